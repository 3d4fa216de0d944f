"""The [imap] resource caps: how much one command may ask of the node (issue 10).

Each check returns the text of a ``NO [LIMIT]`` (RFC 5530) or None, and runs
before anything is stored, so a refused command changes nothing.

Counts are read without a lock, the same way on both backends (through the
store contract): two sessions racing at a cap may both pass and overshoot it
by a little.  Making the count exact would take a lightweight transaction per
CREATE on Cassandra, and a cap that stops abuse does not need to be exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..config import ImapConfig
from ..names import parents
from ..store.interfaces import IMailStore
from ..store.model import Mailbox
from .selected import SelectedMailbox, learn_keywords, mailbox_keywords


def flag_list_refusal(
    flags: Sequence[str], known: Mapping[str, str], config: ImapConfig, creating: bool
) -> str | None:
    """Why a STORE or APPEND flag list is refused, or None.

    ``known`` holds the keywords the mailbox has (by comparison key);
    ``creating`` is false for STORE -FLAGS, which cannot create any.  As in
    Dovecot, the length cap applies to new keywords only: one that already
    exists stays usable.
    """
    if len(flags) > config.max_flags_per_command:
        return f"Too many flags in one command (at most {config.max_flags_per_command})."
    if not creating:
        return None
    new = new_keywords(flags, known)
    if any(len(keyword) > config.max_keyword_length for keyword in new):
        return f"Keyword too long (at most {config.max_keyword_length} characters)."
    return keyword_room_refusal(len(known), len(new), config)


def new_keywords(flags: Iterable[str], known: Mapping[str, str]) -> list[str]:
    """The keywords among ``flags`` that ``known`` lacks, once each (case-insensitively)."""
    found: dict[str, str] = {}
    learn_keywords(found, flags)
    return [spelling for key, spelling in found.items() if key not in known]


def keyword_room_refusal(known: int, new: int, config: ImapConfig) -> str | None:
    """Why ``new`` more keywords do not fit beside ``known`` ones, or None."""
    if new and known + new > config.max_keywords:
        return f"Too many keywords in this mailbox (at most {config.max_keywords})."
    return None


async def keywords_of(store: IMailStore, selected: SelectedMailbox | None, mailbox: Mailbox) -> Mapping[str, str]:
    """The keywords in use in ``mailbox``: from the session's view if it is
    the selected one, else read from the store (only APPEND and COPY with
    keywords get here, so ordinary deliveries never pay for it)."""
    if selected is not None and selected.mailbox.id == mailbox.id:
        return selected.keywords
    snapshot = await store.imap_snapshot(mailbox.id)
    return mailbox_keywords(snapshot.entries)


async def mailbox_room_refusal(
    store: IMailStore, owner: str, name: str, config: ImapConfig, creates_name: bool = True
) -> str | None:
    """Why creating ``name`` (if ``creates_name``) and its missing parents would
    take ``owner`` past ``max_mailboxes``, or None.

    One count per CREATE; the parents are looked up only near the cap.
    """
    superiors = parents(name)
    count = await store.count_mailboxes(owner)
    if count + len(superiors) + creates_name <= config.max_mailboxes:
        return None
    missing = 0
    for parent in superiors:
        if await store.get_mailbox(owner, parent) is None:
            missing += 1
    needed = missing + creates_name
    if needed and count + needed > config.max_mailboxes:
        return f"Too many mailboxes (at most {config.max_mailboxes})."
    return None


async def copy_refusal(
    store: IMailStore, selected: SelectedMailbox, uids: Iterable[int], target: Mailbox, config: ImapConfig
) -> str | None:
    """Why COPY/MOVE of ``uids`` would take ``target`` past ``max_keywords``, or None.

    Without this, copying full mailboxes into one would grow it past the cap
    by 256 keywords a time.  Copies within a mailbox bring nothing new.
    """
    if target.id == selected.mailbox.id:
        return None
    carried: dict[str, str] = {}
    for uid in uids:
        learn_keywords(carried, selected.entry(uid).flags)
    if not carried:
        return None
    known = await keywords_of(store, None, target)
    return keyword_room_refusal(len(known), sum(1 for key in carried if key not in known), config)
