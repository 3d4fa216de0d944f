"""The Cassandra backend's promises, proven with real processes only.

Real Apache Cassandra nodes (tools/cassandra.py, via tests/cassandra_cluster.py),
real ``twistd mailcluster`` processes (tests/integration/conftest.py), driven by
smtplib, poplib, imaplib and raw sockets.  No mocks, no skips: without Java,
Maven, the jars or cassandra-driver these tests fail.

1. the POP3 path runs no lightweight transaction (read from ``system.paxos``);
2. IMAP UIDs stay exact when two nodes deliver and APPEND at once;
3. two nodes serve the same mailboxes;
4. with the second datacenter down, POP3 keeps working, and what IMAP does;
5. Cassandra down: temporary errors in bounded time, nothing lost, recovery
   without restarting twistd;
6. corrupted content is refused, never served;
7. garbage collection of content no message refers to.
"""

from __future__ import annotations

import imaplib
import os
import re
import signal
import smtplib
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from tests.cassandra_cluster import CassandraService, tool
from tests.helpers.imap import RawImap
from tests.integration.conftest import (
    DOMAIN,
    PASSWORD,
    SENDER,
    Deployment,
    Deployments,
    big_body,
    make_message,
    message_id_of,
    parallel,
    paxos_state,
    pop3_cycle,
    pop3_login,
    pop3_reply,
    report,
    smtp_deliver,
    smtp_deliver_many,
)
from twisted_mail_cluster.store.cassandra.connection import REQUEST_TIMEOUT

pytestmark = pytest.mark.timeout(900)


# -- 1. zero LWT on the POP3 path ------------------------------------------------------------------


def recipients_for(i: int, users: list[str]) -> list[str]:
    """Message i goes to one user, every third also to a second, every fifth to a third."""
    n = len(users)
    chosen = [users[i % n]]
    if i % 3 == 0:
        chosen.append(users[(i + 7) % n])
    if i % 5 == 0:
        chosen.append(users[(i + 13) % n])
    return list(dict.fromkeys(chosen))


def deliver_and_pop(deployment: Deployment, users: list[str], messages: int, prefix: str) -> dict[str, Any]:
    """SMTP-deliver ``messages`` messages (several recipients each) through one
    node, then a full POP3 cycle per user; check that every message arrived
    exactly once and was deleted.  Returns figures."""
    node = deployment.nodes[0]
    expected: dict[str, list[str]] = {u: [] for u in users}
    transactions = []
    for i in range(messages):
        message_id = f"{prefix}-{i}@{DOMAIN}"
        recipients = recipients_for(i, users)
        for r in recipients:
            expected[r].append(message_id)
        transactions.append((recipients, make_message(message_id, f"message {i}", recipients=recipients)))
    t0 = time.monotonic()
    replies = smtp_deliver_many(node.smtp, transactions, workers=8)
    smtp_seconds = time.monotonic() - t0
    assert [code for code, _ in replies] == [250] * messages, Counter(r for r in replies)

    t0 = time.monotonic()
    cycles = {u: c for u, c in zip(users, _pop3_all(node.pop3, users))}
    pop3_seconds = time.monotonic() - t0
    for user, cycle in cycles.items():
        want = expected[user]
        assert cycle.count == len(want), user
        assert sorted(cycle.sizes) == sorted(cycle.uidls) == list(range(1, len(want) + 1)), user
        assert cycle.octets == sum(cycle.sizes.values())
        assert sorted(cycle.message_ids()) == sorted(want), user
        for number, raw in cycle.messages.items():
            assert len(raw) == cycle.sizes[number]  # LIST sizes are the exact RETR sizes
        uidls = list(cycle.uidls.values())
        assert len(set(uidls)) == len(uidls)
        assert all(uuid.UUID(u).version == 1 for u in uidls)  # TimeUUID message ids
        assert cycle.quit_reply == b"+OK Logging out."
    # every message was deleted
    for user in users:
        client = pop3_login(node.pop3, user)
        assert client.stat() == (0, 0), user
        client.quit()
    return {
        "deliveries": sum(len(v) for v in expected.values()),
        "smtp_seconds": smtp_seconds,
        "pop3_seconds": pop3_seconds,
    }


def _pop3_all(port: int, users: list[str]) -> list[Any]:
    return parallel([lambda u=u: pop3_cycle(port, u) for u in users], workers=4)


def test_pop3_path_runs_no_lightweight_transaction(
    cassandra_two_dc: CassandraService, deployments: Deployments
) -> None:
    """IMAP disabled, two datacenters: delivery and POP3 leave system.paxos untouched on every node."""
    service = cassandra_two_dc
    deployment = deployments(service, "zerolwt", imap=False, replication={"dc1": 1, "dc2": 1})
    t0 = time.monotonic()
    users = deployment.provision([f"user{i:02d}" for i in range(20)])
    provisioned = time.monotonic() - t0
    nodes = service.all_addresses()
    assert len(nodes) == 2
    own_tables = deployment.table_ids()

    before = paxos_state(service, nodes)
    # provisioning used LWT (IF NOT EXISTS on users and mailboxes): on both nodes
    for node in nodes:
        assert sum(1 for (_, table) in before[node] if table in own_tables) > 0

    deployment.start_node("pop1")  # connecting and checking the schema: no LWT either
    figures = deliver_and_pop(deployment, users, messages=300, prefix="zero")

    after = paxos_state(service, nodes)
    for node in nodes:
        assert len(after[node]) == len(before[node]), node  # the counts
        assert after[node] == before[node], node  # and not one ballot moved
    # nothing is left of the messages but their content (garbage collection's job)
    assert deployment.cql("SELECT count(*) AS n FROM {ks}.pop3_view")[0]["n"] == 0
    assert deployment.cql("SELECT count(*) AS n FROM {ks}.messages")[0]["n"] == 0
    assert deployment.cql("SELECT count(*) AS n FROM {ks}.blob_refs")[0]["n"] == 0
    assert deployment.cql("SELECT count(*) AS n FROM {ks}.blobs")[0]["n"] == 300  # one copy per message
    report(
        f"zero-LWT: provisioning 20 users {provisioned:.1f}s; 300 messages = {figures['deliveries']} "
        f"deliveries in {figures['smtp_seconds']:.1f}s ({300 / figures['smtp_seconds']:.0f} msg/s); "
        f"POP3 cycles {figures['pop3_seconds']:.1f}s; "
        f"system.paxos rows per node {dict((n, len(after[n])) for n in nodes)}"
    )


def test_imap_view_does_add_paxos_rows(cassandra_two_dc: CassandraService, deployments: Deployments) -> None:
    """The control: the same scenario with the IMAP view maintained does run Paxos rounds."""
    service = cassandra_two_dc
    deployment = deployments(service, "withlwt", imap=True, replication={"dc1": 1, "dc2": 1})
    users = deployment.provision(["user0", "user1", "user2"])
    deployment.start_node("imap1")
    nodes = service.all_addresses()
    own_tables = deployment.table_ids()

    def imap_view_rows(state: dict[str, Any]) -> dict[str, int]:
        return {
            n: sum(1 for (_, table) in state[n] if own_tables.get(table) == "imap_view") for n in nodes
        }

    before = paxos_state(service, nodes)
    assert imap_view_rows(before) == {n: 0 for n in nodes}
    deliver_and_pop(deployment, users, messages=12, prefix="ctl")
    after = paxos_state(service, nodes)
    # one row per INBOX whose UID counter was used (a SERIAL round involves both datacenters)
    assert imap_view_rows(after) == {n: 3 for n in nodes}
    for node in nodes:
        assert len(after[node]) > len(before[node])


# -- 2. exact UIDs under concurrency ----------------------------------------------------------------

FETCH_MESSAGE_ID = re.compile(
    rb"\* (\d+) FETCH \(UID (\d+) BODY\[HEADER\.FIELDS \(MESSAGE-ID\)\] \{(\d+)\}\r\n", re.IGNORECASE
)


def imap_listing(port: int, user: str) -> dict[str, Any]:
    """SELECT INBOX and FETCH every message's UID and Message-ID, over a raw socket."""
    client = RawImap(port, timeout=60)
    try:
        client.login(user, PASSWORD)
        selected = client.select()
        exists = int(re.search(rb"\* (\d+) EXISTS", selected).group(1))  # type: ignore[union-attr]
        uidnext = int(re.search(rb"\[UIDNEXT (\d+)\]", selected).group(1))  # type: ignore[union-attr]
        uidvalidity = int(re.search(rb"\[UIDVALIDITY (\d+)\]", selected).group(1))  # type: ignore[union-attr]
        transcript = client.command(b"F", b"FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])") if exists else b""
        client.command(b"Z", b"LOGOUT")
    finally:
        client.close()
    rows = []
    for match in FETCH_MESSAGE_ID.finditer(transcript):
        start = match.end()
        header = transcript[start:start + int(match.group(3))]
        rows.append((int(match.group(1)), int(match.group(2)), message_id_of(header + b"\r\n")))
    return {"exists": exists, "uidnext": uidnext, "uidvalidity": uidvalidity, "rows": rows,
            "transcript": transcript}


@pytest.mark.parametrize("cassandra", ["one-node", "two-dc"])
def test_uids_stay_exact_when_two_nodes_deliver_and_append_at_once(
    cassandra: str, request: pytest.FixtureRequest, deployments: Deployments
) -> None:
    """On one Cassandra node, and on two datacenters (replication 1 + 1, SERIAL),
    where contended Paxos rounds can end with an unknown outcome."""
    if cassandra == "one-node":
        deployment = deployments(request.getfixturevalue("cassandra_node"), "uids", imap=True)
    else:
        deployment = deployments(request.getfixturevalue("cassandra_two_dc"), "uids2dc", imap=True,
                                 replication={"dc1": 1, "dc2": 1})
    (alice,) = deployment.provision(["alice"])
    node1, node2 = deployment.start_node("n1"), deployment.start_node("n2")
    count = 50
    start = threading.Barrier(2 * count, timeout=120)
    smtp_replies: list[tuple[int, bytes] | None] = [None] * count
    append_replies: list[tuple[str, list[bytes]] | None] = [None] * count

    def smtp_one(i: int) -> None:
        client = smtplib.SMTP("127.0.0.1", node1.smtp, timeout=120)
        try:
            client.ehlo("client.test")
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt(alice)[0] == 250
            start.wait()
            smtp_replies[i] = client.data(make_message(f"smtp-{i}@{DOMAIN}", f"smtp {i}"))
        finally:
            client.quit()

    def append_one(i: int) -> None:
        client = imaplib.IMAP4("127.0.0.1", node2.imap, timeout=120)
        try:
            client.login(alice, PASSWORD)
            start.wait()
            append_replies[i] = client.append("INBOX", None, None, make_message(f"append-{i}@{DOMAIN}", f"append {i}"))
        finally:
            client.logout()

    t0 = time.monotonic()
    parallel([lambda i=i: smtp_one(i) for i in range(count)] + [lambda i=i: append_one(i) for i in range(count)],
             workers=2 * count)
    took = time.monotonic() - t0
    assert [r[0] for r in smtp_replies if r] == [250] * count, smtp_replies
    assert [r[0] for r in append_replies if r] == ["OK"] * count, append_replies

    listing = imap_listing(node1.imap, alice)
    rows = listing["rows"]
    assert listing["exists"] == 2 * count
    assert [seq for seq, _, _ in rows] == list(range(1, 2 * count + 1))
    uids = [uid for _, uid, _ in rows]
    assert uids == sorted(set(uids))  # unique, strictly increasing with the sequence numbers
    assert uids == list(range(1, 2 * count + 1))  # no UID lost to a race either
    assert listing["uidnext"] == max(uids) + 1
    message_ids = Counter(m for _, _, m in rows)
    assert message_ids == Counter(
        [f"smtp-{i}@{DOMAIN}" for i in range(count)] + [f"append-{i}@{DOMAIN}" for i in range(count)]
    )
    # every APPENDUID names the UID its message got, in this UIDVALIDITY
    by_uid = {uid: m for _, uid, m in rows}
    for i, (_, data) in enumerate(append_replies):  # type: ignore[misc]
        match = re.match(rb"\[APPENDUID (\d+) (\d+)\] ", data[0])
        assert match is not None, data
        assert int(match.group(1)) == listing["uidvalidity"]
        assert by_uid[int(match.group(2))] == f"append-{i}@{DOMAIN}"
    # node 2 sees exactly the same mailbox
    other = imap_listing(node2.imap, alice)
    assert (other["rows"], other["uidnext"], other["uidvalidity"]) == (rows, listing["uidnext"], listing["uidvalidity"])
    unknown = sum(
        1 for n in (node1, node2) for e in n.log_events() if e.get("event") == "cassandra.lwt_outcome_unknown"
    )
    report(f"UIDs ({cassandra}): {count} SMTP deliveries on node 1 + {count} APPENDs on node 2 at once "
           f"in {took:.1f}s; LWT outcomes unknown and settled: {unknown}")


# -- 3. a cluster of nodes -----------------------------------------------------------------------------


def test_two_nodes_serve_the_same_mailboxes(cassandra_node: CassandraService, deployments: Deployments) -> None:
    """Delivered on node 1, listed by POP3 and IMAP on node 2; a POP3 DELE+QUIT on
    node 2 reaches an IMAP session on node 1 at its next NOOP (no event bus
    between the nodes: the session resynchronises from the store)."""
    deployment = deployments(cassandra_node, "pair", imap=True)
    alice, bob = deployment.provision(["alice", "bob"])
    node1, node2 = deployment.start_node("n1"), deployment.start_node("n2")

    ids = [f"pair-{i}@{DOMAIN}" for i in range(3)]
    for i, message_id in enumerate(ids):
        code, _ = smtp_deliver(node1.smtp, [alice, bob] if i == 0 else [alice], make_message(message_id, f"m{i}"))
        assert code == 250

    # POP3: the same listing, with the same UIDLs, on both nodes
    listings = []
    for node in (node1, node2):
        client = pop3_login(node.pop3, alice)
        listings.append((client.stat(), client.uidl()[1], client.list()[1]))
        client.quit()
    assert listings[0] == listings[1]
    (count, _), uidls, _ = listings[0]
    assert count == 3 and len(uidls) == 3

    # IMAP on node 2
    listing = imap_listing(node2.imap, alice)
    assert [(seq, uid, m) for seq, uid, m in listing["rows"]] == [(1, 1, ids[0]), (2, 2, ids[1]), (3, 3, ids[2])]

    # an IMAP session on node 1 has INBOX selected
    imap = RawImap(node1.imap, timeout=30)
    imap.login(alice, PASSWORD)
    selected = imap.select()
    assert b"* 3 EXISTS\r\n" in selected
    assert imap.command(b"N1", b"NOOP") == b"N1 OK NOOP completed.\r\n"

    # POP3 on node 2 deletes the second message
    client = pop3_login(node2.pop3, alice)
    assert client.uidl(2).split()[2] == uidls[1].split()[1]
    assert client.dele(2) == b"+OK Message 2 deleted."
    assert client.quit() == b"+OK Logging out."

    # node 1's session learns it at its next NOOP, from the store
    assert imap.command(b"N2", b"NOOP") == b"* 2 EXPUNGE\r\nN2 OK NOOP completed.\r\n"
    fetched = imap.command(b"F1", b"FETCH 1:* (UID)")
    assert fetched == b"* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 3)\r\nF1 OK Fetch completed.\r\n"

    # new mail delivered on node 2 appears in node 1's session at its next NOOP
    assert smtp_deliver(node2.smtp, [alice], make_message(f"pair-3@{DOMAIN}", "m3"))[0] == 250
    noop = imap.command(b"N3", b"NOOP")
    assert noop.startswith(b"* 3 EXISTS\r\n* 1 RECENT\r\n"), noop
    assert noop.endswith(b"N3 OK NOOP completed.\r\n")

    # a new SELECT shows the right count, on either node
    reselected = imap.select()
    assert b"* 3 EXISTS\r\n" in reselected and b"[UIDNEXT 5]" in reselected
    imap.command(b"Z", b"LOGOUT")
    imap.close()
    other = imap_listing(node2.imap, alice)
    assert [m for _, _, m in other["rows"]] == [ids[0], ids[2], f"pair-3@{DOMAIN}"]
    assert [uid for _, uid, _ in other["rows"]] == [1, 3, 4]

    # bob's copy of the first message is untouched by alice's deletions
    cycle = pop3_cycle(node2.pop3, bob, delete=False)
    assert cycle.message_ids() == [ids[0]]


# -- 4. two datacenters, the second one down -----------------------------------------------------------


class ImapScenario:
    """An IMAP-enabled keyspace of the two-datacenter cluster, prepared while dc2 is up:
    messages 1-3 delivered, session A selected INBOX and flagged message 3
    \\Deleted, then message 4 arrived (not yet seen by session A)."""

    def __init__(self, deployment: Deployment, name: str) -> None:
        self.deployment = deployment
        self.name = name
        (self.alice,) = deployment.provision(["alice"])
        self.node = deployment.start_node(name)
        self.ids = [f"{name}-{i}@{DOMAIN}" for i in range(1, 5)]
        for message_id in self.ids[:3]:
            assert smtp_deliver(self.node.smtp, [self.alice], make_message(message_id))[0] == 250
        self.session = RawImap(self.node.imap, timeout=60)
        self.session.login(self.alice, PASSWORD)
        assert b"* 3 EXISTS\r\n" in self.session.select()
        stored = self.session.command(b"D", b"STORE 3 +FLAGS (\\Deleted)")
        assert stored.endswith(b"D OK Store completed.\r\n"), stored
        assert smtp_deliver(self.node.smtp, [self.alice], make_message(self.ids[3]))[0] == 250

    def observe(self) -> dict[str, Any]:
        """Every reply, with dc2 down; each within a bounded time."""
        seen: dict[str, Any] = {}
        timings: dict[str, float] = {}

        def timed(name: str, call: Any) -> Any:
            t0 = time.monotonic()
            seen[name] = call()
            timings[name] = time.monotonic() - t0
            return seen[name]

        a = self.session
        timed("smtp", lambda: smtp_deliver(self.node.smtp, [self.alice], make_message(f"{self.name}-5@{DOMAIN}")))
        timed("noop", lambda: a.command(b"A1", b"NOOP"))
        timed("fetch", lambda: a.command(b"A2", b"FETCH 1:* (UID FLAGS)"))
        timed("fetch_peek", lambda: a.command(b"A2P", b"FETCH 2 (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"))
        timed("fetch_body", lambda: a.command(b"A2B", b"FETCH 2 (BODY[HEADER.FIELDS (MESSAGE-ID)])"))
        timed("search", lambda: a.command(b"A2S", b"SEARCH UNSEEN"))
        timed("store", lambda: a.command(b"A3", b"STORE 1 +FLAGS (\\Flagged)"))
        timed("expunge", lambda: a.command(b"A4", b"EXPUNGE"))
        message = make_message(f"{self.name}-appended@{DOMAIN}")
        a.send(b"A5 APPEND INBOX {" + str(len(message)).encode() + b"}\r\n")
        assert a.line().startswith(b"+ ")
        a.send(message + b"\r\n")
        timed("append", lambda: a.until_tagged(b"A5"))
        b = RawImap(self.node.imap, timeout=60)
        b.login(self.alice, PASSWORD)
        timed("select", lambda: b.command(b"B1", b"SELECT INBOX"))
        timed("examine", lambda: b.command(b"B2", b"EXAMINE INBOX"))
        timed("status", lambda: b.command(b"B3", b"STATUS INBOX (MESSAGES UIDNEXT)"))
        b.command(b"B4", b"LOGOUT")
        b.close()
        pop3 = pop3_login(self.node.pop3, self.alice)
        seen["pop3_stat"] = timed("pop3_stat", pop3.stat)
        seen["pop3_retr"] = timed("pop3_retr", lambda: pop3.retr(1)[0])
        seen["pop3_dele"] = timed("pop3_dele", lambda: pop3.dele(1))
        timed("pop3_quit", lambda: pop3_reply(pop3.quit))
        seen["timings"] = timings
        return seen


def test_second_datacenter_down(cassandra_two_dc: CassandraService, deployments: Deployments) -> None:
    """Replication 1 per datacenter, LOCAL_QUORUM, nodes in dc1; the dc2 Cassandra node stops.

    POP3-only keyspace: SMTP and POP3 work completely.  IMAP keyspaces: what
    happens with SERIAL and with LOCAL_SERIAL (docs/cassandra.md, "What IMAP
    does when a datacenter is down")."""
    service = cassandra_two_dc
    two_dc = {"dc1": 1, "dc2": 1}
    pop = deployments(service, "dcpop", imap=False, replication=two_dc)
    (alice,) = pop.provision(["alice"])
    pop_node = pop.start_node("pop")
    before = [f"dcpop-{i}@{DOMAIN}" for i in range(3)]
    for message_id in before:
        assert smtp_deliver(pop_node.smtp, [alice], make_message(message_id))[0] == 250
    serial = ImapScenario(deployments(service, "dcser", replication=two_dc, serial_consistency="SERIAL"), "serial")
    local = ImapScenario(deployments(service, "dcloc", replication=two_dc, serial_consistency="LOCAL_SERIAL"), "local")

    dc2 = service.node("dc2")
    t0 = time.monotonic()
    assert dc2.stop()
    report(f"dc2 stopped in {time.monotonic() - t0:.1f}s")
    try:
        # POP3-only: SMTP accepts, POP3 serves completely
        t0 = time.monotonic()
        during = f"dcpop-during@{DOMAIN}"
        assert smtp_deliver(pop_node.smtp, [alice], make_message(during))[0] == 250
        cycle = pop3_cycle(pop_node.pop3, alice)
        assert sorted(cycle.message_ids()) == sorted(before + [during])
        assert cycle.count == 4 and cycle.quit_reply == b"+OK Logging out."
        client = pop3_login(pop_node.pop3, alice)
        assert client.stat() == (0, 0)
        client.quit()
        pop_seconds = time.monotonic() - t0
        observed = {"SERIAL": serial.observe(), "LOCAL_SERIAL": local.observe()}
    finally:
        t0 = time.monotonic()
        dc2.start()
        tool.wait_for_ring(service.nodes)
        report(f"dc2 restarted in {time.monotonic() - t0:.1f}s")
    for mode, seen in observed.items():
        for key, value in seen.items():
            report(f"{mode} {key}: {value!r}")
    report(f"POP3-only with dc2 down: SMTP + full POP3 cycle in {pop_seconds:.1f}s")

    unavailable = b"NO [UNAVAILABLE] Temporary failure, try again later.\r\n"
    for mode, seen in observed.items():
        assert max(seen["timings"].values()) < 5, (mode, seen["timings"])  # answers at once, no timeouts
        header = b"Message-ID: <%s>\r\n\r\n" % (serial if mode == "SERIAL" else local).ids[1].encode()
        assert seen["fetch_peek"] == (
            b"* 2 FETCH (BODY[HEADER.FIELDS (MESSAGE-ID)] {%d}\r\n%s)\r\nA2P OK Fetch completed.\r\n"
            % (len(header), header)
        )
        assert normalised(seen["examine"]) == (
            b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n* %d EXISTS\r\n* 0 RECENT\r\n"
            b"* OK [UNSEEN 1] First unseen.\r\n* OK [PERMANENTFLAGS ()] Flags permitted\r\n"
            b"* OK [UIDVALIDITY N] UIDs valid\r\n* OK [UIDNEXT %d] Predicted next UID\r\n"
            b"B2 OK [READ-ONLY] Examine completed.\r\n" % ((4, 5) if mode == "SERIAL" else (5, 7))
        )
        assert seen["pop3_stat"][0] == (4 if mode == "SERIAL" else 5)
        assert seen["pop3_retr"].startswith(b"+OK ") and seen["pop3_dele"] == b"+OK Message 1 deleted."

    # SERIAL: every UID/MODSEQ/flag change needs a Paxos round with the dc2 replica: refused
    # at once; reading works, and so do SELECT and NOOP (\Recent is given without a claim).
    seen = observed["SERIAL"]
    assert seen["smtp"] == (451, b"4.3.0 Error: temporary failure storing the message, try again later")
    assert seen["noop"] == b"* 4 EXISTS\r\n* 4 RECENT\r\nA1 OK NOOP completed.\r\n"
    assert seen["fetch"] == (
        b"* 1 FETCH (UID 1 FLAGS (\\Recent))\r\n* 2 FETCH (UID 2 FLAGS (\\Recent))\r\n"
        b"* 3 FETCH (UID 3 FLAGS (\\Deleted \\Recent))\r\n* 4 FETCH (UID 4 FLAGS (\\Recent))\r\n"
        b"A2 OK Fetch completed.\r\n"
    )
    assert seen["fetch_body"] == b"A2B " + unavailable  # BODY[] would set \Seen
    assert seen["search"] == b"* SEARCH 1 2 3 4\r\nA2S OK Search completed.\r\n"
    assert seen["store"] == b"A3 " + unavailable
    assert seen["expunge"] == b"A4 " + unavailable
    assert seen["append"] == b"A5 " + unavailable
    assert normalised(seen["select"]) == (
        b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n* 4 EXISTS\r\n* 1 RECENT\r\n"
        b"* OK [UNSEEN 1] First unseen.\r\n"
        b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted\r\n"
        b"* OK [UIDVALIDITY N] UIDs valid\r\n* OK [UIDNEXT 5] Predicted next UID\r\n"
        b"B1 OK [READ-WRITE] Select completed.\r\n"
    )
    assert seen["status"] == b'* STATUS "INBOX" (MESSAGES 4 UIDNEXT 5)\r\nB3 OK Status completed.\r\n'
    assert seen["pop3_quit"] == b"-ERR [SYS/TEMP] Deleting the messages failed; they are all kept, try again later."

    # LOCAL_SERIAL: Paxos among dc1's replicas only: everything works
    seen = observed["LOCAL_SERIAL"]
    assert seen["smtp"][0] == 250
    assert seen["noop"] == b"* 5 EXISTS\r\n* 5 RECENT\r\nA1 OK NOOP completed.\r\n"
    assert seen["fetch_body"].endswith(b" FLAGS (\\Recent \\Seen))\r\nA2B OK Fetch completed.\r\n")
    assert seen["search"] == b"* SEARCH 1 3 4 5\r\nA2S OK Search completed.\r\n"
    assert seen["store"] == b"* 1 FETCH (FLAGS (\\Flagged \\Recent))\r\nA3 OK Store completed.\r\n"
    assert seen["expunge"] == b"* 3 EXPUNGE\r\n* 4 RECENT\r\nA4 OK Expunge completed.\r\n"
    assert normalised(seen["append"]) == b"* 5 EXISTS\r\n* 5 RECENT\r\nA5 OK [APPENDUID N 6] Append completed.\r\n"
    assert b"* 5 EXISTS\r\n* 0 RECENT\r\n" in seen["select"]
    assert seen["select"].endswith(b"B1 OK [READ-WRITE] Select completed.\r\n")
    assert seen["status"] == b'* STATUS "INBOX" (MESSAGES 5 UIDNEXT 7)\r\nB3 OK Status completed.\r\n'
    assert seen["pop3_quit"] == b"+OK Logging out."

    # dc2 is back: the SERIAL node accepts mail again, and its session can change the mailbox
    t0 = time.monotonic()
    while True:
        code, _ = smtp_deliver(serial.node.smtp, [serial.alice], make_message(f"serial-after@{DOMAIN}"))
        if code == 250 or time.monotonic() - t0 > 60:
            break
        time.sleep(1)
    assert code == 250
    report(f"SERIAL accepts mail {time.monotonic() - t0:.1f}s after dc2 answers CQL again")
    assert serial.session.command(b"R1", b"EXPUNGE").startswith(b"* 3 EXPUNGE\r\n")
    after = imap_listing(serial.node.imap, serial.alice)
    # the message refused with 451 during the outage is nowhere
    assert [m for _, _, m in after["rows"]] == [serial.ids[0], serial.ids[1], serial.ids[3], f"serial-after@{DOMAIN}"]
    assert [uid for _, uid, _ in after["rows"]] == [1, 2, 4, 5]
    serial.session.close()
    local.session.close()


def normalised(transcript: bytes) -> bytes:
    """UIDVALIDITY values (seconds since the epoch) replaced by N."""
    return re.sub(rb"(UIDVALIDITY|APPENDUID) \d+", rb"\1 N", transcript)


# -- 5. Cassandra away: temporary errors in bounded time, nothing lost ------------------------------------

BOUND = 20.0  # seconds any answer may take while Cassandra is away


class Sessions:
    """Client sessions opened while Cassandra was up, kept across its outage."""

    def __init__(self, node: Any, alice: str) -> None:
        self.node, self.alice = node, alice
        self.smtp_data = smtplib.SMTP("127.0.0.1", node.smtp, timeout=60)  # will send DATA during the outage
        self.smtp_data.ehlo("client.test")
        self.smtp_rcpt = smtplib.SMTP("127.0.0.1", node.smtp, timeout=60)  # will send RCPT during the outage
        self.smtp_rcpt.ehlo("client.test")
        self.pop3 = pop3_login(node.pop3, alice)
        self.imap = RawImap(node.imap, timeout=60)
        self.imap.login(alice, PASSWORD)
        self.imap.select()

    def close(self) -> None:
        for close in (self.smtp_data.close, self.smtp_rcpt.close, self.pop3.close, self.imap.close):
            close()


def timed(seen: dict[str, Any], name: str, call: Any) -> Any:
    t0 = time.monotonic()
    try:
        seen[name] = call()
    except Exception as e:  # noqa: BLE001 - recorded, asserted below
        seen[name] = e
    seen.setdefault("timings", {})[name] = time.monotonic() - t0
    return seen[name]


def during_outage(sessions: Sessions, tag: str, seen: dict[str, Any]) -> None:
    """Every protocol's answers while Cassandra cannot answer, from open sessions and new ones."""
    node, alice = sessions.node, sessions.alice
    jobs = {
        "smtp_data": lambda: sessions.smtp_data.data(make_message(f"{tag}-data@{DOMAIN}")),
        "smtp_rcpt": lambda: (sessions.smtp_rcpt.mail(SENDER), sessions.smtp_rcpt.rcpt(alice)),
        "smtp_new": lambda: smtp_deliver(node.smtp, [alice], make_message(f"{tag}-new@{DOMAIN}")),
        "pop3_retr": lambda: pop3_reply(lambda: sessions.pop3.retr(1)[0]),
        "pop3_new": lambda: pop3_reply(lambda: pop3_login(node.pop3, alice).stat()),
        "imap_fetch": lambda: sessions.imap.command(b"F" + tag.encode(), b"FETCH 1 (BODY.PEEK[])"),
        "imap_new": lambda: new_imap_login(node.imap, alice),
    }
    parallel([lambda name=name, job=job: timed(seen, name, job) for name, job in jobs.items()], workers=len(jobs))
    # the same sessions still answer
    timed(seen, "smtp_rset", sessions.smtp_data.rset)
    timed(seen, "smtp_rcpt_rset", sessions.smtp_rcpt.rset)
    timed(seen, "pop3_stat", sessions.pop3.stat)
    timed(seen, "pop3_noop", sessions.pop3.noop)
    timed(seen, "imap_noop", lambda: sessions.imap.command(b"N" + tag.encode(), b"NOOP"))
    timed(seen, "imap_store", lambda: sessions.imap.command(b"S" + tag.encode(), b"STORE 1 +FLAGS (\\Flagged)"))


def new_imap_login(port: int, user: str) -> bytes:
    client = RawImap(port, timeout=60)
    try:
        return client.command(b"L", b'LOGIN "' + user.encode() + b'" "' + PASSWORD.encode() + b'"')
    finally:
        client.close()


def test_cassandra_away_means_temporary_errors(cassandra_outage: CassandraService, deployments: Deployments) -> None:
    """A frozen Cassandra (SIGSTOP: requests time out) and a stopped one (connections refused):
    SMTP 451 4.3.0, POP3 -ERR [SYS/TEMP], IMAP NO [UNAVAILABLE], each within BOUND
    seconds, sessions usable; then Cassandra comes back and the same twistd serves
    again; a 451 left nothing visible, every 250 is there."""
    cassandra = cassandra_outage.nodes[0]
    report(f"outage node {cassandra.address} up in {cassandra_outage.start_seconds:.1f}s")
    deployment = deployments(cassandra_outage, "outage", imap=True)
    (alice,) = deployment.provision(["alice"])
    node = deployment.start_node("n1")
    accepted = [f"before-{i}@{DOMAIN}" for i in range(2)]
    for message_id in accepted:
        assert smtp_deliver(node.smtp, [alice], make_message(message_id))[0] == 250

    observed: dict[str, dict[str, Any]] = {}
    for phase in ("frozen", "stopped"):
        sessions = Sessions(node, alice)
        assert sessions.smtp_data.mail(SENDER)[0] == 250 and sessions.smtp_data.rcpt(alice)[0] == 250
        if phase == "frozen":
            os.kill(cassandra.pid(), signal.SIGSTOP)
        else:
            assert cassandra.stop()
        seen: dict[str, Any] = {}
        try:
            during_outage(sessions, phase, seen)
        finally:
            t1 = time.monotonic()
            if phase == "frozen":
                os.kill(cassandra.pid(), signal.SIGCONT)
            else:
                cassandra.start()
            seen["back_after"] = time.monotonic() - t1
        observed[phase] = seen
        # the same twistd serves again: how long until a delivery is accepted
        t1 = time.monotonic()
        while True:
            code, _ = smtp_deliver(node.smtp, [alice], make_message(f"{phase}-after@{DOMAIN}"))
            if code == 250 or time.monotonic() - t1 > 120:
                break
            time.sleep(0.5)
        seen["recovered_after"] = time.monotonic() - t1
        seen["recovered_code"] = code
        # and the sessions opened before the outage work again
        seen["smtp_again"] = smtp_deliver(node.smtp, [alice], make_message(f"{phase}-again@{DOMAIN}"),
                                          smtp=sessions.smtp_data)
        seen["pop3_again"] = sessions.pop3.retr(1)[0]
        seen["imap_again"] = sessions.imap.command(b"A" + phase.encode(), b"NOOP")
        sessions.close()
        for key, value in seen.items():
            report(f"{phase} {key}: {value!r}")

    temporary_smtp = (451, b"4.3.0 Error: temporary failure storing the message, try again later")
    lookup_smtp = (451, b"4.3.0 Temporary lookup failure, try again later")
    temporary_pop3 = b"-ERR [SYS/TEMP] The mail store is temporarily unavailable, try again later."
    unavailable = b" NO [UNAVAILABLE] Temporary failure, try again later.\r\n"
    for phase, seen in observed.items():
        tag = phase.encode()
        assert seen["smtp_data"] == temporary_smtp  # 451 at the end of DATA
        assert seen["smtp_rcpt"] == ((250, b"2.1.0 Ok"), lookup_smtp)  # or at RCPT
        assert seen["smtp_new"] == lookup_smtp
        assert seen["pop3_retr"] == seen["pop3_new"] == temporary_pop3
        assert seen["imap_fetch"] == b"F" + tag + unavailable
        assert seen["imap_new"] == b"L" + unavailable
        assert seen["imap_store"] == b"S" + tag + unavailable
        # the sessions stay usable
        assert seen["smtp_rset"] == seen["smtp_rcpt_rset"] == (250, b"2.0.0 Ok")
        assert seen["pop3_stat"][0] == (2 if phase == "frozen" else 4)  # the listing taken at login
        assert seen["pop3_noop"] == b"+OK"
        assert seen["imap_noop"] == b"N" + tag + b" OK NOOP completed.\r\n"  # the resync waits for later
        # bounded: a stopped node is refused at once; a frozen one times out after REQUEST_TIMEOUT
        timings = seen["timings"]
        for name, took in timings.items():
            if name == "imap_store" and phase == "frozen":
                # its failed command is followed by the resync the previous NOOP could not do: two timeouts
                assert took < 2 * REQUEST_TIMEOUT + 5, (name, took)
            else:
                assert took < BOUND, (phase, name, took)
        if phase == "stopped":
            assert max(timings.values()) < 1, timings
        # back without restarting twistd: the same sessions and new ones
        assert seen["recovered_code"] == 250 and seen["recovered_after"] < 30
        assert seen["smtp_again"][0] == 250
        assert seen["pop3_again"].startswith(b"+OK ")
        assert seen["imap_again"].endswith(b"A" + tag + b" OK NOOP completed.\r\n")
        assert b" EXISTS\r\n" in seen["imap_again"]
    assert node.alive()

    # every 250 is there, no 451 is
    accepted += [f"{phase}-{what}@{DOMAIN}" for phase in observed for what in ("after", "again")]
    listing = imap_listing(node.imap, alice)
    assert sorted(m for _, _, m in listing["rows"]) == sorted(accepted)
    assert [uid for _, uid, _ in listing["rows"]] == list(range(1, len(accepted) + 1))  # no UID lost either
    cycle = pop3_cycle(node.pop3, alice, delete=False)
    assert sorted(cycle.message_ids()) == sorted(accepted)
    report(
        "outage: frozen answers in {:.1f}s max (IMAP STORE after a failed resync {:.1f}s), stopped in {:.3f}s max; "
        "serving again {:.1f}s after SIGCONT, {:.1f}s after the node answered CQL again".format(
            max(v for k, v in observed["frozen"]["timings"].items() if k != "imap_store"),
            observed["frozen"]["timings"]["imap_store"], max(observed["stopped"]["timings"].values()),
            observed["frozen"]["recovered_after"], observed["stopped"]["recovered_after"],
        )
    )


# -- 6. corrupted content ---------------------------------------------------------------------------------


def test_corrupted_content_is_refused_never_served(cassandra_node: CassandraService, deployments: Deployments) -> None:
    """Bytes of stored chunks changed behind the server's back (CQL): IMAP FETCH
    answers NO without a byte of the message, POP3 RETR -ERR [SYS/PERM], the
    node logs an error naming the content; other messages are served."""
    import hashlib

    deployment = deployments(cassandra_node, "corrupt", imap=True)
    (alice,) = deployment.provision(["alice"])
    node = deployment.start_node("n1")
    markers = {
        "A": "AAAA-marker",  # one chunk, a byte flipped
        "B": "BBBB-marker",  # four chunks, a byte of the last flipped
        "C": "CCCC-marker",  # intact
        "D": "DDDD-marker",  # one chunk replaced together with its own SHA-256: only the whole-content check sees it
    }
    bodies = {key: big_body(marker, 200_000 if key == "B" else 2_000) for key, marker in markers.items()}
    for key in "ABCD":
        assert smtp_deliver(node.smtp, [alice], make_message(f"{key}@{DOMAIN}", key, bodies[key]))[0] == 250

    # the content of each message, from the store's tables
    rows = deployment.cql("SELECT uid, message_id FROM {ks}.imap_view")
    by_uid = {r["uid"]: r["message_id"] for r in rows if r["uid"] is not None}
    blobs = {}
    for key, uid in zip("ABCD", (1, 2, 3, 4)):
        blobs[key] = deployment.cql("SELECT blob_id FROM {ks}.messages WHERE id = %s", [by_uid[uid]])[0]["blob_id"]
    chunks = deployment.cql("SELECT chunks FROM {ks}.blobs WHERE id = %s", [blobs["B"]])[0]["chunks"]
    assert chunks == 4

    def chunk(key: str, seq: int) -> bytes:
        return deployment.cql("SELECT data FROM {ks}.blob_chunks WHERE blob_id = %s AND seq = %s",
                              [blobs[key], seq])[0]["data"]

    def flip(data: bytes) -> bytes:
        i = len(data) // 2
        return data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:]

    for key, seq in (("A", 0), ("B", 3)):
        deployment.cql("UPDATE {ks}.blob_chunks SET data = %s WHERE blob_id = %s AND seq = %s",
                       [flip(chunk(key, seq)), blobs[key], seq])
    altered = flip(chunk("D", 0))
    deployment.cql("UPDATE {ks}.blob_chunks SET data = %s, sha256 = %s WHERE blob_id = %s AND seq = 0",
                   [altered, hashlib.sha256(altered).hexdigest(), blobs["D"]])

    imap = RawImap(node.imap, timeout=30)
    imap.login(alice, PASSWORD)
    imap.select()
    replies = {key: imap.command(b"F" + key.encode(), b"FETCH %d BODY[]" % (i + 1)) for i, key in enumerate("ABCD")}
    together = imap.command(b"T", b"FETCH 1:4 BODY.PEEK[]")
    imap.command(b"Z", b"LOGOUT")
    imap.close()
    pop3 = pop3_login(node.pop3, alice)
    retr = {key: pop3_reply(lambda n=i + 1: pop3.retr(n)) for i, key in enumerate("ABCD")}
    assert pop3.quit() == b"+OK Logging out."

    damaged = b" NO [SERVERBUG] Some message content is unavailable.\r\n"
    for key in "ABD":
        assert replies[key] == b"F" + key.encode() + damaged  # not one byte of the message
        assert retr[key] == b"-ERR [SYS/PERM] message content is unavailable"
    # the intact message, by both protocols, whole
    reply, lines, octets = retr["C"]  # type: ignore[misc]
    content = b"\r\n".join(lines) + b"\r\n"
    assert reply == b"+OK %d octets" % octets and len(content) == octets
    assert replies["C"] == b"* 3 FETCH (BODY[] {%d}\r\n%s FLAGS (\\Recent \\Seen))\r\nFC OK Fetch completed.\r\n" % (
        len(content), content)
    assert together == b"* 3 FETCH (BODY[] {%d}\r\n%s)\r\nT%s" % (len(content), content, damaged)
    for key in "ABD":
        marker = markers[key].encode()
        assert not any(marker in r for r in replies.values()) and marker not in together
    # the operator is told which content is damaged, by each protocol
    errors = [e for e in node.log_events() if e.get("level") == "error"]
    for key in "ABD":
        naming = {e["event"] for e in errors if blobs[key] in str(e.get("error", ""))}
        assert naming == {"imap.fetch_content_unavailable", "pop3.content_unavailable"}, (key, errors)
    assert any("chunk 3 fails its SHA-256" in str(e.get("error")) for e in errors if blobs["B"] in str(e.get("error")))
    assert any(f"content {blobs['D']} fails its SHA-256" == e.get("error") for e in errors)


# -- 7. garbage collection ----------------------------------------------------------------------------------


def test_gc_removes_content_no_message_refers_to(cassandra_node: CassandraService, deployments: Deployments) -> None:
    """``mailcluster-admin gc``: content goes once every message using it is gone (POP3
    DELE+QUIT, IMAP EXPUNGE) and it is older than store.cassandra.gc_grace_seconds."""
    deployment = deployments(cassandra_node, "gc", imap=True)  # default grace: one hour
    alice, bob = deployment.provision(["alice", "bob"])
    node = deployment.start_node("n1")
    no_grace = deployment.write_config(deployment.root / "gc-now.toml", "gc-now", None, None, None,
                                       gc_grace_seconds=0)

    def gc(config: Any = None) -> str:
        return deployment.admin("gc", config=config).stdout

    sent = {
        "X": ([alice, bob], make_message(f"X@{DOMAIN}", "X")),  # one content for both
        "Y": ([alice], make_message(f"Y@{DOMAIN}", "Y", big_body("YYYY", 150_000))),  # three chunks
        "Z": ([bob], make_message(f"Z@{DOMAIN}", "Z")),
    }
    for recipients, message in sent.values():
        assert smtp_deliver(node.smtp, recipients, message)[0] == 250

    def blob_of(user: str) -> dict[str, str]:
        client = pop3_login(node.pop3, user)
        found = {}
        for line in client.uidl()[1]:
            number, uidl = line.split()
            raw = b"\r\n".join(client.retr(int(number))[1])
            row = deployment.cql("SELECT blob_id FROM {ks}.messages WHERE id = %s", [uuid.UUID(uidl.decode())])
            found[message_id_of(raw).split("@")[0]] = row[0]["blob_id"]
        client.quit()
        return found

    blobs = blob_of(alice) | blob_of(bob)
    assert blob_of(alice)["X"] == blob_of(bob)["X"]  # stored once for both recipients

    def stored() -> dict[str, int]:
        """Content rows left, and their chunk rows."""
        rows = deployment.cql("SELECT id, chunks FROM {ks}.blobs")
        return {key: sum(
            len(deployment.cql("SELECT seq FROM {ks}.blob_chunks WHERE blob_id = %s AND seq = %s", [blob, seq]))
            for seq in range(4)
        ) for key, blob in blobs.items() if blob in {r["id"] for r in rows}}

    assert stored() == {"X": 1, "Y": 3, "Z": 1}
    assert gc() == "0 unreferenced contents removed\n"  # nothing is unreferenced yet

    # alice deletes X and Y over POP3: Y's content has no message left, X still has bob's
    cycle = pop3_cycle(node.pop3, alice)
    assert sorted(cycle.message_ids()) == [f"X@{DOMAIN}", f"Y@{DOMAIN}"]
    assert gc() == "0 unreferenced contents removed\n"  # younger than the grace period (1 hour)
    assert stored() == {"X": 1, "Y": 3, "Z": 1}
    assert gc(no_grace) == "1 unreferenced contents removed\n"
    assert stored() == {"X": 1, "Z": 1}  # Y's blob row and its three chunks
    assert sorted(pop3_cycle(node.pop3, bob, delete=False).message_ids()) == [f"X@{DOMAIN}", f"Z@{DOMAIN}"]

    # bob expunges X over IMAP: now X goes too
    imap = RawImap(node.imap, timeout=30)
    imap.login(bob, PASSWORD)
    imap.select()
    assert imap.command(b"S", b"STORE 1 +FLAGS.SILENT (\\Deleted)") == b"S OK Store completed.\r\n"
    expunged = imap.command(b"E", b"EXPUNGE")
    assert expunged.startswith(b"* 1 EXPUNGE\r\n") and expunged.endswith(b"E OK Expunge completed.\r\n")
    assert gc(no_grace) == "1 unreferenced contents removed\n"
    assert stored() == {"Z": 1}
    assert gc(no_grace) == "0 unreferenced contents removed\n"
    fetched = imap.command(b"F", b"FETCH 1 (BODY.PEEK[])")
    assert fetched.endswith(b"F OK Fetch completed.\r\n") and b"Message-ID: <Z@example.test>" in fetched
    imap.close()
