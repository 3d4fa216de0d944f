"""The cluster event bus on RabbitMQ (issue 4), proven with real processes only.

Every test runs two real ``twistd mailcluster`` nodes, A and B, on a Cassandra
keyspace of their own (``tests/cassandra_cluster.py``) and a RabbitMQ vhost of
their own on the project's broker (``tests/rabbitmq_broker.py``), with
``[events] bus = "rabbitmq"``.  Clients are raw sockets (``RawImap``, exact
bytes), smtplib, poplib, pika (to publish garbage) and rabbitmqctl (to look at
queues and bindings).  No mocks, no skips: without Cassandra or rabbitmq-server
these tests fail.

1. an IDLE session on A hears of SMTP deliveries, STOREs, IMAP EXPUNGEs and
   POP3 DELE+QUIT made on B, without sending a command;
2. the selected mailbox renamed on B (the session follows it; INBOX's rename
   expunges its messages, RFC 3501 6.3.5) or deleted on B (``* BYE``);
3. 1,000 IDLE sessions on 50 mailboxes make 50 bindings of the node's queue,
   and none once they logged out;
4. an event of an unknown version, or garbage, is logged and skipped;
5. the broker stopped: mail still flows, sessions catch up from the store,
   and both nodes reconnect and re-bind without a restart;
6. a node killed with SIGKILL leaves no queue and no binding behind;
7. the ``mail-log`` group listener's dead letters, listed and replayed with
   ``mailcluster-admin events``.

Plus two tests at the bus level (real broker, no node): a second
registration on a mailbox whose bind is still on its way waits for that bind;
a connection closed by the broker is re-established and re-bound by itself,
and ``generation()`` moves on (what makes IMAP sessions look at the store).

How an event is told from a poll: an IDLE session also reads the store every
``IDLE_POLL`` (30) seconds while the bus is connected and every ``IDLE_CHECK``
(2) seconds while it is not (or has just reconnected).  So before each change the tests check, with
rabbitmqctl, that node A's queue is bound to the mailbox (which is only the
case while A's bus is connected), and they wait for the untagged response for
less than ``IDLE_POLL`` seconds.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from tests.cassandra_cluster import CassandraService
from tests.helpers.imap import RawImap
from tests.integration.conftest import (
    PASSWORD,
    Deployment,
    Deployments,
    MailNode,
    address,
    make_message,
    message_id_of,
    parallel,
    pop3_login,
    report,
    smtp_deliver,
)
from tests.rabbitmq_broker import Binding, RabbitService, Vhost, eventually
from twisted_mail_cluster.events.model import Added, MailboxAdded, encode
from twisted_mail_cluster.events.rabbitmq import RabbitMQEventBus
from twisted_mail_cluster.imap.server import IDLE_CHECK, IDLE_POLL

pytestmark = pytest.mark.timeout(600)

ALICE = address("alice")
#: How long an untagged response may take to reach an IDLE session on the other
#: node.  Generous (the machine is shared), but below IDLE_POLL: what arrives
#: within it came through the bus, not from the session's periodic look at the store.
EVENTUALLY = 10.0
assert EVENTUALLY < IDLE_POLL
EXCHANGE = "mailcluster.events"


# -- the cluster ---------------------------------------------------------------------------------


@dataclass
class Cluster:
    deployment: Deployment
    vhost: Vhost
    rabbitmq: RabbitService
    a: MailNode
    b: MailNode

    # -- the broker's view

    def bindings(self) -> list[Binding]:
        """Bindings of the events exchange to mailbox keys (``mailbox.<id>``), every queue."""
        return [b for b in self.rabbitmq.bindings(self.vhost.name)
                if b.source == EXCHANGE and b.routing_key.startswith("mailbox.")]

    def keys_of(self, queue: str) -> list[str]:
        """The mailbox ids ``queue`` is bound to, sorted."""
        return sorted(b.routing_key.removeprefix("mailbox.") for b in self.bindings() if b.destination == queue)

    def queue_names(self) -> set[str]:
        return {q.name for q in self.rabbitmq.queues(self.vhost.name)}

    def wait_bound(self, node: MailNode, *mailbox_ids: str, timeout: float = 30.0) -> str:
        """Until the node's current queue is bound to exactly these mailbox ids; the queue name."""

        def bound() -> str | None:
            queue = bus_queue(node)
            return queue if self.keys_of(queue) == sorted(mailbox_ids) else None

        return eventually(bound, timeout, interval=0.2, message=f"{node.name}'s queue bound to {mailbox_ids}")

    # -- the store

    def mailbox_id(self, name: str, owner: str = ALICE) -> str:
        rows = self.deployment.cql("SELECT id FROM {ks}.mailboxes_by_owner WHERE owner = %s AND name = %s",
                                   (owner, name))
        assert len(rows) == 1, (owner, name, rows)
        return str(rows[0]["id"])


def bus_events(node: MailNode, name: str) -> list[dict[str, Any]]:
    return [e for e in node.log_events() if e.get("event") == name]


def bus_queue(node: MailNode) -> str:
    """The queue of the node's current connection (its last ``bus.connected`` log line)."""
    connected = bus_events(node, "bus.connected")
    assert connected, f"node {node.name} never connected to RabbitMQ:\n{node.log_text()[-3000:]}"
    return str(connected[-1]["queue"])


def wait_connected(node: MailNode, times: int = 1, timeout: float = 60.0) -> str:
    """Until the node logged its ``times``-th ``bus.connected``; that connection's queue."""
    eventually(lambda: len(bus_events(node, "bus.connected")) >= times, timeout, interval=0.1,
               message=f"node {node.name} connected to RabbitMQ ({times})")
    return str(bus_events(node, "bus.connected")[times - 1]["queue"])


def start_cluster(deployments: Deployments, service: CassandraService, rabbitmq: RabbitService, prefix: str,
                  users: tuple[str, ...] = ("alice",), per_node: dict[str, dict[str, Any]] | None = None) -> Cluster:
    """Nodes "a" and "b" (``per_node``: options of ``Deployment.start_node`` by node name)."""
    vhost = rabbitmq.unique_vhost(prefix)
    deployment = deployments(service, prefix, events_url=vhost.url)
    deployment.provision(users)
    options = per_node or {}
    a, b = parallel([lambda name=name: deployment.start_node(name, **options.get(name, {})) for name in ("a", "b")],
                    workers=2)
    cluster = Cluster(deployment, vhost, rabbitmq, a, b)
    for node in (a, b):
        wait_connected(node)
    report(f"{prefix}: nodes started in {a.started_in:.1f}s / {b.started_in:.1f}s")
    return cluster


@pytest.fixture
def clusters(deployments: Deployments, cassandra_node: CassandraService,
             rabbitmq: RabbitService) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(prefix: str, **options: Any) -> Cluster:
        cluster = start_cluster(deployments, cassandra_node, rabbitmq, prefix, **options)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.deployment.stop()
            if rabbitmq.is_up():
                rabbitmq.delete_vhost(cluster.vhost.name)
        while RawImap.opened:
            RawImap.opened.pop().close()


# -- IMAP helpers --------------------------------------------------------------------------------


def imap(node: MailNode, user: str = ALICE, timeout: float = 30.0) -> RawImap:
    assert node.imap is not None
    client = RawImap(node.imap, timeout=timeout)
    client.login(user, PASSWORD)
    return client


def idle(client: RawImap, mailbox: bytes = b"INBOX", command: bytes = b"SELECT") -> bytes:
    """SELECT (or EXAMINE) the mailbox and enter IDLE; the SELECT response."""
    response = client.command(b"S", command + b" " + mailbox)
    assert b"\r\nS OK" in b"\r\n" + response, response
    client.send(b"I IDLE\r\n")
    assert client.line() == b"+ idling\r\n"
    return response


def done(client: RawImap) -> bytes:
    client.send(b"DONE\r\n")
    return client.until_tagged(b"I")


def next_lines(client: RawImap, count: int, timeout: float = EVENTUALLY) -> bytes:
    """The next ``count`` lines the server sends, each within ``timeout``."""
    return b"".join(client.line(timeout) for _ in range(count))


def append(client: RawImap, mailbox: bytes, raw: bytes) -> bytes:
    """APPEND with a non-synchronising literal (LITERAL+); the tagged reply."""
    response = client.command(b"A", b"APPEND %s {%d+}\r\n%s" % (mailbox, len(raw), raw))
    assert response.startswith(b"A OK [APPENDUID "), response
    return response


def deliver(node: MailNode, message_id: str, to: str = ALICE) -> None:
    code, text = smtp_deliver(node.smtp, [to], make_message(message_id, recipients=[to]))
    assert code == 250, (code, text)


# -- 1. IDLE on A hears of what B does --------------------------------------------------------------


def test_idle_session_on_a_follows_changes_made_on_b(clusters: Callable[..., Cluster]) -> None:
    cluster = clusters("bus1")
    a, b = cluster.a, cluster.b
    inbox = cluster.mailbox_id("INBOX")
    watcher = imap(a)
    select = idle(watcher)
    assert b"* 0 EXISTS\r\n" in select
    queue_a = cluster.wait_bound(a, inbox)
    assert cluster.keys_of(bus_queue(b)) == []  # B has no session: no binding
    started = time.monotonic()

    # SMTP deliveries on B: EXISTS (and RECENT, this session took \Recent at SELECT).
    for n in range(1, 5):
        deliver(b, f"bus1-{n}@example.test")
        assert next_lines(watcher, 2) == b"* %d EXISTS\r\n* %d RECENT\r\n" % (n, n)

    # STORE on B: an unsolicited FETCH FLAGS.
    other = imap(b)
    other.select(b"INBOX")
    assert other.command(b"F", b"STORE 1 +FLAGS.SILENT (\\Flagged)") == b"F OK Store completed.\r\n"
    assert next_lines(watcher, 1) == b"* 1 FETCH (FLAGS (\\Flagged \\Recent) UID 1)\r\n"

    # STORE \Deleted + EXPUNGE on B.
    assert other.command(b"D", b"STORE 2 +FLAGS.SILENT (\\Deleted)") == b"D OK Store completed.\r\n"
    assert next_lines(watcher, 1) == b"* 2 FETCH (FLAGS (\\Deleted \\Recent) UID 2)\r\n"
    expunged = other.command(b"E", b"EXPUNGE")
    assert expunged == b"* 2 EXPUNGE\r\nE OK Expunge completed.\r\n"
    assert next_lines(watcher, 2) == b"* 2 EXPUNGE\r\n* 3 RECENT\r\n"
    other.command(b"Z", b"LOGOUT")

    # POP3 DELE + QUIT on B (message 1 of the maildrop is UID 1).
    pop = pop3_login(b.pop3, ALICE)
    assert pop.stat()[0] == 3
    assert message_id_of(b"\r\n".join(pop.retr(1)[1])) == "bus1-1@example.test"
    assert pop.dele(1).startswith(b"+OK")
    assert pop.quit().startswith(b"+OK")
    assert next_lines(watcher, 2) == b"* 1 EXPUNGE\r\n* 2 RECENT\r\n"
    in_idle = time.monotonic() - started

    # The session's view is the store's.
    assert done(watcher) == b"I OK Idle completed.\r\n"
    fetched = watcher.command(b"F", b"FETCH 1:* (UID FLAGS)")
    assert fetched == (b"* 1 FETCH (UID 3 FLAGS (\\Recent))\r\n* 2 FETCH (UID 4 FLAGS (\\Recent))\r\n"
                       b"F OK Fetch completed.\r\n")
    assert bus_queue(a) == queue_a  # one connection all along
    report(f"idle: 8 changes on B seen in IDLE on A in {in_idle:.1f}s")


# -- 2. the selected mailbox renamed or deleted on B -----------------------------------------------------


def test_selected_mailbox_renamed_on_b(clusters: Callable[..., Cluster]) -> None:
    cluster = clusters("bus2r")
    a, b = cluster.a, cluster.b
    other = imap(b)
    assert other.command(b"C", b"CREATE Projects") == b"C OK Create completed.\r\n"
    append(other, b"Projects", make_message("p1@example.test"))
    projects = cluster.mailbox_id("Projects")

    watcher = imap(a)
    select = idle(watcher, b"Projects")
    assert b"* 1 EXISTS\r\n" in select
    uidvalidity = re.search(rb"\[UIDVALIDITY (\d+)\]", select)
    assert uidvalidity is not None
    cluster.wait_bound(a, projects)

    # RENAME keeps the mailbox (its id, UIDs and UIDVALIDITY): the session on A
    # stays selected, nothing is said, and it keeps hearing of its changes
    # under the new name - the next thing it hears is the message APPENDed to
    # "Archive" on B, no BYE, no EXPUNGE.
    assert other.command(b"R", b"RENAME Projects Archive") == b"R OK Rename completed.\r\n"
    assert cluster.mailbox_id("Archive") == projects
    appended = append(other, b"Archive", make_message("p2@example.test"))
    assert appended.startswith(b"A OK [APPENDUID " + uidvalidity.group(1) + b" 2]")
    assert next_lines(watcher, 2) == b"* 2 EXISTS\r\n* 2 RECENT\r\n"
    assert done(watcher) == b"I OK Idle completed.\r\n"
    listing = watcher.command(b"L", b'LIST "" "*"')
    assert b'"Archive"\r\n' in listing and b'"Projects"' not in listing
    status = watcher.command(b"N", b"NOOP")
    assert status == b"N OK NOOP completed.\r\n"
    fetched = watcher.command(b"F", b"UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    assert fetched.count(b"Message-ID: <p1@example.test>") == 1
    assert fetched.count(b"Message-ID: <p2@example.test>") == 1
    assert fetched.endswith(b"F OK Fetch completed.\r\n")
    watcher.command(b"Z", b"LOGOUT")

    # Renaming INBOX moves its messages to a new mailbox and leaves INBOX
    # empty (RFC 3501 6.3.5): an IDLE session on INBOX sees them expunged,
    # and INBOX goes on receiving mail.
    deliver(b, "inbox1@example.test")
    deliver(b, "inbox2@example.test")
    inbox = cluster.mailbox_id("INBOX")
    watcher = imap(a)
    assert b"* 2 EXISTS\r\n" in idle(watcher, b"INBOX", b"EXAMINE")
    cluster.wait_bound(a, inbox)
    assert other.command(b"R", b"RENAME INBOX Old-Inbox") == b"R OK Rename completed.\r\n"
    assert next_lines(watcher, 2) == b"* 1 EXPUNGE\r\n* 1 EXPUNGE\r\n"
    assert cluster.mailbox_id("INBOX") == inbox
    deliver(b, "inbox3@example.test")
    assert next_lines(watcher, 1) == b"* 1 EXISTS\r\n"
    assert done(watcher) == b"I OK Idle completed.\r\n"
    moved = watcher.command(b"M", b"STATUS Old-Inbox (MESSAGES)")
    assert moved == b'* STATUS "Old-Inbox" (MESSAGES 2)\r\nM OK Status completed.\r\n'


def test_selected_mailbox_deleted_on_b(clusters: Callable[..., Cluster]) -> None:
    cluster = clusters("bus2d")
    a, b = cluster.a, cluster.b
    bye = b"* BYE Selected mailbox was deleted, have to disconnect.\r\n"
    other = imap(b)
    for name in (b"Doomed", b"Doomed2", b"Doomed3"):
        assert other.command(b"C", b"CREATE " + name) == b"C OK Create completed.\r\n"
    append(other, b"Doomed2", make_message("d2@example.test"))

    idler, busy, full = imap(a), imap(a), imap(a)
    idle(idler, b"Doomed")
    busy.select(b"Doomed3")
    idle(full, b"Doomed2")
    cluster.wait_bound(a, *(cluster.mailbox_id(n) for n in ("Doomed", "Doomed2", "Doomed3")))

    # In IDLE: BYE at once, and the connection closes (as on one node).
    assert other.command(b"D", b"DELETE Doomed") == b"D OK Delete completed.\r\n"
    assert idler.rest(EVENTUALLY) == bye

    # A mailbox with a message: its expunge may be reported before the BYE.
    assert other.command(b"E", b"DELETE Doomed2") == b"E OK Delete completed.\r\n"
    rest = full.rest(EVENTUALLY)
    assert re.fullmatch(rb"(\* 1 EXPUNGE\r\n)?" + re.escape(bye), rest), rest

    # Not idling: the BYE comes at the end of the next command, without a
    # tagged reply (whether the event came first or NOOP found the mailbox
    # gone from the store).
    assert other.command(b"F", b"DELETE Doomed3") == b"F OK Delete completed.\r\n"
    busy.send(b"N NOOP\r\nM NOOP\r\n")
    assert busy.rest(EVENTUALLY) == bye
    errors = [e for e in a.log_events() if e.get("level") in ("error", "critical")]
    assert errors == []


# -- 3. 1,000 IDLE sessions on 50 mailboxes: 50 bindings ------------------------------------------------

SESSIONS = 1000
MAILBOXES = 50


def raise_open_files(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (up to the hard limit) so that it and
    the twistd nodes it starts, which inherit it, can hold ``needed`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    assert soft == resource.RLIM_INFINITY or soft >= needed, f"RLIMIT_NOFILE {soft} < {needed} (hard {hard})"
    return soft


def open_files_limit(pid: int) -> int | None:
    """The soft 'Max open files' of a running process (None: unlimited)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def test_thousand_idle_sessions_on_fifty_mailboxes_make_fifty_bindings(clusters: Callable[..., Cluster]) -> None:
    needed = 2 * SESSIONS + 500  # the client ends here, the server ends in node A, plus slack
    raise_open_files(needed)
    cluster = clusters("bus3")
    a, b = cluster.a, cluster.b
    assert a.process is not None
    node_limit = open_files_limit(a.process.pid)
    assert node_limit is None or node_limit >= SESSIONS + 200, node_limit

    names = [b"Box%02d" % i for i in range(MAILBOXES)]
    admin = imap(a)
    for name in names:
        assert admin.command(b"C", b"CREATE " + name) == b"C OK Create completed.\r\n"
    admin.command(b"Z", b"LOGOUT")
    ids = {name: cluster.mailbox_id(name.decode()) for name in names}

    def open_session(i: int) -> RawImap:
        client = imap(a, timeout=120)
        idle(client, names[i % MAILBOXES], b"EXAMINE")
        return client

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=40) as pool:
        sessions = list(pool.map(open_session, range(SESSIONS)))
    opened_in = time.monotonic() - t0

    # One binding per mailbox for node A's queue, whatever the number of sessions.
    queue_a = cluster.wait_bound(a, *ids.values())
    bindings = cluster.bindings()
    assert len([x for x in bindings if x.destination == queue_a]) == MAILBOXES
    assert cluster.keys_of(bus_queue(b)) == []
    assert len(bindings) == MAILBOXES

    # One binding serves all the sessions on its mailbox.
    append(imap(b), b"Box07", make_message("fanout@example.test"))
    on_box07 = [s for i, s in enumerate(sessions) if i % MAILBOXES == 7]
    assert len(on_box07) == SESSIONS // MAILBOXES
    for session in on_box07:
        assert session.line(EVENTUALLY) == b"* 1 EXISTS\r\n"
    for i, session in enumerate(sessions):
        if i % MAILBOXES != 7:  # nothing for the others (what was sent by now is in their buffer)
            session.sock.setblocking(False)
            try:
                stray = session.sock.recv(65536)
            except BlockingIOError:
                stray = b""
            session.sock.setblocking(True)
            assert session.buffer + stray == b"", (i, stray)

    # All leave: the sessions on the first 25 mailboxes log out, those on the
    # other 25 just drop their connection in the middle of IDLE.  The bindings go.
    def leave(i: int) -> bytes:
        session = sessions[i]
        if i % MAILBOXES >= MAILBOXES // 2:
            session.close()
            return b""
        session.send(b"DONE\r\nZ LOGOUT\r\n")
        reply = session.until_tagged(b"I", b"Z")
        session.close()
        return reply

    t1 = time.monotonic()
    with ThreadPoolExecutor(max_workers=40) as pool:
        replies = list(pool.map(leave, range(SESSIONS)))
    assert set(replies) == {b"", b"I OK Idle completed.\r\n* BYE Logging out\r\nZ OK Logout completed.\r\n"}
    eventually(lambda: cluster.bindings() == [], 30, interval=0.5, message="no mailbox binding left")
    unbound_in = time.monotonic() - t1
    assert bus_queue(a) == queue_a and queue_a in cluster.queue_names()  # the node's queue stays
    assert a.alive()
    report(f"1000 sessions: opened and IDLE in {opened_in:.1f}s, {MAILBOXES} bindings; "
           f"logged out and unbound in {unbound_in:.1f}s; node open-files limit {node_limit}")


# -- 4. unknown versions and garbage are logged and skipped -------------------------------------------------


def test_unknown_or_garbage_events_are_logged_and_skipped(clusters: Callable[..., Cluster]) -> None:
    cluster = clusters("bus4")
    a, b = cluster.a, cluster.b
    inbox = cluster.mailbox_id("INBOX")
    watcher = imap(a)
    idle(watcher, b"INBOX", b"EXAMINE")
    queue_a = cluster.wait_bound(a, inbox)

    real = json.loads(encode(Added(uuid.UUID(inbox), ALICE, uids=(1,), message_ids=(uuid.uuid4(),), modseq=1)))
    future = {**real, "version": 2, "new_field": [1, 2]}
    unknown_type = {**real, "type": "Exploded"}
    malformed = {**real, "uids": "1"}
    bodies = {
        "unknown event version 2": json.dumps(future).encode(),
        "not JSON": b"\x00\xff\xfe garbage \x81",
        "unknown event type 'Exploded'": json.dumps(unknown_type).encode(),
        "malformed Added event": json.dumps(malformed).encode(),
        "not a JSON object": b"[1, 2, 3]",
        "unknown event version None": b"{}",
    }
    connection = pika.BlockingConnection(pika.URLParameters(cluster.vhost.url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # each publish returns once the broker routed it
        for body in bodies.values():
            channel.basic_publish(EXCHANGE, f"mailbox.{inbox}", body, mandatory=True)
    finally:
        connection.close()

    skipped = eventually(lambda: len(bus_events(a, "event.skipped")) >= len(bodies) and bus_events(a, "event.skipped"),
                         30, message="A logged every bad event")
    assert len(skipped) == len(bodies)
    for (expected, body), event in zip(bodies.items(), skipped):
        assert event["reason"].startswith(expected), (expected, event)
        assert event["size"] == len(body)
        assert event["level"] == "warning"
    assert bus_events(b, "event.skipped") == []  # B has no binding to that mailbox
    assert a.alive() and bus_queue(a) == queue_a  # no crash, no reconnection
    queue = cluster.rabbitmq.queue(queue_a, cluster.vhost.name)
    assert queue is not None and queue.messages == 0  # taken and acknowledged, not left to pile up

    # The session heard nothing of them, and still hears of real changes.
    deliver(b, "after-garbage@example.test")
    assert next_lines(watcher, 1) == b"* 1 EXISTS\r\n"
    assert done(watcher) == b"I OK Idle completed.\r\n"


# -- 5. the broker stopped and started again -----------------------------------------------------------------


def log_time(event: dict[str, Any]) -> float:
    """A node log line's timestamp as a POSIX time."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_broker_outage_and_recovery_without_restart(clusters: Callable[..., Cluster], rabbitmq: RabbitService) -> None:
    cluster = clusters("bus5")
    a, b = cluster.a, cluster.b
    inbox = cluster.mailbox_id("INBOX")
    before = imap(a)  # in IDLE from before the outage to after it
    idle(before, b"INBOX", b"EXAMINE")
    selected = imap(a)  # selected, not idling
    selected.select(b"INBOX")
    queue_a = cluster.wait_bound(a, inbox)
    queue_b = bus_queue(b)
    a_pid, b_pid = a.process.pid, b.process.pid  # type: ignore[union-attr]

    stopped = time.time()
    try:
        assert rabbitmq.stop()
        stop_took = time.time() - stopped
        for node in (a, b):
            eventually(lambda node=node: bus_events(node, "bus.disconnected"), 30,
                       message=f"{node.name} saw the broker go")

        # Mail still flows: the store is the truth, the event is dropped (and logged).
        deliver(b, "outage1@example.test")
        assert bus_events(b, "event.dispatch_failed"), "B should log the event it could not send"
        pop = pop3_login(a.pop3, ALICE)
        assert pop.stat()[0] == 1
        assert message_id_of(b"\r\n".join(pop.retr(1)[1])) == "outage1@example.test"
        assert pop.quit().startswith(b"+OK")

        # A selected session catches up from the store at its next command.
        assert selected.command(b"N", b"NOOP") == b"* 1 EXISTS\r\n* 1 RECENT\r\nN OK NOOP completed.\r\n"
        # A new session works, and may IDLE too (it registers; the bind waits for the broker).
        during = imap(a)
        assert b"* 1 EXISTS\r\n" in idle(during, b"INBOX", b"EXAMINE")
        # The IDLE session does not wait for events that cannot come: it looks
        # at the store every IDLE_CHECK seconds while the bus is down.
        assert next_lines(before, 1, IDLE_CHECK + EVENTUALLY) == b"* 1 EXISTS\r\n"
        assert bus_queue(a) == queue_a  # no new connection while the broker is away
    finally:
        if not rabbitmq.is_up():
            rabbitmq.start()
    up = time.time()
    outage = up - stopped

    # Both nodes reconnect by themselves (backoff), declare again and re-bind.
    queue_a2 = wait_connected(a, 2, timeout=60)
    queue_b2 = wait_connected(b, 2, timeout=60)
    reconnected = {n.name: log_time(bus_events(n, "bus.connected")[1]) - up for n in (a, b)}
    assert queue_a2 != queue_a and queue_b2 != queue_b  # new exclusive queues (the old ones died with the broker)
    assert cluster.wait_bound(a, inbox) == queue_a2
    rebound = time.time() - up
    assert cluster.keys_of(queue_b2) == []
    assert cluster.queue_names() == {queue_a2, queue_b2}
    assert a.process is not None and a.process.pid == a_pid and a.alive()
    assert b.process is not None and b.process.pid == b_pid and b.alive()
    attempts = {n.name: len(bus_events(n, "bus.disconnected")) for n in (a, b)}

    # Events flow again: to the session in IDLE since before the outage, to the
    # one opened during it, and to one opened now.  Within EVENTUALLY (< IDLE_POLL)
    # seconds: through the bus, not from a poll.
    after = imap(a)
    idle(after, b"INBOX", b"EXAMINE")
    deliver(b, "outage2@example.test")
    for session in (before, during, after):
        assert next_lines(session, 1) == b"* 2 EXISTS\r\n"
    assert selected.command(b"N", b"NOOP") == b"* 2 EXISTS\r\n* 2 RECENT\r\nN OK NOOP completed.\r\n"
    for session in (before, during, after):
        assert done(session) == b"I OK Idle completed.\r\n"
    report(f"broker outage {outage:.1f}s (stop took {stop_took:.1f}s); after it was back, bus.connected in "
           f"A {reconnected['a']:+.1f}s, B {reconnected['b']:+.1f}s; A's binding seen by rabbitmqctl "
           f"{rebound:.1f}s after; bus.disconnected lines {attempts}")


# -- 6. a killed node leaves nothing behind -------------------------------------------------------------------


def test_killed_node_leaves_no_queue_or_binding(clusters: Callable[..., Cluster]) -> None:
    cluster = clusters("bus6")
    a, b = cluster.a, cluster.b
    watcher = imap(a)
    assert watcher.command(b"C", b"CREATE Other") == b"C OK Create completed.\r\n"
    idle(watcher, b"Other", b"EXAMINE")
    idle(imap(a), b"INBOX", b"EXAMINE")
    queue_a = cluster.wait_bound(a, cluster.mailbox_id("INBOX"), cluster.mailbox_id("Other"))
    queue_b = bus_queue(b)
    assert cluster.queue_names() == {queue_a, queue_b}

    assert a.process is not None
    t0 = time.monotonic()
    a.process.send_signal(signal.SIGKILL)
    assert a.process.wait(30) == -signal.SIGKILL

    def gone() -> bool:
        names = cluster.queue_names()
        left = [x for x in cluster.rabbitmq.bindings(cluster.vhost.name, include_default=True)
                if x.destination == queue_a]
        return queue_a not in names and not left

    eventually(gone, 60, interval=0.2, message="the killed node's queue and bindings gone")
    vanished_in = time.monotonic() - t0
    assert cluster.queue_names() == {queue_b}
    assert cluster.bindings() == []
    # B goes on: its connection and queue are untouched, and it still takes mail.
    assert b.alive() and bus_queue(b) == queue_b
    deliver(b, "after-kill@example.test")
    report(f"SIGKILLed node: its queue and {2} bindings gone after {vanished_in:.1f}s "
           f"(rabbitmqctl polls included; heartbeat is 10s)")


# -- a registration fires once its events are routed, even when another one started the bind ---------------


@pytest_twisted.ensureDeferred
async def test_registration_on_a_key_being_bound_waits_for_the_bind(rabbitmq: RabbitService) -> None:
    """Two sessions of one node SELECT the same mailbox at once: the second must
    not read the store before the node's queue is bound (IEventBus.register), or
    a change made on another node in between reaches neither its snapshot nor it.
    (Found while writing this suite: the second registration used to fire at
    once, while the first one's queue.bind was still on its way.)"""
    vhost = rabbitmq.unique_vhost("bus0")
    bus = RabbitMQEventBus(vhost.url, reactor)
    await bus.start()
    try:
        await bus.when_connected()
        # (out of ClientService's whenConnected callbacks: a stop() from in there is re-entrant)
        await deferLater(reactor, 0, lambda: None)
        key = uuid.uuid4()
        first_seen: list[Any] = []
        second_seen: list[Any] = []
        first = bus.register(first_seen.append, str(key))
        second = bus.register(second_seen.append, str(key))
        assert not second.called, "fired before the broker could have bound the queue"
        registration = await second
        first_registration = await first
        # And events are routed to it now: publish from another connection.
        sender = RabbitMQEventBus(vhost.url, reactor)
        await sender.start()
        try:
            await sender.when_connected()
            await deferLater(reactor, 0, lambda: None)
            await sender.dispatch(MailboxAdded(key, ALICE, name="x"))
        finally:
            await sender.stop()
        deadline = reactor.seconds() + EVENTUALLY
        while not second_seen and reactor.seconds() < deadline:
            await deferLater(reactor, 0.01, lambda: None)
        assert [e.key for e in second_seen] == [str(key)] and first_seen == second_seen
        await registration.unregister()
        await first_registration.unregister()
    finally:
        await bus.stop()
        rabbitmq.delete_vhost(vhost.name)


@pytest_twisted.ensureDeferred
async def test_a_reconnection_changes_the_generation_and_routes_again(rabbitmq: RabbitService) -> None:
    """The broker closes the node's connection (as it does when it restarts): the
    bus reconnects by itself, re-binds its keys, and its generation() moves on,
    which is what tells IMAP sessions that events may have been lost meanwhile
    and that they must look at the store.  The same when the broker cancels the
    node's consumer (its queue was deleted) on a connection that stays open."""
    vhost = rabbitmq.unique_vhost("busgen")
    bus = RabbitMQEventBus(vhost.url, reactor)
    sender = RabbitMQEventBus(vhost.url, reactor)
    await bus.start()
    await sender.start()
    try:
        await bus.when_connected()
        await sender.when_connected()
        await deferLater(reactor, 0, lambda: None)
        key = uuid.uuid4()
        seen: list[Any] = []
        registration = await bus.register(seen.append, str(key))
        first = bus.generation()
        assert bus.connected() and first >= 1
        await sender.dispatch(MailboxAdded(key, ALICE, name="before"))

        async def until(check: Callable[[], bool], what: str) -> None:
            deadline = reactor.seconds() + 30
            while not check():
                assert reactor.seconds() < deadline, what
                await deferLater(reactor, 0.05, lambda: None)

        await until(lambda: len(seen) == 1, "the event before")
        assert bus.generation() == first  # events flowing do not change it

        await threads.deferToThread(
            rabbitmq.ctl, "close_all_connections", "-p", vhost.name, "test: connection closed by the broker"
        )
        await until(lambda: not bus.connected(), "the bus noticed")
        await until(lambda: bus.connected() and sender.connected(), "both reconnected")
        assert bus.generation() == first + 1
        await sender.dispatch(MailboxAdded(key, ALICE, name="after"))
        await until(lambda: len(seen) == 2, "the event after the reconnection")
        assert [e.name for e in seen] == ["before", "after"]

        # An operator deletes the node's queue: the broker cancels its consumer
        # (the connection stays open); the bus starts over instead of going deaf.
        queue = bus._queue_name
        assert queue is not None
        await threads.deferToThread(rabbitmq.ctl, "delete_queue", "-p", vhost.name, queue)
        await until(lambda: bus.generation() == first + 2 and bus.connected(), "set up again")
        assert bus._queue_name != queue
        await sender.dispatch(MailboxAdded(key, ALICE, name="after the queue was deleted"))
        await until(lambda: len(seen) == 3, "the event after the queue came back")
        await registration.unregister()
    finally:
        await sender.stop()
        await bus.stop()
        rabbitmq.delete_vhost(vhost.name)


# -- 7. the mail-log group listener's dead letters, with the admin CLI --------------------------------------------

MAIL_LOG_GROUP = "mail-log"


def mail_log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def test_mail_log_dead_letters_listed_and_replayed_with_the_admin_cli(
    clusters: Callable[..., Cluster], tmp_path: Path
) -> None:
    # Each node appends to a file of its own.  The directories must exist at
    # start (a node refuses to start otherwise): they are moved away once the
    # nodes run, so that every write fails (ENOENT), and moved back later.
    log_dirs = {name: tmp_path / f"mail-log-{name}" for name in ("a", "b")}
    for directory in log_dirs.values():
        directory.mkdir()
    files = {name: directory / "mail-log.jsonl" for name, directory in log_dirs.items()}
    cluster = clusters("bus7", per_node={name: {"mail_log": path} for name, path in files.items()})
    a, b = cluster.a, cluster.b
    group_queue = f"mailcluster.group.{MAIL_LOG_GROUP}"
    dead_queue = f"{group_queue}.dead"

    def queue(name: str) -> Any:
        found = cluster.rabbitmq.queue(name, cluster.vhost.name)
        assert found is not None, f"no queue {name}"
        return found

    eventually(lambda: queue(group_queue).consumers == 2, 30, interval=0.5, message="both nodes consume mail-log")
    assert queue(group_queue).durable and queue(dead_queue).durable

    def logged() -> list[dict[str, Any]]:
        lines = []
        for name, path in files.items():
            for line in mail_log_lines(path):
                assert line["node"] == f"{name}.example.test", line  # the node that wrote it
                lines.append(line)
        return lines

    # Working: one line per event, once for the cluster.
    deliver(a, "ok-1@example.test")
    first = eventually(logged, 30, message="the first Added logged")
    assert [(e["event"], e["owner"], e["uids"]) for e in first] == [("Added", ALICE, [1])]

    # Writes fail: retries, then dead letters.
    away = {name: directory.with_name(directory.name + ".away") for name, directory in log_dirs.items()}
    for name, directory in log_dirs.items():
        directory.rename(away[name])
    deliver(a, "dead-1@example.test")
    deliver(b, "dead-2@example.test")
    deliver(b, "dead-3@example.test")
    t0 = time.monotonic()

    def dead_letters() -> list[dict[str, Any]]:
        out = cluster.deployment.admin("events", "dead-letters", MAIL_LOG_GROUP).stdout
        return [json.loads(line) for line in out.splitlines()]

    dead = eventually(lambda: len(dead_letters()) >= 3 and dead_letters(), 120, interval=2.0,
                      message="3 dead letters")
    dead_in = time.monotonic() - t0
    assert len(dead) == 3
    inbox = cluster.mailbox_id("INBOX")
    assert sorted((e["type"], e["version"], e["mailbox_id"], e["owner"], tuple(e["uids"])) for e in dead) == [
        ("Added", 1, inbox, ALICE, (uid,)) for uid in (2, 3, 4)
    ]
    dead_ids = {e["event_id"] for e in dead}
    assert len(dead_ids) == 3
    # Listing takes nothing away; the group queue is drained (all retries spent).
    assert dead_letters() == dead
    assert queue(dead_queue).messages == 3
    assert queue(group_queue).messages == 0
    retries = sum(len(bus_events(node, "event.retry")) for node in (a, b))
    buried = [e for node in (a, b) for e in bus_events(node, "event.dead_letter")]
    assert retries == 3 * 5 and len(buried) == 3, (retries, buried)
    assert all(e["group"] == MAIL_LOG_GROUP and "No such file or directory" in e["error"] for e in buried)
    # Nothing was written meanwhile, neither where the files were moved nor anywhere else.
    assert [line for name in files for line in mail_log_lines(away[name] / files[name].name)] == first
    assert not any(directory.exists() for directory in log_dirs.values())

    # The cause fixed, the admin replays them: each is logged (at least once), and the dead queue is empty.
    for name, directory in log_dirs.items():
        away[name].rename(directory)
    replay = cluster.deployment.admin("events", "replay", MAIL_LOG_GROUP)
    assert replay.stdout == f"3 dead letters handed to {MAIL_LOG_GROUP} again\n"

    def replayed() -> list[dict[str, Any]] | None:
        lines = logged()
        return lines if dead_ids <= {e["event_id"] for e in lines} else None

    lines = eventually(replayed, 30, message="every dead letter logged after the replay")
    later = [e for e in lines if e["event_id"] in dead_ids]
    assert sorted(e["uids"][0] for e in {e["event_id"]: e for e in later}.values()) == [2, 3, 4]
    assert {e["event_id"] for e in lines} == dead_ids | {first[0]["event_id"]}  # nothing else
    assert all(e["event"] == "Added" and e["mailbox_id"] == inbox for e in later)
    assert dead_letters() == []
    assert queue(dead_queue).messages == 0
    assert a.alive() and b.alive()
    by_node = {name: len(mail_log_lines(path)) for name, path in files.items()}
    report(f"mail-log: 3 events dead-lettered {dead_in:.1f}s after delivery ({retries} retries); "
           f"replayed: {len(later)} lines for 3 events; lines per node {by_node}")
