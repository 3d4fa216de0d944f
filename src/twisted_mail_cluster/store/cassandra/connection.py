"""cassandra-driver, bridged to Twisted.

The driver runs its own I/O thread (its default libev connection class; its
Twisted event loop is deprecated, TWISTED-NOTES section 6).  Each
``execute_async`` future is turned into a Deferred that fires on the reactor
thread with *all* rows of the result, fetching further pages as needed:
callbacks run on the driver's thread, so they only append rows and hand the
outcome over with ``callFromThread``.

Connecting and preparing statements block, so they run in a thread at start.
Cassandra's availability errors (timeouts, not enough replicas, no host)
become ``TemporaryFailure``: the protocols turn that into SMTP 451, POP3
``-ERR [SYS/TEMP]`` and IMAP ``NO [UNAVAILABLE]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import structlog
from cassandra import (
    ConsistencyLevel,
    CoordinationFailure,
    OperationTimedOut,
    ReadTimeout,
    Unavailable,
    WriteTimeout,
)
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import BatchStatement, BatchType, PreparedStatement, dict_factory
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from ...config import CassandraConfig
from ..errors import TemporaryFailure

log = structlog.get_logger(__name__)

Row = dict[str, Any]

#: Errors that mean "the cluster cannot answer now", not "the request is wrong".
UNAVAILABLE = (
    Unavailable, ReadTimeout, WriteTimeout, OperationTimedOut, NoHostAvailable, CoordinationFailure,
)


class LwtNotApplied(Exception):
    """A lightweight transaction lost its race; ``current`` holds the row it saw."""

    def __init__(self, current: Row) -> None:
        super().__init__("lightweight transaction not applied")
        self.current = current


class CassandraSession:
    """One connected session with prepared statements, answering in Deferreds."""

    def __init__(self, config: CassandraConfig, reactor: IReactorFromThreads) -> None:
        self.config = config
        self._reactor = reactor
        self._cluster: Cluster | None = None
        self._session: Session | None = None
        self._prepared: dict[str, PreparedStatement] = {}

    # -- life cycle ---------------------------------------------------------------

    def connect_blocking(self) -> Session:
        """Blocking: connect with DC-aware, token-aware routing and our consistency levels."""
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(
                DCAwareRoundRobinPolicy(local_dc=self.config.local_datacenter)
            ),
            consistency_level=ConsistencyLevel.name_to_value[self.config.consistency],
            serial_consistency_level=ConsistencyLevel.name_to_value[self.config.serial_consistency],
            request_timeout=12.0,
            row_factory=dict_factory,
        )
        self._cluster = Cluster(
            contact_points=list(self.config.contact_points),
            port=self.config.port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            protocol_version=5,
            connect_timeout=10,
        )
        self._session = self._cluster.connect()
        return self._session

    def run_blocking(self, cql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Blocking: for schema changes at start-up only."""
        assert self._session is not None
        return list(self._session.execute(cql, params))

    def prepare_all(self, statements: Mapping[str, str]) -> Deferred[None]:
        def work() -> None:
            assert self._session is not None
            for name, cql in statements.items():
                self._prepared[name] = self._session.prepare(cql)

        return deferToThread(work)

    def close(self) -> Deferred[None]:
        cluster, self._cluster, self._session = self._cluster, None, None
        if cluster is None:
            return succeed(None)
        return deferToThread(cluster.shutdown)

    # -- statements -----------------------------------------------------------------

    def statement(self, name: str) -> PreparedStatement:
        return self._prepared[name]

    def execute(self, name: str, *params: Any) -> Deferred[list[Row]]:
        """Run a prepared statement; fire with every row (all pages)."""
        return self._submit(self._prepared[name].bind(params))

    def batch(self, items: Iterable[tuple[str, Sequence[Any]]], logged: bool = True) -> Deferred[list[Row]]:
        """Run prepared statements as one batch (a conditional one if any has IF)."""
        batch = BatchStatement(batch_type=BatchType.LOGGED if logged else BatchType.UNLOGGED)
        for name, params in items:
            batch.add(self._prepared[name], params)
        return self._submit(batch)

    def execute_lwt(self, name: str, *params: Any) -> Deferred[Row]:
        """Run a conditional statement; fire with its row if applied, else fail with LwtNotApplied."""
        return self._submit(self._prepared[name].bind(params)).addCallback(_applied)

    def batch_lwt(self, items: Iterable[tuple[str, Sequence[Any]]]) -> Deferred[Row]:
        return self.batch(items).addCallback(_applied)

    def _submit(self, statement: Any) -> Deferred[list[Row]]:
        if self._session is None:
            return fail(TemporaryFailure("not connected to Cassandra"))
        d: Deferred[list[Row]] = Deferred()
        rows: list[Row] = []
        future: ResponseFuture = self._session.execute_async(statement)

        def page(results: list[Row]) -> None:
            # Runs on the driver's thread (or at once, if the result is there).
            try:
                rows.extend(results or ())
                if future.has_more_pages:
                    future.start_fetching_next_page()  # the same callbacks fire again
                    return
            except BaseException as e:  # the driver swallows exceptions raised here
                self._reactor.callFromThread(d.errback, Failure(e))
                return
            self._reactor.callFromThread(d.callback, rows)

        def failed(error: BaseException) -> None:
            self._reactor.callFromThread(d.errback, Failure(error))

        future.add_callbacks(page, failed)
        return d.addErrback(_as_temporary)


def _applied(rows: list[Row]) -> Row:
    row = rows[0] if rows else {"[applied]": False}
    if not row.get("[applied]", False):
        raise LwtNotApplied(row)
    return row


def _as_temporary(failure: Failure) -> Failure:
    if failure.check(*UNAVAILABLE):
        log.warning("cassandra.unavailable", error=repr(failure.value))
        return Failure(TemporaryFailure(f"Cassandra: {failure.value}"))
    return failure
