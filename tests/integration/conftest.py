"""Real ``twistd mailcluster`` nodes on a real Cassandra keyspace.

A :class:`Deployment` is one keyspace of its own (``unique_keyspace``) on a
Cassandra service of ``tests/cassandra_cluster.py``, provisioned with
``mailcluster-admin --config`` exactly as an operator would, and the twistd
nodes that serve it (each a separate process with its own TOML file, ports and
JSON log).  The ``deployments`` fixture stops every node and drops every
keyspace a test made.  Clients are the standard library's (smtplib, poplib,
imaplib) and ``tests.helpers.imap.RawImap`` where exact bytes matter.
"""

from __future__ import annotations

import email
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import poplib
import pytest
import smtplib

from tests.cassandra_cluster import CassandraService, unique_keyspace
from tests.helpers.mailserver import wait_for_ports

T = TypeVar("T")

BIN = Path(sys.executable).parent
DOMAIN = "example.test"
PASSWORD = "s3cret-Pa55 word"
SENDER = "sender@elsewhere.test"
#: twistd connects to Cassandra and prepares its statements before it listens.
NODE_START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def address(user: str) -> str:
    return f"{user}@{DOMAIN}"


def parallel(jobs: Iterable[Callable[[], T]], workers: int = 8) -> list[T]:
    """Run the jobs in threads; their results in order (the first exception is raised)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]


# -- messages --------------------------------------------------------------------------------


def make_message(message_id: str, subject: str = "test", body: str = "", recipients: Sequence[str] = ()) -> bytes:
    """An RFC 5322 message with CRLF line ends; ``message_id`` without angle brackets."""
    lines = [
        f"From: {SENDER}",
        f"To: {', '.join(recipients) or address('alice')}",
        f"Subject: {subject}",
        f"Message-ID: <{message_id}>",
        "Date: Mon, 23 Nov 2026 10:00:00 +0000",
        "",
        body or f"Body of {message_id}.",
        "",
    ]
    return "\r\n".join(lines).encode()


def big_body(marker: str, size: int) -> str:
    """Lines of text of about ``size`` bytes, each naming ``marker`` (so a chunk of it is recognisable)."""
    line = f"{marker} " + "x" * 60
    return "\r\n".join(f"{i:06d} {line}" for i in range(size // (len(line) + 9)))


def message_id_of(raw: bytes) -> str:
    value = email.message_from_bytes(raw)["Message-ID"]
    assert value is not None, raw[:500]
    return str(value).strip().strip("<>")


# -- clients -----------------------------------------------------------------------------------


def smtp_deliver(
    port: int, recipients: Sequence[str], message: bytes, smtp: smtplib.SMTP | None = None,
) -> tuple[int, bytes]:
    """One SMTP transaction; the reply to DATA (or the first refusal before it)."""
    own = smtp is None
    client = smtp or smtplib.SMTP("127.0.0.1", port, timeout=60)
    try:
        if own:
            client.ehlo("client.test")
        code, text = client.mail(SENDER)
        if code != 250:
            client.rset()
            return code, text
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            if code != 250:
                client.rset()
                return code, text
        return client.data(message)
    finally:
        if own:
            client.quit()


def smtp_deliver_many(
    port: int, transactions: Sequence[tuple[Sequence[str], bytes]], workers: int = 8,
) -> list[tuple[int, bytes]]:
    """Deliver over ``workers`` SMTP connections at once; the DATA reply of each transaction, in order."""
    results: list[tuple[int, bytes] | None] = [None] * len(transactions)

    def worker(first: int) -> None:
        client = smtplib.SMTP("127.0.0.1", port, timeout=60)
        try:
            client.ehlo("client.test")
            for i in range(first, len(transactions), workers):
                recipients, message = transactions[i]
                results[i] = smtp_deliver(port, recipients, message, smtp=client)
        finally:
            client.quit()

    parallel([lambda first=first: worker(first) for first in range(min(workers, len(transactions)))], workers)
    return [r for r in results if r is not None]


def pop3_reply(call: Callable[[], Any]) -> Any:
    """What a poplib call got: its result on +OK, the -ERR line otherwise."""
    try:
        return call()
    except poplib.error_proto as e:
        return e.args[0] if isinstance(e.args[0], bytes) else str(e.args[0]).encode()


def pop3_login(port: int, user: str, timeout: float = 60) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=timeout)
    client.user(user)
    client.pass_(PASSWORD)
    return client


@dataclass
class Pop3Cycle:
    """What one full POP3 session saw: STAT, LIST, UIDL and every message."""

    count: int
    octets: int
    sizes: dict[int, int]
    uidls: dict[int, str]
    messages: dict[int, bytes]
    quit_reply: bytes

    def message_ids(self) -> list[str]:
        return [message_id_of(raw) for _, raw in sorted(self.messages.items())]


def pop3_cycle(port: int, user: str, delete: bool = True) -> Pop3Cycle:
    """STAT, LIST, UIDL, RETR of every message, DELE of every message (if ``delete``), QUIT."""
    client = pop3_login(port, user)
    try:
        count, octets = client.stat()
        listing = client.list()
        sizes = {int(n): int(s) for n, s in (line.split() for line in listing[1])}
        uidls = {int(n): u.decode() for n, u in (line.split() for line in client.uidl()[1])}
        messages = {}
        for number in sorted(sizes):
            reply, lines, _ = client.retr(number)
            assert reply.startswith(b"+OK"), reply
            messages[number] = b"\r\n".join(lines) + b"\r\n"
            if delete:
                assert client.dele(number).startswith(b"+OK")
        quit_reply = client.quit()
    except BaseException:
        client.close()
        raise
    return Pop3Cycle(count, octets, sizes, uidls, messages, quit_reply)


# -- Cassandra ---------------------------------------------------------------------------------


def paxos_state(
    service: CassandraService, addresses: Sequence[str],
) -> dict[str, dict[tuple[bytes, Any], tuple[Any, ...]]]:
    """Every row of the node-local ``system.paxos`` on each node, with its ballots.

    A Paxos round on a partition that already has a row changes the row's
    ballots without adding a row, so comparing the rows themselves (not only
    their number) sees every round.
    """
    state = {}
    for node in addresses:
        rows = service.query(
            "SELECT row_key, cf_id, in_progress_ballot, most_recent_commit_at, proposal_ballot FROM system.paxos", node
        )
        state[node] = {
            (r["row_key"], r["cf_id"]): (r["in_progress_ballot"], r["most_recent_commit_at"], r["proposal_ballot"])
            for r in rows
        }
    return state


def table_ids(service: CassandraService, keyspace: str) -> dict[Any, str]:
    rows = service.query(f"SELECT table_name, id FROM system_schema.tables WHERE keyspace_name = '{keyspace}'")
    return {r["id"]: r["table_name"] for r in rows}


# -- nodes ------------------------------------------------------------------------------------


@dataclass
class MailNode:
    """One ``twistd -n mailcluster --config FILE`` process."""

    name: str
    workdir: Path
    config_path: Path
    smtp: int
    pop3: int
    imap: int | None
    process: subprocess.Popen[bytes] | None = None
    started_in: float = 0.0

    @property
    def log_path(self) -> Path:
        return self.workdir / "twistd.out"

    def start(self, timeout: float = NODE_START_TIMEOUT) -> None:
        t0 = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--config", str(self.config_path)],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
            )
        ports = tuple(p for p in (self.smtp, self.pop3, self.imap) if p is not None)
        try:
            wait_for_ports(self.process, ports, self.log_path, timeout)
        except RuntimeError as e:
            raise RuntimeError(f"node {self.name}: {e}") from None
        self.started_in = time.monotonic() - t0

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait(timeout=10)
        self.process = None
        return status

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines the node wrote so far."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.startswith("{")]


@dataclass
class Deployment:
    """A keyspace of its own on ``service``, and the twistd nodes serving it."""

    service: CassandraService
    root: Path
    keyspace: str
    imap: bool = True
    replication: dict[str, int] = field(default_factory=dict)
    local_dc: str = "dc1"
    contact_points: tuple[str, ...] = ()
    serial_consistency: str = "SERIAL"
    gc_grace_seconds: float | None = None
    #: ``amqp://`` URL of a RabbitMQ vhost: the nodes then run ``[events] bus = "rabbitmq"``
    #: (None: the in-process bus of a single node).
    events_url: str | None = None
    #: ``[events.rabbitmq] ca_file`` (for an ``amqps://`` events_url).
    events_ca_file: Path | None = None
    #: ``[store.cassandra] tls_ca_file`` for a TLS service; None: the service's own CA file.
    cassandra_ca_file: Path | None = None
    nodes: list[MailNode] = field(default_factory=list)
    _cluster: Any = None
    _session: Any = None

    def __post_init__(self) -> None:
        self.replication = self.replication or {self.local_dc: 1}
        if not self.contact_points:
            self.contact_points = tuple(
                a for a in self.service.contact_points if self.service.dcs.get(a, self.local_dc) == self.local_dc
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.admin_config = self.write_config(self.root / "admin.toml", "admin", None, None, None)

    # -- configuration

    def config_text(
        self,
        name: str,
        smtp: int | None,
        pop3: int | None,
        imap: int | None,
        serial_consistency: str | None = None,
        gc_grace_seconds: float | None = None,
        mail_log: Path | None = None,
    ) -> str:
        """``mail_log``: the node's ``[events] mail_log`` file (the mail-log group listener)."""

        def listen(port: int | None) -> str:
            return f'["tcp:{port}:interface=127.0.0.1"]' if port else "[]"

        replication = ", ".join(f"{dc} = {factor}" for dc, factor in sorted(self.replication.items()))
        contact = ", ".join(f'"{a}"' for a in self.contact_points)
        grace = gc_grace_seconds if gc_grace_seconds is not None else self.gc_grace_seconds
        lines = [
            "[server]",
            f'data = "{self.root / name / "data"}"',
            f'hostname = "{name}.example.test"',
            "[smtp]",
            f"listen = {listen(smtp)}",
            "[pop3]",
            f"listen = {listen(pop3)}",
            "listen_tls = []",
            "[imap]",
            f"enabled = {'true' if self.imap else 'false'}",
        ]
        if self.imap:
            lines += [f"listen = {listen(imap)}", "listen_tls = []"]
            # These tests stand for many clients, all of them on loopback.
            lines += ["max_connections_per_address = 5000", "max_userip_connections = 5000"]
        lines += [
            "[store]",
            'backend = "cassandra"',
            "[store.cassandra]",
            f"contact_points = [{contact}]",
            f"port = {self.service.port}",
            f'local_datacenter = "{self.local_dc}"',
            f'keyspace = "{self.keyspace}"',
            f"replication = {{ {replication} }}",
            'consistency = "LOCAL_QUORUM"',
            f'serial_consistency = "{serial_consistency or self.serial_consistency}"',
        ]
        if grace is not None:
            lines.append(f"gc_grace_seconds = {grace}")
        if self.service.ca_file is not None:  # a TLS-only Cassandra
            lines += ["tls = true", f'tls_ca_file = "{self.cassandra_ca_file or self.service.ca_file}"']
        if self.events_url is not None or mail_log is not None:
            lines.append("[events]")
            if mail_log is not None:
                lines.append(f'mail_log = "{mail_log}"')
            if self.events_url is not None:
                lines += ['bus = "rabbitmq"', "[events.rabbitmq]", f'url = "{self.events_url}"']
                if self.events_ca_file is not None:
                    lines.append(f'ca_file = "{self.events_ca_file}"')
        lines += ["[log]", 'level = "info"', ""]
        return "\n".join(lines)

    def write_config(self, path: Path, name: str, smtp: int | None, pop3: int | None, imap: int | None,
                     **options: Any) -> Path:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        path.write_text(self.config_text(name, smtp, pop3, imap, **options))
        return path

    # -- mailcluster-admin

    def admin(self, *args: str, password: str | None = None, config: Path | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "mailcluster-admin"), "--config", str(config or self.admin_config), *args],
            input=None if password is None else password + "\n",
            capture_output=True, text=True, timeout=120,
        )
        if check:
            assert result.returncode == 0, f"mailcluster-admin {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def provision(self, users: Sequence[str], workers: int = 4) -> list[str]:
        """Domain example.test (this creates the keyspace and its tables) and the users, with their mailboxes."""
        assert self.admin("domain", "add", DOMAIN).stdout == f"domain {DOMAIN} added\n"
        addresses = [address(u) for u in users]
        outputs = parallel([lambda a=a: self.admin("user", "add", a, password=PASSWORD).stdout for a in addresses],
                           workers)
        assert outputs == [f"user {a} added\n" for a in addresses]
        return addresses

    # -- nodes

    def start_node(self, name: str, **options: Any) -> MailNode:
        ports = (free_port(), free_port(), free_port() if self.imap else None)
        workdir = self.root / name
        config = self.write_config(workdir / "mailcluster.toml", name, *ports, **options)
        node = MailNode(name, workdir, config, *ports)
        self.nodes.append(node)
        node.start()
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.close_cql()

    def cql(self, statement: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """CQL through cassandra-driver (LOCAL_QUORUM in the local datacenter); ``{ks}`` is the keyspace."""
        if self._session is None:
            from cassandra import ConsistencyLevel
            from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
            from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
            from cassandra.query import dict_factory

            profile = ExecutionProfile(
                load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=self.local_dc)),
                consistency_level=ConsistencyLevel.LOCAL_QUORUM, request_timeout=30, row_factory=dict_factory,
            )
            self._cluster = Cluster(list(self.contact_points), port=self.service.port, protocol_version=5,
                                    execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                                    ssl_context=self._ssl_context())
            self._session = self._cluster.connect()
        return list(self._session.execute(statement.replace("{ks}", self.keyspace), params))

    def _ssl_context(self) -> Any:
        """TLS for the test's own driver on a TLS-only Cassandra (verified with the service's CA)."""
        if self.service.ca_file is None:
            return None
        from twisted_mail_cluster.tls.client import stdlib_context

        return stdlib_context(self.service.ca_file)

    def close_cql(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()
        self._cluster = self._session = None

    def table_ids(self) -> dict[Any, str]:
        return table_ids(self.service, self.keyspace)


class Deployments:
    """Factory of deployments; everything it made is stopped and dropped at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.made: list[Deployment] = []

    def __call__(self, service: CassandraService, prefix: str, **options: Any) -> Deployment:
        keyspace = unique_keyspace(prefix)
        deployment = Deployment(service, self.tmp_path / keyspace, keyspace, **options)
        self.made.append(deployment)
        return deployment

    def close(self) -> None:
        for deployment in self.made:
            deployment.stop()
        for deployment in self.made:
            try:
                deployment.service.query(f"DROP KEYSPACE IF EXISTS {deployment.keyspace}",
                                         deployment.contact_points[0])
            except Exception as e:  # noqa: BLE001 - a leftover keyspace only costs disk space
                print(f"[cluster] could not drop keyspace {deployment.keyspace}: {e!r}")


@pytest.fixture
def deployments(tmp_path: Path) -> Iterator[Deployments]:
    factory = Deployments(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


def report(message: str) -> None:
    """Figures for the issue note: shown with -s, and in the output of a failing test."""
    print(f"[cluster] {message}")


# -- a Cassandra node of one test's own, to stop and freeze ---------------------------------------

OUTAGE_NAME = "test-outage"
OUTAGE_CLUSTER_NAME = "mailcluster-test-outage"


def outage_address() -> str:
    """A loopback address no other test cluster uses (127.0.0.4 unless the two-DC cluster moved there)."""
    from tests.cassandra_cluster import SINGLE_ADDRESS, tls_address, tool, two_dc_addresses

    taken = {SINGLE_ADDRESS, *two_dc_addresses(), tls_address()}  # (the TLS node answers no clear CQL)
    for last in range(4, 30):
        candidate = f"127.0.0.{last}"
        if candidate not in taken and not tool.cql_answers(candidate, tool.NATIVE_PORT, timeout=0.5):
            return candidate
    raise RuntimeError("no free loopback address for a Cassandra node")


@pytest.fixture
def cassandra_outage() -> Iterator[CassandraService]:
    """A fresh one-node Cassandra (dc1) that the test may stop, freeze and start again."""
    from tests.cassandra_cluster import START_TIMEOUT, CassandraNode, tool

    node = CassandraNode(OUTAGE_NAME, address=outage_address(), dc="dc1", cluster_name=OUTAGE_CLUSTER_NAME)
    node.stop()  # a leftover of ours
    took = node.start(START_TIMEOUT, fresh=True)
    service = CassandraService(
        cluster_name=OUTAGE_CLUSTER_NAME, contact_points=(node.address,), port=tool.NATIVE_PORT, local_dc="dc1",
        nodes=(node,), started_here=True, dcs={node.address: "dc1"}, start_seconds=took,
    )
    try:
        yield service
    finally:
        pid = node.pid()
        if pid:
            os.kill(pid, signal.SIGCONT)  # if the test left it frozen
        node.stop()
