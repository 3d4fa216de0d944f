"""SEARCH: evaluate a parsed search program over the selected mailbox.

Only what the program needs is loaded: flags and UIDs are in the session
already; sizes and dates need the message metadata; header keys read just the
header bytes; BODY and TEXT read the whole message and search its decoded text
parts (base64 and quoted-printable undone, charsets decoded, as Dovecot does).
Matching is case-insensitive substring matching (RFC 3501 6.4.4), on Unicode
text.

Matching never runs on the reactor thread: a 2 MB message and 4,500 ``NOT
BODY`` keys took 12.5 s there and stalled every other session for as long.
The reactor only gathers, per batch of messages, the plain values the
program looks at (flags, numbers, metadata, header bytes); a thread of a
small pool of SEARCH's own decodes bodies and evaluates the program on them,
casefolding each text once per message rather than once per key, and
answering a key repeated in the program from the first evaluation.  Bodies
are loaded one message at a time, so a SEARCH holds one message's text at most.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from .. import mime
from ..store.errors import ContentCorrupted, ContentMissing
from ..store.interfaces import IMailStore
from ..store.model import MessageInfo, flag_key
from ..twisted_types import installed_reactor
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
#: Threads that evaluate SEARCH programs.  A pool of its own, so that heavy
#: searches queue behind each other instead of filling the reactor's shared
#: pool, where deliveries parse their messages.
SEARCH_THREADS = 2
_INFO_KEYS = (SizeKey, DateKey, HeaderKey, BodyKey, TextKey)
T = TypeVar("T")


class _SearchPool:
    """A thread pool started on first use and stopped when the reactor shuts down."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="imap-search")
        self._started = False

    def run(self, work: Callable[..., T], *args: object) -> Deferred[T]:
        reactor = installed_reactor()
        if not self._started:
            self._started = True
            self._pool.start()
            reactor.addSystemEventTrigger("during", "shutdown", self._stop)
        return deferToThreadPool(reactor, self._pool, work, *args)

    def _stop(self) -> None:
        if self._started:
            self._started = False
            self._pool.stop()


_POOL = _SearchPool(SEARCH_THREADS)


def count_keys(key: SearchKey) -> int:
    """The criteria of a program, what imap.max_search_keys caps: every key but
    the NOT, OR and parentheses that combine them (those are bounded by
    MAX_SEARCH_DEPTH, which also bounds this recursion)."""
    if isinstance(key, And):
        return sum(count_keys(k) for k in key.keys)
    if isinstance(key, Or):
        return count_keys(key.left) + count_keys(key.right)
    if isinstance(key, Not):
        return count_keys(key.key)
    return 1


@dataclass
class _Needs:
    info: bool = False
    header: bool = False
    body: bool = False


@dataclass
class _Message:
    """One message as the program sees it: plain values, safe to read in a thread.

    The text caches are filled in the search thread, once per message.
    """

    uid: int
    seq: int
    flags: frozenset[str]  # comparison keys (flag_key), \\Recent included
    modseq: int
    info: MessageInfo | None = None
    header: bytes = b""
    content: bytes | None = None
    _text: str | None = None
    _header_text: str | None = None
    values: dict[str, list[str]] = field(default_factory=dict)
    folded: dict[str, list[str]] = field(default_factory=dict)
    memo: dict[tuple[str, str], bool] = field(default_factory=dict)

    def text(self) -> str:
        """Blocking: the decoded, casefolded body text."""
        if self._text is None:
            self._text = _body_text(self.content or b"").casefold()
            self.content = None  # decoded: the raw bytes are no longer needed
        return self._text

    def header_text(self) -> str:
        if self._header_text is None:
            self._header_text = self.header.decode("utf-8", "replace").casefold()
        return self._header_text

    def header_values(self, name: str) -> list[str]:
        """The decoded values of one header field."""
        if name not in self.values:
            self.values[name] = mime.header_values(self.header, name)
        return self.values[name]

    def folded_values(self, name: str) -> list[str]:
        """The same, casefolded for matching."""
        if name not in self.folded:
            self.folded[name] = [v.casefold() for v in self.header_values(name)]
        return self.folded[name]


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
        matcher = _Matcher(key, selected.exists, selected.uids[-1] if selected.uids else 0)
        candidates = selected.live_uids(selected.uids)
        matched: list[int] = []
        for start in range(0, len(candidates), BATCH):
            messages = await self._load(candidates[start:start + BATCH], needs)
            if not needs.body:
                matched.extend(await _POOL.run(matcher.matching, messages))
                continue
            for message in messages:  # one body in memory at a time
                if await self._load_body(message):
                    matched.extend(await _POOL.run(matcher.matching, [message]))
        return matched

    async def _load(self, batch: Sequence[int], needs: _Needs) -> list[_Message]:
        """The batch's plain values, with metadata and headers where the program needs them."""
        selected = self._selected
        messages = [
            _Message(uid, selected.seq_of(uid) or 0, selected.flag_keys(uid), selected.entry(uid).modseq)
            for uid in batch
        ]
        if not needs.info:
            return messages
        infos = await self._store.message_info([selected.message_id(u) for u in batch])
        loaded = []
        for message in messages:
            message.info = infos.get(selected.message_id(message.uid))
            if message.info is None:
                continue  # removed meanwhile: it matches nothing
            if needs.header and not needs.body:
                try:
                    message.header = await self._read(message.info, header_only=True)
                except (ContentCorrupted, ContentMissing):
                    continue
            loaded.append(message)
        return loaded

    async def _load_body(self, message: _Message) -> bool:
        """Read the whole message for BODY/TEXT; False if its content is unavailable."""
        assert message.info is not None
        try:
            message.content = await self._read(message.info, header_only=False)
        except (ContentCorrupted, ContentMissing):
            return False
        message.header = message.content[:_body_start(message.info)]
        return True

    async def _read(self, info: MessageInfo, header_only: bool) -> bytes:
        end = _body_start(info) if header_only else None
        return (await self._store.open_content(info.blob_id, 0, end)).read()


def _body_start(info: MessageInfo) -> int:
    return mime.MessageStructure.from_json(info.structure).root.body_start


class _Matcher:
    """Evaluates one search program on _Message values; runs in a search thread.

    It reads nothing of the session: the counts it needs are given at the
    start (SEARCH never reports EXISTS or EXPUNGE while it runs).
    """

    def __init__(self, key: SearchKey, exists: int, largest_uid: int) -> None:
        self._key = key
        self._exists = exists
        self._largest_uid = largest_uid
        self._needles: dict[str, str] = {}

    def matching(self, messages: Sequence[_Message]) -> list[int]:
        """Blocking: the UIDs of ``messages`` that match the program."""
        return [m.uid for m in messages if self._match(self._key, m)]

    def _needle(self, value: str) -> str:
        folded = self._needles.get(value)
        if folded is None:
            folded = self._needles[value] = value.casefold()
        return folded

    def _match(self, key: SearchKey, message: _Message) -> bool:
        if isinstance(key, All):
            return True
        if isinstance(key, And):
            return all(self._match(k, message) for k in key.keys)
        if isinstance(key, Or):
            return self._match(key.left, message) or self._match(key.right, message)
        if isinstance(key, Not):
            return not self._match(key.key, message)
        if isinstance(key, FlagKey):
            return (flag_key(key.flag) in message.flags) == key.present
        if isinstance(key, SequenceKey):
            if key.uid:
                return key.sequence.contains(message.uid, self._largest_uid)
            return key.sequence.contains(message.seq, self._exists)
        if isinstance(key, ModSeqKey):
            return message.modseq >= key.modseq
        return self._match_content(key, message)

    def _match_content(self, key: SearchKey, message: _Message) -> bool:
        info = message.info
        assert info is not None
        if isinstance(key, SizeKey):
            return info.size > key.size if key.op == "LARGER" else info.size < key.size
        if isinstance(key, DateKey):
            return _date_matches(key, _message_date(key, info, message))
        if isinstance(key, HeaderKey):
            values = message.folded_values(key.field)
            if not key.value:
                return bool(values)
            needle = self._needle(key.value)
            return any(needle in v for v in values)
        if isinstance(key, BodyKey | TextKey):
            return self._match_text(key, message)
        raise TypeError(f"unknown search key {key!r}")

    def _match_text(self, key: BodyKey | TextKey, message: _Message) -> bool:
        """BODY and TEXT, remembered per message: a key given a thousand times
        costs one scan of the text."""
        kind = "BODY" if isinstance(key, BodyKey) else "TEXT"
        needle = self._needle(key.value)
        known = message.memo.get((kind, needle))
        if known is not None:
            return known
        found = needle in message.text()
        if kind == "TEXT" and not found:
            found = needle in message.header_text() or any(
                needle in v for v in message.folded_values("SUBJECT")
            )
        message.memo[(kind, needle)] = found
        return found


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
