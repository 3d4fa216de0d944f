"""SEARCH: evaluate a parsed search program over the selected mailbox.

Only what the program needs is loaded: flags and UIDs are in the session
already; sizes and dates need the message metadata; header keys read just the
header bytes; BODY and TEXT read the whole message and search its decoded text
parts (base64 and quoted-printable undone, charsets decoded, as Dovecot does),
in a thread.  Matching is case-insensitive substring matching (RFC 3501
6.4.4), on Unicode text.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

from twisted.internet.threads import deferToThread

from .. import mime
from ..store.errors import ContentCorrupted, ContentMissing
from ..store.interfaces import IMailStore
from ..store.model import MessageInfo
from .parser import (
    All,
    And,
    BodyKey,
    DateKey,
    FlagKey,
    HeaderKey,
    ModSeqKey,
    Not,
    Or,
    SearchKey,
    SequenceKey,
    SizeKey,
    TextKey,
)
from .selected import SelectedMailbox

BATCH = 100
_INFO_KEYS = (SizeKey, DateKey, HeaderKey, BodyKey, TextKey)


@dataclass
class _Needs:
    info: bool = False
    header: bool = False
    body: bool = False


@dataclass
class _Message:
    uid: int
    seq: int
    info: MessageInfo | None = None
    header: bytes = b""
    text: str = ""
    values: dict[str, list[str]] = field(default_factory=dict)

    def header_values(self, name: str) -> list[str]:
        if name not in self.values:
            self.values[name] = mime.header_values(self.header, name)
        return self.values[name]


def _needs(key: SearchKey, needs: _Needs) -> _Needs:
    if isinstance(key, And):
        for k in key.keys:
            _needs(k, needs)
    elif isinstance(key, Or):
        _needs(key.left, needs)
        _needs(key.right, needs)
    elif isinstance(key, Not):
        _needs(key.key, needs)
    elif isinstance(key, _INFO_KEYS):
        needs.info = True
        if isinstance(key, HeaderKey | TextKey) or (isinstance(key, DateKey) and key.source == "SENT"):
            needs.header = True
        if isinstance(key, BodyKey | TextKey):
            needs.body = True
    return needs


class Searcher:
    def __init__(self, store: IMailStore, selected: SelectedMailbox) -> None:
        self._store = store
        self._selected = selected

    async def run(self, key: SearchKey) -> list[int]:
        """UIDs of the live messages that match, ascending."""
        selected = self._selected
        needs = _needs(key, _Needs())
        candidates = selected.live_uids(selected.uids)
        matched: list[int] = []
        for start in range(0, len(candidates), BATCH):
            batch = candidates[start:start + BATCH]
            for message in await self._load(batch, needs):
                if self._match(key, message):
                    matched.append(message.uid)
        return matched

    async def _load(self, batch: Sequence[int], needs: _Needs) -> list[_Message]:
        selected = self._selected
        messages = [_Message(uid, selected.seq_of(uid) or 0) for uid in batch]
        if not needs.info:
            return messages
        infos = await self._store.message_info([selected.message_id(u) for u in batch])
        loaded = []
        for message in messages:
            message.info = infos.get(selected.message_id(message.uid))
            if message.info is None:
                continue  # removed meanwhile: it matches nothing
            try:
                await self._load_content(message, needs)
            except (ContentCorrupted, ContentMissing):
                continue
            loaded.append(message)
        return loaded

    async def _load_content(self, message: _Message, needs: _Needs) -> None:
        info = message.info
        assert info is not None
        if needs.body:
            content = (await self._store.open_content(info.blob_id)).read()
            message.header = content[: mime.MessageStructure.from_json(info.structure).root.body_start]
            message.text = await deferToThread(_body_text, content)
        elif needs.header:
            end = mime.MessageStructure.from_json(info.structure).root.body_start
            message.header = (await self._store.open_content(info.blob_id, 0, end)).read()

    def _match(self, key: SearchKey, message: _Message) -> bool:
        selected = self._selected
        if isinstance(key, All):
            return True
        if isinstance(key, And):
            return all(self._match(k, message) for k in key.keys)
        if isinstance(key, Or):
            return self._match(key.left, message) or self._match(key.right, message)
        if isinstance(key, Not):
            return not self._match(key.key, message)
        if isinstance(key, FlagKey):
            return selected.has_flag(message.uid, key.flag) == key.present
        if isinstance(key, SequenceKey):
            if key.uid:
                largest = selected.uids[-1] if selected.uids else 0
                return key.sequence.contains(message.uid, largest)
            return key.sequence.contains(message.seq, selected.exists)
        if isinstance(key, ModSeqKey):
            return selected.entry(message.uid).modseq >= key.modseq
        info = message.info
        assert info is not None
        if isinstance(key, SizeKey):
            return info.size > key.size if key.op == "LARGER" else info.size < key.size
        if isinstance(key, DateKey):
            return _date_matches(key, _message_date(key, info, message))
        if isinstance(key, HeaderKey):
            values = message.header_values(key.field)
            if not key.value:
                return bool(values)
            needle = key.value.casefold()
            return any(needle in v.casefold() for v in values)
        if isinstance(key, BodyKey):
            return key.value.casefold() in message.text.casefold()
        if isinstance(key, TextKey):
            needle = key.value.casefold()
            header_text = message.header.decode("utf-8", "replace")
            return needle in header_text.casefold() or needle in message.text.casefold() or any(
                needle in v.casefold() for v in message.header_values("SUBJECT")
            )
        raise TypeError(f"unknown search key {key!r}")


def _message_date(key: DateKey, info: MessageInfo, message: _Message) -> date | None:
    if key.source == "INTERNAL":
        return datetime.fromtimestamp(info.internal_date, timezone.utc).date()
    values = message.header_values("DATE")
    if not values:
        return None
    try:
        return email.utils.parsedate_to_datetime(values[0]).date()
    except (TypeError, ValueError, IndexError):
        return None


def _date_matches(key: DateKey, when: date | None) -> bool:
    if when is None:
        return False
    if key.op == "BEFORE":
        return when < key.date
    if key.op == "ON":
        return when == key.date
    return when >= key.date


def _body_text(content: bytes) -> str:
    """Blocking: the decoded text of every text/* part, for BODY and TEXT."""
    try:
        message = email.message_from_bytes(content, policy=email.policy.default)
    except Exception:
        return content.decode("utf-8", "replace")
    texts: list[str] = []
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        try:
            texts.append(part.get_content())
        except Exception:
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                texts.append(payload.decode("utf-8", "replace"))
    return "\n".join(texts)
