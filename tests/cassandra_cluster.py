"""A real Apache Cassandra for tests: pytest fixtures over ``tools/cassandra.py``.

``tests/conftest.py`` names this module in ``pytest_plugins``, so every test
takes these fixtures as arguments without importing them.

* ``cassandra_node`` (session scope): one node on 127.0.0.1, datacenter dc1.
  A node already answering CQL there (e.g. started with
  ``python3 tools/cassandra.py start --name node1``) is reused and left
  running, which makes local iteration fast; otherwise the fixture starts a
  fresh node named ``test-single`` and stops it at the end of the session.
  A reused node keeps its data: tests create keyspaces of their own
  (see :func:`unique_keyspace`).
* ``cassandra_two_dc`` (module scope): a second cluster (another cluster
  name, its own seeds) of two nodes, ``test-dc1`` on 127.0.0.2 in dc1 and
  ``test-dc2`` on 127.0.0.3 in dc2, so that it coexists with the single node.
  Set ``MAILCLUSTER_TEST_CASSANDRA_TWO_DC=127.0.0.3,127.0.0.4`` to move it.
  A test that stops a node restarts it before it ends
  (``service.node("dc2").start()``), since later tests of the module share
  the cluster.
* ``cassandra_tls`` (module scope): ``test-tls`` on 127.0.0.9 (its own
  cluster ``mailcluster-test-tls``), whose CQL speaks TLS only
  (``tools/cassandra.py start --tls``: a certificate of the test CA for its
  address).  ``service.ca_file`` is the CA file clients verify it with;
  ``query`` and ``driver_cluster`` use TLS by themselves.  A node of ours
  already running there with TLS is reused and left running.
  ``MAILCLUSTER_TEST_CASSANDRA_TLS`` moves it to another address.

Nothing here skips: without Java, Maven or the jars the fixtures raise, and
the tests fail (tools/install-test-deps installs all three).

``tools/cassandra.py`` is loaded under the module name
``mailcluster_cassandra_tool``: putting ``tools/`` on ``sys.path`` would
shadow the ``cassandra`` package of cassandra-driver.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.tools import TOOLS, load_tool

TOOL_PATH = TOOLS / "cassandra.py"
TOOL_MODULE = "mailcluster_cassandra_tool"

tool = load_tool(TOOL_PATH.name, TOOL_MODULE)
CassandraNode = tool.CassandraNode
CassandraToolError = tool.CassandraToolError

SINGLE_NAME = "test-single"
SINGLE_ADDRESS = "127.0.0.1"
SINGLE_DC = "dc1"
SINGLE_CLUSTER_NAME = "mailcluster-test"

TWO_DC_NAMES = ("test-dc1", "test-dc2")
TWO_DC_DCS = ("dc1", "dc2")
TWO_DC_CLUSTER_NAME = "mailcluster-test-2dc"
TWO_DC_ENV = "MAILCLUSTER_TEST_CASSANDRA_TWO_DC"

TLS_NAME = "test-tls"
TLS_CLUSTER_NAME = "mailcluster-test-tls"
TLS_ENV = "MAILCLUSTER_TEST_CASSANDRA_TLS"

START_TIMEOUT = float(os.environ.get("MAILCLUSTER_TEST_CASSANDRA_TIMEOUT", "240"))


def two_dc_addresses() -> tuple[str, str]:
    raw = os.environ.get(TWO_DC_ENV, "127.0.0.2,127.0.0.3")
    addresses = tuple(a.strip() for a in raw.split(",") if a.strip())
    if len(addresses) != 2 or SINGLE_ADDRESS in addresses:
        raise CassandraToolError(f"{TWO_DC_ENV} must name two addresses other than {SINGLE_ADDRESS}: {raw!r}")
    return addresses  # type: ignore[return-value]


@dataclasses.dataclass
class CassandraService:
    """What a test needs to reach a running cluster."""

    cluster_name: str
    contact_points: tuple[str, ...]
    port: int
    local_dc: str
    #: the nodes, when they are ours to stop and start (empty for a reused
    #: node this checkout does not know)
    nodes: tuple[Any, ...] = ()
    started_here: bool = False
    #: datacenter of each contact point
    dcs: dict[str, str] = dataclasses.field(default_factory=dict)
    #: seconds the fixture took to start the nodes (0 when reused)
    start_seconds: float = 0.0
    #: the CA file of a cluster whose CQL speaks TLS (None: clear text)
    ca_file: Path | None = None

    @property
    def contact_point(self) -> str:
        return self.contact_points[0]

    def client_context(self) -> ssl.SSLContext | None:
        """The stdlib TLS context the tool's CQL client needs here (None: clear text)."""
        return tool.client_context(self.ca_file) if self.ca_file is not None else None

    def node(self, dc: str) -> Any:
        """The (first) node of datacenter ``dc``."""
        for node in self.nodes:
            if node.dc == dc:
                return node
        raise LookupError(f"no node of {dc} known in cluster {self.cluster_name}")

    def query(self, cql: str, address: str | None = None) -> list[dict[str, Any]]:
        """Run CQL with the stdlib client (simple types only) on one node."""
        return tool.cql_query(address or self.contact_point, cql, port=self.port, ssl_context=self.client_context())

    def all_addresses(self) -> list[str]:
        """Every node of the cluster: the contact points and their peers."""
        found = list(self.contact_points)
        for address in self.contact_points:
            try:
                peers = self.query("SELECT peer FROM system.peers_v2", address)
            except (OSError, tool.CqlError):
                continue
            found += [str(p["peer"]) for p in peers if str(p["peer"]) not in found]
        return found

    def paxos_rows(self, addresses: Sequence[str] | None = None) -> dict[str, int]:
        """Rows of ``system.paxos`` on each node (a node-local table: every
        Paxos round leaves a row on each replica that took part)."""
        counts = {}
        for address in addresses or self.all_addresses():
            counts[address] = len(self.query("SELECT row_key, cf_id FROM system.paxos", address))
        return counts

    def driver_cluster(self, local_dc: str | None = None, **kwargs: Any) -> Any:
        """A cassandra-driver ``Cluster`` for this service: token-aware,
        DC-aware with the local datacenter, LOCAL_QUORUM.  The caller shuts it down."""
        from cassandra import ConsistencyLevel
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=local_dc or self.local_dc)),
            consistency_level=ConsistencyLevel.LOCAL_QUORUM,
            request_timeout=30,
        )
        kwargs.setdefault("execution_profiles", {EXEC_PROFILE_DEFAULT: profile})
        kwargs.setdefault("port", self.port)
        if self.ca_file is not None:
            from twisted_mail_cluster.tls.client import stdlib_context

            kwargs.setdefault("ssl_context", stdlib_context(self.ca_file))
        contact = [a for a in self.contact_points if self.dcs.get(a, self.local_dc) == (local_dc or self.local_dc)]
        return Cluster(contact or list(self.contact_points), **kwargs)


def unique_keyspace(prefix: str = "t") -> str:
    """A keyspace name no other test run uses (names are at most 48 characters)."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def _local_info(address: str, port: int) -> dict[str, Any]:
    rows = tool.cql_query(address, "SELECT cluster_name, data_center FROM system.local", port=port)
    return rows[0] if rows else {}


def _known_node_at(address: str, base: Path) -> Any | None:
    for node in CassandraNode.all(base):
        if node.address == address and node.is_running():
            return node
    return None


def start_single_node(base: Path | None = None) -> CassandraService:
    """The single-node service: reuse a node answering on 127.0.0.1, or start one."""
    base = Path(base or tool.DEFAULT_BASE)
    port = tool.NATIVE_PORT
    if tool.cql_answers(SINGLE_ADDRESS, port):
        info = _local_info(SINGLE_ADDRESS, port)
        if info.get("data_center") != SINGLE_DC:
            raise CassandraToolError(
                f"the Cassandra node answering on {SINGLE_ADDRESS}:{port} is in datacenter "
                f"{info.get('data_center')!r}, not {SINGLE_DC!r}; stop it (python3 tools/cassandra.py stop-all)"
            )
        known = _known_node_at(SINGLE_ADDRESS, base)
        return CassandraService(
            cluster_name=str(info.get("cluster_name")), contact_points=(SINGLE_ADDRESS,), port=port,
            local_dc=SINGLE_DC, nodes=(known,) if known else (), started_here=False,
            dcs={SINGLE_ADDRESS: SINGLE_DC},
        )
    node = CassandraNode(SINGLE_NAME, address=SINGLE_ADDRESS, dc=SINGLE_DC,
                         cluster_name=SINGLE_CLUSTER_NAME, base=base)
    node.stop()  # a leftover process of ours that no longer answers
    took = node.start(START_TIMEOUT, fresh=True)
    return CassandraService(
        cluster_name=SINGLE_CLUSTER_NAME, contact_points=(SINGLE_ADDRESS,), port=port,
        local_dc=SINGLE_DC, nodes=(node,), started_here=True, dcs={SINGLE_ADDRESS: SINGLE_DC},
        start_seconds=took,
    )


def start_two_dc(base: Path | None = None) -> CassandraService:
    """The two-datacenter service: reuse our test cluster if it is up, else start it fresh."""
    base = Path(base or tool.DEFAULT_BASE)
    addresses = two_dc_addresses()
    nodes = tool.two_dc_cluster(addresses=addresses, names=TWO_DC_NAMES, dcs=TWO_DC_DCS,
                                cluster_name=TWO_DC_CLUSTER_NAME, base=base)
    port = tool.NATIVE_PORT
    service = CassandraService(
        cluster_name=TWO_DC_CLUSTER_NAME, contact_points=tuple(addresses), port=port,
        local_dc=TWO_DC_DCS[0], nodes=tuple(nodes), dcs=dict(zip(addresses, TWO_DC_DCS)),
    )
    answering = [a for a in addresses if tool.cql_answers(a, port)]
    foreign = [a for a in answering if _local_info(a, port).get("cluster_name") != TWO_DC_CLUSTER_NAME]
    if foreign:
        raise CassandraToolError(
            f"another Cassandra cluster answers on {', '.join(foreign)}; stop it "
            f"(python3 tools/cassandra.py stop-all) or move the test cluster with {TWO_DC_ENV}"
        )
    if len(answering) == len(addresses) and all(n.is_running() for n in nodes):
        tool.wait_for_ring(nodes)
        return service
    tool.stop_nodes(nodes)  # leftovers of ours that no longer answer
    service.start_seconds = tool.start_cluster(nodes, START_TIMEOUT, fresh=True)
    service.started_here = True
    return service


def tls_address() -> str:
    """The TLS node's address: 127.0.0.9 unless moved, never one of the other test clusters'."""
    address = os.environ.get(TLS_ENV, "127.0.0.9").strip()
    if address == SINGLE_ADDRESS or address in two_dc_addresses():
        raise CassandraToolError(f"{TLS_ENV} must name an address no other test cluster uses: {address!r}")
    return address


def start_tls_node(base: Path | None = None) -> CassandraService:
    """The TLS-only node: reuse ours if it is up with TLS, else start it fresh."""
    base = Path(base or tool.DEFAULT_BASE)
    address = tls_address()
    node = CassandraNode(TLS_NAME, address=address, dc=SINGLE_DC, cluster_name=TLS_CLUSTER_NAME, base=base,
                         tls=True)
    service = CassandraService(
        cluster_name=TLS_CLUSTER_NAME, contact_points=(address,), port=tool.NATIVE_PORT, local_dc=SINGLE_DC,
        nodes=(node,), dcs={address: SINGLE_DC}, ca_file=node.ca_file,
    )
    if node.is_running() and node.is_up():
        return service
    node.stop()  # a leftover process of ours that no longer answers
    service.start_seconds = node.start(START_TIMEOUT, fresh=True)
    service.started_here = True
    return service


@pytest.fixture(scope="session")
def cassandra_node() -> Iterator[CassandraService]:
    service = start_single_node()
    try:
        yield service
    finally:
        if service.started_here:
            tool.stop_nodes(service.nodes)


@pytest.fixture(scope="module")
def cassandra_two_dc() -> Iterator[CassandraService]:
    service = start_two_dc()
    try:
        yield service
    finally:
        if service.started_here:
            tool.stop_nodes(service.nodes)


@pytest.fixture(scope="module")
def cassandra_tls() -> Iterator[CassandraService]:
    service = start_tls_node()
    try:
        yield service
    finally:
        if service.started_here:
            tool.stop_nodes(service.nodes)
