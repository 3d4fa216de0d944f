"""IMailStore on Apache Cassandra: any node serves any user.

The two views of a mailbox (DESIGN.md):

* POP3 (``pop3_view``): delivery, listing, retrieval and removal are plain
  writes and reads.  With the IMAP view disabled nothing on the mail path runs
  a lightweight transaction, so a POP3-only cluster works across datacenters.
* IMAP (``imap_view``): UIDs and MODSEQs are allocated by a conditional batch
  on the mailbox's partition (``_commit``), which also writes the rows that use
  them, so UIDs become visible in order.  Lost races are retried.  A node
  runs one round per mailbox at a time, and concurrent deliveries into a
  mailbox share its next round (group commit, ``_add_rows``): many rounds on
  one partition at once preempt each other and, with several replicas, end in
  timeouts and unknown outcomes.  An unknown outcome is settled with a SERIAL
  read before anything is retried (``_batch_applied``), so a UID is never
  given twice nor a message added twice.

Order of writes for one delivery (nothing is visible before its content is):
content chunks, then the blob row, then per recipient the message row, the
IMAP row (its UID allocation is the IMAP commit point) and the POP3 row (the
POP3 commit point).  A failure in between leaves rows no reader shows
(a message row without a view row) or, at worst, a message IMAP shows and
POP3 not yet; the sender got no 250 and will retry.  Content whose last
message is gone is removed by ``collect_garbage``, never inline.
"""

from __future__ import annotations

import functools
import hashlib
import random
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, IO

import structlog
from twisted.internet.defer import Deferred, DeferredList, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from ..._deferred import deferred
from ...config import CassandraConfig
from ...ids import new_mailbox_id, new_message_id, new_uidvalidity
from ..errors import AlreadyExists, ContentCorrupted, ContentMissing, NotEmpty, NotFound, TemporaryFailure
from ..interfaces import IMailStore
from ..model import (
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
from .connection import CassandraSession, LwtNotApplied, LwtOutcomeUnknown, Row
from .schema import MIGRATIONS, SCHEMA_VERSION, VERSION_TABLE, keyspace_cql, qualified
from .statements import for_keyspace

log = structlog.get_logger(__name__)

CHUNK_SIZE = 64 * 1024
SPOOL_IN_MEMORY = 1024 * 1024
#: Rows per conditional batch: Cassandra refuses batches above ~50 KiB.
BATCH_ROWS = 100
#: Lost UID/MODSEQ races before giving up with a temporary failure.
MAX_CAS_ATTEMPTS = 50
#: SERIAL reads tried to learn the outcome of a lightweight transaction.
SETTLE_ATTEMPTS = 5
#: Content reads in flight at once for one open_content.
READ_AHEAD = 4

Item = tuple[str, Sequence[Any]]
NewRow = tuple[uuid.UUID, frozenset[str], int]


class _MailboxLocks:
    """One lock per mailbox id, so that a node runs one Paxos round per mailbox at a time.

    Many rounds on one partition at once do not go faster: they preempt each
    other's ballots, and with several replicas Cassandra then answers with
    timeouts and unknown outcomes (CAS contention) rather than with a lost race.
    """

    def __init__(self) -> None:
        self._locks: dict[uuid.UUID, DeferredLock] = {}

    async def run(self, key: uuid.UUID, work: Callable[[], Awaitable[Any]]) -> Any:
        lock = self._locks.setdefault(key, DeferredLock())
        await lock.acquire()
        try:
            return await work()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting and self._locks.get(key) is lock:
                del self._locks[key]


async def _gather(ds: Iterable[Deferred[Any]]) -> list[Any]:
    """All results, or the first failure unwrapped (not a FirstError)."""
    results = await DeferredList(list(ds), consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]


def _mailbox(row: Row) -> Mailbox:
    return Mailbox(row["id"], row["owner"], row["name"], row["uidvalidity"], row["special_use"])


def _entry(row: Row) -> ImapEntry:
    return ImapEntry(row["uid"], row["message_id"], frozenset(row["flags"] or ()), row["modseq"])


@implementer(IMailStore)
class CassandraStore:
    """The cluster store.  ``imap_enabled=False`` is the zero-LWT POP3-only deployment."""

    def __init__(
        self,
        config: CassandraConfig,
        reactor: Any,
        imap_enabled: bool = True,
        gc_grace: timedelta | None = None,
    ) -> None:
        """``gc_grace`` overrides ``config.gc_grace_seconds`` (see collect_garbage)."""
        if config.pop3_view == "uid" and not imap_enabled:
            raise ValueError('store.cassandra.pop3_view = "uid" needs the IMAP view (imap.enabled)')
        self.config = config
        self.imap_enabled = imap_enabled
        self._pop3_from_imap = config.pop3_view == "uid"
        self._reactor: IReactorTime = reactor
        self._gc_grace = timedelta(seconds=config.gc_grace_seconds) if gc_grace is None else gc_grace
        self.db = CassandraSession(config, reactor)
        self._mailbox_locks = _MailboxLocks()
        #: New IMAP rows waiting for their mailbox's next round (see _add_rows).
        self._new_rows: dict[uuid.UUID, list[tuple[list[NewRow], Deferred[tuple[list[int], int]]]]] = {}
        self._committing: set[uuid.UUID] = set()

    # -- life cycle ----------------------------------------------------------------

    @deferred
    async def start(self) -> None:
        await deferToThread(self._connect_and_migrate)
        await self.db.prepare_all(for_keyspace(self.config.keyspace))

    def _connect_and_migrate(self) -> None:
        """Blocking: connect, create the keyspace and bring the schema to SCHEMA_VERSION."""
        session = self.db.connect_blocking()
        keyspace = self.config.keyspace
        session.execute(keyspace_cql(keyspace, self.config.replication))
        session.execute(qualified(VERSION_TABLE, keyspace))
        rows = list(session.execute(f"SELECT version FROM {keyspace}.schema_version WHERE component = 'store'"))
        version = rows[0]["version"] if rows else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"schema version {version} is newer than this server's {SCHEMA_VERSION}")
        while version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                session.execute(qualified(statement, keyspace))
            version += 1
            session.execute(
                f"INSERT INTO {keyspace}.schema_version (component, version) VALUES ('store', %s)", (version,)
            )

    def close(self) -> Deferred[None]:
        return self.db.close()

    # -- directory -------------------------------------------------------------------

    async def _insert_if_absent(self, statement: str, params: Sequence[Any], mine: Callable[[Row], bool]) -> bool:
        """Run an ``IF NOT EXISTS`` insert; whether the row now there is ours.

        When an attempt's outcome was unknown (LwtOutcomeUnknown), the insert
        is tried again: "not applied" then may mean that the first attempt
        was, which ``mine`` tells from the row found.
        """
        unknown = False
        for attempt in range(MAX_CAS_ATTEMPTS):
            try:
                await self.db.execute_lwt(statement, *params)
                return True
            except LwtNotApplied as lost:
                return unknown and mine(lost.current)
            except LwtOutcomeUnknown:
                unknown = True
                await self._backoff(attempt)
        raise TemporaryFailure("could not complete a lightweight transaction")

    @deferred
    async def add_domain(self, name: str) -> None:
        # A domain row is only its name: after an unknown outcome, finding it is success.
        if not await self._insert_if_absent("domain_insert_lwt", (name,), lambda row: True):
            raise AlreadyExists(f"domain {name} already exists")

    @deferred
    async def remove_domain(self, name: str) -> None:
        if not await self.db.execute("domain_get", name):
            raise NotFound(f"no domain {name}")
        if await self.db.execute("domain_user_any", name):
            raise NotEmpty(f"domain {name} still has users")
        await self.db.execute("domain_delete", name)

    @deferred
    async def list_domains(self) -> list[str]:
        return sorted(row["name"] for row in await self.db.execute("domain_list"))

    @deferred
    async def domain_exists(self, name: str) -> bool:
        return bool(await self.db.execute("domain_get", name))

    @deferred
    async def add_user(self, address: str, password_hash: str) -> User:
        domain = address.rpartition("@")[2]
        if not await self.db.execute("domain_get", domain):
            raise NotFound(f"{domain} is not a local domain")
        if not await self._insert_if_absent(
            "user_insert_lwt", (address, domain, password_hash),
            lambda row: row.get("password_hash") == password_hash,  # a hash has a salt of its own
        ):
            raise AlreadyExists(f"user {address} already exists")
        await self.db.execute("domain_user_insert", domain, address)
        return User(address, password_hash)

    @deferred
    async def remove_user(self, address: str) -> None:
        if not await self.db.execute("user_get", address):
            raise NotFound(f"no user {address}")
        for mailbox in await self.list_mailboxes(address):
            await self._delete_mailbox(mailbox)
        await self.db.execute("subscription_delete_all", address)
        await self.db.execute("domain_user_delete", address.rpartition("@")[2], address)
        await self.db.execute("user_delete", address)

    @deferred
    async def get_user(self, address: str) -> User | None:
        rows = await self.db.execute("user_get", address)
        return User(rows[0]["address"], rows[0]["password_hash"]) if rows else None

    @deferred
    async def list_users(self, domain: str | None = None) -> list[User]:
        if domain is None:
            rows = await self.db.execute("user_all")
            return sorted((User(r["address"], r["password_hash"]) for r in rows), key=lambda u: u.address)
        addresses = [r["address"] for r in await self.db.execute("domain_user_list", domain)]
        users = await _gather(self.get_user(a) for a in addresses)
        return sorted((u for u in users if u is not None), key=lambda u: u.address)

    @deferred
    async def set_password_hash(self, address: str, password_hash: str) -> None:
        if not await self.db.execute("user_get", address):
            raise NotFound(f"no user {address}")
        await self.db.execute("user_set_hash", password_hash, address)

    # -- mailboxes ----------------------------------------------------------------------

    async def _next_uidvalidity(self) -> int:
        """Strictly increasing across the cluster (a counter row behind an LWT)."""
        for attempt in range(MAX_CAS_ATTEMPTS):
            rows = await self.db.execute("counter_get", "uidvalidity")
            last = rows[0]["value"] if rows else None
            value = new_uidvalidity(last or 0)
            try:
                if last is None:
                    await self.db.execute_lwt("counter_init_lwt", "uidvalidity", value)
                else:
                    await self.db.execute_lwt("counter_set_lwt", value, "uidvalidity", last)
                return value
            except (LwtNotApplied, LwtOutcomeUnknown):
                # Unknown: if it was applied after all, the counter moved past
                # ``value`` and nobody else holds it; the next value is as good.
                await self._backoff(attempt)
        raise TemporaryFailure("could not allocate a UIDVALIDITY")

    @deferred
    async def create_mailbox(self, owner: str, name: str, special_use: str | None = None) -> Mailbox:
        if not await self.db.execute("user_get", owner):
            raise NotFound(f"no user {owner}")
        if await self.db.execute("owner_mailbox_get", owner, name):
            raise AlreadyExists(f"mailbox {name} already exists")
        mailbox = Mailbox(new_mailbox_id(), owner, name, await self._next_uidvalidity(), special_use)
        await self.db.execute(
            "mailbox_insert", mailbox.id, owner, name, mailbox.uidvalidity, special_use
        )
        if self.imap_enabled:
            await self.db.execute("imap_init", mailbox.id)
        # The commit point: the name now points at the mailbox.
        if not await self._insert_if_absent(
            "owner_mailbox_insert_lwt", (owner, name, mailbox.id, mailbox.uidvalidity, special_use),
            lambda row: row.get("id") == mailbox.id,
        ):
            await self.db.execute("mailbox_delete", mailbox.id)
            await self.db.execute("imap_delete_all", mailbox.id)
            raise AlreadyExists(f"mailbox {name} already exists")
        return mailbox

    @deferred
    async def get_mailbox(self, owner: str, name: str) -> Mailbox | None:
        rows = await self.db.execute("owner_mailbox_get", owner, name)
        return _mailbox(rows[0]) if rows else None

    @deferred
    async def get_mailbox_by_id(self, mailbox_id: uuid.UUID) -> Mailbox | None:
        rows = await self.db.execute("mailbox_get", mailbox_id)
        return _mailbox(rows[0]) if rows else None

    @deferred
    async def list_mailboxes(self, owner: str) -> list[Mailbox]:
        rows = await self.db.execute("owner_mailbox_list", owner)
        return sorted((_mailbox(r) for r in rows), key=lambda m: m.name)

    @deferred
    async def count_mailboxes(self, owner: str) -> int:
        rows = await self.db.execute("owner_mailbox_count", owner)
        return int(rows[0]["count"]) if rows else 0

    @deferred
    async def delete_mailbox(self, mailbox_id: uuid.UUID) -> list[Removed]:
        mailbox = await self.get_mailbox_by_id(mailbox_id)
        if mailbox is None:
            raise NotFound("no such mailbox")
        return await self._delete_mailbox(mailbox)

    async def _delete_mailbox(self, mailbox: Mailbox) -> list[Removed]:
        entries: list[tuple[uuid.UUID, int | None]] = []
        if self.imap_enabled:
            rows = await self.db.execute("imap_all", mailbox.id)
            entries = [(r["message_id"], r["uid"]) for r in rows if r["uid"] is not None and not r["expunged"]]
        if not self._pop3_from_imap:
            known = {m for m, _ in entries}
            entries += [
                (r["message_id"], None) for r in await self.db.execute("pop3_list", mailbox.id)
                if r["message_id"] not in known
            ]
        # Invisible first (the name), then the views, then the messages.
        await self.db.execute("owner_mailbox_delete", mailbox.owner, mailbox.name)
        await _gather([
            self.db.execute("imap_delete_all", mailbox.id),
            self.db.execute("pop3_delete_all", mailbox.id),
        ])
        await self._drop_messages(m for m, _ in entries)
        await self.db.execute("mailbox_delete", mailbox.id)
        return [Removed(mailbox.id, m, uid, None) for m, uid in sorted(entries, key=lambda e: e[1] or 0)]

    @deferred
    async def rename_mailbox(self, mailbox_id: uuid.UUID, new_name: str) -> Mailbox:
        mailbox = await self.get_mailbox_by_id(mailbox_id)
        if mailbox is None:
            raise NotFound("no such mailbox")
        if not await self._insert_if_absent(
            "owner_mailbox_insert_lwt",
            (mailbox.owner, new_name, mailbox.id, mailbox.uidvalidity, mailbox.special_use),
            lambda row: row.get("id") == mailbox.id,
        ):
            raise AlreadyExists(f"mailbox {new_name} already exists")
        await self.db.execute("mailbox_rename", new_name, mailbox.id)
        await self.db.execute("owner_mailbox_delete", mailbox.owner, mailbox.name)
        return Mailbox(mailbox.id, mailbox.owner, new_name, mailbox.uidvalidity, mailbox.special_use)

    @deferred
    async def subscribe(self, owner: str, name: str) -> None:
        await self.db.execute("subscription_insert", owner, name)

    @deferred
    async def unsubscribe(self, owner: str, name: str) -> None:
        if not await self.db.execute("subscription_get", owner, name):
            raise NotFound(f"not subscribed to {name}")
        await self.db.execute("subscription_delete", owner, name)

    @deferred
    async def list_subscriptions(self, owner: str) -> list[str]:
        return sorted(r["name"] for r in await self.db.execute("subscription_list", owner))

    # -- content ----------------------------------------------------------------------------

    @deferred
    async def deliver(
        self,
        content: bytes,
        structure: str,
        targets: Sequence[DeliveryTarget],
        internal_date: datetime,
    ) -> list[Delivered]:
        boxes = await _gather(self.get_mailbox_by_id(t.mailbox_id) for t in targets)
        if any(box is None for box in boxes):
            raise NotFound("no such mailbox")
        blob_id = await self._put_blob(content, structure)
        when = internal_date.timestamp()
        return await _gather(
            Deferred.fromCoroutine(self._deliver_one(blob_id, len(content), when, target))
            for target in targets
        )

    async def _deliver_one(self, blob_id: str, size: int, when: float, target: DeliveryTarget) -> Delivered:
        message_id = new_message_id()
        flags = normalise_flags(target.flags)
        await _gather([
            self.db.execute("message_insert", message_id, target.mailbox_id, blob_id, size, when),
            self.db.execute("ref_insert", blob_id, message_id),
        ])
        uid = modseq = None
        if self.imap_enabled:
            (uid,), modseq = await self._add_rows(target.mailbox_id, [(message_id, flags, size)])
            await self.db.execute("message_set_uid", uid, message_id)
        if not self._pop3_from_imap:
            await self.db.execute("pop3_insert", target.mailbox_id, message_id, size)
        return Delivered(target.mailbox_id, message_id, uid, modseq, flags)

    async def _put_blob(self, content: bytes, structure: str) -> str:
        """Chunks first, the blob row last: a blob row always has all of its chunks."""
        blob_id = hashlib.sha256(content).hexdigest()
        existing = await self.db.execute("blob_get", blob_id)
        if existing:
            return blob_id
        chunks = [content[i:i + CHUNK_SIZE] for i in range(0, len(content), CHUNK_SIZE)]
        for start in range(0, len(chunks), 8):
            await _gather(
                self.db.execute("chunk_insert", blob_id, seq, hashlib.sha256(chunk).hexdigest(), chunk)
                for seq, chunk in enumerate(chunks[start:start + 8], start=start)
            )
        await self.db.execute("blob_insert", blob_id, len(content), CHUNK_SIZE, len(chunks), structure)
        return blob_id

    @deferred
    async def message_info(self, message_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, MessageInfo]:
        ids = list(dict.fromkeys(message_ids))
        rows = [r for found in await _gather(self.db.execute("message_get", m) for m in ids) for r in found]
        blob_ids = sorted({r["blob_id"] for r in rows})
        blobs = {
            found[0]["id"]: found[0]
            for found in await _gather(self.db.execute("blob_get", b) for b in blob_ids)
            if found
        }
        return {
            r["id"]: MessageInfo(r["id"], r["blob_id"], r["size"], r["internal_date"], blobs[r["blob_id"]]["structure"])
            for r in rows
            if r["blob_id"] in blobs
        }

    @deferred
    async def open_content(self, blob_id: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        rows = await self.db.execute("blob_get", blob_id)
        if not rows:
            raise ContentMissing(f"content {blob_id} is not stored")
        size, chunk_size = rows[0]["size"], rows[0]["chunk_size"]
        end = size if end is None else min(end, size)
        start = max(0, min(start, end))
        out = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        digest = hashlib.sha256() if (start, end) == (0, size) else None
        if end > start:
            first, last = start // chunk_size, (end - 1) // chunk_size
            for window in range(first, last + 1, READ_AHEAD):
                seqs = range(window, min(window + READ_AHEAD, last + 1))
                for seq, found in zip(seqs, await _gather(self.db.execute("chunk_get", blob_id, s) for s in seqs)):
                    if not found:
                        raise ContentMissing(f"content {blob_id}: chunk {seq} is missing")
                    data = found[0]["data"]
                    if hashlib.sha256(data).hexdigest() != found[0]["sha256"]:
                        raise ContentCorrupted(f"content {blob_id}: chunk {seq} fails its SHA-256")
                    if digest is not None:
                        digest.update(data)
                    base = seq * chunk_size
                    out.write(data[max(0, start - base):end - base])
        if digest is not None and digest.hexdigest() != blob_id:
            raise ContentCorrupted(f"content {blob_id} fails its SHA-256")
        out.seek(0)
        return out

    @deferred
    async def collect_garbage(self) -> int:
        """Remove content no message refers to, once it is older than the grace period.

        The grace period protects a delivery in progress, whose blob row is
        written before its first reference.
        """
        horizon = datetime.now(timezone.utc) - self._gc_grace
        removed = 0
        for row in await self.db.execute("blob_all"):
            created = row["created"]
            if created is not None and created.replace(tzinfo=timezone.utc) > horizon:
                continue
            if await self.db.execute("ref_any", row["id"]):
                continue
            await self.db.execute("blob_delete", row["id"])
            await _gather(self.db.execute("chunk_delete", row["id"], seq) for seq in range(row["chunks"] or 0))
            removed += 1
        return removed

    async def _drop_messages(self, message_ids: Iterable[uuid.UUID]) -> None:
        """Delete message rows and their references (content goes in collect_garbage)."""
        ids = list(message_ids)
        rows = [r for found in await _gather(self.db.execute("message_get", m) for m in ids) for r in found]
        await _gather(
            d
            for r in rows
            for d in (self.db.execute("ref_delete", r["blob_id"], r["id"]), self.db.execute("message_delete", r["id"]))
        )

    # -- IMAP view: the one place with lightweight transactions -------------------------------

    def _require_imap(self) -> None:
        if not self.imap_enabled:
            raise NotFound("the IMAP view is disabled on this cluster (imap.enabled = false)")

    async def _counters(self, mailbox_id: uuid.UUID) -> Row:
        rows = await self.db.execute("imap_counters", mailbox_id)
        if not rows or rows[0]["uidnext"] is None:
            raise NotFound("no such mailbox")
        return rows[0]

    async def _backoff(self, attempt: int = 0) -> None:
        """A random pause before retrying a lightweight transaction, longer after each loss."""
        await deferLater(self._reactor, random.uniform(0.001, min(0.2, 0.02 * 1.25**attempt)), lambda: None)

    async def _batch_applied(self, mailbox_id: uuid.UUID, items: Sequence[Item]) -> bool:
        """After LwtOutcomeUnknown: whether that conditional batch was applied.

        A SERIAL read of the rows it wrote completes or supersedes the unfinished
        round, so the answer is final.  The MODSEQ the batch claimed belongs to
        exactly one applied batch: rows inserted carry our message ids, rows
        expunged our MODSEQ (they never change again); flag changes with our
        MODSEQ and flags count as applied (the state is ours either way), and
        otherwise the caller re-runs the change on fresh rows, which is harmless
        for flags.
        """
        expected: dict[int, Callable[[Row], bool]] = {}
        for name, params in items:
            if name == "imap_row_insert":
                expected[params[1]] = functools.partial(_row_holds, params[2])
            elif name == "imap_row_flags":
                expected[params[3]] = functools.partial(_row_flagged, frozenset(params[0] or ()), params[1])
            elif name == "imap_row_expunge":
                expected[params[2]] = functools.partial(_row_expunged, params[0])
        if not expected:
            return False
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                found = await self.db.read_serial("imap_rows_in", mailbox_id, sorted(expected))
                break
            except TemporaryFailure:
                if attempt == SETTLE_ATTEMPTS - 1:
                    raise
                await self._backoff(attempt)
        rows = {r["uid"]: r for r in found if r["uid"] is not None}
        return all(uid in rows and check(rows[uid]) for uid, check in expected.items())

    async def _commit(
        self,
        mailbox_id: uuid.UUID,
        build: Callable[[int, int], Awaitable[tuple[list[Item], int, Any]]],
    ) -> Any:
        """Apply ``build``'s rows together with the counters they use, in one Paxos round.

        ``build(uidnext, modseq)`` returns (statements, new uidnext, result);
        no statements means nothing to change (and no MODSEQ is used up).
        If another writer got there first, ``build`` runs again on fresh
        counters (and re-reads whatever it based its rows on).  Rounds on
        one mailbox take turns on this node (_MailboxLocks).
        """
        return await self._mailbox_locks.run(mailbox_id, lambda: self._commit_now(mailbox_id, build))

    async def _commit_now(
        self,
        mailbox_id: uuid.UUID,
        build: Callable[[int, int], Awaitable[tuple[list[Item], int, Any]]],
    ) -> Any:
        """_commit, with the mailbox's lock held."""
        counters = await self._counters(mailbox_id)
        uidnext, highest = counters["uidnext"], counters["highest_modseq"]
        for attempt in range(MAX_CAS_ATTEMPTS):
            items, new_uidnext, result = await build(uidnext, highest + 1)
            if not items:
                return result
            items.append(("imap_counters_lwt", (new_uidnext, highest + 1, mailbox_id, uidnext, highest)))
            try:
                await self.db.batch_lwt(items)
                return result
            except LwtNotApplied as lost:
                if lost.current.get("uidnext") is None:
                    raise NotFound("no such mailbox") from None
                uidnext, highest = lost.current["uidnext"], lost.current["highest_modseq"]
            except LwtOutcomeUnknown:
                if await self._batch_applied(mailbox_id, items):
                    return result
                counters = await self._counters(mailbox_id)
                uidnext, highest = counters["uidnext"], counters["highest_modseq"]
            await self._backoff(attempt)
        raise TemporaryFailure("too much contention on the mailbox's UID counter")

    async def _add_rows(self, mailbox_id: uuid.UUID, rows: Sequence[NewRow]) -> tuple[list[int], int]:
        """New IMAP rows at the next UIDs; fire with (their UIDs, their MODSEQ).

        Group commit: rows of concurrent deliveries into one mailbox queue up
        while the mailbox's lock is held and go together in its next round
        (sharing its MODSEQ), so a burst of N deliveries costs a few Paxos
        rounds, not N contending ones.
        """
        done: Deferred[tuple[list[int], int]] = Deferred()
        self._new_rows.setdefault(mailbox_id, []).append((list(rows), done))
        if mailbox_id not in self._committing:
            self._committing.add(mailbox_id)
            Deferred.fromCoroutine(self._commit_queued(mailbox_id))
        return await done

    async def _commit_queued(self, mailbox_id: uuid.UUID) -> None:
        """Commit the mailbox's queued rows, round after round, until none is left."""
        try:
            while self._new_rows.get(mailbox_id):
                await self._mailbox_locks.run(mailbox_id, lambda: self._commit_new_rows(mailbox_id))
        except Exception:  # not expected (_commit_new_rows hands failures over): nobody may wait forever
            failure = Failure()
            for _, done in self._new_rows.pop(mailbox_id, []):
                done.errback(failure)
        finally:
            self._committing.discard(mailbox_id)

    async def _commit_new_rows(self, mailbox_id: uuid.UUID) -> None:
        """With the mailbox's lock held: one round for the rows queued (at most BATCH_ROWS)."""
        queue = self._new_rows.get(mailbox_id)
        if not queue:
            return
        taken = [queue.pop(0)]
        while queue and sum(len(r) for r, _ in taken) + len(queue[0][0]) <= BATCH_ROWS:
            taken.append(queue.pop(0))
        if not queue:
            del self._new_rows[mailbox_id]
        rows = [row for part, _ in taken for row in part]

        async def build(uidnext: int, modseq: int) -> tuple[list[Item], int, Any]:
            uids = list(range(uidnext, uidnext + len(rows)))
            items: list[Item] = [
                ("imap_row_insert", (mailbox_id, uid, message_id, set(flags) or None, modseq, size))
                for uid, (message_id, flags, size) in zip(uids, rows)
            ]
            return items, uidnext + len(rows), (uids, modseq)

        try:
            uids, modseq = await self._commit_now(mailbox_id, build)
        except Exception:
            failure = Failure()
            for _, done in taken:
                done.errback(failure)
            return
        start = 0
        for part, done in taken:
            done.callback((uids[start:start + len(part)], modseq))
            start += len(part)

    async def _rows(self, mailbox_id: uuid.UUID, uids: Sequence[int] | None = None) -> list[Row]:
        """Live (not expunged) IMAP rows, all or those of ``uids``, in UID order."""
        if uids is None:
            found = await self.db.execute("imap_all", mailbox_id)
        else:
            found = []
            wanted = sorted(set(uids))
            for i in range(0, len(wanted), BATCH_ROWS):
                found += await self.db.execute("imap_rows_in", mailbox_id, wanted[i:i + BATCH_ROWS])
        return sorted((r for r in found if r["uid"] is not None and not r["expunged"]), key=lambda r: r["uid"])

    @deferred
    async def imap_snapshot(self, mailbox_id: uuid.UUID) -> MailboxSnapshot:
        self._require_imap()
        mailbox = await self.get_mailbox_by_id(mailbox_id)
        if mailbox is None:
            raise NotFound("no such mailbox")
        rows = await self.db.execute("imap_all", mailbox_id)
        if not rows or rows[0]["uidnext"] is None:
            raise NotFound("no such mailbox")
        entries = tuple(
            _entry(r) for r in sorted(rows, key=lambda r: r["uid"] or 0) if r["uid"] is not None and not r["expunged"]
        )
        return MailboxSnapshot(mailbox, rows[0]["uidnext"], rows[0]["highest_modseq"], entries)

    @deferred
    async def imap_changes(self, mailbox_id: uuid.UUID, since_modseq: int) -> ImapChanges:
        self._require_imap()
        counters = await self._counters(mailbox_id)
        if counters["highest_modseq"] <= since_modseq:
            return ImapChanges(counters["uidnext"], counters["highest_modseq"], (), ())
        rows = sorted(
            (
                r for r in await self.db.execute("imap_all", mailbox_id)
                if r["uid"] is not None and r["modseq"] > since_modseq
            ),
            key=lambda r: r["uid"],
        )
        head = await self._counters(mailbox_id) if not rows else rows[0]
        changed = tuple(_entry(r) for r in rows if not r["expunged"])
        expunged = tuple(r["uid"] for r in rows if r["expunged"])
        return ImapChanges(head["uidnext"], head["highest_modseq"], changed, expunged)

    @deferred
    async def imap_status(self, mailbox_id: uuid.UUID) -> MailboxStatus:
        self._require_imap()
        mailbox = await self.get_mailbox_by_id(mailbox_id)
        rows = await self.db.execute("imap_all", mailbox_id)
        if mailbox is None or not rows or rows[0]["uidnext"] is None:
            raise NotFound("no such mailbox")
        head = rows[0]
        live = [r for r in rows if r["uid"] is not None and not r["expunged"]]
        return MailboxStatus(
            messages=len(live),
            recent=sum(1 for r in live if r["uid"] >= head["first_recent_uid"]),
            uidnext=head["uidnext"],
            uidvalidity=mailbox.uidvalidity,
            unseen=sum(1 for r in live if SEEN not in (r["flags"] or ())),
            highest_modseq=head["highest_modseq"],
            size=sum(r["size"] or 0 for r in live),
        )

    @deferred
    async def imap_claim_recent(self, mailbox_id: uuid.UUID) -> int:
        self._require_imap()
        return await self._mailbox_locks.run(mailbox_id, lambda: self._claim_recent(mailbox_id))

    async def _claim_recent(self, mailbox_id: uuid.UUID) -> int:
        """Claim the unclaimed UIDs with an LWT; if the LWT cannot tell, they are recent anyway.

        RFC 3501 2.3.2: "If it is not possible to determine whether or not this
        session is the first session to be notified about a message, then that
        message SHOULD be considered recent."  So a claim that cannot run (the
        serial consistency's replicas are unreachable: SERIAL with a datacenter
        down) or whose outcome is unknown gives this session the messages
        without claiming them, and SELECT and NOOP keep working; another
        session may see them as recent too.
        """
        first = 0  # read on the first attempt; MAX_CAS_ATTEMPTS is at least 1
        for attempt in range(MAX_CAS_ATTEMPTS):
            counters = await self._counters(mailbox_id)
            first, uidnext = counters["first_recent_uid"], counters["uidnext"]
            if first == uidnext:
                return int(first)
            try:
                await self.db.execute_lwt("imap_recent_lwt", uidnext, mailbox_id, first)
                return int(first)
            except LwtNotApplied:
                await self._backoff(attempt)  # another session claimed them first: look again
            except TemporaryFailure as e:
                log.warning("cassandra.recent_not_claimed", mailbox=str(mailbox_id), error=str(e))
                return int(first)
        log.warning("cassandra.recent_not_claimed", mailbox=str(mailbox_id), error="contention")
        return int(first)

    @deferred
    async def imap_store(
        self,
        mailbox_id: uuid.UUID,
        uids: Sequence[int],
        mode: FlagMode,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> StoreResult:
        self._require_imap()
        given = normalise_flags(flags)
        wanted = sorted(set(uids))

        async def build(uidnext: int, modseq: int) -> tuple[list[Item], int, Any]:
            changes: list[tuple[Row, frozenset[str]]] = []
            modified: list[int] = []
            for row in await self._rows(mailbox_id, wanted):
                if unchanged_since is not None and row["modseq"] > unchanged_since:
                    modified.append(row["uid"])
                    continue
                current = frozenset(row["flags"] or ())
                new = mode.apply(current, given)
                if new != current:
                    changes.append((row, new))
            items: list[Item] = [
                ("imap_row_flags", (set(new) or None, modseq, mailbox_id, row["uid"])) for row, new in changes
            ]
            updated = tuple(ImapEntry(row["uid"], row["message_id"], new, modseq) for row, new in changes)
            return items, uidnext, StoreResult(updated, tuple(modified))

        if len(wanted) <= BATCH_ROWS:
            return await self._commit(mailbox_id, build)
        updated: list[ImapEntry] = []
        modified: list[int] = []
        for i in range(0, len(wanted), BATCH_ROWS):
            part = await self.imap_store(mailbox_id, wanted[i:i + BATCH_ROWS], mode, given, unchanged_since)
            updated += part.updated
            modified += part.modified
        return StoreResult(tuple(updated), tuple(modified))

    @deferred
    async def imap_expunge(self, mailbox_id: uuid.UUID, uids: Sequence[int] | None = None) -> list[Removed]:
        self._require_imap()
        rows = await self._rows(mailbox_id, uids)
        deleted = [r["uid"] for r in rows if DELETED in (r["flags"] or ())]
        return await self._expunge_uids(mailbox_id, deleted, only_deleted=True)

    async def _expunge_uids(self, mailbox_id: uuid.UUID, uids: Sequence[int], only_deleted: bool) -> list[Removed]:
        """Mark rows expunged (one MODSEQ per batch), then drop their POP3 rows and messages."""
        removed: list[Removed] = []
        for i in range(0, len(uids), BATCH_ROWS):
            batch = uids[i:i + BATCH_ROWS]

            async def build(uidnext: int, modseq: int, batch: Sequence[int] = batch) -> tuple[list[Item], int, Any]:
                rows = [
                    r for r in await self._rows(mailbox_id, batch)
                    if not only_deleted or DELETED in (r["flags"] or ())
                ]
                items: list[Item] = [("imap_row_expunge", (modseq, mailbox_id, r["uid"])) for r in rows]
                return items, uidnext, [Removed(mailbox_id, r["message_id"], r["uid"], modseq) for r in rows]

            removed += await self._commit(mailbox_id, build)
        if removed:
            if not self._pop3_from_imap:
                await _gather(self.db.execute("pop3_delete", mailbox_id, r.message_id) for r in removed)
            await self._drop_messages(r.message_id for r in removed)
        return removed

    @deferred
    async def imap_copy(
        self, source_mailbox_id: uuid.UUID, uids: Sequence[int], target_mailbox_id: uuid.UUID
    ) -> list[Copied]:
        self._require_imap()
        return await self._copy(source_mailbox_id, uids, target_mailbox_id)

    async def _copy(self, source: uuid.UUID, uids: Sequence[int], target: uuid.UUID) -> list[Copied]:
        if await self.get_mailbox_by_id(target) is None:
            raise NotFound("no such mailbox")
        rows = await self._rows(source, uids)
        infos = await self.message_info(r["message_id"] for r in rows)
        rows = [r for r in rows if r["message_id"] in infos]
        copies = [(r, new_message_id()) for r in rows]
        await _gather(
            d
            for r, new_id in copies
            for d in (
                self.db.execute(
                    "message_insert", new_id, target, infos[r["message_id"]].blob_id,
                    infos[r["message_id"]].size, infos[r["message_id"]].internal_date,
                ),
                self.db.execute("ref_insert", infos[r["message_id"]].blob_id, new_id),
            )
        )
        copied: list[Copied] = []
        for i in range(0, len(copies), BATCH_ROWS):
            part = copies[i:i + BATCH_ROWS]
            new_uids, modseq = await self._add_rows(
                target, [(new_id, frozenset(r["flags"] or ()), r["size"]) for r, new_id in part]
            )
            for (r, new_id), uid in zip(part, new_uids):
                flags = frozenset(r["flags"] or ())
                copied.append(Copied(r["uid"], Delivered(target, new_id, uid, modseq, flags)))
        await _gather(self.db.execute("message_set_uid", c.delivered.uid, c.delivered.message_id) for c in copied)
        if not self._pop3_from_imap:
            sizes = {new_id: r["size"] for r, new_id in copies}
            await _gather(
                self.db.execute("pop3_insert", target, c.delivered.message_id, sizes[c.delivered.message_id])
                for c in copied
            )
        return copied

    @deferred
    async def imap_move(
        self, source_mailbox_id: uuid.UUID, uids: Sequence[int], target_mailbox_id: uuid.UUID
    ) -> tuple[list[Copied], list[Removed]]:
        self._require_imap()
        copied = await self._copy(source_mailbox_id, uids, target_mailbox_id)
        removed = await self._expunge_uids(source_mailbox_id, [c.source_uid for c in copied], only_deleted=False)
        return copied, removed

    # -- POP3 view: no lightweight transaction unless the IMAP view must follow ----------------

    @deferred
    async def pop3_list(self, mailbox_id: uuid.UUID) -> list[Pop3Entry]:
        if self._pop3_from_imap:
            return [Pop3Entry(r["message_id"], r["size"]) for r in await self._rows(mailbox_id)]
        rows = await self.db.execute("pop3_list", mailbox_id)
        return [Pop3Entry(r["message_id"], r["size"]) for r in rows]

    @deferred
    async def pop3_remove(self, mailbox_id: uuid.UUID, message_ids: Iterable[uuid.UUID]) -> list[Removed]:
        ids = list(dict.fromkeys(message_ids))
        rows = [
            r for found in await _gather(self.db.execute("message_get", m) for m in ids) for r in found
            if r["mailbox_id"] == mailbox_id
        ]
        if not rows:
            return []
        if self.imap_enabled:
            by_uid = {r["uid"]: r for r in rows if r["uid"] is not None}
            removed = await self._expunge_uids(mailbox_id, sorted(by_uid), only_deleted=False)
            gone = {r.message_id for r in removed}
            # Rows without a UID (a delivery interrupted before its IMAP commit).
            rest = [r for r in rows if r["id"] not in gone and r["uid"] is None]
        else:
            removed, rest = [], rows
        if rest:
            await _gather(self.db.execute("pop3_delete", mailbox_id, r["id"]) for r in rest)
            await self._drop_messages(r["id"] for r in rest)
            removed += [Removed(mailbox_id, r["id"], None, None) for r in rest]
        order = {m: i for i, m in enumerate(ids)}
        return sorted(removed, key=lambda r: (r.uid is None, r.uid or 0, order.get(r.message_id, 0)))


# What a settled LWT batch left in each row it wrote (see _settle).

def _row_holds(message_id: uuid.UUID, row: Row) -> bool:
    return bool(row["message_id"] == message_id)


def _row_flagged(flags: frozenset[str], modseq: int, row: Row) -> bool:
    return row["modseq"] == modseq and frozenset(row["flags"] or ()) == flags and not row["expunged"]


def _row_expunged(modseq: int, row: Row) -> bool:
    return bool(row["expunged"]) and row["modseq"] == modseq
