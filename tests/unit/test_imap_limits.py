"""The [imap] resource caps and the linear-time code behind them (issue 10).

tests/hostile/test_imap_limits.py runs the attacks against a real node; these
check the pieces one by one.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.helpers.node import listen, make_node, stop
from tests.unit.test_imap import ALICE, Server

from twisted_mail_cluster.config import ConfigError, ImapConfig, load_config
from twisted_mail_cluster.imap.limits import flag_list_refusal, keyword_room_refusal, new_keywords
from twisted_mail_cluster.imap.parser import CommandReader, SearchKey
from twisted_mail_cluster.imap.search import count_keys
from twisted_mail_cluster.imap.server import IMAPFactory
from twisted_mail_cluster.imap.selected import SelectedMailbox, mailbox_keywords
from twisted_mail_cluster.names import check_mailbox_name, is_inferior, with_inferiors
from twisted_mail_cluster.store.errors import InvalidName
from twisted_mail_cluster.store.model import ImapEntry, Mailbox, MailboxSnapshot

CONFIG = ImapConfig()


# -- configuration -----------------------------------------------------------------


def test_defaults() -> None:
    assert (CONFIG.max_keywords, CONFIG.max_keyword_length, CONFIG.max_flags_per_command) == (256, 50, 300)
    assert (CONFIG.max_search_keys, CONFIG.max_mailboxes) == (1000, 10_000)
    # A STORE FLAGS that sets every keyword of a full mailbox, system flags too, fits in one command.
    assert CONFIG.max_flags_per_command >= CONFIG.max_keywords + 5


@pytest.mark.parametrize(
    "key", ["max_keywords", "max_keyword_length", "max_flags_per_command", "max_search_keys", "max_mailboxes"]
)
@pytest.mark.parametrize("value", [0, -3, "10", 2.5, True])
def test_caps_must_be_positive_integers(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={f"imap.{key}": value})
    assert str(info.value).startswith(f"imap.{key}: must be a positive integer, got ")
    assert "\n" not in str(info.value)


def test_caps_are_read_from_the_file() -> None:
    config = load_config(overrides={"imap.max_keywords": 10, "imap.max_mailboxes": 20})
    assert (config.imap.max_keywords, config.imap.max_mailboxes) == (10, 20)


# -- names (finding 13) ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "../../../etc/passwd", "a/./b", "a/..", "Sent/../x", "./a"])
def test_dot_levels_are_refused(name: str) -> None:
    with pytest.raises(InvalidName, match=r'"\." and "\.\." are not allowed'):
        check_mailbox_name(name)


@pytest.mark.parametrize("name", ["a//b", "/a", "a/"])
def test_empty_levels_are_refused(name: str) -> None:
    with pytest.raises(InvalidName, match="empty level"):
        check_mailbox_name(name)


@pytest.mark.parametrize("name", ["a..b", ".hidden", "...", "x/.y/z.", "Archive/2024.01"])
def test_dots_inside_a_level_are_fine(name: str) -> None:
    assert check_mailbox_name(name) == name


# -- LIST children (finding 7) ---------------------------------------------------------


def test_with_inferiors_names_every_superior() -> None:
    assert with_inferiors(["a/b/c", "x", "y/z"]) == {"a", "a/b", "y"}
    assert with_inferiors([]) == set()
    assert with_inferiors(["INBOX/Sub"]) == {"INBOX"}


def test_with_inferiors_agrees_with_comparing_every_pair() -> None:
    rng = random.Random(10)
    names = {"/".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(300)}
    quadratic = {n for n in names if any(is_inferior(other, n) for other in names)}
    # The quadratic rule only sees existing mailboxes; superiors of existing ones are a superset.
    assert quadratic == with_inferiors(names) & names


def test_with_inferiors_is_linear_in_the_names() -> None:
    names = [f"box{n:05d}" for n in range(12_000)] + [f"p/box{n:05d}" for n in range(12_000)]
    assert with_inferiors(names) == {"p"}


# -- SEARCH (finding 6) -------------------------------------------------------------------


def program(text: bytes) -> SearchKey:
    return CommandReader([text]).search_program()[1]


@pytest.mark.parametrize(
    ("text", "count"),
    [
        (b"ALL", 1),
        (b"NOT BODY x", 1),
        (b"OR SUBJECT a (FROM b TO c)", 3),
        (b"NOT NOT NOT SEEN", 1),
        (b" ".join([b"NOT BODY zq"] * 4500), 4500),
        (b"1:5 UID 3 KEYWORD k UNSEEN NEW", 6),  # NEW is RECENT UNSEEN
    ],
)
def test_count_keys(text: bytes, count: int) -> None:
    assert count_keys(program(text)) == count


# -- keywords (finding 5) ---------------------------------------------------------------


def test_new_keywords_ignore_system_flags_case_and_repeats() -> None:
    known = {"k1": "K1"}
    assert new_keywords(["\\Seen", "k1", "K2", "k2", "$Junk"], known) == ["K2", "$Junk"]


def test_flag_list_refusals() -> None:
    known = {f"k{n}": f"k{n}" for n in range(250)}
    too_many = ["x%d" % n for n in range(301)]
    assert flag_list_refusal(too_many, {}, CONFIG, creating=True) == "Too many flags in one command (at most 300)."
    assert flag_list_refusal(too_many, {}, CONFIG, creating=False) == "Too many flags in one command (at most 300)."
    assert flag_list_refusal(["x" * 51], {}, CONFIG, creating=True) == "Keyword too long (at most 50 characters)."
    assert flag_list_refusal(["x" * 51], {"x" * 51: "x" * 51}, CONFIG, creating=True) is None  # it exists
    assert flag_list_refusal(["x" * 50], {}, CONFIG, creating=True) is None
    assert flag_list_refusal([f"n{n}" for n in range(6)], known, CONFIG, creating=True) is None  # 256
    assert flag_list_refusal([f"n{n}" for n in range(7)], known, CONFIG, creating=True) \
        == "Too many keywords in this mailbox (at most 256)."
    assert flag_list_refusal([f"n{n}" for n in range(7)], known, CONFIG, creating=False) is None  # -FLAGS
    assert flag_list_refusal(["K1", "\\Seen"], known, CONFIG, creating=True) is None
    assert keyword_room_refusal(300, 0, CONFIG) is None  # over the cap already: known ones still work


def snapshot(entries: list[ImapEntry]) -> MailboxSnapshot:
    box = Mailbox(uuid.uuid4(), "alice@example.test", "INBOX", 1)
    return MailboxSnapshot(box, len(entries) + 1, 10, tuple(entries))


def entry(uid: int, *flags: str) -> ImapEntry:
    return ImapEntry(uid, uuid.uuid4(), frozenset(flags), 1)


def test_keywords_of_a_mailbox_keep_the_first_spelling() -> None:
    keywords = mailbox_keywords([entry(1, "\\Seen", "Work"), entry(2, "work", "$Junk"), entry(3, "\\Flagged")])
    assert keywords == {"work": "Work", "$junk": "$Junk"}


def test_a_message_with_24000_keywords_selects_in_linear_time() -> None:
    """The review's state after four STOREs: SELECT took 29 s, quadratic in the keywords."""
    flags = [f"k_{n:05d}" for n in range(24_000)]
    selected = SelectedMailbox(snapshot([entry(1, *flags)]), readonly=False, first_recent_uid=None)
    assert len(selected.keywords) == 24_000
    assert selected.flags_response()[1].endswith(b"k_23999 \\*)] Flags permitted")


def test_permanentflags_drop_the_star_at_the_keyword_cap() -> None:
    entries = [entry(1, *(f"k{n}" for n in range(3)))]
    assert b"\\*)]" in SelectedMailbox(snapshot(entries), False, None, max_keywords=4).flags_response()[1]
    full = SelectedMailbox(snapshot(entries), False, None, max_keywords=3)
    assert full.keywords_full()
    assert full.flags_response()[1] == (
        b"OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft k0 k1 k2)] Flags permitted"
    )
    readonly = SelectedMailbox(snapshot(entries), True, None, max_keywords=4)
    assert readonly.flags_response()[1] == b"OK [PERMANENTFLAGS ()] Flags permitted"


def test_flag_keys_include_recent() -> None:
    selected = SelectedMailbox(snapshot([entry(1, "\\Seen", "Work"), entry(2)]), False, first_recent_uid=2)
    assert selected.flag_keys(1) == {"\\seen", "work"}
    assert selected.flag_keys(2) == {"\\recent"}


# -- in a node: LIST placeholders and the mailbox cap on RENAME ---------------------------


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[Server]:
    """A node whose users may have six mailboxes (five come with the account)."""
    imap = dataclasses.replace(ImapConfig(), max_mailboxes=6)
    node = pytest_twisted.blockon(Deferred.fromCoroutine(make_node(tmp_path, imap=imap)))
    port_number, port = listen(IMAPFactory(node))
    yield Server(node, port_number)
    pytest_twisted.blockon(stop(port, node))


@pytest_twisted.ensureDeferred
async def test_list_shows_a_superior_that_is_no_mailbox_as_noselect(small_server: Server) -> None:
    await small_server.node.accounts.inbox(ALICE)
    await small_server.node.store.create_mailbox(ALICE, "orphan/child")  # behind the service's back
    raw = await deferToThread(small_server.raw)
    await deferToThread(raw.login)
    top = await deferToThread(raw.command, b"A", b'LIST "" "%"')
    everything = await deferToThread(raw.command, b"B", b'LIST "" "*"')
    raw.close()
    assert b'* LIST (\\Noselect \\HasChildren) "/" "orphan"\r\n' in top
    assert b'"orphan/child"' not in top
    assert b'* LIST (\\Noselect \\HasChildren) "/" "orphan"\r\n' in everything
    assert b'* LIST (\\HasNoChildren) "/" "orphan/child"\r\n' in everything


@pytest_twisted.ensureDeferred
async def test_the_mailbox_cap_counts_what_rename_would_create(small_server: Server) -> None:
    raw = await deferToThread(small_server.raw)
    await deferToThread(raw.login)
    full = b"NO [LIMIT] Too many mailboxes (at most 6)."
    # Renaming INBOX makes a new mailbox (and here its parent too): 5 + 2 > 6.
    assert full in await deferToThread(raw.command, b"A", b"RENAME INBOX Old/Inbox")
    assert b"B OK" in await deferToThread(raw.command, b"B", b"RENAME Junk Spam/Junk")  # 5 + 1
    assert full in await deferToThread(raw.command, b"C", b"CREATE Other")
    assert full in await deferToThread(raw.command, b"D", b"RENAME Trash Bin/Trash")
    assert b"E OK" in await deferToThread(raw.command, b"E", b"RENAME Trash Spam/Trash")  # no new parent
    raw.close()
    names = sorted(m.name for m in await small_server.node.store.list_mailboxes(ALICE))
    assert names == ["Drafts", "INBOX", "Sent", "Spam", "Spam/Junk", "Spam/Trash"]
