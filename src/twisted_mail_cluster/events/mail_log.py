"""The ``mail-log`` group listener: one JSON line per mailbox event, once per cluster.

What Dovecot's mail_log plugin gives an operator (who saved, expunged or
flagged what in which mailbox, and which mailboxes were created, renamed or
deleted), for a whole cluster: the listener is a *group* listener, so each
event is written by one node only, whichever took it from the group's queue.
Point every node's ``events.mail_log`` at the same shared file, or collect
each node's file with your log shipper.

Delivery is at least once: after a node dies half-way through, an event can be
written twice; ``event_id`` tells the copies apart.  A failed write (a full
disk, a missing directory) fails the listener, so the bus retries the event
with backoff and, after the last retry, keeps it among the group's dead
letters (``mailcluster-admin events dead-letters mail-log``) until an admin
replays it (``mailcluster-admin events replay mail-log``).  Events dispatched
while the bus is down are not logged: the bus is a notification channel and
the store, not this log, is the record of what the mailboxes hold.

The file is opened for each line, in append mode: log rotation only has to
move it away, and a line is one ``write`` so concurrent writers (threads of
this node, other nodes on a shared file system with O_APPEND) do not
interleave within a line.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from .model import Event, encode

#: The group name (its RabbitMQ queues are ``<prefix>.group.mail-log`` and ``....dead``).
GROUP = "mail-log"


def mail_log_line(event: Event, node: str, now: datetime | None = None) -> bytes:
    """The event's wire fields (without ``version``) after ``logged_at`` and ``node``.

    ``logged_at`` is when this line was written, not when the change was made:
    a replayed dead letter is logged at the time of the replay.
    """
    fields = json.loads(encode(event))
    fields.pop("version", None)
    line = {
        "logged_at": (now or datetime.now(timezone.utc)).isoformat(timespec="milliseconds"),
        "node": node,
        "event": fields.pop("type"),
        **fields,
    }
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


class MailLog:
    """A group listener appending :func:`mail_log_line` lines to ``path``.

    The write runs in the reactor's thread pool: a slow disk or NFS must not
    stall every session of the node.
    """

    def __init__(self, path: Path, node: str, reactor: Any) -> None:
        self.path = path
        self.node = node
        self._reactor = reactor

    def __call__(self, event: Event) -> Deferred[None]:
        line = mail_log_line(event, self.node)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._append, line)

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            written = os.write(fd, line)
            if written != len(line):  # a full disk part-way through the line
                raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
        finally:
            os.close(fd)
