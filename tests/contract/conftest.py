"""Backends of the contract suites.

Every test in ``tests/contract`` runs once per backend listed in the
registries below, and only through the contract interfaces
(``IMailStore``, ``IEventBus``): no SQL, no backend internals.  A new backend
joins by adding one factory here; the suites themselves stay unchanged.

* ``STORE_BACKENDS``: name -> factory(request, tmp_path) returning an
  *unstarted* IMailStore that is empty and private to the calling test (the
  Cassandra one gets a keyspace of its own on the session's real node).
  The fixture starts it and closes it.
* ``BUS_BACKENDS``: name -> factory(settings) returning an *unstarted*
  IEventBus whose group retries follow ``settings`` (short backoffs, so the
  suite stays fast).
"""

from __future__ import annotations

import uuid

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from twisted_mail_cluster.events.interfaces import IEventBus
from twisted_mail_cluster.store.interfaces import IMailStore

# -- store backends ------------------------------------------------------------


def _embedded_store(request: pytest.FixtureRequest, tmp_path: Path) -> IMailStore:
    from twisted_mail_cluster.store.embedded import EmbeddedStore

    return EmbeddedStore(tmp_path / "store" / "mail.sqlite", reactor)


def _cassandra_store(request: pytest.FixtureRequest, tmp_path: Path) -> IMailStore:
    """A keyspace of its own on the session's real Cassandra node, dropped afterwards.

    No grace period for garbage collection: the suite checks that content
    goes once its last message is gone.
    """
    from datetime import timedelta

    from tests.cassandra_cluster import unique_keyspace
    from twisted_mail_cluster.config import CassandraConfig
    from twisted_mail_cluster.store.cassandra import CassandraStore

    service = request.getfixturevalue("cassandra_node")
    keyspace = unique_keyspace("contract")
    config = CassandraConfig(
        contact_points=service.contact_points, port=service.port, local_datacenter=service.local_dc,
        keyspace=keyspace, replication={service.local_dc: 1},
    )
    request.addfinalizer(lambda: service.query(f"DROP KEYSPACE IF EXISTS {keyspace}"))
    return CassandraStore(config, reactor, gc_grace=timedelta(0))


STORE_BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], IMailStore]] = {
    "embedded": _embedded_store,
    "cassandra": _cassandra_store,
}


@pytest.fixture(params=list(STORE_BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IMailStore]:
    """A started, empty store of each backend; closed after the test."""
    backend = STORE_BACKENDS[request.param](request, tmp_path)
    pytest_twisted.blockon(backend.start())
    try:
        yield backend
    finally:
        pytest_twisted.blockon(backend.close())


OWNER = "alice@example.com"
OTHER_OWNER = "bob@example.com"


@pytest.fixture
def owner(store: IMailStore) -> str:
    """A local domain with two users; the first one's address."""
    pytest_twisted.blockon(store.add_domain("example.com"))
    pytest_twisted.blockon(store.add_user(OWNER, "hash-of-alice"))
    pytest_twisted.blockon(store.add_user(OTHER_OWNER, "hash-of-bob"))
    return OWNER


@pytest.fixture
def other_owner(owner: str) -> str:
    """The second user of ``owner``'s domain."""
    return OTHER_OWNER


# -- event bus backends ----------------------------------------------------------


@dataclass(frozen=True)
class BusSettings:
    """Group retry policy every bus backend must accept (seconds)."""

    retries: int = 3
    first_backoff: float = 0.02
    max_backoff: float = 0.05

    def backoff(self, attempt: int) -> float:
        """The least wait before retry number ``attempt + 1`` (0-based attempt)."""
        return min(self.first_backoff * 2**attempt, self.max_backoff)


BUS_SETTINGS = BusSettings()


def _inprocess_bus(settings: BusSettings) -> IEventBus:
    from twisted_mail_cluster.events.inprocess import InProcessEventBus

    return InProcessEventBus(
        reactor,
        retries=settings.retries,
        first_backoff=settings.first_backoff,
        max_backoff=settings.max_backoff,
    )


def _rabbitmq_bus(settings: BusSettings, request: pytest.FixtureRequest) -> IEventBus:
    """A bus on the session's real broker, with names of its own (a fresh prefix per test)."""
    from twisted_mail_cluster.events.rabbitmq import RabbitMQEventBus

    broker = request.getfixturevalue("rabbitmq")
    return RabbitMQEventBus(
        broker.url, reactor, prefix=f"test{uuid.uuid4().hex[:12]}",
        retries=settings.retries, first_backoff=settings.first_backoff, max_backoff=settings.max_backoff,
    )


BUS_BACKENDS: dict[str, Callable[..., IEventBus]] = {
    "inprocess": lambda settings, request: _inprocess_bus(settings),
    "rabbitmq": _rabbitmq_bus,
}


@pytest.fixture
def bus_settings() -> BusSettings:
    """The retry policy the ``bus`` fixture was built with."""
    return BUS_SETTINGS


@pytest.fixture(params=list(BUS_BACKENDS))
def bus(request: pytest.FixtureRequest, bus_settings: BusSettings) -> Iterator[IEventBus]:
    """A started bus of each backend; stopped after the test."""
    backend = BUS_BACKENDS[request.param](bus_settings, request)
    pytest_twisted.blockon(backend.start())
    if hasattr(backend, "when_connected"):
        pytest_twisted.blockon(backend.when_connected())
    try:
        yield backend
    finally:
        pytest_twisted.blockon(backend.stop())
