"""The ``mail-log`` group listener: one JSON line per mailbox event, once per cluster.

What Dovecot's mail_log plugin gives an operator (who saved, expunged or
flagged what in which mailbox, and which mailboxes were created, renamed or
deleted), for a whole cluster: the listener is a *group* listener, so each
event is written by one node only, whichever took it from the group's queue.
Give each node a file of its own and collect them with your log shipper (a
shared file on NFS is not safe: appends from several clients can interleave).

Delivery is at least once: after a node dies half-way through, an event can be
written twice; ``event_id`` tells the copies apart.  A failed write (a full
disk, a missing directory) fails the listener, so the bus retries the event
with backoff and, after the last retry, keeps it among the group's dead
letters (``mailcluster-admin events dead-letters mail-log``) until an admin
replays it (``mailcluster-admin events replay mail-log``).  Events dispatched
while the bus is down are not logged: the bus is a notification channel and
the store, not this log, is the record of what the mailboxes hold.

The file is opened for each line, in append mode, so log rotation only has
to move it away.  A node writes one line at a time, in the order it took the
events, so a hung disk ties up one thread of the reactor's pool, not all of
them (they also hash passwords and parse messages).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
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
        self._one_at_a_time = DeferredLock()

    def __call__(self, event: Event) -> Deferred[None]:
        return self._one_at_a_time.run(self._write, event)

    def _write(self, event: Event) -> Deferred[None]:
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
