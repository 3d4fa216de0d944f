"""The embedded backend: one SQLite file, no setup, for a single node.

The tables mirror the Cassandra design (DESIGN.md) so that both backends
answer the contract the same way: content in SHA-256-checked chunks, a
``messages`` row per copy of a message, an IMAP view keyed by UID and a POP3
view keyed by arrival time and TimeUUID.  Here every change happens inside
one SQLite transaction, so a crash leaves either all of a delivery or none.

Content no message refers to any more is removed in the same transaction that
removed its last message: on SQLite that costs one indexed lookup, and it
keeps the file from growing.  ``collect_garbage`` sweeps anything missed.
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from zope.interface import implementer

from ..ids import message_id_time, new_mailbox_id, new_message_id, new_uidvalidity
from ..twisted_types import installed_reactor
from .errors import AlreadyExists, ContentCorrupted, ContentMissing, NotEmpty, NotFound
from .interfaces import IMailStore
from .model import (
    DELETED,
    SEEN,
    Copied,
    Delivered,
    DeliveryTarget,
    FlagMode,
    ImapChanges,
    ImapEntry,
    Mailbox,
    MailboxSnapshot,
    MailboxStatus,
    MessageInfo,
    Pop3Entry,
    Removed,
    StoreResult,
    User,
    normalise_flags,
)
from .sqlite_runner import SQLiteRunner

SCHEMA_VERSION = 1
CHUNK_SIZE = 64 * 1024
#: Ranges up to this size are returned in memory; larger ones are spooled to disk.
SPOOL_IN_MEMORY = 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS domains (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    address TEXT PRIMARY KEY,
    domain TEXT NOT NULL REFERENCES domains(name),
    password_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS users_domain ON users(domain);
CREATE TABLE IF NOT EXISTS mailboxes (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL REFERENCES users(address) ON DELETE CASCADE,
    name TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL DEFAULT 1,
    highest_modseq INTEGER NOT NULL DEFAULT 1,
    first_recent_uid INTEGER NOT NULL DEFAULT 1,
    special_use TEXT,
    UNIQUE (owner, name)
);
CREATE TABLE IF NOT EXISTS subscriptions (
    owner TEXT NOT NULL REFERENCES users(address) ON DELETE CASCADE,
    name TEXT NOT NULL,
    PRIMARY KEY (owner, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    structure TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blob_chunks (
    blob_id TEXT NOT NULL REFERENCES blobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (blob_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    blob_id TEXT NOT NULL REFERENCES blobs(id),
    size INTEGER NOT NULL,
    internal_date REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_blob ON messages(blob_id);
CREATE TABLE IF NOT EXISTS imap_view (
    mailbox_id TEXT NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    flags TEXT NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, uid)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS imap_view_message ON imap_view(mailbox_id, message_id);
CREATE INDEX IF NOT EXISTS imap_view_modseq ON imap_view(mailbox_id, modseq);
CREATE TABLE IF NOT EXISTS imap_expunged (
    mailbox_id TEXT NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS imap_expunged_modseq ON imap_expunged(mailbox_id, modseq);
CREATE TABLE IF NOT EXISTS pop3_view (
    mailbox_id TEXT NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    arrival INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, arrival, message_id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS pop3_view_message ON pop3_view(mailbox_id, message_id);
"""

#: SQLite's limit on host parameters is 32766 in current versions; stay well below.
_BATCH = 500
T = TypeVar("T")


def _flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(flags))


def _flags(text: str) -> frozenset[str]:
    return frozenset(text.split()) if text else frozenset()


def _has_flag_sql(flag: str) -> str:
    """A WHERE fragment true when the space-separated flags column holds ``flag``."""
    return f"(' ' || flags || ' ') LIKE '% {flag} %'"


def _batches(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _BATCH):
        yield items[start:start + _BATCH]


def _mailbox(row: sqlite3.Row | tuple) -> Mailbox:
    return Mailbox(
        id=uuid.UUID(row[0]), owner=row[1], name=row[2], uidvalidity=row[3], special_use=row[4]
    )


_MAILBOX_COLUMNS = "id, owner, name, uidvalidity, special_use"


def check_database(path: Path) -> None:
    """Blocking: create or check the schema now, for start-up before the reactor runs.

    Raises OSError, sqlite3.Error or RuntimeError (a newer schema) so that a
    node that cannot use its data folder stops with a clear message instead
    of failing its first SMTP transaction.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("BEGIN IMMEDIATE")
        EmbeddedStore._create_schema(connection)
        connection.execute("COMMIT")
    finally:
        connection.close()


@implementer(IMailStore)
class EmbeddedStore:
    """IMailStore on a SQLite file in the node's data folder."""

    imap_enabled = True

    def __init__(self, path: Path, reactor: IReactorThreads | None = None) -> None:
        self.path = path
        self._db = SQLiteRunner(path, reactor if reactor is not None else installed_reactor())

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        self._db.start()
        return self._db.write(self._create_schema)

    def close(self) -> Deferred[None]:
        self._db.stop()
        return succeed(None)

    @staticmethod
    def _create_schema(db: sqlite3.Connection) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        row = db.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            raise RuntimeError(
                f"{row[0]} is a newer schema version than this server knows ({SCHEMA_VERSION})"
            )

    # -- directory -----------------------------------------------------------

    def add_domain(self, name: str) -> Deferred[None]:
        def work(db: sqlite3.Connection) -> None:
            try:
                db.execute("INSERT INTO domains (name) VALUES (?)", (name,))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"domain {name} already exists") from None

        return self._db.write(work)

    def remove_domain(self, name: str) -> Deferred[None]:
        def work(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"no domain {name}")
            if db.execute("SELECT 1 FROM users WHERE domain = ? LIMIT 1", (name,)).fetchone():
                raise NotEmpty(f"domain {name} still has users")
            db.execute("DELETE FROM domains WHERE name = ?", (name,))

        return self._db.write(work)

    def list_domains(self) -> Deferred[list[str]]:
        return self._db.read(
            lambda db: [r[0] for r in db.execute("SELECT name FROM domains ORDER BY name")]
        )

    def domain_exists(self, name: str) -> Deferred[bool]:
        return self._db.read(
            lambda db: db.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone()
            is not None
        )

    def add_user(self, address: str, password_hash: str) -> Deferred[User]:
        domain = address.rpartition("@")[2]

        def work(db: sqlite3.Connection) -> User:
            if db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone() is None:
                raise NotFound(f"{domain} is not a local domain")
            try:
                db.execute(
                    "INSERT INTO users (address, domain, password_hash) VALUES (?, ?, ?)",
                    (address, domain, password_hash),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"user {address} already exists") from None
            return User(address, password_hash)

        return self._db.write(work)

    def remove_user(self, address: str) -> Deferred[None]:
        def work(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM users WHERE address = ?", (address,)).fetchone() is None:
                raise NotFound(f"no user {address}")
            for (mailbox_id,) in db.execute(
                "SELECT id FROM mailboxes WHERE owner = ?", (address,)
            ).fetchall():
                self._delete_mailbox_rows(db, mailbox_id)
            db.execute("DELETE FROM users WHERE address = ?", (address,))

        return self._db.write(work)

    def get_user(self, address: str) -> Deferred[User | None]:
        def work(db: sqlite3.Connection) -> User | None:
            row = db.execute(
                "SELECT address, password_hash FROM users WHERE address = ?", (address,)
            ).fetchone()
            return User(*row) if row else None

        return self._db.read(work)

    def list_users(self, domain: str | None = None) -> Deferred[list[User]]:
        def work(db: sqlite3.Connection) -> list[User]:
            if domain is None:
                rows = db.execute("SELECT address, password_hash FROM users ORDER BY address")
            else:
                rows = db.execute(
                    "SELECT address, password_hash FROM users WHERE domain = ? ORDER BY address",
                    (domain,),
                )
            return [User(*row) for row in rows]

        return self._db.read(work)

    def set_password_hash(self, address: str, password_hash: str) -> Deferred[None]:
        def work(db: sqlite3.Connection) -> None:
            cursor = db.execute(
                "UPDATE users SET password_hash = ? WHERE address = ?", (password_hash, address)
            )
            if cursor.rowcount == 0:
                raise NotFound(f"no user {address}")

        return self._db.write(work)

    # -- mailboxes -----------------------------------------------------------

    def create_mailbox(
        self, owner: str, name: str, special_use: str | None = None
    ) -> Deferred[Mailbox]:
        def work(db: sqlite3.Connection) -> Mailbox:
            if db.execute("SELECT 1 FROM users WHERE address = ?", (owner,)).fetchone() is None:
                raise NotFound(f"no user {owner}")
            last = db.execute("SELECT value FROM counters WHERE name = 'uidvalidity'").fetchone()
            uidvalidity = new_uidvalidity(last[0] if last else 0)
            db.execute(
                "INSERT OR REPLACE INTO counters (name, value) VALUES ('uidvalidity', ?)", (uidvalidity,)
            )
            mailbox = Mailbox(new_mailbox_id(), owner, name, uidvalidity, special_use)
            try:
                db.execute(
                    "INSERT INTO mailboxes (id, owner, name, uidvalidity, special_use)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (str(mailbox.id), owner, name, mailbox.uidvalidity, special_use),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"mailbox {name} already exists") from None
            return mailbox

        return self._db.write(work)

    def get_mailbox(self, owner: str, name: str) -> Deferred[Mailbox | None]:
        def work(db: sqlite3.Connection) -> Mailbox | None:
            row = db.execute(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes WHERE owner = ? AND name = ?",
                (owner, name),
            ).fetchone()
            return _mailbox(row) if row else None

        return self._db.read(work)

    def get_mailbox_by_id(self, mailbox_id: uuid.UUID) -> Deferred[Mailbox | None]:
        def work(db: sqlite3.Connection) -> Mailbox | None:
            row = db.execute(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes WHERE id = ?", (str(mailbox_id),)
            ).fetchone()
            return _mailbox(row) if row else None

        return self._db.read(work)

    def list_mailboxes(self, owner: str) -> Deferred[list[Mailbox]]:
        def work(db: sqlite3.Connection) -> list[Mailbox]:
            rows = db.execute(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes WHERE owner = ? ORDER BY name",
                (owner,),
            )
            return [_mailbox(row) for row in rows]

        return self._db.read(work)

    def count_mailboxes(self, owner: str) -> Deferred[int]:
        return self._db.read(
            lambda db: db.execute("SELECT COUNT(*) FROM mailboxes WHERE owner = ?", (owner,)).fetchone()[0]
        )

    def delete_mailbox(self, mailbox_id: uuid.UUID) -> Deferred[list[Removed]]:
        def work(db: sqlite3.Connection) -> list[Removed]:
            key = str(mailbox_id)
            if db.execute("SELECT 1 FROM mailboxes WHERE id = ?", (key,)).fetchone() is None:
                raise NotFound("no such mailbox")
            return self._delete_mailbox_rows(db, key)

        return self._db.write(work)

    def _delete_mailbox_rows(self, db: sqlite3.Connection, mailbox_id: str) -> list[Removed]:
        rows = db.execute(
            "SELECT message_id, uid FROM imap_view WHERE mailbox_id = ? ORDER BY uid",
            (mailbox_id,),
        ).fetchall()
        message_ids = [row[0] for row in rows]
        db.execute("DELETE FROM imap_view WHERE mailbox_id = ?", (mailbox_id,))
        db.execute("DELETE FROM pop3_view WHERE mailbox_id = ?", (mailbox_id,))
        self._drop_messages(db, message_ids)
        db.execute("DELETE FROM mailboxes WHERE id = ?", (mailbox_id,))
        box = uuid.UUID(mailbox_id)
        return [Removed(box, uuid.UUID(m), uid, None) for m, uid in rows]

    def rename_mailbox(self, mailbox_id: uuid.UUID, new_name: str) -> Deferred[Mailbox]:
        def work(db: sqlite3.Connection) -> Mailbox:
            try:
                cursor = db.execute(
                    "UPDATE mailboxes SET name = ? WHERE id = ?", (new_name, str(mailbox_id))
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"mailbox {new_name} already exists") from None
            if cursor.rowcount == 0:
                raise NotFound("no such mailbox")
            row = db.execute(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes WHERE id = ?", (str(mailbox_id),)
            ).fetchone()
            return _mailbox(row)

        return self._db.write(work)

    def subscribe(self, owner: str, name: str) -> Deferred[None]:
        return self._db.write(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO subscriptions (owner, name) VALUES (?, ?)", (owner, name)
            )
            and None
        )

    def unsubscribe(self, owner: str, name: str) -> Deferred[None]:
        def work(db: sqlite3.Connection) -> None:
            cursor = db.execute(
                "DELETE FROM subscriptions WHERE owner = ? AND name = ?", (owner, name)
            )
            if cursor.rowcount == 0:
                raise NotFound(f"not subscribed to {name}")

        return self._db.write(work)

    def list_subscriptions(self, owner: str) -> Deferred[list[str]]:
        return self._db.read(
            lambda db: [
                r[0]
                for r in db.execute(
                    "SELECT name FROM subscriptions WHERE owner = ? ORDER BY name", (owner,)
                )
            ]
        )

    # -- content ---------------------------------------------------------------

    def deliver(
        self,
        content: bytes,
        structure: str,
        targets: Sequence[DeliveryTarget],
        internal_date: datetime,
    ) -> Deferred[list[Delivered]]:
        when = internal_date.timestamp()

        def work(db: sqlite3.Connection) -> list[Delivered]:
            blob_id = self._put_blob(db, content, structure)
            delivered = []
            for target in targets:
                message_id = new_message_id()
                self._insert_message(db, message_id, blob_id, len(content), when)
                delivered.append(
                    self._add_to_mailbox(
                        db, str(target.mailbox_id), message_id, len(content), target.flags
                    )
                )
            return delivered

        return self._db.write(work)

    @staticmethod
    def _put_blob(db: sqlite3.Connection, content: bytes, structure: str) -> str:
        """Store content once under its SHA-256; identical content is kept only once."""
        blob_id = hashlib.sha256(content).hexdigest()
        inserted = db.execute(
            "INSERT OR IGNORE INTO blobs (id, size, chunk_size, structure) VALUES (?, ?, ?, ?)",
            (blob_id, len(content), CHUNK_SIZE, structure),
        ).rowcount
        if inserted:
            view = memoryview(content)
            db.executemany(
                "INSERT INTO blob_chunks (blob_id, seq, sha256, data) VALUES (?, ?, ?, ?)",
                (
                    (blob_id, seq, hashlib.sha256(chunk).hexdigest(), bytes(chunk))
                    for seq, chunk in enumerate(
                        view[offset:offset + CHUNK_SIZE]
                        for offset in range(0, len(content), CHUNK_SIZE)
                    )
                ),
            )
        return blob_id

    @staticmethod
    def _insert_message(
        db: sqlite3.Connection, message_id: uuid.UUID, blob_id: str, size: int, when: float
    ) -> None:
        db.execute(
            "INSERT INTO messages (id, blob_id, size, internal_date) VALUES (?, ?, ?, ?)",
            (str(message_id), blob_id, size, when),
        )

    @staticmethod
    def _next_modseq(db: sqlite3.Connection, mailbox_id: str) -> tuple[int, int]:
        """Reserve the next MODSEQ; fire with (uidnext, modseq).

        Safe without further locking: every write runs on the single writer
        thread inside ``BEGIN IMMEDIATE``.
        """
        row = db.execute(
            "SELECT uidnext, highest_modseq FROM mailboxes WHERE id = ?", (mailbox_id,)
        ).fetchone()
        if row is None:
            raise NotFound("no such mailbox")
        uidnext, highest = row
        db.execute(
            "UPDATE mailboxes SET highest_modseq = ? WHERE id = ?", (highest + 1, mailbox_id)
        )
        return uidnext, highest + 1

    def _add_to_mailbox(
        self,
        db: sqlite3.Connection,
        mailbox_id: str,
        message_id: uuid.UUID,
        size: int,
        flags: frozenset[str],
    ) -> Delivered:
        uid, modseq = self._next_modseq(db, mailbox_id)
        flags = normalise_flags(flags)
        db.execute("UPDATE mailboxes SET uidnext = ? WHERE id = ?", (uid + 1, mailbox_id))
        db.execute(
            "INSERT INTO imap_view (mailbox_id, uid, message_id, flags, modseq)"
            " VALUES (?, ?, ?, ?, ?)",
            (mailbox_id, uid, str(message_id), _flags_text(flags), modseq),
        )
        db.execute(
            "INSERT INTO pop3_view (mailbox_id, arrival, message_id, size) VALUES (?, ?, ?, ?)",
            (mailbox_id, message_id_time(message_id), str(message_id), size),
        )
        return Delivered(uuid.UUID(mailbox_id), message_id, uid, modseq, flags)

    def message_info(self, message_ids: Iterable[uuid.UUID]) -> Deferred[dict[uuid.UUID, MessageInfo]]:
        keys = [str(m) for m in message_ids]

        def work(db: sqlite3.Connection) -> dict[uuid.UUID, MessageInfo]:
            found: dict[uuid.UUID, MessageInfo] = {}
            for batch in _batches(keys):
                marks = ",".join("?" * len(batch))
                for row in db.execute(
                    "SELECT m.id, m.blob_id, m.size, m.internal_date, b.structure"
                    f" FROM messages m JOIN blobs b ON b.id = m.blob_id WHERE m.id IN ({marks})",
                    tuple(batch),
                ):
                    message_id = uuid.UUID(row[0])
                    found[message_id] = MessageInfo(message_id, row[1], row[2], row[3], row[4])
            return found

        return self._db.read(work)

    def open_content(self, blob_id: str, start: int = 0, end: int | None = None) -> Deferred[IO[bytes]]:
        return self._db.read(self._read_range, blob_id, start, end)

    @staticmethod
    def _read_range(db: sqlite3.Connection, blob_id: str, start: int, end: int | None) -> IO[bytes]:
        row = db.execute("SELECT size, chunk_size FROM blobs WHERE id = ?", (blob_id,)).fetchone()
        if row is None:
            raise ContentMissing(f"content {blob_id} is not stored")
        size, chunk_size = row
        end = size if end is None else min(end, size)
        start = max(0, min(start, end))
        whole = start == 0 and end == size
        out = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        digest = hashlib.sha256() if whole else None
        first, last = start // chunk_size, max(start, end - 1) // chunk_size
        expected = first
        if end > start:
            for seq, sha, data in db.execute(
                "SELECT seq, sha256, data FROM blob_chunks"
                " WHERE blob_id = ? AND seq BETWEEN ? AND ? ORDER BY seq",
                (blob_id, first, last),
            ):
                if seq != expected:
                    raise ContentMissing(f"content {blob_id}: chunk {expected} is missing")
                if hashlib.sha256(data).hexdigest() != sha:
                    raise ContentCorrupted(f"content {blob_id}: chunk {seq} fails its SHA-256")
                if digest is not None:
                    digest.update(data)
                base = seq * chunk_size
                out.write(data[max(0, start - base):end - base])
                expected += 1
            if expected != last + 1:
                raise ContentMissing(f"content {blob_id}: chunk {expected} is missing")
        if digest is not None and digest.hexdigest() != blob_id:
            raise ContentCorrupted(f"content {blob_id} fails its SHA-256")
        out.seek(0)
        return out

    def collect_garbage(self) -> Deferred[int]:
        def work(db: sqlite3.Connection) -> int:
            orphans = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM blobs b"
                    " WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.blob_id = b.id)"
                )
            ]
            for blob_id in orphans:
                db.execute("DELETE FROM blobs WHERE id = ?", (blob_id,))
            return len(orphans)

        return self._db.write(work)

    @staticmethod
    def _drop_messages(db: sqlite3.Connection, message_ids: Sequence[str]) -> None:
        """Delete message rows no view refers to, then content no message refers to."""
        blob_ids: set[str] = set()
        for batch in _batches(message_ids):
            marks = ",".join("?" * len(batch))
            blob_ids.update(
                r[0]
                for r in db.execute(
                    f"SELECT blob_id FROM messages WHERE id IN ({marks})", tuple(batch)
                )
            )
            db.execute(f"DELETE FROM messages WHERE id IN ({marks})", tuple(batch))
        for blob_id in blob_ids:
            db.execute(
                "DELETE FROM blobs WHERE id = ?"
                " AND NOT EXISTS (SELECT 1 FROM messages WHERE blob_id = ?)",
                (blob_id, blob_id),
            )

    # -- IMAP view -----------------------------------------------------------------

    def imap_snapshot(self, mailbox_id: uuid.UUID) -> Deferred[MailboxSnapshot]:
        def work(db: sqlite3.Connection) -> MailboxSnapshot:
            key = str(mailbox_id)
            row = db.execute(
                f"SELECT {_MAILBOX_COLUMNS}, uidnext, highest_modseq FROM mailboxes WHERE id = ?",
                (key,),
            ).fetchone()
            if row is None:
                raise NotFound("no such mailbox")
            entries = tuple(
                ImapEntry(uid, uuid.UUID(message_id), _flags(flags), modseq)
                for uid, message_id, flags, modseq in db.execute(
                    "SELECT uid, message_id, flags, modseq FROM imap_view"
                    " WHERE mailbox_id = ? ORDER BY uid",
                    (key,),
                )
            )
            return MailboxSnapshot(_mailbox(row), row[5], row[6], entries)

        return self._db.read(work)

    def imap_changes(self, mailbox_id: uuid.UUID, since_modseq: int) -> Deferred[ImapChanges]:
        def work(db: sqlite3.Connection) -> ImapChanges:
            key = str(mailbox_id)
            row = db.execute(
                "SELECT uidnext, highest_modseq FROM mailboxes WHERE id = ?", (key,)
            ).fetchone()
            if row is None:
                raise NotFound("no such mailbox")
            uidnext, highest = row
            if highest <= since_modseq:
                return ImapChanges(uidnext, highest, (), ())
            changed = tuple(
                ImapEntry(uid, uuid.UUID(message_id), _flags(flags), modseq)
                for uid, message_id, flags, modseq in db.execute(
                    "SELECT uid, message_id, flags, modseq FROM imap_view"
                    " WHERE mailbox_id = ? AND modseq > ? ORDER BY uid",
                    (key, since_modseq),
                )
            )
            expunged = tuple(
                r[0]
                for r in db.execute(
                    "SELECT uid FROM imap_expunged WHERE mailbox_id = ? AND modseq > ? ORDER BY uid",
                    (key, since_modseq),
                )
            )
            return ImapChanges(uidnext, highest, changed, expunged)

        return self._db.read(work)

    def imap_status(self, mailbox_id: uuid.UUID) -> Deferred[MailboxStatus]:
        def work(db: sqlite3.Connection) -> MailboxStatus:
            key = str(mailbox_id)
            row = db.execute(
                "SELECT uidvalidity, uidnext, highest_modseq, first_recent_uid"
                " FROM mailboxes WHERE id = ?",
                (key,),
            ).fetchone()
            if row is None:
                raise NotFound("no such mailbox")
            uidvalidity, uidnext, highest, first_recent = row
            messages, unseen, recent = db.execute(
                "SELECT COUNT(*),"
                f" COALESCE(SUM(CASE WHEN {_has_flag_sql(SEEN)} THEN 0 ELSE 1 END), 0),"
                " COALESCE(SUM(CASE WHEN uid >= ? THEN 1 ELSE 0 END), 0)"
                " FROM imap_view WHERE mailbox_id = ?",
                (first_recent, key),
            ).fetchone()
            size = db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM pop3_view WHERE mailbox_id = ?", (key,)
            ).fetchone()[0]
            return MailboxStatus(messages, recent, uidnext, uidvalidity, unseen, highest, size)

        return self._db.read(work)

    def imap_claim_recent(self, mailbox_id: uuid.UUID) -> Deferred[int]:
        def work(db: sqlite3.Connection) -> int:
            key = str(mailbox_id)
            row = db.execute(
                "SELECT first_recent_uid, uidnext FROM mailboxes WHERE id = ?", (key,)
            ).fetchone()
            if row is None:
                raise NotFound("no such mailbox")
            first_recent, uidnext = row
            if first_recent != uidnext:
                db.execute("UPDATE mailboxes SET first_recent_uid = ? WHERE id = ?", (uidnext, key))
            return first_recent

        return self._db.write(work)

    def imap_store(
        self,
        mailbox_id: uuid.UUID,
        uids: Sequence[int],
        mode: FlagMode,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> Deferred[StoreResult]:
        given = normalise_flags(flags)
        wanted = sorted(set(uids))

        def work(db: sqlite3.Connection) -> StoreResult:
            key = str(mailbox_id)
            rows = self._rows_for_uids(db, key, wanted)
            changes: list[tuple[int, str, frozenset[str]]] = []
            modified: list[int] = []
            for uid, message_id, flags_text, modseq in rows:
                if unchanged_since is not None and modseq > unchanged_since:
                    modified.append(uid)
                    continue
                current = _flags(flags_text)
                new = mode.apply(current, given)
                if new != current:
                    changes.append((uid, message_id, new))
            if not changes:
                return StoreResult((), tuple(modified))
            _, modseq = self._next_modseq(db, key)
            db.executemany(
                "UPDATE imap_view SET flags = ?, modseq = ? WHERE mailbox_id = ? AND uid = ?",
                ((_flags_text(new), modseq, key, uid) for uid, _, new in changes),
            )
            updated = tuple(ImapEntry(uid, uuid.UUID(m), new, modseq) for uid, m, new in changes)
            return StoreResult(updated, tuple(modified))

        return self._db.write(work)

    @staticmethod
    def _rows_for_uids(
        db: sqlite3.Connection, mailbox_id: str, uids: Sequence[int]
    ) -> list[tuple[int, str, str, int]]:
        rows: list[tuple[int, str, str, int]] = []
        for batch in _batches(uids):
            marks = ",".join("?" * len(batch))
            rows.extend(
                db.execute(
                    "SELECT uid, message_id, flags, modseq FROM imap_view"
                    f" WHERE mailbox_id = ? AND uid IN ({marks}) ORDER BY uid",
                    (mailbox_id, *batch),
                )
            )
        rows.sort()
        return rows

    def imap_expunge(
        self, mailbox_id: uuid.UUID, uids: Sequence[int] | None = None
    ) -> Deferred[list[Removed]]:
        def work(db: sqlite3.Connection) -> list[Removed]:
            key = str(mailbox_id)
            if uids is None:
                rows = db.execute(
                    "SELECT uid, message_id, flags, modseq FROM imap_view"
                    f" WHERE mailbox_id = ? AND {_has_flag_sql(DELETED)} ORDER BY uid",
                    (key,),
                ).fetchall()
            else:
                rows = [
                    r
                    for r in self._rows_for_uids(db, key, sorted(set(uids)))
                    if DELETED in _flags(r[2])
                ]
            return self._remove_rows(db, key, [(uid, message_id) for uid, message_id, _, _ in rows])

        return self._db.write(work)

    def _remove_rows(
        self, db: sqlite3.Connection, mailbox_id: str, rows: Sequence[tuple[int | None, str]]
    ) -> list[Removed]:
        """Take messages out of both views with one new MODSEQ, leaving tombstones."""
        if not rows:
            return []
        _, modseq = self._next_modseq(db, mailbox_id)
        uids = [uid for uid, _ in rows if uid is not None]
        message_ids = [message_id for _, message_id in rows]
        for batch in _batches(uids):
            marks = ",".join("?" * len(batch))
            db.execute(
                f"DELETE FROM imap_view WHERE mailbox_id = ? AND uid IN ({marks})",
                (mailbox_id, *batch),
            )
        db.executemany(
            "INSERT OR REPLACE INTO imap_expunged (mailbox_id, uid, modseq) VALUES (?, ?, ?)",
            ((mailbox_id, uid, modseq) for uid in uids),
        )
        for id_batch in _batches(message_ids):
            marks = ",".join("?" * len(id_batch))
            db.execute(
                f"DELETE FROM pop3_view WHERE mailbox_id = ? AND message_id IN ({marks})",
                (mailbox_id, *id_batch),
            )
        self._drop_messages(db, message_ids)
        box = uuid.UUID(mailbox_id)
        return [Removed(box, uuid.UUID(m), uid, modseq) for uid, m in rows]

    def imap_copy(
        self, source_mailbox_id: uuid.UUID, uids: Sequence[int], target_mailbox_id: uuid.UUID
    ) -> Deferred[list[Copied]]:
        def work(db: sqlite3.Connection) -> list[Copied]:
            return self._copy_rows(db, str(source_mailbox_id), sorted(set(uids)), str(target_mailbox_id))[0]

        return self._db.write(work)

    def imap_move(
        self, source_mailbox_id: uuid.UUID, uids: Sequence[int], target_mailbox_id: uuid.UUID
    ) -> Deferred[tuple[list[Copied], list[Removed]]]:
        def work(db: sqlite3.Connection) -> tuple[list[Copied], list[Removed]]:
            source = str(source_mailbox_id)
            copied, rows = self._copy_rows(db, source, sorted(set(uids)), str(target_mailbox_id))
            removed = self._remove_rows(db, source, [(uid, m) for uid, m, _, _ in rows])
            return copied, removed

        return self._db.write(work)

    def _copy_rows(
        self, db: sqlite3.Connection, source: str, uids: Sequence[int], target: str
    ) -> tuple[list[Copied], list[tuple[int, str, str, int]]]:
        if db.execute("SELECT 1 FROM mailboxes WHERE id = ?", (target,)).fetchone() is None:
            raise NotFound("no such mailbox")
        rows = self._rows_for_uids(db, source, uids)
        copied: list[Copied] = []
        for uid, message_id, flags_text, _ in rows:
            info = db.execute(
                "SELECT blob_id, size, internal_date FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if info is None:
                continue
            blob_id, size, when = info
            new_id = new_message_id()
            self._insert_message(db, new_id, blob_id, size, when)
            delivered = self._add_to_mailbox(db, target, new_id, size, _flags(flags_text))
            copied.append(Copied(uid, delivered))
        return copied, rows

    # -- POP3 view -------------------------------------------------------------------

    def pop3_list(self, mailbox_id: uuid.UUID) -> Deferred[list[Pop3Entry]]:
        return self._db.read(
            lambda db: [
                Pop3Entry(uuid.UUID(message_id), size)
                for message_id, size in db.execute(
                    "SELECT message_id, size FROM pop3_view WHERE mailbox_id = ?"
                    " ORDER BY arrival, message_id",
                    (str(mailbox_id),),
                )
            ]
        )

    def pop3_remove(
        self, mailbox_id: uuid.UUID, message_ids: Iterable[uuid.UUID]
    ) -> Deferred[list[Removed]]:
        # A message named twice is still removed once (and reported once).
        keys = list(dict.fromkeys(str(m) for m in message_ids))

        def work(db: sqlite3.Connection) -> list[Removed]:
            key = str(mailbox_id)
            rows: list[tuple[int | None, str]] = []
            for batch in _batches(keys):
                marks = ",".join("?" * len(batch))
                present = {
                    r[0]
                    for r in db.execute(
                        f"SELECT message_id FROM pop3_view WHERE mailbox_id = ? AND message_id IN ({marks})",
                        (key, *batch),
                    )
                }
                uid_of = dict(
                    db.execute(
                        f"SELECT message_id, uid FROM imap_view WHERE mailbox_id = ? AND message_id IN ({marks})",
                        (key, *batch),
                    ).fetchall()
                )
                rows.extend((uid_of.get(m), m) for m in batch if m in present or m in uid_of)
            return self._remove_rows(db, key, rows)

        return self._db.write(work)
