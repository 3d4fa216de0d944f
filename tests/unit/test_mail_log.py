"""The mail-log group listener on the in-process bus, with the real reactor and real files."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from twisted_mail_cluster.events.inprocess import InProcessEventBus
from twisted_mail_cluster.events.mail_log import GROUP, MailLog, mail_log_line
from twisted_mail_cluster.events.model import Added, FlagsUpdated, MailboxRenamed

MAILBOX = uuid.UUID("6f1c2b4e-0000-4000-8000-000000000001")
MESSAGE = uuid.UUID("a0d4c6f0-9a3b-11ef-8000-000000000002")
EVENT = uuid.UUID("0c9a7e1e-0000-4000-8000-000000000003")


def test_a_line_is_the_event_with_when_and_where() -> None:
    event = Added(MAILBOX, "alice@example.test", uids=(7,), message_ids=(MESSAGE,), modseq=12, event_id=EVENT)
    line = mail_log_line(event, "mx1.example.test", datetime(2026, 11, 23, 15, 4, 5, 123456, tzinfo=timezone.utc))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "logged_at": "2026-11-23T15:04:05.123+00:00",
        "node": "mx1.example.test",
        "event": "Added",
        "event_id": str(EVENT),
        "mailbox_id": str(MAILBOX),
        "owner": "alice@example.test",
        "uids": [7],
        "message_ids": [str(MESSAGE)],
        "modseq": 12,
    }
    # the first keys say when, where and what, for a reader skimming the file
    assert list(json.loads(line))[:3] == ["logged_at", "node", "event"]


def test_every_kind_of_event_has_its_own_fields() -> None:
    renamed = json.loads(mail_log_line(MailboxRenamed(MAILBOX, "bob@example.test", old_name="A", new_name="B"), "n"))
    assert (renamed["event"], renamed["old_name"], renamed["new_name"]) == ("MailboxRenamed", "A", "B")
    flags = json.loads(mail_log_line(FlagsUpdated(MAILBOX, "bob@example.test", updates=((3, ("\\Seen",), 9),)), "n"))
    assert (flags["event"], flags["updates"]) == ("FlagsUpdated", [[3, ["\\Seen"], 9]])


async def _until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    waited = 0.0
    while not check():
        assert waited < timeout, "condition not met"
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


@pytest_twisted.ensureDeferred
async def test_each_event_is_appended_once(tmp_path: Path) -> None:
    bus = InProcessEventBus(reactor)
    path = tmp_path / "mail-log.jsonl"
    path.write_bytes(b'{"kept":"what was there"}\n')
    # two members of the group on this node: each event is still written once
    await bus.register_group(MailLog(path, "mx1", reactor), GROUP)
    await bus.register_group(MailLog(path, "mx1", reactor), GROUP)
    events = [Added(MAILBOX, "alice@example.test", uids=(i,), message_ids=(uuid.uuid1(),), modseq=i)
              for i in range(1, 6)]
    for event in events:
        await bus.dispatch(event)
    await _until(lambda: len(path.read_bytes().splitlines()) == 6)
    await deferLater(reactor, 0.2, lambda: None)  # nothing more comes
    lines = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert lines[0] == {"kept": "what was there"}
    assert sorted(line["uids"][0] for line in lines[1:]) == [1, 2, 3, 4, 5]
    assert {line["event_id"] for line in lines[1:]} == {str(e.event_id) for e in events}
    await bus.stop()


@pytest_twisted.ensureDeferred
async def test_failed_writes_are_retried_then_dead_lettered_then_replayed(tmp_path: Path) -> None:
    """The directory goes away (an unmounted disk): the bus retries with backoff,
    keeps the event among the group's dead letters, and a replay once the
    directory is back writes it."""
    bus = InProcessEventBus(reactor, retries=2, first_backoff=0.05)
    folder = tmp_path / "logs"
    path = folder / "mail-log.jsonl"
    await bus.register_group(MailLog(path, "mx1", reactor), GROUP)
    event = Added(MAILBOX, "alice@example.test", uids=(1,), message_ids=(MESSAGE,), modseq=1)
    await bus.dispatch(event)
    dead: list[object] = []

    async def dead_letters() -> list[object]:
        return list(await bus.dead_letters(GROUP))

    for _ in range(200):
        dead = await dead_letters()
        if dead:
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert dead == [event]
    assert not folder.exists()

    folder.mkdir()
    assert await bus.replay_dead_letters(GROUP) == 1
    await _until(path.exists)
    await _until(lambda: path.read_bytes().endswith(b"\n"))
    (line,) = path.read_bytes().splitlines()
    assert json.loads(line)["event_id"] == str(event.event_id)
    assert await dead_letters() == []
    await bus.stop()
