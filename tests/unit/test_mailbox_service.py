"""MailboxService over a real EmbeddedStore and the in-process bus."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.task import deferLater

from twisted_mail_cluster.events.inprocess import InProcessEventBus
from twisted_mail_cluster.events.model import (
    Added,
    Expunged,
    FlagsUpdated,
    MailboxAdded,
    MailboxDeleted,
    MailboxRenamed,
)
from twisted_mail_cluster.mailbox_service import MailboxService, PreparedMessage
from twisted_mail_cluster.store.embedded import EmbeddedStore
from twisted_mail_cluster.store.errors import AlreadyExists, InvalidName, NotFound
from twisted_mail_cluster.store.model import DELETED, FLAGGED, SEEN, FlagMode, Mailbox

ensure = pytest_twisted.ensureDeferred
OWNER = "alice@example.com"
WHEN = datetime(2024, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
NO_ID = uuid.UUID(int=0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(tmp_path / "mail.sqlite", reactor)
    pytest_twisted.blockon(s.start())
    pytest_twisted.blockon(s.add_domain("example.com"))
    pytest_twisted.blockon(s.add_user(OWNER, "h"))
    yield s
    pytest_twisted.blockon(s.close())


@pytest.fixture
def bus() -> InProcessEventBus:
    return InProcessEventBus(reactor, retries=0, first_backoff=0.01, max_backoff=0.01)


class Events:
    """Every event the bus carries, recorded by a group listener."""

    def __init__(self, bus: InProcessEventBus) -> None:
        self.all: list = []
        bus.register_group(self.all.append, "test-recorder")

    async def expect(self, expected: list, grace: float = 0.02) -> None:
        """Wait for the events, then check that exactly these arrived (event ids aside)."""
        deadline = reactor.seconds() + 3
        while len(self.all) < len(expected) and reactor.seconds() < deadline:
            await deferLater(reactor, 0.002, lambda: None)
        await deferLater(reactor, grace, lambda: None)
        got = [dataclasses.replace(e, event_id=NO_ID) for e in self.all]
        want = [dataclasses.replace(e, event_id=NO_ID) for e in expected]
        self.all.clear()
        assert got == want


@pytest.fixture
def events(bus) -> Events:
    return Events(bus)


@pytest.fixture
def service(store, bus) -> MailboxService:
    return MailboxService(store, bus)


def prepared(n: int) -> PreparedMessage:
    return PreparedMessage(b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n), '{"n": %d}' % n)


async def names(store) -> list[str]:
    return [m.name for m in await store.list_mailboxes(OWNER)]


async def deliver(service, box: Mailbox, n: int, flags=frozenset()):
    (d,) = await service.deliver(prepared(n), [(box, frozenset(flags))], WHEN)
    return d


# -- create ---------------------------------------------------------------------------


@ensure
async def test_create_makes_missing_parents(service, store, events) -> None:
    leaf = await service.create_mailbox(OWNER, "Work/2024/Q1", "\\Archive")
    assert await names(store) == ["Work", "Work/2024", "Work/2024/Q1"]
    work = await store.get_mailbox(OWNER, "Work")
    year = await store.get_mailbox(OWNER, "Work/2024")
    assert (work.special_use, year.special_use, leaf.special_use) == (None, None, "\\Archive")
    assert await store.get_mailbox(OWNER, "Work/2024/Q1") == leaf
    await events.expect([
        MailboxAdded(work.id, OWNER, name="Work"),
        MailboxAdded(year.id, OWNER, name="Work/2024"),
        MailboxAdded(leaf.id, OWNER, name="Work/2024/Q1"),
    ])

    q2 = await service.create_mailbox(OWNER, "Work/2024/Q2")
    assert await names(store) == ["Work", "Work/2024", "Work/2024/Q1", "Work/2024/Q2"]
    await events.expect([MailboxAdded(q2.id, OWNER, name="Work/2024/Q2")])


@ensure
async def test_create_normalises_inbox_and_refuses_bad_names(service, store, events) -> None:
    sub = await service.create_mailbox(OWNER, "inbox/Sub")
    assert sub.name == "INBOX/Sub"
    assert await names(store) == ["INBOX", "INBOX/Sub"]
    with pytest.raises(AlreadyExists):
        await service.create_mailbox(OWNER, "Inbox/Sub")
    for bad in ["", "a//b", "/a", "a/", "x*", "y%", "tab\there"]:
        with pytest.raises(InvalidName):
            await service.create_mailbox(OWNER, bad)
    assert await names(store) == ["INBOX", "INBOX/Sub"]
    inbox = await store.get_mailbox(OWNER, "INBOX")
    await events.expect([
        MailboxAdded(inbox.id, OWNER, name="INBOX"),
        MailboxAdded(sub.id, OWNER, name="INBOX/Sub"),
    ])


@ensure
async def test_ensure_mailbox(service, store, events) -> None:
    inbox = await service.ensure_mailbox(OWNER, "INBOX")
    assert await service.ensure_mailbox(OWNER, "INBOX") == inbox
    assert await names(store) == ["INBOX"]
    await events.expect([MailboxAdded(inbox.id, OWNER, name="INBOX")])


# -- delete ---------------------------------------------------------------------------


@ensure
async def test_delete_refuses_inbox(service, store) -> None:
    await service.create_mailbox(OWNER, "INBOX")
    for spelling in ["INBOX", "inbox", "InBoX"]:
        with pytest.raises(InvalidName):
            await service.delete_mailbox(OWNER, spelling)
    assert await names(store) == ["INBOX"]


@ensure
async def test_delete_refuses_a_mailbox_with_inferiors(service, store) -> None:
    await service.create_mailbox(OWNER, "Work/Old")
    with pytest.raises(InvalidName):
        await service.delete_mailbox(OWNER, "Work")
    assert await names(store) == ["Work", "Work/Old"]
    await service.delete_mailbox(OWNER, "Work/Old")
    await service.delete_mailbox(OWNER, "Work")
    assert await names(store) == []
    with pytest.raises(NotFound):
        await service.delete_mailbox(OWNER, "Work")


@ensure
async def test_delete_is_not_fooled_by_a_name_prefix(service, store) -> None:
    await service.create_mailbox(OWNER, "Work")
    await service.create_mailbox(OWNER, "Workshop")
    await service.delete_mailbox(OWNER, "Work")
    assert await names(store) == ["Workshop"]


@ensure
async def test_delete_emits_expunged_then_mailbox_deleted(service, store, events) -> None:
    box = await service.create_mailbox(OWNER, "Old")
    d1 = await deliver(service, box, 1)
    d2 = await deliver(service, box, 2)
    await deferLater(reactor, 0.02, lambda: None)
    events.all.clear()

    assert await service.delete_mailbox(OWNER, "Old") == box

    assert await store.get_mailbox_by_id(box.id) is None
    assert await store.message_info([d1.message_id, d2.message_id]) == {}
    await events.expect([
        Expunged(box.id, OWNER, uids=(1, 2), message_ids=(d1.message_id, d2.message_id), modseq=0),
        MailboxDeleted(box.id, OWNER, name="Old"),
    ])


# -- rename ---------------------------------------------------------------------------


@ensure
async def test_rename_renames_inferiors_and_keeps_uids(service, store, events) -> None:
    old = await service.create_mailbox(OWNER, "Old")
    sub = await service.create_mailbox(OWNER, "Old/Sub")
    deep = await service.create_mailbox(OWNER, "Old/Sub/Deep")
    older = await service.create_mailbox(OWNER, "Older")  # a prefix, not an inferior
    await deliver(service, old, 1, {SEEN})
    await deliver(service, old, 2)
    await deliver(service, sub, 3)
    before = {b.id: await store.imap_snapshot(b.id) for b in (old, sub, deep)}
    await deferLater(reactor, 0.02, lambda: None)
    events.all.clear()

    renamed = await service.rename_mailbox(OWNER, "Old", "New/Place")

    assert [(m.id, m.name) for m in renamed] == [
        (old.id, "New/Place"), (sub.id, "New/Place/Sub"), (deep.id, "New/Place/Sub/Deep")
    ]
    assert await names(store) == ["New", "New/Place", "New/Place/Sub", "New/Place/Sub/Deep", "Older"]
    assert await store.get_mailbox(OWNER, "Older") == older
    for box in (old, sub, deep):
        after = await store.imap_snapshot(box.id)
        assert after.entries == before[box.id].entries
        assert after.uidnext == before[box.id].uidnext
        assert after.mailbox.uidvalidity == box.uidvalidity
    new = await store.get_mailbox(OWNER, "New")
    await events.expect([
        MailboxAdded(new.id, OWNER, name="New"),
        MailboxRenamed(old.id, OWNER, old_name="Old", new_name="New/Place"),
        MailboxRenamed(sub.id, OWNER, old_name="Old/Sub", new_name="New/Place/Sub"),
        MailboxRenamed(deep.id, OWNER, old_name="Old/Sub/Deep", new_name="New/Place/Sub/Deep"),
    ])


@ensure
async def test_rename_refusals(service, store) -> None:
    await service.create_mailbox(OWNER, "INBOX")
    await service.create_mailbox(OWNER, "A/Child")
    await service.create_mailbox(OWNER, "B")
    before = await store.list_mailboxes(OWNER)
    with pytest.raises(AlreadyExists):
        await service.rename_mailbox(OWNER, "A", "B")
    with pytest.raises(NotFound):
        await service.rename_mailbox(OWNER, "Missing", "C")
    for old, new in [("A", "INBOX"), ("A", "inbox"), ("A", "A/Child/X"), ("A", "A"), ("A", "a//b")]:
        with pytest.raises(InvalidName):
            await service.rename_mailbox(OWNER, old, new)
    assert await store.list_mailboxes(OWNER) == before


@ensure
async def test_rename_with_a_clashing_inferior_changes_nothing(service, store) -> None:
    """RENAME is all or nothing: if an inferior's new name is taken, nothing moves."""
    await service.create_mailbox(OWNER, "A/Child")
    # "B/Child" without a "B": only reachable from older data or a race, but possible.
    await store.create_mailbox(OWNER, "B/Child")
    before = await store.list_mailboxes(OWNER)
    with pytest.raises(AlreadyExists):
        await service.rename_mailbox(OWNER, "A", "B")
    assert await store.list_mailboxes(OWNER) == before


@ensure
async def test_renaming_inbox_moves_its_messages(service, store, events) -> None:
    inbox = await service.create_mailbox(OWNER, "INBOX")
    inbox_sub = await service.create_mailbox(OWNER, "INBOX/Sub")
    d1 = await deliver(service, inbox, 1, {SEEN})
    d2 = await deliver(service, inbox, 2, {FLAGGED})
    info = await store.message_info([d1.message_id])
    await deferLater(reactor, 0.02, lambda: None)
    events.all.clear()

    (target,) = await service.rename_mailbox(OWNER, "inbox", "Old Mail")

    assert target.name == "Old Mail"
    assert target.id != inbox.id
    assert await names(store) == ["INBOX", "INBOX/Sub", "Old Mail"]
    assert await store.get_mailbox(OWNER, "INBOX") == inbox
    assert await store.get_mailbox(OWNER, "INBOX/Sub") == inbox_sub
    assert (await store.imap_snapshot(inbox.id)).entries == ()
    assert await store.pop3_list(inbox.id) == []
    moved = (await store.imap_snapshot(target.id)).entries
    assert [(e.uid, e.flags) for e in moved] == [(1, frozenset({SEEN})), (2, frozenset({FLAGGED}))]
    moved_info = await store.message_info([moved[0].message_id])
    assert moved_info[moved[0].message_id].blob_id == info[d1.message_id].blob_id
    h_inbox = (await store.imap_snapshot(inbox.id)).highest_modseq
    h_target = (await store.imap_snapshot(target.id)).highest_modseq
    await events.expect([
        MailboxAdded(target.id, OWNER, name="Old Mail"),
        Added(target.id, OWNER, uids=(1, 2), message_ids=tuple(e.message_id for e in moved),
              modseq=h_target),
        Expunged(inbox.id, OWNER, uids=(1, 2), message_ids=(d1.message_id, d2.message_id),
                 modseq=h_inbox),
    ])


@ensure
async def test_renaming_an_empty_inbox(service, store, events) -> None:
    inbox = await service.create_mailbox(OWNER, "INBOX")
    await deferLater(reactor, 0.02, lambda: None)
    events.all.clear()
    (target,) = await service.rename_mailbox(OWNER, "INBOX", "Archive/2023")
    assert await names(store) == ["Archive", "Archive/2023", "INBOX"]
    assert await store.get_mailbox(OWNER, "INBOX") == inbox
    archive = await store.get_mailbox(OWNER, "Archive")
    await events.expect([
        MailboxAdded(archive.id, OWNER, name="Archive"),
        MailboxAdded(target.id, OWNER, name="Archive/2023"),
    ])


# -- messages and their events ------------------------------------------------------------


@ensure
async def test_deliver_emits_added_per_mailbox(service, store, events) -> None:
    inbox = await service.create_mailbox(OWNER, "INBOX")
    other = await service.create_mailbox(OWNER, "Other")
    await deliver(service, other, 0)
    await deferLater(reactor, 0.02, lambda: None)
    events.all.clear()

    delivered = await service.deliver(prepared(1), [(inbox, frozenset({"\\seen"})), (other, frozenset())], WHEN)

    assert [(d.mailbox_id, d.uid, d.flags) for d in delivered] == [
        (inbox.id, 1, frozenset({SEEN})), (other.id, 2, frozenset())
    ]
    info = await store.message_info([delivered[0].message_id])
    assert info[delivered[0].message_id].structure == prepared(1).structure
    assert info[delivered[0].message_id].internal_date == WHEN.timestamp()
    await events.expect([
        Added(inbox.id, OWNER, uids=(1,), message_ids=(delivered[0].message_id,),
              modseq=delivered[0].modseq),
        Added(other.id, OWNER, uids=(2,), message_ids=(delivered[1].message_id,),
              modseq=delivered[1].modseq),
    ])


@ensure
async def test_store_flags_emits_flags_updated(service, store, events) -> None:
    box = await service.create_mailbox(OWNER, "INBOX")
    await deliver(service, box, 1, {SEEN})
    await deliver(service, box, 2)
    await deferLater(reactor, 0.02, lambda: None)
    events.all.clear()

    result = await service.store_flags(box, [1, 2], FlagMode.ADD, ["\\seen", "$Work"])

    modseq = (await store.imap_snapshot(box.id)).highest_modseq
    assert [(e.uid, e.flags, e.modseq) for e in result.updated] == [
        (1, frozenset({SEEN, "$Work"}), modseq), (2, frozenset({SEEN, "$Work"}), modseq)
    ]
    await events.expect([
        FlagsUpdated(box.id, OWNER, updates=((1, ("$Work", SEEN), modseq), (2, ("$Work", SEEN), modseq)))
    ])
    # Nothing changes, nothing is told.
    assert (await service.store_flags(box, [1, 2], FlagMode.ADD, [SEEN])).updated == ()
    await events.expect([])


@ensure
async def test_expunge_emits_expunged(service, store, events) -> None:
    box = await service.create_mailbox(OWNER, "INBOX")
    ds = [await deliver(service, box, n, {DELETED} if n != 2 else ()) for n in (1, 2, 3)]
    await deferLater(reactor, 0.02, lambda: None)
    events.all.clear()

    removed = await service.expunge(box)

    modseq = (await store.imap_snapshot(box.id)).highest_modseq
    assert [r.uid for r in removed] == [1, 3]
    await events.expect([
        Expunged(box.id, OWNER, uids=(1, 3), message_ids=(ds[0].message_id, ds[2].message_id),
                 modseq=modseq)
    ])
    assert await service.expunge(box) == []
    await events.expect([])


@ensure
async def test_pop3_remove_emits_expunged(service, store, events) -> None:
    box = await service.create_mailbox(OWNER, "INBOX")
    ds = [await deliver(service, box, n) for n in (1, 2)]
    await deferLater(reactor, 0.02, lambda: None)
    events.all.clear()

    removed = await service.pop3_remove(box, [ds[1].message_id, ds[1].message_id])

    modseq = (await store.imap_snapshot(box.id)).highest_modseq
    assert [r.message_id for r in removed] == [ds[1].message_id]
    await events.expect([
        Expunged(box.id, OWNER, uids=(2,), message_ids=(ds[1].message_id,), modseq=modseq)
    ])
    assert await service.pop3_remove(box, [ds[1].message_id]) == []
    await events.expect([])


@ensure
async def test_copy_and_move_emit_events(service, store, events) -> None:
    source = await service.create_mailbox(OWNER, "INBOX")
    target = await service.create_mailbox(OWNER, "Archive")
    ds = [await deliver(service, source, n) for n in (1, 2)]
    await deferLater(reactor, 0.02, lambda: None)
    events.all.clear()

    copied = await service.copy(source, [1, 2], target)
    target_modseq = (await store.imap_snapshot(target.id)).highest_modseq
    await events.expect([
        Added(target.id, OWNER, uids=(1, 2), message_ids=tuple(c.delivered.message_id for c in copied),
              modseq=target_modseq)
    ])

    copied, removed = await service.move(source, [2], target)
    target_modseq = (await store.imap_snapshot(target.id)).highest_modseq
    source_modseq = (await store.imap_snapshot(source.id)).highest_modseq
    assert [c.delivered.uid for c in copied] == [3]
    assert [r.uid for r in removed] == [2]
    await events.expect([
        Added(target.id, OWNER, uids=(3,), message_ids=(copied[0].delivered.message_id,),
              modseq=target_modseq),
        Expunged(source.id, OWNER, uids=(2,), message_ids=(ds[1].message_id,), modseq=source_modseq),
    ])


# -- a failing bus ------------------------------------------------------------------------


class BrokenBus:
    """A bus that is down: dispatch raises, or fails its Deferred."""

    def __init__(self, raise_now: bool) -> None:
        self.raise_now = raise_now
        self.attempts = 0

    def dispatch(self, event):
        self.attempts += 1
        if self.raise_now:
            raise ConnectionError("bus is down")
        return fail(ConnectionError("bus is down"))

    def register(self, listener, key):  # pragma: no cover - not used here
        raise AssertionError

    def register_group(self, listener, group):  # pragma: no cover - not used here
        raise AssertionError

    def start(self):  # pragma: no cover
        return succeed(None)

    def stop(self):  # pragma: no cover
        return succeed(None)


@pytest.mark.parametrize("raise_now", [True, False], ids=["raises", "fails-deferred"])
@ensure
async def test_a_failing_bus_does_not_fail_the_change(store, raise_now) -> None:
    bus = BrokenBus(raise_now)
    service = MailboxService(store, bus)

    box = await service.create_mailbox(OWNER, "Work/Inbox")
    (d,) = await service.deliver(prepared(1), [(box, frozenset())], WHEN)
    result = await service.store_flags(box, [d.uid], FlagMode.ADD, [DELETED])
    removed = await service.expunge(box)
    renamed = await service.rename_mailbox(OWNER, "Work", "Job")
    await service.delete_mailbox(OWNER, "Job/Inbox")

    assert d.uid == 1
    assert [e.uid for e in result.updated] == [1]
    assert [r.uid for r in removed] == [1]
    assert [m.name for m in renamed] == ["Job", "Job/Inbox"]
    assert await names(store) == ["Job"]
    # Work, Work/Inbox added; Added; FlagsUpdated; Expunged; 2 renamed; Deleted.
    assert bus.attempts == 8


@ensure
async def test_inbox_can_be_renamed_below_itself(service, store) -> None:
    """RFC 3501 6.3.5: renaming INBOX moves its messages; INBOX/old is a fine target."""
    inbox = await service.create_mailbox(OWNER, "INBOX")
    await deliver(service, inbox, 1, {SEEN})
    (target,) = await service.rename_mailbox(OWNER, "INBOX", "INBOX/old")
    assert await names(store) == ["INBOX", "INBOX/old"]
    assert (await store.imap_snapshot(inbox.id)).entries == ()
    assert [e.uid for e in (await store.imap_snapshot(target.id)).entries] == [1]
