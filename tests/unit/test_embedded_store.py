"""What only the embedded (SQLite) backend can show: its file, its pragmas, its threads.

The behaviour every backend shares is in tests/contract/test_store_contract.py.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from twisted_mail_cluster.store.embedded import CHUNK_SIZE, EmbeddedStore
from twisted_mail_cluster.store.errors import ContentCorrupted, ContentMissing, TemporaryFailure
from twisted_mail_cluster.store.model import SEEN, DeliveryTarget, FlagMode

ensure = pytest_twisted.ensureDeferred
WHEN = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
OWNER = "alice@example.com"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "mail.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(path, reactor)
    pytest_twisted.blockon(s.start())
    pytest_twisted.blockon(s.add_domain("example.com"))
    pytest_twisted.blockon(s.add_user(OWNER, "h"))
    yield s
    pytest_twisted.blockon(s.close())


def big_content() -> bytes:
    """Three full chunks and a partial one."""
    header = b"Subject: big\r\n\r\n"
    return header + random.Random(7).randbytes(3 * CHUNK_SIZE + 999 - len(header))


async def deliver_big(store: EmbeddedStore) -> tuple[str, bytes]:
    box = await store.create_mailbox(OWNER, "INBOX")
    content = big_content()
    (d,) = await store.deliver(content, "{}", [DeliveryTarget(box.id)], WHEN)
    blob_id = (await store.message_info([d.message_id]))[d.message_id].blob_id
    return blob_id, content


async def read(store: EmbeddedStore, blob_id: str, start: int = 0, end: int | None = None) -> bytes:
    f = await store.open_content(blob_id, start, end)
    try:
        return f.read()
    finally:
        f.close()


def on_file(path: Path, sql: str, *args: object) -> list[tuple]:
    """Run one statement on the database file, from outside the store."""
    db = sqlite3.connect(path)
    try:
        with db:
            return db.execute(sql, args).fetchall()
    finally:
        db.close()


def flip_byte(path: Path, blob_id: str, seq: int, offset: int) -> None:
    (data,) = on_file(path, "SELECT data FROM blob_chunks WHERE blob_id = ? AND seq = ?", blob_id, seq)[0]
    damaged = bytearray(data)
    damaged[offset] ^= 0x01
    on_file(
        path, "UPDATE blob_chunks SET data = ? WHERE blob_id = ? AND seq = ?", bytes(damaged), blob_id, seq
    )


# -- content integrity --------------------------------------------------------------


@ensure
async def test_content_is_chunked_under_its_sha256(store, path) -> None:
    blob_id, content = await deliver_big(store)
    assert blob_id == hashlib.sha256(content).hexdigest()
    rows = on_file(path, "SELECT seq, sha256, length(data) FROM blob_chunks WHERE blob_id = ? ORDER BY seq", blob_id)
    assert [(seq, size) for seq, _, size in rows] == [
        (0, CHUNK_SIZE), (1, CHUNK_SIZE), (2, CHUNK_SIZE), (3, 999)
    ]
    for seq, sha, _ in rows:
        assert sha == hashlib.sha256(content[seq * CHUNK_SIZE:(seq + 1) * CHUNK_SIZE]).hexdigest()


@ensure
async def test_a_corrupted_chunk_is_never_served(store, path) -> None:
    blob_id, content = await deliver_big(store)
    flip_byte(path, blob_id, seq=1, offset=1234)

    with pytest.raises(ContentCorrupted):
        await read(store, blob_id)
    with pytest.raises(ContentCorrupted):
        await read(store, blob_id, CHUNK_SIZE + 1000, CHUNK_SIZE + 2000)  # damaged chunk only
    with pytest.raises(ContentCorrupted):
        await read(store, blob_id, CHUNK_SIZE - 10, CHUNK_SIZE + 10)  # across into it
    with pytest.raises(ContentCorrupted):
        await read(store, blob_id, 0, 3 * CHUNK_SIZE)
    # Chunks that are intact still serve their ranges.
    assert await read(store, blob_id, 10, 500) == content[10:500]
    assert await read(store, blob_id, 2 * CHUNK_SIZE, None) == content[2 * CHUNK_SIZE:]


@ensure
async def test_a_consistently_rewritten_chunk_fails_the_whole_digest(store, path) -> None:
    """Even with a matching per-chunk hash, a whole read checks the blob's own SHA-256."""
    blob_id, content = await deliver_big(store)
    forged = b"x" * CHUNK_SIZE
    on_file(
        path,
        "UPDATE blob_chunks SET data = ?, sha256 = ? WHERE blob_id = ? AND seq = 2",
        forged, hashlib.sha256(forged).hexdigest(), blob_id,
    )
    with pytest.raises(ContentCorrupted):
        await read(store, blob_id)


@ensure
async def test_a_missing_chunk_is_reported(store, path) -> None:
    blob_id, content = await deliver_big(store)
    on_file(path, "DELETE FROM blob_chunks WHERE blob_id = ? AND seq = 1", blob_id)
    with pytest.raises(ContentMissing):
        await read(store, blob_id)
    with pytest.raises(ContentMissing):
        await read(store, blob_id, CHUNK_SIZE + 1, CHUNK_SIZE + 2)
    on_file(path, "DELETE FROM blob_chunks WHERE blob_id = ? AND seq = 3", blob_id)
    with pytest.raises(ContentMissing):
        await read(store, blob_id, 3 * CHUNK_SIZE, None)
    assert await read(store, blob_id, 0, 100) == content[:100]


# -- durability ---------------------------------------------------------------------


@ensure
async def test_durability_pragmas(store, path) -> None:
    assert on_file(path, "PRAGMA journal_mode") == [("wal",)]

    def pragmas(db: sqlite3.Connection) -> tuple:
        return tuple(
            db.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous", "foreign_keys")
        )

    # synchronous is per connection: ask the store's own writer and readers.
    assert await store._db.write(pragmas) == ("wal", 2, 1)  # 2 is FULL
    assert await store._db.read(pragmas) == ("wal", 2, 1)


@ensure
async def test_data_survives_a_restart(store, path) -> None:
    box = await store.create_mailbox(OWNER, "INBOX")
    (d,) = await store.deliver(b"Subject: a\r\n\r\nx\r\n", "{}", [DeliveryTarget(box.id, frozenset({SEEN}))], WHEN)
    before = await store.imap_snapshot(box.id)
    await store.close()

    again = EmbeddedStore(path, reactor)
    await again.start()
    try:
        assert await again.imap_snapshot(box.id) == before
        (d2,) = await again.deliver(b"Subject: b\r\n\r\ny\r\n", "{}", [DeliveryTarget(box.id)], WHEN)
        assert d2.uid == d.uid + 1
        assert d2.modseq > before.highest_modseq
    finally:
        await again.close()


@ensure
async def test_a_closed_store_fails_temporarily(store) -> None:
    await store.close()
    with pytest.raises(TemporaryFailure):
        await store.list_domains()
    with pytest.raises(TemporaryFailure):
        await store.add_domain("example.org")


@ensure
async def test_a_newer_schema_is_refused(store, path) -> None:
    await store.close()
    on_file(path, "UPDATE schema_version SET version = version + 1")
    newer = EmbeddedStore(path, reactor)
    try:
        with pytest.raises(RuntimeError):
            await newer.start()
    finally:
        await newer.close()


@ensure
async def test_a_failed_commit_does_not_wedge_the_writer(store) -> None:
    """A COMMIT that fails (here a deferred foreign key) is rolled back, and the next write works."""

    def commit_fails(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA defer_foreign_keys=ON")
        db.execute(
            "INSERT INTO users (address, domain, password_hash) VALUES ('x@nowhere.example', 'nowhere.example', 'h')"
        )

    with pytest.raises(sqlite3.IntegrityError):
        await store._db.write(commit_fails)
    assert await store.get_user("x@nowhere.example") is None
    await store.add_domain("example.org")
    assert await store.list_domains() == ["example.com", "example.org"]


@ensure
async def test_a_failing_write_rolls_back_everything(store) -> None:
    def half_then_fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO domains (name) VALUES ('half.example')")
        raise ValueError("changed my mind")

    with pytest.raises(ValueError):
        await store._db.write(half_then_fail)
    assert await store.domain_exists("half.example") is False
    await store.add_domain("example.org")
    assert await store.list_domains() == ["example.com", "example.org"]


# -- concurrency --------------------------------------------------------------------


@ensure
async def test_concurrent_delivers_and_stores_get_unique_increasing_uids(store) -> None:
    box = await store.create_mailbox(OWNER, "INBOX")
    work = []
    for n in range(50):
        work.append(
            store.deliver(b"Subject: %d\r\n\r\nbody\r\n" % n, "{}", [DeliveryTarget(box.id)], WHEN)
        )
        work.append(store.imap_store(box.id, list(range(1, 51)), FlagMode.ADD, ["$k%d" % n]))
    results = await gatherResults(work, consumeErrors=True)

    delivered = [r[0] for r in results[0::2]]
    assert [d.uid for d in delivered] == list(range(1, 51))  # in the order they were asked
    assert len({d.message_id for d in delivered}) == 50
    modseqs = [d.modseq for d in delivered]
    assert modseqs == sorted(set(modseqs))  # strictly increasing

    snapshot = await store.imap_snapshot(box.id)
    assert [e.uid for e in snapshot.entries] == list(range(1, 51))
    assert snapshot.uidnext == 51
    # Message n got the keywords of the stores that ran after it arrived.
    for n, entry in enumerate(snapshot.entries):
        assert entry.flags == frozenset("$k%d" % k for k in range(n, 50))
    stored_modseqs = [r.updated[0].modseq for r in results[1::2]]
    assert stored_modseqs == sorted(set(stored_modseqs))
    assert set(stored_modseqs).isdisjoint(modseqs)
    assert snapshot.highest_modseq == max(stored_modseqs)
