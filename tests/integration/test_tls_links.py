"""Encrypted links to Cassandra and RabbitMQ, with CA verification, against real servers on loopback.

The servers come from the project's tools with TLS turned on, from the test CA
of ``tools/test_ca.py``: a Cassandra node whose CQL speaks TLS only
(``cassandra_tls``, ``tools/cassandra.py start --tls``) and the test broker's
TLS listener (``rabbitmq_tls``, ``tools/rabbitmq.py start --tls``).  Both
are started once for the module.  The mail nodes are real ``twistd
mailcluster`` processes configured as an operator would:

* two nodes with ``[store.cassandra] tls = true`` + ``tls_ca_file`` and
  ``[events.rabbitmq] url = "amqps://..."`` + ``ca_file``: provisioned with
  ``mailcluster-admin`` over the TLS link, they take mail over SMTP on one
  node, an IDLE session on the other hears of it through the bus, and
  IMAP and POP3 read it back.  The servers' own views confirm that every
  link is encrypted (``rabbitmqctl list_connections ssl``, Cassandra's
  ``system_views.clients``);
* a node given a CA that did not sign the broker's certificate never
  connects to the broker (the broker never sees its login), says why in its
  log at every attempt, keeps retrying with backoff, and serves mail from its
  embedded store meanwhile;
* a node (and ``mailcluster-admin``) given a CA that did not sign the
  Cassandra node's certificate refuses to start, with one line that says so.
"""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.cassandra_cluster import CassandraService
from tests.helpers.mailserver import BIN, admin, free_port, wait_for_ports
from tests.helpers.tools import load_tool
from tests.integration.conftest import (
    DOMAIN,
    PASSWORD,
    Deployments,
    MailNode,
    address,
    make_message,
    parallel,
    pop3_cycle,
    report,
    smtp_deliver,
)
from tests.integration.test_event_bus_cluster import Cluster, bus_events, done, idle, imap, next_lines, wait_connected
from tests.rabbitmq_broker import RabbitService, eventually

pytestmark = pytest.mark.timeout(600)

test_ca = load_tool("test_ca.py", "mailcluster_test_ca")

ALICE = address("alice")


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A CA of its own: it signed neither server's certificate."""
    return Path(test_ca.ensure_ca(tmp_path / "other-ca", name="some other CA"))


def broker_log(rabbitmq: RabbitService) -> str:
    return Path(rabbitmq.node.log_file).read_text(errors="replace")


# -- both links encrypted: SMTP in, IDLE hears it through the bus, IMAP and POP3 read it ---------------


def test_cluster_on_encrypted_links(deployments: Deployments, cassandra_tls: CassandraService,
                                    rabbitmq_tls: RabbitService) -> None:
    vhost = rabbitmq_tls.unique_vhost("tls")
    deployment = deployments(cassandra_tls, "tls", events_url=rabbitmq_tls.tls_url_for(vhost.name),
                             events_ca_file=rabbitmq_tls.ca_file)
    try:
        deployment.provision(["alice"])  # mailcluster-admin: keyspace, tables and users over TLS
        a, b = parallel([lambda name=name: deployment.start_node(name) for name in ("a", "b")], workers=2)
        for node in (a, b):
            wait_connected(node)
        for node in (a, b):
            config = node.config_path.read_text()
            assert "tls = true" in config and 'url = "amqps://' in config and "ca_file = " in config
        cluster = Cluster(deployment, vhost, rabbitmq_tls, a, b)

        # The broker's view: one connection per node, both TLS.
        connections = [c for c in rabbitmq_tls.node.ctl_json(
            ["list_connections", "vhost", "ssl", "ssl_protocol", "peer_port"]) if c["vhost"] == vhost.name]
        assert len(connections) == 2, connections
        assert all(c["ssl"] is True and c["ssl_protocol"] in ("tlsv1.3", "tlsv1.2") for c in connections)
        # Cassandra's view: every client connection (the nodes' pools, the test's own) is TLS.
        clients = cassandra_tls.query("SELECT address, port, ssl_enabled, ssl_protocol FROM system_views.clients")
        assert clients and all(c["ssl_enabled"] is True for c in clients), clients
        assert {c["ssl_protocol"] for c in clients} <= {"TLSv1.3", "TLSv1.2"}

        # IDLE on A, once A's queue is bound to INBOX: a delivery on B reaches it through the bus
        # (well before the session's own look at the store, IDLE_POLL).
        inbox = cluster.mailbox_id("INBOX")
        watcher = imap(a)
        assert b"* 0 EXISTS\r\n" in idle(watcher)
        cluster.wait_bound(a, inbox)
        started = time.monotonic()
        code, text = smtp_deliver(b.smtp, [ALICE], make_message("tls-1@example.test", recipients=[ALICE]))
        assert code == 250, (code, text)
        assert next_lines(watcher, 2) == b"* 1 EXISTS\r\n* 1 RECENT\r\n"
        heard = time.monotonic() - started
        assert done(watcher) == b"I OK Idle completed.\r\n"
        fetched = watcher.command(b"F", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert b"Message-ID: <tls-1@example.test>" in fetched and fetched.endswith(b"F OK Fetch completed.\r\n")
        watcher.command(b"Z", b"LOGOUT")

        # POP3 on A reads it, and deletes it.
        cycle = pop3_cycle(a.pop3, ALICE)
        assert cycle.message_ids() == ["tls-1@example.test"]
        assert cycle.quit_reply.startswith(b"+OK")
        for node in (a, b):
            assert not bus_events(node, "bus.setup_failed") and not bus_events(node, "bus.connect_failed")
        report(f"tls: nodes up in {a.started_in:.1f}s / {b.started_in:.1f}s, IDLE heard the delivery in "
               f"{heard:.2f}s; Cassandra TLS node started in {cassandra_tls.start_seconds:.1f}s")
    finally:
        deployment.stop()
        rabbitmq_tls.delete_vhost(vhost.name)


# -- a broker whose certificate does not verify gets no login ------------------------------------------


def log_events(log_path: Path, *names: str) -> list[dict[str, Any]]:
    """The node's JSON log lines whose event is one of ``names``."""
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") in names]


def _setup_failures(log_path: Path) -> list[dict[str, Any]]:
    return log_events(log_path, "bus.setup_failed", "bus.connect_failed")


def test_broker_signed_by_another_ca_gets_no_password(tmp_path: Path, rabbitmq_tls: RabbitService,
                                                      other_ca: Path) -> None:
    vhost = rabbitmq_tls.unique_vhost("badca")
    data = tmp_path / "data"
    for args, password in ((("domain", "add", DOMAIN), None), (("user", "add", ALICE), PASSWORD)):
        result = admin(data, *args, password=password)
        assert result.returncode == 0, result.stderr
    smtp, pop3 = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[server]\ndata = "{data}"\n[smtp]\nlisten = "tcp:{smtp}:interface=127.0.0.1"\n'
        f'[pop3]\nlisten = "tcp:{pop3}:interface=127.0.0.1"\nlisten_tls = []\n[imap]\nlisten = []\nlisten_tls = []\n'
        f'[events]\nbus = "rabbitmq"\n[events.rabbitmq]\nurl = "{rabbitmq_tls.tls_url_for(vhost.name)}"\n'
        f'ca_file = "{other_ca}"\n'
    )
    log_path = tmp_path / "twistd.out"
    process = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--config", str(config)],
        cwd=tmp_path, stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for_ports(process, (smtp, pop3), log_path)
        # The node serves mail without its bus (the store is the truth).
        code, text = smtp_deliver(smtp, [ALICE], make_message("badca-1@example.test", recipients=[ALICE]))
        assert code == 250, (code, text)
        assert pop3_cycle(pop3, ALICE).message_ids() == ["badca-1@example.test"]

        seen = eventually(lambda: len(_setup_failures(log_path)) >= 3 and _setup_failures(log_path), timeout=30,
                          interval=0.2, message="three failed attempts")
        assert {e["error"] for e in seen} == {
            "TLS handshake failed (certificate verify failed): the server's certificate does not verify "
            "against the CAs of events.rabbitmq.ca_file (the system's trust store when unset): signed by "
            "another CA, or expired"
        }, seen
        assert [e["failures"] for e in seen[:3]] == [1, 2, 3]
        times = [datetime.fromisoformat(str(e["timestamp"]).replace("Z", "+00:00")) for e in seen[:3]]
        gaps = [(later - earlier).total_seconds() for earlier, later in zip(times, times[1:])]
        assert 0.4 <= gaps[0] < gaps[1], gaps  # 0.5 s, then 1 s (±20 %): the reconnect backoff
        assert process.poll() is None  # still running
        text = log_path.read_text()
        assert not log_events(log_path, "bus.connected")
        assert "Unhandled Error" not in text and "Traceback" not in text
        assert str(rabbitmq_tls.node.password) not in text
        # The broker saw TLS handshakes fail and never a login to this vhost.
        assert f"granted access to vhost '{vhost.name}'" not in broker_log(rabbitmq_tls)
        assert not [c for c in rabbitmq_tls.node.ctl_json(["list_connections", "vhost"]) if c["vhost"] == vhost.name]
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=30)
        rabbitmq_tls.delete_vhost(vhost.name)
    assert status == -signal.SIGTERM


# -- a Cassandra node whose certificate does not verify: no start ------------------------------------------


def test_cassandra_signed_by_another_ca_stops_the_start(deployments: Deployments, cassandra_tls: CassandraService,
                                                        other_ca: Path) -> None:
    deployment = deployments(cassandra_tls, "tlsbad", cassandra_ca_file=other_ca)
    expected = (
        f"TLS to Cassandra at {cassandra_tls.contact_point}:{cassandra_tls.port} failed ("
    )
    advice = "the node's certificate does not verify against store.cassandra.tls_ca_file"

    # mailcluster-admin: one line on stderr, exit status 1.
    result = deployment.admin("domain", "add", DOMAIN, check=False)
    assert result.returncode == 1, result
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert expected in result.stderr and advice in result.stderr and "CERTIFICATE_VERIFY_FAILED" in result.stderr

    # twistd: no port opened, one node.start_failed line naming the TLS failure, exit status 1.
    smtp = free_port()
    workdir = deployment.root / "n"
    config = deployment.write_config(workdir / "mailcluster.toml", "n", smtp, None, None)
    node = MailNode("n", workdir, config, smtp, free_port(), None)
    with node.log_path.open("ab") as log:
        node.process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--config", str(config)],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        )
    status = node.process.wait(timeout=120)
    assert status == 1, node.log_text()
    failed = [e for e in node.log_events() if e.get("event") == "node.start_failed"]
    assert len(failed) == 1, node.log_text()
    assert expected in failed[0]["error"] and advice in failed[0]["error"], failed
    assert not [e for e in node.log_events() if e.get("event") == "node.started"]
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", smtp, timeout=2)
    node.process = None
    # Nothing was created on the cluster: the keyspace does not exist.
    keyspaces = cassandra_tls.query("SELECT keyspace_name FROM system_schema.keyspaces")
    assert deployment.keyspace not in {k["keyspace_name"] for k in keyspaces}
