"""FETCH: answers from the structure computed at delivery, bodies streamed from the store.

Nothing here parses a message.  ENVELOPE, BODY and BODYSTRUCTURE are strings
stored with the message; every ``BODY[section]<partial>`` is a byte range of
the stored content, read through ``open_content`` (checked against its
SHA-256, spooled to disk when large) and written to the client in 64 KiB
pieces that wait for the transport to drain.  So a FETCH of a 50 MiB
attachment costs a temporary file, not 50 MiB of memory.

All the data for one message is gathered before its first byte is written:
a damaged or missing content never leaves a half-written response behind.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Union

import structlog

from .. import mime
from ..flow import WriteGate
from ..mailbox_service import MailboxService
from ..store.errors import ContentCorrupted, ContentMissing
from ..store.interfaces import IMailStore
from ..store.model import SEEN, FlagMode, MessageInfo
from . import wire
from .parser import FetchAttribute
from .selected import SelectedMailbox

log = structlog.get_logger(__name__)

#: Messages whose metadata is loaded (and whose responses are written) at once.
BATCH = 100
#: Bytes written per piece while streaming a body.
PIECE = 64 * 1024
#: HEADER.FIELDS reads at most this much header.
MAX_HEADER = 1024 * 1024

_NEEDS_CONTENT = frozenset(
    {"ENVELOPE", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE", "RFC822.TEXT",
     "BODY", "BODYSTRUCTURE"}
)


@dataclass
class _Stream:
    """A literal whose bytes come from a file."""

    prefix: bytes
    file: IO[bytes]
    size: int


Piece = Union[bytes, _Stream]


@dataclass
class FetchOutcome:
    """What the tagged reply must say after the untagged responses went out."""

    expunge_issued: bool = False
    damaged: bool = False
    unavailable: list[str] = field(default_factory=list)


class Fetcher:
    """Runs one FETCH (or UID FETCH) command for one session."""

    def __init__(
        self,
        store: IMailStore,
        mailboxes: MailboxService,
        selected: SelectedMailbox,
        write: Callable[[bytes], None],
        gate: WriteGate,
    ) -> None:
        self._store = store
        self._mailboxes = mailboxes
        self._selected = selected
        self._write = write
        self._gate = gate

    async def run(
        self, uids: Sequence[int], attributes: Sequence[FetchAttribute], uid_command: bool
    ) -> FetchOutcome:
        attributes = list(attributes)
        if uid_command and not any(a.name == "UID" for a in attributes):
            attributes.insert(0, FetchAttribute("UID"))
        outcome = FetchOutcome()
        needs_content = any(a.name in _NEEDS_CONTENT for a in attributes)
        marks_seen = not self._selected.readonly and any(a.marks_seen for a in attributes)
        for start in range(0, len(uids), BATCH):
            batch = uids[start:start + BATCH]
            await self._fetch_batch(batch, attributes, needs_content, marks_seen, outcome)
            if self._gate.stopped:
                break
        return outcome

    async def _fetch_batch(
        self,
        batch: Sequence[int],
        attributes: list[FetchAttribute],
        needs_content: bool,
        marks_seen: bool,
        outcome: FetchOutcome,
    ) -> None:
        selected = self._selected
        live = selected.live_uids(batch)
        infos: dict[uuid.UUID, MessageInfo] = {}
        if needs_content and live:
            infos = await self._store.message_info([selected.message_id(u) for u in live])
        seen_now: set[int] = set()
        if marks_seen:
            unseen = [u for u in live if SEEN not in selected.entry(u).flags and selected.message_id(u) in infos]
            if unseen:
                result = await self._mailboxes.store_flags(selected.mailbox, unseen, FlagMode.ADD, [SEEN])
                selected.apply_own(result.updated)
                seen_now = {e.uid for e in result.updated}
        for uid in batch:
            if self._gate.stopped:
                return  # the connection is gone: read no more content for it
            info = infos.get(selected.message_id(uid)) if needs_content else None
            if selected.is_ghost(uid) or (needs_content and info is None):
                outcome.expunge_issued = True
                continue
            try:
                pieces = await self._message_pieces(uid, info, attributes, uid in seen_now)
            except (ContentCorrupted, ContentMissing) as e:
                log.error("imap.fetch_content_unavailable", uid=uid, mailbox=str(selected.mailbox.id), error=str(e))
                outcome.damaged = True
                continue
            await self._send(pieces)

    async def _message_pieces(
        self, uid: int, info: MessageInfo | None, attributes: list[FetchAttribute], seen_now: bool
    ) -> list[Piece]:
        selected = self._selected
        structure = mime.MessageStructure.from_json(info.structure) if info is not None else None
        items: list[Piece] = []
        for attribute in attributes:
            items.extend(await self._item(uid, info, structure, attribute))
        if seen_now and not any(a.name == "FLAGS" for a in attributes):
            items.append(b"FLAGS " + wire.flag_list(selected.flags(uid)))
        pieces: list[Piece] = [b"* %d FETCH (" % selected.seq(uid)]
        for index, item in enumerate(items):
            if index:
                pieces.append(b" ")
            pieces.append(item)
        pieces.append(b")\r\n")
        return pieces

    async def _item(
        self,
        uid: int,
        info: MessageInfo | None,
        structure: mime.MessageStructure | None,
        attribute: FetchAttribute,
    ) -> list[Piece]:
        name = attribute.name
        selected = self._selected
        if name == "UID":
            return [b"UID %d" % uid]
        if name == "FLAGS":
            return [b"FLAGS " + wire.flag_list(selected.flags(uid))]
        if name == "MODSEQ":
            return [b"MODSEQ (%d)" % selected.entry(uid).modseq]
        assert info is not None and structure is not None
        if name == "INTERNALDATE":
            return [b"INTERNALDATE " + wire.internal_date(info.internal_date)]
        if name == "RFC822.SIZE":
            return [b"RFC822.SIZE %d" % info.size]
        if name == "ENVELOPE":
            return [b"ENVELOPE " + structure.envelope]
        if name == "BODYSTRUCTURE":
            return [b"BODYSTRUCTURE " + structure.bodystructure]
        if name == "BODY" and not attribute.has_section:
            return [b"BODY " + structure.body]
        if name == "RFC822":
            return [await self._range_literal(b"RFC822", info, 0, info.size)]
        if name == "RFC822.HEADER":
            start, end = structure.section_range((), "HEADER")
            return [await self._range_literal(b"RFC822.HEADER", info, start, end)]
        if name == "RFC822.TEXT":
            start, end = structure.section_range((), "TEXT")
            return [await self._range_literal(b"RFC822.TEXT", info, start, end)]
        return [await self._section(info, structure, attribute)]

    async def _section(
        self, info: MessageInfo, structure: mime.MessageStructure, attribute: FetchAttribute
    ) -> Piece:
        response_name = attribute.response_name()
        text = attribute.text
        try:
            if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
                start, end = structure.section_range(attribute.part, "HEADER")
                header_file = await self._store.open_content(info.blob_id, start, min(end, start + MAX_HEADER))
                data = mime.header_fields(
                    header_file.read(), attribute.fields, exclude=text == "HEADER.FIELDS.NOT"
                )
                if attribute.partial is not None:
                    origin, length = attribute.partial
                    data = data[origin:origin + length]
                return response_name + b" " + _literal(data)
            start, end = structure.section_range(attribute.part, text)
        except mime.SectionNotFound:
            # A part that does not exist reads as empty, as Dovecot answers it.
            return response_name + b' ""'
        if attribute.partial is not None:
            origin, length = attribute.partial
            start = min(start + origin, end)
            end = min(start + length, end)
        return await self._range_literal(response_name, info, start, end)

    async def _range_literal(self, name: bytes, info: MessageInfo, start: int, end: int) -> Piece:
        if end <= start:
            return name + b' ""'
        content = await self._store.open_content(info.blob_id, start, end)
        return _Stream(name + b" {%d}\r\n" % (end - start), content, end - start)

    async def _send(self, pieces: list[Piece]) -> None:
        buffered: list[bytes] = []
        for piece in pieces:
            if isinstance(piece, bytes):
                buffered.append(piece)
                continue
            buffered.append(piece.prefix)
            self._write(b"".join(buffered))
            buffered = []
            await self._stream(piece)
        if buffered:
            self._write(b"".join(buffered))
        await self._gate.wait()

    async def _stream(self, stream: _Stream) -> None:
        remaining = stream.size
        try:
            while remaining > 0:
                chunk = stream.file.read(min(PIECE, remaining))
                if not chunk:
                    raise ContentMissing("stored content ended early")
                remaining -= len(chunk)
                self._write(chunk)
                await self._gate.wait()
        finally:
            stream.file.close()


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data
