"""Run SQLite work off the reactor thread, one transaction per call.

SQLite allows one writer at a time, so every write goes through a single
dedicated thread: transactions never wait on each other's locks, and
``BEGIN IMMEDIATE`` takes the write lock before any read so that a
read-then-write transaction cannot deadlock.  Readers get their own small
pool; in WAL mode they read a consistent snapshot while the writer works.

With ``synchronous=FULL`` in WAL mode, COMMIT returns only after the WAL is
fsynced: when a write Deferred fires, the data survives a crash or a power
cut.  That is the promise behind SMTP's 250.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .errors import TemporaryFailure

T = TypeVar("T")
Work = Callable[..., T]

_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
)


class SQLiteRunner:
    """Owns the connections and threads of one SQLite database file."""

    def __init__(self, path: Path, reactor: IReactorThreads, readers: int = 4) -> None:
        self._path = path
        self._reactor = reactor
        self._writer = ThreadPool(minthreads=1, maxthreads=1, name="sqlite-writer")
        self._readers = ThreadPool(minthreads=1, maxthreads=readers, name="sqlite-reader")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._running = False

    def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._writer.start()
        self._readers.start()
        self._running = True

    def stop(self) -> None:
        """Stop the threads, then close every connection they opened."""
        if not self._running:
            return
        self._running = False
        self._writer.stop()
        self._readers.stop()
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    def write(self, work: Work[T], *args: object) -> Deferred[T]:
        """Run ``work(connection, *args)`` in one write transaction."""
        return self._run(self._writer, "BEGIN IMMEDIATE", work, args)

    def read(self, work: Work[T], *args: object) -> Deferred[T]:
        """Run ``work(connection, *args)`` in one read transaction (a snapshot)."""
        return self._run(self._readers, "BEGIN", work, args)

    def _run(self, pool: ThreadPool, begin: str, work: Work[T], args: tuple[object, ...]) -> Deferred[T]:
        if not self._running:
            return fail(TemporaryFailure("embedded store is closed"))
        d = deferToThreadPool(self._reactor, pool, self._transaction, begin, work, args)
        d.addErrback(_as_temporary)
        return d

    def _transaction(self, begin: str, work: Work[T], args: tuple[object, ...]) -> T:
        connection = self._connection()
        connection.execute(begin)
        try:
            result = work(connection, *args)
            connection.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (deferred constraint, disk full, I/O error) leaves
            # the transaction open: roll it back, or every later call on this
            # thread's connection fails with "transaction within a transaction".
            # SQLite may already have rolled back by itself (in_transaction is
            # then false); a second ROLLBACK would hide the real error.
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return result

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False
            )
            for pragma in _PRAGMAS:
                connection.execute(pragma)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection


def _as_temporary(failure: Failure) -> Failure:
    """A locked or failing database is a reason to try again later, not a refusal."""
    if failure.check(sqlite3.OperationalError):
        return Failure(TemporaryFailure(f"embedded store: {failure.value}"))
    return failure
