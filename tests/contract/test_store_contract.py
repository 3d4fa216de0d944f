"""The behavioural contract of ``IMailStore``, run against every backend.

Only the interface is used here (see conftest.py for the backend registry):
a backend passes this module unchanged or it is not a store.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timezone

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from twisted_mail_cluster.store.errors import (
    AlreadyExists,
    ContentMissing,
    NotEmpty,
    NotFound,
)
from twisted_mail_cluster.store.interfaces import IMailStore
from twisted_mail_cluster.store.model import (
    ANSWERED,
    DELETED,
    DRAFT,
    FLAGGED,
    SEEN,
    Copied,
    Delivered,
    DeliveryTarget,
    FlagMode,
    ImapEntry,
    Mailbox,
    MailboxStatus,
    MessageInfo,
    Pop3Entry,
    Removed,
    User,
)

ensure = pytest_twisted.ensureDeferred

WHEN = datetime(2024, 5, 6, 7, 8, 9, 250000, tzinfo=timezone.utc)
#: The store must treat the MessageStructure JSON as opaque text.
STRUCTURE = '{"type": "text/plain", "params": {"charset": "utf-8"}, "note": "\u00e9\u2713"}'
#: Larger than 200 KiB: four 64 KiB chunks, the last one partial.
CHUNK = 64 * 1024
BIG_SIZE = 3 * CHUNK + 12345


def message(n: int, body_lines: int = 1) -> bytes:
    """A distinct small message (CRLF line endings)."""
    body = b"".join(b"line %d of message %d\r\n" % (i, n) for i in range(body_lines))
    return (
        b"From: sender@example.net\r\nTo: alice@example.com\r\n"
        b"Subject: message %d\r\n\r\n" % n
    ) + body


def big_message() -> bytes:
    header = b"From: sender@example.net\r\nSubject: big\r\n\r\n"
    body = random.Random(20240506).randbytes(BIG_SIZE - len(header))
    content = header + body
    assert len(content) == BIG_SIZE
    return content


async def new_box(store, owner: str, name: str, special_use: str | None = None) -> Mailbox:
    return await store.create_mailbox(owner, name, special_use)


async def deliver(
    store,
    boxes: list[Mailbox],
    content: bytes,
    flags: frozenset[str] = frozenset(),
    structure: str = STRUCTURE,
) -> list[Delivered]:
    return await store.deliver(
        content, structure, [DeliveryTarget(box.id, flags) for box in boxes], WHEN
    )


async def deliver_one(store, box: Mailbox, content: bytes, flags=frozenset()) -> Delivered:
    (delivered,) = await deliver(store, [box], content, frozenset(flags))
    return delivered


async def read(store, blob_id: str, start: int = 0, end: int | None = None) -> bytes:
    f = await store.open_content(blob_id, start, end)
    try:
        return f.read()
    finally:
        f.close()


async def highest(store, box: Mailbox) -> int:
    return (await store.imap_snapshot(box.id)).highest_modseq


async def uids(store, box: Mailbox) -> list[int]:
    return [e.uid for e in (await store.imap_snapshot(box.id)).entries]


async def blob_of(store, message_id: uuid.UUID) -> str:
    return (await store.message_info([message_id]))[message_id].blob_id


def test_provides_the_interface(store) -> None:
    assert verifyObject(IMailStore, store)
    assert store.imap_enabled is True


# -- domains -----------------------------------------------------------------------


@ensure
async def test_domains_add_list_exists(store) -> None:
    assert await store.list_domains() == []
    await store.add_domain("example.org")
    await store.add_domain("example.com")
    assert await store.list_domains() == ["example.com", "example.org"]
    assert await store.domain_exists("example.com") is True
    assert await store.domain_exists("example.net") is False


@ensure
async def test_add_existing_domain_fails(store) -> None:
    await store.add_domain("example.com")
    with pytest.raises(AlreadyExists):
        await store.add_domain("example.com")
    assert await store.list_domains() == ["example.com"]


@ensure
async def test_remove_domain(store) -> None:
    await store.add_domain("example.com")
    await store.add_domain("example.org")
    await store.remove_domain("example.com")
    assert await store.list_domains() == ["example.org"]
    assert await store.domain_exists("example.com") is False
    with pytest.raises(NotFound):
        await store.remove_domain("example.com")


@ensure
async def test_remove_domain_with_users_fails_until_they_are_gone(store) -> None:
    await store.add_domain("example.com")
    await store.add_user("alice@example.com", "h")
    with pytest.raises(NotEmpty):
        await store.remove_domain("example.com")
    assert await store.domain_exists("example.com") is True
    assert await store.get_user("alice@example.com") == User("alice@example.com", "h")
    await store.remove_user("alice@example.com")
    await store.remove_domain("example.com")
    assert await store.list_domains() == []


# -- users -------------------------------------------------------------------------


@ensure
async def test_add_user_to_unknown_domain_fails(store) -> None:
    await store.add_domain("example.com")
    with pytest.raises(NotFound):
        await store.add_user("alice@example.org", "h")
    assert await store.get_user("alice@example.org") is None
    assert await store.list_users() == []


@ensure
async def test_add_existing_user_fails_and_keeps_the_first(store) -> None:
    await store.add_domain("example.com")
    assert await store.add_user("alice@example.com", "first") == User("alice@example.com", "first")
    with pytest.raises(AlreadyExists):
        await store.add_user("alice@example.com", "second")
    assert await store.get_user("alice@example.com") == User("alice@example.com", "first")


@ensure
async def test_get_and_list_users(store) -> None:
    await store.add_domain("example.com")
    await store.add_domain("example.org")
    await store.add_user("carol@example.com", "hc")
    await store.add_user("alice@example.org", "ha")
    await store.add_user("bob@example.com", "hb")
    assert await store.get_user("bob@example.com") == User("bob@example.com", "hb")
    assert await store.get_user("nobody@example.com") is None
    assert await store.list_users() == [
        User("alice@example.org", "ha"),
        User("bob@example.com", "hb"),
        User("carol@example.com", "hc"),
    ]
    assert await store.list_users("example.com") == [
        User("bob@example.com", "hb"),
        User("carol@example.com", "hc"),
    ]
    assert await store.list_users("example.net") == []


@ensure
async def test_set_password_hash(store, owner, other_owner) -> None:
    await store.set_password_hash(owner, "new-hash")
    assert await store.get_user(owner) == User(owner, "new-hash")
    assert await store.get_user(other_owner) == User(other_owner, "hash-of-bob")
    with pytest.raises(NotFound):
        await store.set_password_hash("nobody@example.com", "h")
    assert await store.get_user("nobody@example.com") is None


@ensure
async def test_remove_user_removes_mailboxes_messages_and_subscriptions(store, owner, other_owner) -> None:
    inbox = await new_box(store, owner, "INBOX")
    sent = await new_box(store, owner, "Sent", "\\Sent")
    bobs = await new_box(store, other_owner, "INBOX")
    await store.subscribe(owner, "INBOX")
    delivered = await deliver(store, [inbox, sent, bobs], message(1))
    blob_id = await blob_of(store, delivered[0].message_id)

    await store.remove_user(owner)

    assert await store.get_user(owner) is None
    assert await store.list_users() == [User(other_owner, "hash-of-bob")]
    assert await store.list_mailboxes(owner) == []
    assert await store.get_mailbox(owner, "INBOX") is None
    assert await store.get_mailbox_by_id(inbox.id) is None
    assert await store.get_mailbox_by_id(sent.id) is None
    assert await store.list_subscriptions(owner) == []
    assert await store.message_info([d.message_id for d in delivered[:2]]) == {}
    # Bob's copy of the same delivery is untouched, content included.
    assert await store.pop3_list(bobs.id) == [Pop3Entry(delivered[2].message_id, len(message(1)))]
    assert await store.collect_garbage() == 0
    assert await read(store, blob_id) == message(1)
    with pytest.raises(NotFound):
        await store.remove_user(owner)


@ensure
async def test_removed_users_content_is_collectable(store, owner) -> None:
    inbox = await new_box(store, owner, "INBOX")
    delivered = await deliver_one(store, inbox, message(1))
    blob_id = await blob_of(store, delivered.message_id)
    await store.remove_user(owner)
    await store.collect_garbage()
    with pytest.raises(ContentMissing):
        await read(store, blob_id)
    assert await store.collect_garbage() == 0


# -- mailboxes -----------------------------------------------------------------------


@ensure
async def test_create_and_get_mailbox(store, owner, other_owner) -> None:
    sent = await store.create_mailbox(owner, "Sent", "\\Sent")
    assert isinstance(sent, Mailbox)
    assert isinstance(sent.id, uuid.UUID)
    assert (sent.owner, sent.name, sent.special_use) == (owner, "Sent", "\\Sent")
    assert 1 <= sent.uidvalidity <= 0xFFFFFFFF
    inbox = await store.create_mailbox(owner, "INBOX")
    assert inbox.special_use is None
    assert inbox.id != sent.id
    assert await store.get_mailbox(owner, "Sent") == sent
    assert await store.get_mailbox(owner, "INBOX") == inbox
    assert await store.get_mailbox_by_id(sent.id) == sent
    assert await store.get_mailbox(owner, "Drafts") is None
    assert await store.get_mailbox(other_owner, "Sent") is None
    assert await store.get_mailbox_by_id(uuid.uuid4()) is None


@ensure
async def test_create_existing_mailbox_fails(store, owner, other_owner) -> None:
    first = await store.create_mailbox(owner, "Work")
    with pytest.raises(AlreadyExists):
        await store.create_mailbox(owner, "Work", "\\Archive")
    assert await store.list_mailboxes(owner) == [first]
    # The same name for another owner is another mailbox.
    bobs = await store.create_mailbox(other_owner, "Work")
    assert bobs.id != first.id
    assert await store.get_mailbox(owner, "Work") == first


@ensure
async def test_create_mailbox_for_unknown_owner_fails(store, owner) -> None:
    with pytest.raises(NotFound):
        await store.create_mailbox("nobody@example.com", "INBOX")
    assert await store.list_mailboxes("nobody@example.com") == []


@ensure
async def test_list_mailboxes_sorted_by_name(store, owner, other_owner) -> None:
    names = ["Zebra", "INBOX", "apple", "Archive/2024", "\u00c4rger", "Archive"]
    created = {name: await store.create_mailbox(owner, name) for name in names}
    await store.create_mailbox(other_owner, "Bobs")
    listed = await store.list_mailboxes(owner)
    assert [m.name for m in listed] == sorted(names)
    assert listed == [created[name] for name in sorted(names)]
    assert await store.list_mailboxes("nobody@example.com") == []


@ensure
async def test_count_mailboxes_follows_create_rename_and_delete(store, owner, other_owner) -> None:
    """What IMAP's per-user mailbox cap (imap.max_mailboxes) is checked against."""
    assert await store.count_mailboxes(owner) == 0
    boxes = [await store.create_mailbox(owner, name) for name in ("INBOX", "a", "a/b")]
    await store.create_mailbox(other_owner, "Bobs")
    assert await store.count_mailboxes(owner) == 3
    await store.rename_mailbox(boxes[2].id, "c")
    assert await store.count_mailboxes(owner) == 3
    await store.delete_mailbox(boxes[1].id)
    assert await store.count_mailboxes(owner) == 2
    assert await store.count_mailboxes(other_owner) == 1
    assert await store.count_mailboxes("nobody@example.com") == 0


@ensure
async def test_rename_keeps_id_uidvalidity_uids_and_messages(store, owner) -> None:
    box = await store.create_mailbox(owner, "Old", "\\Archive")
    d1 = await deliver_one(store, box, message(1), {SEEN})
    d2 = await deliver_one(store, box, message(2))
    before = await store.imap_snapshot(box.id)
    pop3_before = await store.pop3_list(box.id)

    renamed = await store.rename_mailbox(box.id, "New")

    assert renamed == Mailbox(box.id, owner, "New", box.uidvalidity, "\\Archive")
    assert await store.get_mailbox(owner, "Old") is None
    assert await store.get_mailbox(owner, "New") == renamed
    assert await store.get_mailbox_by_id(box.id) == renamed
    after = await store.imap_snapshot(box.id)
    assert after.mailbox == renamed
    assert after.entries == before.entries
    assert [e.uid for e in after.entries] == [d1.uid, d2.uid]
    assert after.uidnext == before.uidnext
    assert await store.pop3_list(box.id) == pop3_before
    info = await store.message_info([d1.message_id])
    assert await read(store, info[d1.message_id].blob_id) == message(1)
    d3 = await deliver_one(store, renamed, message(3))
    assert d3.uid == before.uidnext


@ensure
async def test_rename_onto_existing_fails(store, owner) -> None:
    a = await store.create_mailbox(owner, "A")
    b = await store.create_mailbox(owner, "B")
    with pytest.raises(AlreadyExists):
        await store.rename_mailbox(a.id, "B")
    assert await store.get_mailbox_by_id(a.id) == a
    assert await store.get_mailbox_by_id(b.id) == b
    assert await store.list_mailboxes(owner) == [a, b]


@ensure
async def test_rename_unknown_mailbox_fails(store, owner) -> None:
    with pytest.raises(NotFound):
        await store.rename_mailbox(uuid.uuid4(), "New")
    assert await store.list_mailboxes(owner) == []


@ensure
async def test_delete_mailbox_returns_its_messages(store, owner) -> None:
    box = await store.create_mailbox(owner, "Doomed")
    other = await store.create_mailbox(owner, "Kept")
    d1, kept = await deliver(store, [box, other], message(1))
    d2 = await deliver_one(store, box, message(2))

    only_here = await blob_of(store, d2.message_id)
    removed = await store.delete_mailbox(box.id)

    # (Removed.modseq is the backend's business here: the mailbox is gone.)
    assert sorted((r.mailbox_id, r.message_id, r.uid) for r in removed) == sorted([
        (box.id, d1.message_id, d1.uid),
        (box.id, d2.message_id, d2.uid),
    ])
    assert await store.get_mailbox_by_id(box.id) is None
    assert await store.get_mailbox(owner, "Doomed") is None
    assert await store.list_mailboxes(owner) == [other]
    assert await store.message_info([d1.message_id, d2.message_id]) == {}
    # The copy in another mailbox shares the content, which must survive
    # garbage collection; the content only the deleted mailbox used need not.
    await store.collect_garbage()
    assert await read(store, await blob_of(store, kept.message_id)) == message(1)
    with pytest.raises(ContentMissing):
        await read(store, only_here)
    with pytest.raises(NotFound):
        await store.delete_mailbox(box.id)


@ensure
async def test_recreated_mailbox_starts_afresh(store, owner) -> None:
    box = await store.create_mailbox(owner, "Again")
    await deliver_one(store, box, message(1))
    await deliver_one(store, box, message(2))
    await store.delete_mailbox(box.id)
    again = await store.create_mailbox(owner, "Again")
    assert again.id != box.id
    snapshot = await store.imap_snapshot(again.id)
    assert snapshot.entries == ()
    assert await store.pop3_list(again.id) == []


@ensure
async def test_subscriptions(store, owner, other_owner) -> None:
    assert await store.list_subscriptions(owner) == []
    await store.create_mailbox(owner, "INBOX")
    await store.subscribe(owner, "INBOX")
    await store.subscribe(owner, "Does/Not/Exist")  # RFC 3501 6.3.6: allowed
    await store.subscribe(owner, "Archive")
    await store.subscribe(owner, "Archive")  # twice is once
    await store.subscribe(other_owner, "Bobs")
    assert await store.list_subscriptions(owner) == ["Archive", "Does/Not/Exist", "INBOX"]
    assert await store.list_subscriptions(other_owner) == ["Bobs"]
    assert await store.get_mailbox(owner, "Does/Not/Exist") is None

    await store.unsubscribe(owner, "Archive")
    assert await store.list_subscriptions(owner) == ["Does/Not/Exist", "INBOX"]
    with pytest.raises(NotFound):
        await store.unsubscribe(owner, "Archive")
    with pytest.raises(NotFound):
        await store.unsubscribe(owner, "Bobs")
    assert await store.list_subscriptions(other_owner) == ["Bobs"]


@ensure
async def test_deleting_a_mailbox_keeps_its_subscription(store, owner) -> None:
    # RFC 3501 6.3.9: the server MUST NOT remove a name from the subscriptions
    # because the mailbox is gone.
    box = await store.create_mailbox(owner, "Work")
    await store.subscribe(owner, "Work")
    await store.delete_mailbox(box.id)
    assert await store.list_subscriptions(owner) == ["Work"]


# -- delivery --------------------------------------------------------------------


@ensure
async def test_deliver_to_three_mailboxes_stores_content_once(store, owner, other_owner) -> None:
    boxes = [
        await store.create_mailbox(owner, "INBOX"),
        await store.create_mailbox(owner, "Archive"),
        await store.create_mailbox(other_owner, "INBOX"),
    ]
    content = message(1, body_lines=20)

    delivered = await deliver(store, boxes, content, frozenset({"\\seen", "$Label"}))

    assert [d.mailbox_id for d in delivered] == [b.id for b in boxes]
    assert [d.uid for d in delivered] == [1, 1, 1]
    assert [d.flags for d in delivered] == [frozenset({SEEN, "$Label"})] * 3
    ids = [d.message_id for d in delivered]
    assert len(set(ids)) == 3
    assert all(isinstance(i, uuid.UUID) and i.version == 1 for i in ids)
    assert all(i.variant == uuid.RFC_4122 for i in ids)
    for box, d in zip(boxes, delivered):
        snapshot = await store.imap_snapshot(box.id)
        assert d.modseq == snapshot.highest_modseq
        assert snapshot.entries == (ImapEntry(1, d.message_id, d.flags, d.modseq),)
        assert snapshot.uidnext == 2
        assert await store.pop3_list(box.id) == [Pop3Entry(d.message_id, len(content))]

    infos = await store.message_info(ids)
    assert set(infos) == set(ids)
    blob_id = infos[ids[0]].blob_id
    for message_id in ids:
        assert infos[message_id] == MessageInfo(
            message_id, blob_id, len(content), WHEN.timestamp(), STRUCTURE
        )
        assert await read(store, infos[message_id].blob_id) == content


@ensure
async def test_deliver_to_an_unknown_mailbox_fails_and_leaves_nothing(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    with pytest.raises(NotFound):
        await store.deliver(
            message(1), STRUCTURE, [DeliveryTarget(box.id), DeliveryTarget(uuid.uuid4())], WHEN
        )
    snapshot = await store.imap_snapshot(box.id)
    assert snapshot.entries == ()
    assert await store.pop3_list(box.id) == []
    assert (await store.imap_status(box.id)).messages == 0


@ensure
async def test_deliver_normalises_flags(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    d = await deliver_one(store, box, message(1), {"\\seen", "\\DRAFT", "$Label", "$label"})
    assert d.flags in (
        frozenset({SEEN, DRAFT, "$Label"}),
        frozenset({SEEN, DRAFT, "$label"}),
    )
    assert (await store.imap_snapshot(box.id)).entries[0].flags == d.flags


@ensure
async def test_structure_is_returned_unchanged(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    odd = '{"a": [1, 2.5, null], "b": "line\\nbreak \u00fc", "c": {}}  '
    d = (await deliver(store, [box], message(7), structure=odd))[0]
    assert (await store.message_info([d.message_id]))[d.message_id].structure == odd


@ensure
async def test_a_real_message_structure_round_trips(store, owner) -> None:
    from twisted_mail_cluster import mime

    content = message(8, body_lines=3)
    structure = mime.analyse(content).to_json()
    box = await store.create_mailbox(owner, "INBOX")
    d = (await deliver(store, [box], content, structure=structure))[0]
    assert (await store.message_info([d.message_id]))[d.message_id].structure == structure


@ensure
async def test_uids_strictly_increase_and_are_never_reused(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    first = [await deliver_one(store, box, message(n)) for n in range(3)]
    assert [d.uid for d in first] == [1, 2, 3]
    await store.imap_store(box.id, [3], FlagMode.ADD, [DELETED])
    assert [r.uid for r in await store.imap_expunge(box.id)] == [3]
    d4 = await deliver_one(store, box, message(3))
    assert d4.uid == 4
    await store.pop3_remove(box.id, [d4.message_id])
    d5 = await deliver_one(store, box, message(4))
    assert d5.uid == 5
    assert await uids(store, box) == [1, 2, 5]
    snapshot = await store.imap_snapshot(box.id)
    assert snapshot.uidnext == 6
    assert (await store.imap_status(box.id)).uidnext == 6


@ensure
async def test_uidvalidity_is_stable(store, owner) -> None:
    box = await store.create_mailbox(owner, "Box")
    d = await deliver_one(store, box, message(1))
    await store.imap_store(box.id, [d.uid], FlagMode.ADD, [DELETED])
    await store.imap_expunge(box.id)
    await store.rename_mailbox(box.id, "Renamed")
    await deliver_one(store, box, message(2))
    snapshot = await store.imap_snapshot(box.id)
    assert snapshot.mailbox.uidvalidity == box.uidvalidity
    assert (await store.imap_status(box.id)).uidvalidity == box.uidvalidity
    assert (await store.get_mailbox_by_id(box.id)).uidvalidity == box.uidvalidity


@ensure
async def test_recreated_mailbox_gets_a_larger_uidvalidity(store, owner) -> None:
    """RFC 3501 2.3.1.1: a name reused for a new mailbox must not reuse UIDs' validity."""
    seen = []
    for _ in range(5):
        box = await store.create_mailbox(owner, "Reused")
        seen.append(box.uidvalidity)
        await store.delete_mailbox(box.id)
    assert seen == sorted(set(seen))


@ensure
async def test_modseq_increases_with_every_change(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    h0 = await highest(store, box)
    assert h0 >= 1

    d1 = await deliver_one(store, box, message(1))
    h1 = await highest(store, box)
    assert h1 > h0 and d1.modseq == h1

    d2 = await deliver_one(store, box, message(2))
    h2 = await highest(store, box)
    assert h2 > h1 and d2.modseq == h2

    stored = await store.imap_store(box.id, [d1.uid], FlagMode.ADD, [SEEN])
    h3 = await highest(store, box)
    assert h3 > h2
    assert stored.updated == (ImapEntry(d1.uid, d1.message_id, frozenset({SEEN}), h3),)

    # A STORE that changes nothing is no change.
    assert (await store.imap_store(box.id, [d1.uid], FlagMode.ADD, [SEEN])).updated == ()
    assert await highest(store, box) == h3
    # Neither is an EXPUNGE with nothing to expunge.
    assert await store.imap_expunge(box.id) == []
    assert await highest(store, box) == h3

    await store.imap_store(box.id, [d2.uid], FlagMode.ADD, [DELETED])
    h4 = await highest(store, box)
    assert h4 > h3
    (removed,) = await store.imap_expunge(box.id)
    h5 = await highest(store, box)
    assert h5 > h4
    assert removed == Removed(box.id, d2.message_id, d2.uid, h5)

    d3 = await deliver_one(store, box, message(3))
    h6 = await highest(store, box)
    assert h6 > h5 and d3.modseq == h6
    assert (await store.imap_status(box.id)).highest_modseq == h6
    assert (await store.imap_changes(box.id, h0)).highest_modseq == h6


# -- flags -----------------------------------------------------------------------


@ensure
async def test_flag_modes_and_normalisation(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    d = await deliver_one(store, box, message(1))

    async def flags_now() -> frozenset[str]:
        return (await store.imap_snapshot(box.id)).entries[0].flags

    result = await store.imap_store(box.id, [d.uid], FlagMode.ADD, ["\\seen", "\\FLAGGED", "$Work"])
    assert [e.flags for e in result.updated] == [frozenset({SEEN, FLAGGED, "$Work"})]
    assert await flags_now() == frozenset({SEEN, FLAGGED, "$Work"})

    # Keywords compare case-insensitively: adding $work again changes nothing.
    result = await store.imap_store(box.id, [d.uid], FlagMode.ADD, ["$work", "\\Seen"])
    assert result.updated == ()
    assert await flags_now() == frozenset({SEEN, FLAGGED, "$Work"})

    result = await store.imap_store(box.id, [d.uid], FlagMode.REMOVE, ["\\SEEN", "$WORK", "$absent"])
    assert [e.flags for e in result.updated] == [frozenset({FLAGGED})]
    assert await flags_now() == frozenset({FLAGGED})

    result = await store.imap_store(box.id, [d.uid], FlagMode.REPLACE, ["\\answered", "$Later"])
    assert [e.flags for e in result.updated] == [frozenset({ANSWERED, "$Later"})]
    assert await flags_now() == frozenset({ANSWERED, "$Later"})

    result = await store.imap_store(box.id, [d.uid], FlagMode.REPLACE, [])
    assert [e.flags for e in result.updated] == [frozenset()]
    assert await flags_now() == frozenset()

    result = await store.imap_store(box.id, [d.uid], FlagMode.REMOVE, [SEEN])
    assert result.updated == ()


@ensure
async def test_only_rows_that_change_get_a_new_modseq(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    d1 = await deliver_one(store, box, message(1), {SEEN})
    d2 = await deliver_one(store, box, message(2))
    d3 = await deliver_one(store, box, message(3))
    h = await highest(store, box)

    result = await store.imap_store(box.id, [d1.uid, d2.uid, 99], FlagMode.ADD, [SEEN])

    new = await highest(store, box)
    assert new > h
    assert result.updated == (ImapEntry(d2.uid, d2.message_id, frozenset({SEEN}), new),)
    assert result.modified == ()
    assert (await store.imap_snapshot(box.id)).entries == (
        ImapEntry(d1.uid, d1.message_id, frozenset({SEEN}), d1.modseq),
        ImapEntry(d2.uid, d2.message_id, frozenset({SEEN}), new),
        ImapEntry(d3.uid, d3.message_id, frozenset(), d3.modseq),
    )


@ensure
async def test_store_on_unknown_uids_changes_nothing(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    await deliver_one(store, box, message(1))
    h = await highest(store, box)
    result = await store.imap_store(box.id, [7, 8], FlagMode.ADD, [SEEN])
    assert (result.updated, result.modified) == ((), ())
    assert await highest(store, box) == h


@ensure
async def test_unchanged_since(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    d1 = await deliver_one(store, box, message(1))
    d2 = await deliver_one(store, box, message(2))
    known = await highest(store, box)
    await store.imap_store(box.id, [d1.uid], FlagMode.ADD, [FLAGGED])
    m1 = await highest(store, box)

    result = await store.imap_store(box.id, [d1.uid, d2.uid], FlagMode.ADD, [SEEN], unchanged_since=known)

    m2 = await highest(store, box)
    assert m2 > m1
    assert result.modified == (d1.uid,)
    assert result.updated == (ImapEntry(d2.uid, d2.message_id, frozenset({SEEN}), m2),)
    entries = (await store.imap_snapshot(box.id)).entries
    assert entries[0] == ImapEntry(d1.uid, d1.message_id, frozenset({FLAGGED}), m1)

    # A row whose MODSEQ equals UNCHANGEDSINCE may change (RFC 7162 3.1.3).
    result = await store.imap_store(box.id, [d1.uid], FlagMode.ADD, [ANSWERED], unchanged_since=m1)
    m3 = await highest(store, box)
    assert result.modified == ()
    assert result.updated == (ImapEntry(d1.uid, d1.message_id, frozenset({FLAGGED, ANSWERED}), m3),)


# -- IMAP view -------------------------------------------------------------------


@ensure
async def test_snapshot(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    empty = await store.imap_snapshot(box.id)
    assert (empty.mailbox, empty.uidnext, empty.entries) == (box, 1, ())
    d1 = await deliver_one(store, box, message(1), {FLAGGED})
    d2 = await deliver_one(store, box, message(2))
    snapshot = await store.imap_snapshot(box.id)
    assert snapshot.mailbox == box
    assert snapshot.uidnext == 3
    assert snapshot.highest_modseq == d2.modseq
    assert snapshot.entries == (
        ImapEntry(1, d1.message_id, frozenset({FLAGGED}), d1.modseq),
        ImapEntry(2, d2.message_id, frozenset(), d2.modseq),
    )
    with pytest.raises(NotFound):
        await store.imap_snapshot(uuid.uuid4())


@ensure
async def test_changes_since_a_modseq(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    delivered = [await deliver_one(store, box, message(n)) for n in range(1, 5)]
    await store.imap_store(box.id, [3], FlagMode.ADD, [DELETED])
    since = await highest(store, box)

    await store.imap_store(box.id, [2], FlagMode.ADD, [SEEN])
    await store.imap_expunge(box.id)  # removes 3, flagged before ``since``
    await store.imap_store(box.id, [4], FlagMode.ADD, [DELETED])
    await store.imap_expunge(box.id, [4])
    d5 = await deliver_one(store, box, message(5))

    changes = await store.imap_changes(box.id, since)
    snapshot = await store.imap_snapshot(box.id)
    assert changes.uidnext == 6
    assert changes.highest_modseq == snapshot.highest_modseq
    by_uid = {e.uid: e for e in snapshot.entries}
    assert sorted(changes.changed, key=lambda e: e.uid) == [by_uid[2], by_uid[5]]
    assert by_uid[5].message_id == d5.message_id
    assert by_uid[2].message_id == delivered[1].message_id
    assert sorted(changes.expunged) == [3, 4]

    nothing = await store.imap_changes(box.id, snapshot.highest_modseq)
    assert (nothing.uidnext, nothing.highest_modseq, nothing.changed, nothing.expunged) == (
        6, snapshot.highest_modseq, (), ()
    )
    with pytest.raises(NotFound):
        await store.imap_changes(uuid.uuid4(), 1)


@ensure
async def test_status(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    contents = [message(1), message(2, body_lines=5), message(3, body_lines=9)]
    await deliver_one(store, box, contents[0], {SEEN})
    await deliver_one(store, box, contents[1], {DELETED})
    await deliver_one(store, box, contents[2])
    await deliver_one(store, await store.create_mailbox(owner, "Other"), message(9))

    status = await store.imap_status(box.id)
    assert status == MailboxStatus(
        messages=3,
        recent=3,
        uidnext=4,
        uidvalidity=box.uidvalidity,
        unseen=2,
        highest_modseq=await highest(store, box),
        size=sum(len(c) for c in contents),
    )
    await store.imap_claim_recent(box.id)
    assert (await store.imap_status(box.id)).recent == 0
    await store.imap_store(box.id, [2], FlagMode.ADD, [SEEN])
    assert (await store.imap_status(box.id)).unseen == 1
    with pytest.raises(NotFound):
        await store.imap_status(uuid.uuid4())


@ensure
async def test_claim_recent(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    await deliver_one(store, box, message(1))
    await deliver_one(store, box, message(2))
    assert (await store.imap_status(box.id)).recent == 2

    # The first session gets both messages as recent, the next one none.
    assert await store.imap_claim_recent(box.id) == 1
    assert await store.imap_claim_recent(box.id) == 3
    assert (await store.imap_status(box.id)).recent == 0

    await deliver_one(store, box, message(3))
    assert (await store.imap_status(box.id)).recent == 1
    assert await store.imap_claim_recent(box.id) == 3
    assert await store.imap_claim_recent(box.id) == 4
    assert (await store.imap_status(box.id)).recent == 0


@ensure
async def test_expunge_removes_only_deleted_messages(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    ds = [await deliver_one(store, box, message(n)) for n in range(1, 6)]
    await store.imap_store(box.id, [1, 2, 3, 5], FlagMode.ADD, [DELETED])

    h0 = await highest(store, box)
    assert await store.imap_expunge(box.id, []) == []  # an empty UID set is not "all"
    assert await store.imap_expunge(box.id, [4]) == []  # not \Deleted
    assert await highest(store, box) == h0
    assert await uids(store, box) == [1, 2, 3, 4, 5]

    removed = await store.imap_expunge(box.id, [5, 2, 3, 4])
    h = await highest(store, box)
    assert removed == [
        Removed(box.id, ds[1].message_id, 2, h),
        Removed(box.id, ds[2].message_id, 3, h),
        Removed(box.id, ds[4].message_id, 5, h),
    ]
    assert await uids(store, box) == [1, 4]

    removed = await store.imap_expunge(box.id)
    assert removed == [Removed(box.id, ds[0].message_id, 1, await highest(store, box))]
    assert await uids(store, box) == [4]
    assert await store.pop3_list(box.id) == [Pop3Entry(ds[3].message_id, len(message(4)))]
    assert await store.message_info([d.message_id for d in ds]) == {
        ds[3].message_id: MessageInfo(ds[3].message_id, await blob_of(store, ds[3].message_id),
                                      len(message(4)), WHEN.timestamp(), STRUCTURE)
    }


@ensure
async def test_copy(store, owner) -> None:
    source = await store.create_mailbox(owner, "INBOX")
    target = await store.create_mailbox(owner, "Archive")
    s1 = await deliver_one(store, source, message(1), {SEEN, "$Work"})
    s2 = await deliver_one(store, source, message(2))
    t1 = await deliver_one(store, target, message(3))
    source_before = await store.imap_snapshot(source.id)
    target_highest = await highest(store, target)

    assert await store.imap_copy(source.id, [], target.id) == []
    assert await highest(store, target) == target_highest
    copied = await store.imap_copy(source.id, [2, 1, 99], target.id)

    assert [c.source_uid for c in copied] == [1, 2]
    assert all(isinstance(c, Copied) for c in copied)
    assert [(c.delivered.mailbox_id, c.delivered.uid, c.delivered.flags) for c in copied] == [
        (target.id, 2, frozenset({SEEN, "$Work"})),
        (target.id, 3, frozenset()),
    ]
    new_ids = [c.delivered.message_id for c in copied]
    assert len(set(new_ids) | {s1.message_id, s2.message_id, t1.message_id}) == 5
    assert all(i.version == 1 for i in new_ids)
    assert all(c.delivered.modseq > target_highest for c in copied)
    target_after = await store.imap_snapshot(target.id)
    assert target_after.highest_modseq == max(c.delivered.modseq for c in copied)
    assert target_after.entries[1:] == tuple(
        ImapEntry(c.delivered.uid, c.delivered.message_id, c.delivered.flags, c.delivered.modseq)
        for c in copied
    )
    assert await store.imap_snapshot(source.id) == source_before
    assert [e.message_id for e in await store.pop3_list(target.id)] == [t1.message_id, *new_ids]

    infos = await store.message_info([s1.message_id, s2.message_id, *new_ids])
    assert infos[new_ids[0]].blob_id == infos[s1.message_id].blob_id
    assert infos[new_ids[1]].blob_id == infos[s2.message_id].blob_id
    assert infos[new_ids[0]].size == len(message(1))
    assert infos[new_ids[0]].internal_date == WHEN.timestamp()
    assert await read(store, infos[new_ids[1]].blob_id) == message(2)

    with pytest.raises(NotFound):
        await store.imap_copy(source.id, [1], uuid.uuid4())
    assert await store.imap_snapshot(source.id) == source_before


@ensure
async def test_move(store, owner) -> None:
    source = await store.create_mailbox(owner, "INBOX")
    target = await store.create_mailbox(owner, "Trash", "\\Trash")
    ds = [await deliver_one(store, source, message(n), {FLAGGED} if n == 3 else ()) for n in (1, 2, 3)]
    since = await highest(store, source)

    copied, removed = await store.imap_move(source.id, [3, 1], target.id)

    h = await highest(store, source)
    assert h > since
    assert [c.source_uid for c in copied] == [1, 3]
    assert [(c.delivered.mailbox_id, c.delivered.uid, c.delivered.flags) for c in copied] == [
        (target.id, 1, frozenset()),
        (target.id, 2, frozenset({FLAGGED})),
    ]
    assert removed == [
        Removed(source.id, ds[0].message_id, 1, h),
        Removed(source.id, ds[2].message_id, 3, h),
    ]
    assert await uids(store, source) == [2]
    assert await store.pop3_list(source.id) == [Pop3Entry(ds[1].message_id, len(message(2)))]
    changes = await store.imap_changes(source.id, since)
    assert (changes.changed, tuple(sorted(changes.expunged))) == ((), (1, 3))

    new_ids = [c.delivered.message_id for c in copied]
    assert await uids(store, target) == [1, 2]
    assert [e.message_id for e in await store.pop3_list(target.id)] == new_ids
    assert await store.message_info([ds[0].message_id, ds[2].message_id]) == {}
    assert await store.collect_garbage() == 0
    infos = await store.message_info(new_ids)
    assert await read(store, infos[new_ids[0]].blob_id) == message(1)
    assert await read(store, infos[new_ids[1]].blob_id) == message(3)


# -- POP3 view -----------------------------------------------------------------------


@ensure
async def test_pop3_list_in_arrival_order_with_sizes(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    contents = [message(1, body_lines=7), message(2), message(3, body_lines=3)]
    ds = [await deliver_one(store, box, c) for c in contents]
    await deliver_one(store, await store.create_mailbox(owner, "Other"), message(4))
    assert await store.pop3_list(box.id) == [
        Pop3Entry(d.message_id, len(c)) for d, c in zip(ds, contents)
    ]
    assert await store.pop3_list(uuid.uuid4()) == []


@ensure
async def test_pop3_remove_removes_from_both_views(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    ds = [await deliver_one(store, box, message(n)) for n in (1, 2, 3)]
    since = await highest(store, box)

    removed = await store.pop3_remove(box.id, [ds[1].message_id])

    h = await highest(store, box)
    assert h > since
    assert removed == [Removed(box.id, ds[1].message_id, 2, h)]
    assert await store.pop3_list(box.id) == [
        Pop3Entry(ds[0].message_id, len(message(1))),
        Pop3Entry(ds[2].message_id, len(message(3))),
    ]
    assert await uids(store, box) == [1, 3]
    changes = await store.imap_changes(box.id, since)
    assert (changes.changed, changes.expunged) == ((), (2,))
    assert (await store.imap_status(box.id)).messages == 2
    assert await store.message_info([ds[1].message_id]) == {}


@ensure
async def test_pop3_remove_skips_ids_already_gone(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    other = await store.create_mailbox(owner, "Other")
    ds = [await deliver_one(store, box, message(n)) for n in (1, 2)]
    elsewhere = await deliver_one(store, other, message(3))
    await store.pop3_remove(box.id, [ds[0].message_id])
    h = await highest(store, box)

    assert await store.pop3_remove(box.id, [ds[0].message_id]) == []
    assert await store.pop3_remove(box.id, []) == []
    assert await store.pop3_remove(box.id, [uuid.uuid1()]) == []
    # An id of another mailbox is not in this one.
    assert await store.pop3_remove(box.id, [elsewhere.message_id]) == []
    assert await highest(store, box) == h
    assert await store.pop3_list(other.id) == [Pop3Entry(elsewhere.message_id, len(message(3)))]

    removed = await store.pop3_remove(box.id, [ds[0].message_id, ds[1].message_id])
    assert removed == [Removed(box.id, ds[1].message_id, 2, await highest(store, box))]
    assert await store.pop3_list(box.id) == []


@ensure
async def test_pop3_remove_reports_a_message_named_twice_once(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    ds = [await deliver_one(store, box, message(n)) for n in (1, 2, 3)]
    removed = await store.pop3_remove(
        box.id, [ds[2].message_id, ds[0].message_id, ds[2].message_id]
    )
    h = await highest(store, box)
    assert sorted(removed, key=lambda r: r.uid) == [
        Removed(box.id, ds[0].message_id, 1, h),
        Removed(box.id, ds[2].message_id, 3, h),
    ]
    assert await store.pop3_list(box.id) == [Pop3Entry(ds[1].message_id, len(message(2)))]
    changes = await store.imap_changes(box.id, ds[2].modseq)
    assert sorted(changes.expunged) == [1, 3]


# -- content -----------------------------------------------------------------------


@ensure
async def test_open_content_ranges(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    content = big_message()
    d = await deliver_one(store, box, content)
    blob_id = await blob_of(store, d.message_id)
    size = len(content)
    ranges = [
        (0, None),
        (0, size),
        (0, 1),
        (10, 20),  # inside the first chunk
        (CHUNK + 100, CHUNK + 5000),  # inside another chunk
        (CHUNK - 5, CHUNK + 5),  # across one boundary
        (CHUNK, 2 * CHUNK),  # exactly one chunk
        (CHUNK - 1, 3 * CHUNK + 1),  # across every boundary
        (3 * CHUNK, None),  # the partial last chunk
        (100, 100),  # empty
        (200, 100),  # end before start: empty
        (size - 10, size + 1000),  # end beyond the size
        (size, None),  # empty, at the end
        (size + 10, size + 20),  # wholly beyond the end
    ]
    for start, end in ranges:
        got = await read(store, blob_id, start, end)
        expected = content[start:end]
        assert len(got) == len(expected), (start, end)
        assert got == expected, (start, end)
    assert await read(store, blob_id) == content


@ensure
async def test_open_content_of_unknown_blob(store, owner) -> None:
    with pytest.raises(ContentMissing):
        await read(store, "0" * 64)


@ensure
async def test_message_info_omits_unknown_ids(store, owner) -> None:
    box = await store.create_mailbox(owner, "INBOX")
    d = await deliver_one(store, box, message(1))
    unknown = uuid.uuid1()
    infos = await store.message_info([unknown, d.message_id])
    assert list(infos) == [d.message_id]
    info = infos[d.message_id]
    assert (info.message_id, info.size, info.internal_date, info.structure) == (
        d.message_id, len(message(1)), WHEN.timestamp(), STRUCTURE
    )
    assert await store.message_info([unknown]) == {}
    assert await store.message_info([]) == {}


@ensure
async def test_collect_garbage(store, owner) -> None:
    a = await store.create_mailbox(owner, "A")
    b = await store.create_mailbox(owner, "B")
    da, db_ = await deliver(store, [a, b], message(1))
    blob_id = await blob_of(store, da.message_id)
    other = await deliver_one(store, a, message(2))

    assert await store.collect_garbage() == 0
    assert await read(store, blob_id) == message(1)

    await store.delete_mailbox(b.id)
    assert await store.collect_garbage() == 0
    assert await read(store, blob_id) == message(1)

    await store.imap_store(a.id, [da.uid], FlagMode.ADD, [DELETED])
    await store.imap_expunge(a.id)
    await store.collect_garbage()
    with pytest.raises(ContentMissing):
        await read(store, blob_id)
    assert await store.collect_garbage() == 0
    assert await read(store, await blob_of(store, other.message_id)) == message(2)
