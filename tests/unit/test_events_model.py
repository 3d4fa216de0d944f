"""The wire format of events: JSON with a version, round trips, and refusals."""

from __future__ import annotations

import json
import uuid

import pytest

from twisted_mail_cluster.events.model import (
    EVENT_TYPES,
    EVENT_VERSION,
    Added,
    Expunged,
    FlagsUpdated,
    MailboxAdded,
    MailboxDeleted,
    MailboxRenamed,
    UnknownEvent,
    decode,
    encode,
)

BOX = uuid.UUID("5f0c6f3e-7d2a-4a55-9d38-2f4f3c1b9a10")
OWNER = "alice@example.com"
M1 = uuid.UUID("a3c1e2f0-1d2b-11ef-8c3b-0242ac120002")
M2 = uuid.UUID("a3c1e2f1-1d2b-11ef-8c3b-0242ac120002")

EVENTS = [
    Added(BOX, OWNER, uids=(1, 2), message_ids=(M1, M2), modseq=12),
    Added(BOX, OWNER),  # POP3-only delivery: no UID, no MODSEQ
    Expunged(BOX, OWNER, uids=(4,), message_ids=(M1,), modseq=13),
    FlagsUpdated(BOX, OWNER, updates=((1, ("$Work", "\\Seen"), 14), (2, (), 14))),
    MailboxAdded(BOX, OWNER, name="Archive/2024"),
    MailboxDeleted(BOX, OWNER, name="\u00c4rger"),
    MailboxRenamed(BOX, OWNER, old_name="Old/\u00fc", new_name="New"),
]


def test_every_event_type_is_covered() -> None:
    assert {type(e) for e in EVENTS} == set(EVENT_TYPES.values())
    assert set(EVENT_TYPES) == {
        "Added", "Expunged", "FlagsUpdated", "MailboxAdded", "MailboxDeleted", "MailboxRenamed"
    }


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_round_trip(event) -> None:
    payload = encode(event)
    assert isinstance(payload, bytes)
    decoded = decode(payload)
    assert decoded == event
    assert type(decoded) is type(event)
    assert decoded.key == str(BOX)
    assert encode(decoded) == payload


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_wire_shape(event) -> None:
    body = json.loads(encode(event))
    assert body["version"] == EVENT_VERSION == 1
    assert body["type"] == type(event).__name__
    assert body["mailbox_id"] == str(BOX)
    assert body["owner"] == OWNER
    assert body["event_id"] == str(event.event_id)


def test_wire_values() -> None:
    body = json.loads(encode(EVENTS[0]))
    assert {k: body[k] for k in ("uids", "message_ids", "modseq")} == {
        "uids": [1, 2], "message_ids": [str(M1), str(M2)], "modseq": 12
    }
    body = json.loads(encode(EVENTS[3]))
    assert body["updates"] == [[1, ["$Work", "\\Seen"], 14], [2, [], 14]]


def test_event_ids_are_fresh() -> None:
    assert Added(BOX, OWNER).event_id != Added(BOX, OWNER).event_id


def good(index: int = 0) -> dict:
    return json.loads(encode(EVENTS[index]))


def payload(body) -> bytes:
    return json.dumps(body).encode()


def changed(index: int, **changes) -> bytes:
    body = good(index)
    for key, value in changes.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    return payload(body)


BAD_PAYLOADS = {
    "not json": b"{not json",
    "not utf-8": b'{"version": 1, "type": "Added\xff\xfe"}',
    "empty": b"",
    "a list": b"[1, 2]",
    "a string": b'"Added"',
    "null": b"null",
    "nested too deep": b"[" * 100_000 + b"]" * 100_000,
    "object nested too deep": b'{"version": 1, "type": "Added", "uids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "version missing": changed(0, version=...),
    "version 0": changed(0, version=0),
    "version 2": changed(0, version=2),
    "version as text": changed(0, version="1"),
    "version null": changed(0, version=None),
    "version true": changed(0, version=True),
    "version 1.0": changed(0, version=1.0),
    "type missing": changed(0, type=...),
    "type unknown": changed(0, type="Exploded"),
    "type wrong case": changed(0, type="added"),
    "type a list": changed(0, type=["Added"]),
    "type an object": changed(0, type={"name": "Added"}),
    "mailbox_id missing": changed(0, mailbox_id=...),
    "mailbox_id not a uuid": changed(0, mailbox_id="INBOX"),
    "mailbox_id a number": changed(0, mailbox_id=5),
    "owner missing": changed(0, owner=...),
    "owner a number": changed(0, owner=7),
    "event_id missing": changed(0, event_id=...),
    "event_id bad": changed(0, event_id="x"),
    "uids missing": changed(0, uids=...),
    "uid as text": changed(0, uids=["1", 2]),
    "uid a boolean": changed(0, uids=[True]),
    "uid a float": changed(0, uids=[1.5]),
    "uids a number": changed(0, uids=3),
    "uids a string": changed(0, uids="12"),
    "uids an empty string": changed(0, uids=""),
    "uids an object": changed(0, uids={}),
    "message_ids bad": changed(0, message_ids=["nope"]),
    "message_ids a string": changed(0, message_ids=str(M1)),
    "message_ids an empty string": changed(0, message_ids=""),
    "modseq missing": changed(0, modseq=...),
    "modseq as text": changed(0, modseq="12"),
    "modseq null": changed(0, modseq=None),
    "updates missing": changed(3, updates=...),
    "update too short": changed(3, updates=[[1, ["\\Seen"]]]),
    "update not a list": changed(3, updates=[5]),
    "update flags a string": changed(3, updates=[[1, "\\Seen", 14]]),
    "update flag a number": changed(3, updates=[[1, [5], 14]]),
    "update uid as text": changed(3, updates=[["1", [], 14]]),
    "updates an object": changed(3, updates={"1": [[], 14]}),
    "updates an empty object": changed(3, updates={}),
    "updates an empty string": changed(3, updates=""),
    "update flags an empty string": changed(3, updates=[[1, "", 14]]),
    "update a string": changed(3, updates=["abc"]),
    "name missing": changed(4, name=...),
    "name a number": changed(4, name=3),
    "new_name missing": changed(6, new_name=...),
    "old_name a list": changed(6, old_name=["Old"]),
}


@pytest.mark.parametrize("raw", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_decode_refuses_what_it_does_not_know(raw: bytes) -> None:
    with pytest.raises(UnknownEvent):
        decode(raw)


def test_unknown_event_is_a_value_error() -> None:
    assert issubclass(UnknownEvent, ValueError)


def test_unknown_extra_fields_are_ignored() -> None:
    """A newer node may add fields within the same version: older nodes ignore them."""
    body = good(0)
    body["priority"] = "high"
    assert decode(payload(body)) == EVENTS[0]
