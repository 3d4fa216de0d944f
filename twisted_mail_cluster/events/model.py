"""Mailbox events: what one node tells the others (and its own sessions).

Events carry ids, UIDs, MODSEQs and flags, never message bodies.  On the wire
they are JSON objects with a ``version`` field; a node that receives a version
or a shape it does not know logs it and skips it, so that a rolling upgrade
never crashes an older node.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Union

EVENT_VERSION = 1


class UnknownEvent(ValueError):
    """A payload that is not a known event of a known version."""


def _new_event_id() -> uuid.UUID:
    return uuid.uuid4()


@dataclass(frozen=True)
class _MailboxEvent:
    """Fields every event has: which mailbox (the routing key) and whose."""

    kind: ClassVar[str] = ""
    mailbox_id: uuid.UUID
    owner: str

    @property
    def key(self) -> str:
        """Routing key: sessions register under the mailbox id they selected."""
        return str(self.mailbox_id)


@dataclass(frozen=True)
class Added(_MailboxEvent):
    kind: ClassVar[str] = "Added"
    uids: tuple[int, ...] = ()
    message_ids: tuple[uuid.UUID, ...] = ()
    modseq: int = 0
    event_id: uuid.UUID = field(default_factory=_new_event_id)


@dataclass(frozen=True)
class Expunged(_MailboxEvent):
    kind: ClassVar[str] = "Expunged"
    uids: tuple[int, ...] = ()
    message_ids: tuple[uuid.UUID, ...] = ()
    modseq: int = 0
    event_id: uuid.UUID = field(default_factory=_new_event_id)


@dataclass(frozen=True)
class FlagsUpdated(_MailboxEvent):
    kind: ClassVar[str] = "FlagsUpdated"
    #: (uid, flags, modseq) per changed message.
    updates: tuple[tuple[int, tuple[str, ...], int], ...] = ()
    event_id: uuid.UUID = field(default_factory=_new_event_id)


@dataclass(frozen=True)
class MailboxAdded(_MailboxEvent):
    kind: ClassVar[str] = "MailboxAdded"
    name: str = ""
    event_id: uuid.UUID = field(default_factory=_new_event_id)


@dataclass(frozen=True)
class MailboxDeleted(_MailboxEvent):
    kind: ClassVar[str] = "MailboxDeleted"
    name: str = ""
    event_id: uuid.UUID = field(default_factory=_new_event_id)


@dataclass(frozen=True)
class MailboxRenamed(_MailboxEvent):
    kind: ClassVar[str] = "MailboxRenamed"
    old_name: str = ""
    new_name: str = ""
    event_id: uuid.UUID = field(default_factory=_new_event_id)


Event = Union[Added, Expunged, FlagsUpdated, MailboxAdded, MailboxDeleted, MailboxRenamed]
EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls for cls in (Added, Expunged, FlagsUpdated, MailboxAdded, MailboxDeleted, MailboxRenamed)
}


def _plain(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def encode(event: Event) -> bytes:
    body = {f.name: _plain(getattr(event, f.name)) for f in fields(event)}
    body["type"] = event.kind
    body["version"] = EVENT_VERSION
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def decode(payload: bytes) -> Event:
    """Parse a wire event; raise UnknownEvent for anything this node cannot use."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: [[[[...
        raise UnknownEvent(f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise UnknownEvent("not a JSON object")
    version = body.get("version")
    if not _is_int(version) or version != EVENT_VERSION:
        raise UnknownEvent(f"unknown event version {version!r}")
    kind = body.get("type")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnknownEvent(f"unknown event type {kind!r}")
    try:
        return _build(cls, body)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnknownEvent(f"malformed {cls.kind} event: {e}") from None


def _build(cls: type[Event], body: dict[str, Any]) -> Event:
    kwargs: dict[str, Any] = {
        "mailbox_id": uuid.UUID(_text(body["mailbox_id"])),
        "owner": _text(body["owner"]),
        "event_id": uuid.UUID(_text(body["event_id"])),
    }
    if cls in (Added, Expunged):
        kwargs["uids"] = tuple(_int(u) for u in _list(body["uids"]))
        kwargs["message_ids"] = tuple(uuid.UUID(_text(m)) for m in _list(body["message_ids"]))
        kwargs["modseq"] = _int(body["modseq"])
    elif cls is FlagsUpdated:
        kwargs["updates"] = tuple(
            (_int(uid), tuple(_text(f) for f in _list(flags)), _int(modseq))
            for uid, flags, modseq in map(_list, _list(body["updates"]))
        )
    elif cls is MailboxRenamed:
        kwargs["old_name"] = _text(body["old_name"])
        kwargs["new_name"] = _text(body["new_name"])
    else:
        kwargs["name"] = _text(body["name"])
    return cls(**kwargs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any) -> int:
    if not _is_int(value):
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def _list(value: Any) -> list[Any]:
    """JSON arrays only: a string or an object would iterate as something else."""
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value
