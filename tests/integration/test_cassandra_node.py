"""A real Apache Cassandra 5.0, started by tools/cassandra.py: one node, and a
cluster of two datacenters.  No mocks, no skips: without Java, Maven, the jars
or cassandra-driver these tests fail (tools/install-test-deps installs them).

Each cluster starts once per module (see tests/cassandra_cluster.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from cassandra import ConsistencyLevel, Unavailable, WriteTimeout
from cassandra.cluster import NoHostAvailable
from cassandra.query import SimpleStatement

from tests.cassandra_cluster import TOOL_PATH, CassandraService, tool, unique_keyspace

pytestmark = pytest.mark.timeout(600)


def report(message: str) -> None:
    # shown with -s, and in the captured output of a failing test
    print(f"[cassandra] {message}")


# -- one node


def test_single_node_answers_cql(cassandra_node: CassandraService) -> None:
    local = cassandra_node.query("SELECT cluster_name, data_center, release_version FROM system.local")[0]
    assert local["data_center"] == "dc1"
    assert local["release_version"].startswith("5.0")
    if cassandra_node.started_here:
        assert local["cluster_name"] == "mailcluster-test"
        assert local["release_version"] == tool.CASSANDRA_VERSION
        node = cassandra_node.nodes[0]
        rss = node.rss()
        report(f"single node up in {cassandra_node.start_seconds:.1f}s, RSS {rss and rss // 2**20} MiB")
        # our cassandra.yaml uses only current setting names, and nothing is printed
        warnings = (node.log_dir / "warn.log").read_text()
        assert "YamlConfigurationLoader" not in warnings, warnings
        assert "Exception" not in (node.log_dir / "stdout.log").read_text()


def test_system_paxos_records_lwt_only(cassandra_node: CassandraService) -> None:
    ks = unique_keyspace("paxos")
    cluster = cassandra_node.driver_cluster()
    try:
        session = cluster.connect()
        assert session.execute("SELECT * FROM system.paxos") is not None  # readable with the driver
        session.execute(
            f"CREATE KEYSPACE {ks} WITH replication = {{'class': 'NetworkTopologyStrategy', 'dc1': 1}}"
        )
        session.execute(f"CREATE TABLE {ks}.counters (k text PRIMARY KEY, v int)")
        table_id = session.execute(
            "SELECT id FROM system_schema.tables WHERE keyspace_name = %s AND table_name = 'counters'", (ks,)
        ).one().id

        def paxos_rows_of_table() -> int:
            rows = session.execute("SELECT cf_id FROM system.paxos")
            return sum(1 for r in rows if r.cf_id == table_id)

        before = cassandra_node.paxos_rows()
        session.execute(f"INSERT INTO {ks}.counters (k, v) VALUES ('plain', 1)")
        session.execute(f"UPDATE {ks}.counters SET v = 2 WHERE k = 'plain'")
        assert paxos_rows_of_table() == 0
        assert cassandra_node.paxos_rows() == before  # plain writes add nothing

        lwt = SimpleStatement(f"INSERT INTO {ks}.counters (k, v) VALUES ('lwt', 1) IF NOT EXISTS",
                              serial_consistency_level=ConsistencyLevel.SERIAL)
        assert session.execute(lwt).was_applied
        assert not session.execute(lwt).was_applied
        assert paxos_rows_of_table() == 1  # one partition, one row
        after = cassandra_node.paxos_rows()
        assert sum(after.values()) == sum(before.values()) + 1
        session.execute(f"DROP KEYSPACE {ks}")
    finally:
        cluster.shutdown()


def test_cli_start_status_cql_stop(tmp_path: Path) -> None:
    """The operator's path: a node of its own on 127.0.0.9, through the CLI."""
    base = ["--base", str(tmp_path / "nodes")]

    def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(TOOL_PATH), *base, *args],
                              capture_output=True, text=True, timeout=timeout)

    t0 = time.monotonic()
    run = cli("start", "--name", "life", "--address", "127.0.0.9", "--cluster-name", "lifecycle")
    assert run.returncode == 0, run.stdout + run.stderr
    started = time.monotonic() - t0
    try:
        assert "CQL up on 127.0.0.9:9042" in run.stdout
        node = tool.CassandraNode.load("life", tmp_path / "nodes")
        assert node.is_running() and node.is_up()
        assert node.jmx_port == 7207
        status = cli("status")
        assert "life" in status.stdout and "up" in status.stdout
        cql = cli("cql", "--address", "127.0.0.9", "SELECT cluster_name, data_center FROM system.local")
        assert cql.stdout.strip() == "cluster_name=lifecycle | data_center=dc1", cql.stdout + cql.stderr
        again = cli("start", "--name", "life")
        assert again.returncode == 1 and "already running" in again.stderr
        rss = node.rss()
    finally:
        t1 = time.monotonic()
        stop = cli("stop", "--name", "life")
    stopped = time.monotonic() - t1
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    assert not node.is_running() and not node.is_up(timeout=1)
    assert not node.pid_file.exists()
    assert "Cassandra shutdown complete" in node.system_log.read_text()  # SIGTERM: a clean shutdown
    report(f"CLI node: start {started:.1f}s, RSS {rss and rss // 2**20} MiB, graceful stop {stopped:.1f}s")


# -- two datacenters


def test_two_dc_ring(cassandra_two_dc: CassandraService) -> None:
    if cassandra_two_dc.started_here:
        report(f"two-DC cluster up in {cassandra_two_dc.start_seconds:.1f}s")
    dc1, dc2 = cassandra_two_dc.node("dc1"), cassandra_two_dc.node("dc2")
    assert dc1.local()["data_center"] == "dc1" and dc2.local()["data_center"] == "dc2"
    assert dc1.local()["cluster_name"] == dc2.local()["cluster_name"] == "mailcluster-test-2dc"
    assert {(str(p["peer"]), p["data_center"]) for p in dc1.peers()} == {(dc2.address, "dc2")}
    assert {(str(p["peer"]), p["data_center"]) for p in dc2.peers()} == {(dc1.address, "dc1")}
    assert cassandra_two_dc.all_addresses() == [dc1.address, dc2.address]


def test_two_dc_replication_and_serial_with_dc2_down(cassandra_two_dc: CassandraService) -> None:
    """NetworkTopologyStrategy {'dc1': 1, 'dc2': 1}; with the dc2 node stopped,
    LOCAL_QUORUM and LOCAL_SERIAL keep working in dc1, SERIAL cannot."""
    ks = unique_keyspace("twodc")
    dc2_node = cassandra_two_dc.node("dc2")
    cluster = cassandra_two_dc.driver_cluster(local_dc="dc1")
    dc2_cluster = cassandra_two_dc.driver_cluster(local_dc="dc2")
    try:
        session = cluster.connect()
        session.execute(f"CREATE KEYSPACE {ks} WITH replication = "
                        "{'class': 'NetworkTopologyStrategy', 'dc1': 1, 'dc2': 1}")
        session.execute(f"CREATE TABLE {ks}.c (k text PRIMARY KEY, v int)")
        session.execute(SimpleStatement(f"INSERT INTO {ks}.c (k, v) VALUES ('both', 1)",
                                        consistency_level=ConsistencyLevel.EACH_QUORUM))
        dc2_session = dc2_cluster.connect()
        row = dc2_session.execute(SimpleStatement(f"SELECT v FROM {ks}.c WHERE k = 'both'",
                                                  consistency_level=ConsistencyLevel.LOCAL_ONE)).one()
        assert row.v == 1  # replicated to dc2
        dc2_cluster.shutdown()

        paxos_dc2_before = cassandra_two_dc.paxos_rows([dc2_node.address])[dc2_node.address]
        lwt = SimpleStatement(f"INSERT INTO {ks}.c (k, v) VALUES ('serial-up', 1) IF NOT EXISTS",
                              serial_consistency_level=ConsistencyLevel.SERIAL)
        assert session.execute(lwt).was_applied
        # a SERIAL round involves the replicas of both datacenters
        assert cassandra_two_dc.paxos_rows([dc2_node.address])[dc2_node.address] == paxos_dc2_before + 1

        t0 = time.monotonic()
        assert dc2_node.stop()
        report(f"dc2 node stopped in {time.monotonic() - t0:.1f}s")
        try:
            session.execute(f"INSERT INTO {ks}.c (k, v) VALUES ('dc1-only', 1)")  # LOCAL_QUORUM
            assert session.execute(f"SELECT v FROM {ks}.c WHERE k = 'dc1-only'").one().v == 1

            local = SimpleStatement(f"INSERT INTO {ks}.c (k, v) VALUES ('local-serial', 1) IF NOT EXISTS",
                                    serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL)
            assert session.execute(local).was_applied
            cond = SimpleStatement(f"UPDATE {ks}.c SET v = 2 WHERE k = 'local-serial' IF v = 1",
                                   serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL)
            assert session.execute(cond).was_applied
            read = SimpleStatement(f"SELECT v FROM {ks}.c WHERE k = 'local-serial'",
                                   consistency_level=ConsistencyLevel.LOCAL_SERIAL)
            assert session.execute(read).one().v == 2

            serial = SimpleStatement(f"INSERT INTO {ks}.c (k, v) VALUES ('serial-down', 1) IF NOT EXISTS",
                                     serial_consistency_level=ConsistencyLevel.SERIAL)
            t0 = time.monotonic()
            with pytest.raises((Unavailable, NoHostAvailable, WriteTimeout)) as failure:
                session.execute(serial)
            report(f"SERIAL LWT with dc2 down: {type(failure.value).__name__} after "
                   f"{time.monotonic() - t0:.2f}s: {failure.value}")
            assert "SERIAL" in str(failure.value)
        finally:
            t0 = time.monotonic()
            dc2_node.start()
            tool.wait_for_ring(cassandra_two_dc.nodes)
            report(f"dc2 node restarted in {time.monotonic() - t0:.1f}s")
        session.execute(f"DROP KEYSPACE {ks}")
    finally:
        dc2_cluster.shutdown()
        cluster.shutdown()
