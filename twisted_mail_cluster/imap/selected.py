"""The state of one selected mailbox, as this session's client knows it.

IMAP sequence numbers are a conversation between one server session and one
client: the client's numbering changes only when the server says so
(EXISTS, EXPUNGE).  So this object keeps the client's view - the UID list in
which sequence number N is position N-1 - separately from the store's truth,
and moves the view forward only in ``drain_updates``, which the protocol calls
at the moments RFC 3501 7.4.1 allows.

A message removed in the store (by this session, another one, or another
node) stays in the view as a *ghost* until its EXPUNGE has been sent; EXISTS
counts ghosts, so the counts the client sees always add up.
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Iterable, Sequence

from ..store.model import DELETED, SEEN, SYSTEM_FLAGS, ImapChanges, ImapEntry, MailboxSnapshot, flag_key
from . import wire
from .parser import SequenceSet

RECENT = "\\Recent"
_SYSTEM_KEYS = {flag_key(f) for f in SYSTEM_FLAGS}


class BadSequence(ValueError):
    """A sequence number the client cannot know (RFC 3501: BAD)."""


def learn_keywords(known: dict[str, str], flags: Iterable[str]) -> None:
    """Add the keywords among ``flags`` to ``known`` (comparison key -> first spelling).

    One dictionary look-up per flag: a message with 24,000 keywords used to
    cost a lower-cased copy of the whole set per keyword, and froze the node
    for half a minute at every SELECT.
    """
    for flag in flags:
        key = flag_key(flag)
        if key not in _SYSTEM_KEYS and key not in known:
            known[key] = flag


def mailbox_keywords(entries: Iterable[ImapEntry]) -> dict[str, str]:
    """The keywords in use in a mailbox, keyed by their comparison key."""
    known: dict[str, str] = {}
    for entry in entries:
        learn_keywords(known, entry.flags)
    return known


class SelectedMailbox:
    def __init__(
        self,
        snapshot: MailboxSnapshot,
        readonly: bool,
        first_recent_uid: int | None,
        max_keywords: int | None = None,
    ) -> None:
        self.mailbox = snapshot.mailbox
        self.readonly = readonly
        self.highest_modseq = snapshot.highest_modseq
        self.uidnext = snapshot.uidnext
        self._uids: list[int] = [e.uid for e in snapshot.entries]
        self._entries: dict[int, ImapEntry] = {e.uid: e for e in snapshot.entries}
        self._ghosts: set[int] = set()
        self._flag_updates: set[int] = set()
        self.recent: set[int] = (
            set() if first_recent_uid is None else {u for u in self._uids if u >= first_recent_uid}
        )
        #: Keywords in use (comparison key -> spelling), and how many the
        #: mailbox may hold before PERMANENTFLAGS stops offering "\*".
        self.keywords = mailbox_keywords(snapshot.entries)
        self.max_keywords = max_keywords
        self._reported_exists = len(self._uids)
        self._reported_recent = len(self.recent)
        self._keywords_reported = len(self.keywords)
        #: Set when the store may hold changes this view has not loaded yet.
        self.dirty = False

    # -- numbering ------------------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self._uids)

    @property
    def uids(self) -> Sequence[int]:
        return self._uids

    def seq(self, uid: int) -> int:
        """The message number of a UID this session knows; KeyError for any other."""
        number = self.seq_of(uid)
        if number is None:
            raise KeyError(uid)
        return number

    def seq_of(self, uid: int) -> int | None:
        index = bisect.bisect_left(self._uids, uid)
        if index < len(self._uids) and self._uids[index] == uid:
            return index + 1
        return None

    def resolve(self, sequence: SequenceSet, uid_mode: bool) -> list[int]:
        """The UIDs a sequence set names, in ascending order.

        UIDs that do not exist are ignored (RFC 3501 6.4.8); a message
        number the client cannot know is an error (BAD).
        """
        if uid_mode:
            largest = self._uids[-1] if self._uids else 0
            found: list[int] = []
            for low, high in sequence.resolve(largest):
                start = bisect.bisect_left(self._uids, low)
                stop = bisect.bisect_right(self._uids, high)
                found.extend(self._uids[start:stop])
            return sorted(set(found))
        count = len(self._uids)
        if count == 0 and "*" in str(sequence):
            return []  # "1:*" in an empty mailbox names nothing; it is not an error
        chosen: list[int] = []
        for low, high in sequence.resolve(count):
            if high > count:
                raise BadSequence("message sequence number out of range")
            chosen.extend(self._uids[max(low, 1) - 1:high])
        return sorted(set(chosen))

    # -- per-message state --------------------------------------------------------

    def entry(self, uid: int) -> ImapEntry:
        return self._entries[uid]

    def message_id(self, uid: int) -> uuid.UUID:
        return self._entries[uid].message_id

    def is_ghost(self, uid: int) -> bool:
        return uid in self._ghosts

    def flags(self, uid: int) -> frozenset[str]:
        """Flags as the client sees them, \\Recent included."""
        flags = self._entries[uid].flags
        return flags | {RECENT} if uid in self.recent else flags

    def has_flag(self, uid: int, flag: str) -> bool:
        if flag_key(flag) == flag_key(RECENT):
            return uid in self.recent
        key = flag_key(flag)
        return any(flag_key(f) == key for f in self._entries[uid].flags)

    def live_uids(self, uids: Iterable[int]) -> list[int]:
        return [u for u in uids if u not in self._ghosts]

    def deleted_uids(self) -> list[int]:
        return [u for u in self._uids if u not in self._ghosts and DELETED in self._entries[u].flags]

    def unseen_count(self) -> int:
        return sum(1 for u in self._uids if SEEN not in self._entries[u].flags)

    def first_unseen(self) -> int | None:
        for seq, uid in enumerate(self._uids, start=1):
            if SEEN not in self._entries[uid].flags:
                return seq
        return None

    # -- changes -----------------------------------------------------------------

    def apply_own(self, entries: Iterable[ImapEntry]) -> None:
        """Flags this session just stored and reports itself (no unsolicited FETCH)."""
        for entry in entries:
            known = self._entries.get(entry.uid)
            if known is not None and entry.modseq >= known.modseq:
                self._entries[entry.uid] = entry
                self._learn_keywords(entry.flags)
                self._flag_updates.discard(entry.uid)

    def apply_changes(self, changes: ImapChanges) -> list[int]:
        """Load what the store says changed; return UIDs new to this view."""
        new: list[int] = []
        for entry in sorted(changes.changed, key=lambda e: e.uid):
            known = self._entries.get(entry.uid)
            if known is not None:
                if entry.modseq > known.modseq:
                    if entry.flags != known.flags and entry.uid not in self._ghosts:
                        self._flag_updates.add(entry.uid)
                    self._entries[entry.uid] = entry
                    self._learn_keywords(entry.flags)
            elif not self._uids or entry.uid > self._uids[-1]:
                self._uids.append(entry.uid)
                self._entries[entry.uid] = entry
                self._learn_keywords(entry.flags)
                new.append(entry.uid)
        self.mark_expunged(changes.expunged)
        self.highest_modseq = max(self.highest_modseq, changes.highest_modseq)
        self.uidnext = max(self.uidnext, changes.uidnext)
        return new

    def mark_expunged(self, uids: Iterable[int]) -> None:
        for uid in uids:
            if uid not in self._entries:
                continue
            self._flag_updates.discard(uid)
            index = bisect.bisect_left(self._uids, uid)
            if index >= self._reported_exists:
                # The client never heard of it: drop it silently, no EXPUNGE.
                self._forget(index, uid)
            else:
                self._ghosts.add(uid)

    def _forget(self, index: int, uid: int) -> None:
        del self._uids[index]
        del self._entries[uid]
        self.recent.discard(uid)

    def add_recent(self, uids: Iterable[int]) -> None:
        self.recent.update(uids)

    def _learn_keywords(self, flags: Iterable[str]) -> None:
        learn_keywords(self.keywords, flags)

    def flag_keys(self, uid: int) -> frozenset[str]:
        """The comparison keys of a message's flags, \\Recent included (for SEARCH)."""
        keys = frozenset(flag_key(f) for f in self._entries[uid].flags)
        return keys | {flag_key(RECENT)} if uid in self.recent else keys

    def keywords_full(self) -> bool:
        """No new keyword may be created here (RFC 3501 7.1: no "\\*" in PERMANENTFLAGS)."""
        return self.max_keywords is not None and len(self.keywords) >= self.max_keywords

    # -- reporting -------------------------------------------------------------------

    def flags_response(self) -> list[bytes]:
        """FLAGS and PERMANENTFLAGS (RFC 3501 7.2.6, 7.1): system flags plus keywords in use."""
        defined = [*SYSTEM_FLAGS, *sorted(self.keywords.values())]
        if self.readonly:
            permanent = []
        else:
            permanent = defined if self.keywords_full() else [*defined, "\\*"]
        return [
            b"FLAGS " + wire.flag_list(defined),
            b"OK [PERMANENTFLAGS " + wire.flag_list(permanent) + b"] Flags permitted",
        ]

    def keyword_updates(self) -> list[bytes]:
        """FLAGS and PERMANENTFLAGS again if a keyword appeared since they were last sent.

        STORE calls this before echoing FETCH FLAGS, so that the client has
        heard of a new keyword before it sees it on a message (as Dovecot does).
        """
        if len(self.keywords) == self._keywords_reported:
            return []
        self._keywords_reported = len(self.keywords)
        return self.flags_response()

    def drain_updates(self, allow_expunge: bool) -> list[bytes]:
        """Untagged responses that bring the client's view up to date.

        EXPUNGEs only when ``allow_expunge`` (never during FETCH, STORE or
        SEARCH: RFC 3501 7.4.1); until then ghosts keep the numbering intact
        and EXISTS counts them.
        """
        lines: list[bytes] = []
        if allow_expunge and self._ghosts:
            for uid in sorted(self._ghosts):
                index = bisect.bisect_left(self._uids, uid)
                lines.append(b"%d EXPUNGE" % (index + 1))
                self._forget(index, uid)
                self._reported_exists -= 1
            self._ghosts.clear()
        lines.extend(self.keyword_updates())
        if len(self._uids) != self._reported_exists:
            self._reported_exists = len(self._uids)
            lines.append(b"%d EXISTS" % len(self._uids))
        if len(self.recent) != self._reported_recent:
            self._reported_recent = len(self.recent)
            lines.append(b"%d RECENT" % len(self.recent))
        for uid in sorted(self._flag_updates):
            seq = self.seq_of(uid)
            if seq is not None:
                lines.append(
                    b"%d FETCH (FLAGS %s UID %d)" % (seq, wire.flag_list(self.flags(uid)), uid)
                )
        self._flag_updates.clear()
        return lines
