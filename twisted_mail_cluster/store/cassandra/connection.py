"""cassandra-driver, bridged to Twisted.

The driver runs its own I/O thread (its default libev connection class; its
Twisted event loop is deprecated, TWISTED-NOTES section 6).  Each
``execute_async`` future is turned into a Deferred that fires on the reactor
thread with *all* rows of the result, fetching further pages as needed:
callbacks run on the driver's thread, so they only append rows and hand the
outcome over with ``callFromThread``.

Connecting and preparing statements block, so they run in a thread at start.
With ``[store.cassandra] tls = true`` every connection is TLS, verified
against ``tls_ca_file`` (tls/client.py); a handshake that fails on every
contact point stops the start with one line that says so (``CassandraTLSError``).
Cassandra's availability errors (timeouts, not enough replicas, no host)
become ``TemporaryFailure``: the protocols turn that into SMTP 451, POP3
``-ERR [SYS/TEMP]`` and IMAP ``NO [UNAVAILABLE]``.

A lightweight transaction can also end without telling whether it was
applied: a timeout once its Paxos round started, or (protocol v5) a proposal
that only some replicas accepted before a competing round preempted it, which
happens under contention as soon as there are several replicas.  Those become
``LwtOutcomeUnknown`` (a ``TemporaryFailure``), and ``read_serial`` lets the
store find out: a SERIAL read completes or supersedes any unfinished round on
the partition, so what it returns is final.
"""

from __future__ import annotations

import ssl
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
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy
from cassandra.protocol import ErrorMessage
from cassandra.query import BatchStatement, BatchType, PreparedStatement, dict_factory
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from ...tls.client import stdlib_context
from ...config import CassandraConfig
from ..errors import StoreError, TemporaryFailure

log = structlog.get_logger(__name__)

Row = dict[str, Any]

#: Seconds a request may wait for its answer (client side; Cassandra's own
#: timeouts are shorter and answer first when the node is alive).
REQUEST_TIMEOUT = 12.0
#: Reconnecting to a node that went away: after 0.5 s, then doubling up to
#: 5 s between attempts, for ever.  The driver's default waits up to 10
#: minutes between attempts (so a node could keep failing requests minutes
#: after Cassandra came back) and gives up for good after 64 attempts.
RECONNECTION = ExponentialReconnectionPolicy(base_delay=0.5, max_delay=5.0, max_attempts=None)

#: Errors that mean "the cluster cannot answer now", not "the request is wrong".
UNAVAILABLE = (
    Unavailable, ReadTimeout, WriteTimeout, OperationTimedOut, NoHostAvailable, CoordinationFailure,
)


#: CAS_WRITE_UNKNOWN (protocol v5): "CAS operation result is unknown - proposal
#: accepted by 1 but not a quorum".  cassandra-driver 3.30 has no class for it,
#: so it arrives as a bare ErrorMessage with this code.
CAS_WRITE_UNKNOWN = 0x1700

#: Failures of a conditional statement after which it may or may not be applied.
LWT_UNKNOWN = (WriteTimeout, OperationTimedOut, ReadTimeout)


class CassandraTLSError(StoreError):
    """No contact point completed a TLS handshake: the message says why, in one line.

    A StoreError (raised on purpose, a configuration to fix), so that
    mailcluster-admin prints it as its one line too.
    """


class LwtOutcomeUnknown(TemporaryFailure):
    """A lightweight transaction may or may not have been applied: find out before retrying."""


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
            request_timeout=REQUEST_TIMEOUT,
            row_factory=dict_factory,
        )
        self._cluster = Cluster(
            contact_points=list(self.config.contact_points),
            port=self.config.port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            protocol_version=5,
            connect_timeout=10,
            reconnection_policy=RECONNECTION,
            # No ssl_options={"server_hostname": ...}: with check_hostname on,
            # the driver checks each connection against its own endpoint's
            # address, where one fixed name would be wrong for all nodes but one.
            ssl_context=self.ssl_context(),
        )
        try:
            self._session = self._cluster.connect()
        except NoHostAvailable as e:
            tls = _tls_failure(e) if self.config.tls else None
            if tls is None:
                raise
            self._cluster.shutdown()
            self._cluster = None
            raise CassandraTLSError(tls) from None
        return self._session

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of every connection (None: clear text, ``tls = false``)."""
        if not self.config.tls:
            return None
        return stdlib_context(self.config.tls_ca_file)

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
        """Run a conditional statement; fire with its row if applied, else fail with
        LwtNotApplied (the condition was false) or LwtOutcomeUnknown."""
        return self._submit(self._prepared[name].bind(params), lwt=True).addCallback(_applied)

    def batch_lwt(self, items: Iterable[tuple[str, Sequence[Any]]]) -> Deferred[Row]:
        """A conditional batch: like execute_lwt."""
        batch = BatchStatement(batch_type=BatchType.LOGGED)
        for name, params in items:
            batch.add(self._prepared[name], params)
        return self._submit(batch, lwt=True).addCallback(_applied)

    def read_serial(self, name: str, *params: Any) -> Deferred[list[Row]]:
        """Run a SELECT at the serial consistency (SERIAL or LOCAL_SERIAL): it sees
        every applied lightweight transaction, and settles any whose outcome was unknown."""
        statement = self._prepared[name].bind(params)
        statement.consistency_level = ConsistencyLevel.name_to_value[self.config.serial_consistency]
        return self._submit(statement)

    def _submit(self, statement: Any, lwt: bool = False) -> Deferred[list[Row]]:
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
        return d.addErrback(_as_lwt_outcome if lwt else _as_temporary)


def _tls_failure(error: NoHostAvailable) -> str | None:
    """One line for a connect that failed in TLS on some contact point, else None.

    The driver keeps only the text of the socket's error (connection.py,
    ``_connect_socket``: "Tried connecting to [...]. Last error: [SSL:
    CERTIFICATE_VERIFY_FAILED] ..."), so the TLS failure is recognised by it.
    """
    errors: Mapping[Any, BaseException] = getattr(error, "errors", None) or {}
    for endpoint, cause in errors.items():
        text = str(cause)
        if "SSL" not in text and "certificate" not in text.lower():
            continue
        detail = text.split("Last error: ", 1)[-1]
        if "CERTIFICATE_VERIFY_FAILED" in text:
            advice = (
                "the node's certificate does not verify against store.cassandra.tls_ca_file (the system's "
                "trust store when unset), or does not name the address connected to (an IP subjectAltName)"
            )
        elif "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
            advice = "the node does not answer in TLS: is client_encryption_options enabled on it?"
        else:
            advice = "check the node's client_encryption_options and store.cassandra.tls_ca_file"
        return f"TLS to Cassandra at {endpoint} failed ({detail}): {advice}"
    return None


def _applied(rows: list[Row]) -> Row:
    row = rows[0] if rows else {"[applied]": False}
    if not row.get("[applied]", False):
        raise LwtNotApplied(row)
    return row


def _as_lwt_outcome(failure: Failure) -> Failure:
    """A conditional statement that failed after it may have been applied."""
    error = failure.value
    if failure.check(*LWT_UNKNOWN) or (isinstance(error, ErrorMessage) and error.code == CAS_WRITE_UNKNOWN):
        log.warning("cassandra.lwt_outcome_unknown", error=repr(error))
        return Failure(LwtOutcomeUnknown(f"Cassandra: {error}"))
    return _as_temporary(failure)


def _as_temporary(failure: Failure) -> Failure:
    error = failure.value
    if isinstance(error, ErrorMessage) and error.code == CAS_WRITE_UNKNOWN:
        # A SERIAL read proposes an empty update, which contention can leave unfinished too.
        log.warning("cassandra.lwt_outcome_unknown", error=repr(error))
        return Failure(LwtOutcomeUnknown(f"Cassandra: {error}"))
    if failure.check(*UNAVAILABLE):
        log.warning("cassandra.unavailable", error=repr(failure.value))
        return Failure(TemporaryFailure(f"Cassandra: {failure.value}"))
    return failure
