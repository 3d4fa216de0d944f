"""Each Twisted IMAP gap our server closes, shown on the wire against both servers.

Every test runs twice: against our ``IMAPServer`` on a real node, and against
plain ``twisted.mail.imap4.IMAP4Server`` over an honest in-memory account
(tests/helpers/imap.py) whose ``select`` answers in a later reactor turn, as
any real store does.  The Twisted run is a strict expected failure pinned to
an ``AssertionError``: it proves the fix is needed, and if Twisted ever closes
the gap itself, the XPASS tells us.

Transcripts are compared byte for byte; only the human-readable text of
status lines (``TEXT``) and numbers the test cannot know (``NUM``, a
UIDVALIDITY) are left open, so that the Twisted run fails on the gap and not
on wording.  See TWISTED-NOTES.md section 1 for where each gap lives.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
import pytest_twisted

from tests.helpers.imap import (
    ALICE,
    ANYTHING,
    NUM,
    PASSWORD,
    SIMPLE,
    TEXT,
    MakeSite,
    assert_wire,
    gap,
    last_line,
    run,
    wire_contains,
)
from tests.helpers.node import make_config
from twisted_mail_cluster.config import AuthConfig

ensure = pytest_twisted.ensureDeferred


# -- APPEND ------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", gap("APPEND without a flag list: opt_plist gives None, TypeError, BAD"))
@ensure
async def test_append_without_a_flag_list(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.logged_in()
        client.send(b"A APPEND INBOX {%d}\r\n" % len(SIMPLE))
        assert_wire(client.line(), b"+", TEXT, b"\r\n")
        client.send(SIMPLE + b"\r\n")
        assert_wire(last_line(client.until_tagged(b"A")), b"A OK ", TEXT, b"\r\n")
        assert site.uids() == [1]

    await run(scenario)


@pytest.mark.parametrize("server", gap("APPEND sends * n EXISTS for a mailbox that is not selected"))
@ensure
async def test_append_to_a_mailbox_that_is_not_selected_sends_no_exists(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.logged_in()
        client.send(b"A APPEND INBOX (\\Seen) {%d}\r\n" % len(SIMPLE))
        client.line()
        client.send(SIMPLE + b"\r\n")
        assert_wire(client.until_tagged(b"A"), b"A OK ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("APPEND to a missing mailbox: NO built from str, so BAD (#12262)"))
@ensure
async def test_append_to_a_missing_mailbox_says_trycreate(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.logged_in()
        client.send(b"A APPEND Nope (\\Seen) {%d}\r\n" % len(SIMPLE))
        assert_wire(client.line(), b"+", TEXT, b"\r\n")
        client.send(SIMPLE + b"\r\n")
        assert_wire(client.until_tagged(b"A"), b"A NO [TRYCREATE] ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("no UIDPLUS: APPEND gives no APPENDUID (#7336)"))
@ensure
async def test_append_answers_appenduid(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.logged_in()
        client.send(b"A APPEND INBOX (\\Seen) {%d}\r\n" % len(SIMPLE))
        client.line()
        client.send(SIMPLE + b"\r\n")
        assert_wire(last_line(client.until_tagged(b"A")), b"A OK [APPENDUID ", NUM, b" 1] ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("APPEND literals have no size limit: '+' is sent for any size"))
@ensure
async def test_an_oversized_append_literal_is_refused_before_the_continuation(
    make_site: MakeSite, server: str
) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.logged_in()
        client.send(b"A APPEND INBOX {4000000000}\r\n")
        assert_wire(client.line(), b"A NO ", TEXT, b"\r\n")
        # The client never sends the literal, and the session goes on.
        assert_wire(client.command(b"N", b"NOOP"), b"N OK ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("a negative literal size {-5} is accepted with '+'"))
@ensure
async def test_a_negative_literal_size_is_bad(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.logged_in()
        client.send(b"A APPEND INBOX {-5}\r\n")
        assert_wire(client.line(), b"A BAD ", TEXT, b"\r\n")

    await run(scenario)


# -- literals and authentication ---------------------------------------------------------------


@pytest.mark.parametrize("server", gap("LITERAL+ ({n+}) is refused: 'Bad literal size'"))
@ensure
async def test_literal_plus_is_accepted(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.client()
        user, password = ALICE.encode(), PASSWORD.encode()
        client.send(b"L LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(user), user, len(password), password))
        # No continuation request: the literals were non-synchronising.
        assert_wire(client.until_tagged(b"L"), b"L OK ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("SASL-IR: AUTHENTICATE with an initial response is 'Too many arguments'"))
@ensure
async def test_authenticate_plain_with_an_initial_response(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.client()
        initial = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())
        assert_wire(client.command(b"A", b"AUTHENTICATE PLAIN " + initial), b"A OK ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("a failed LOGIN is answered at once: no delay against guessing"))
@ensure
async def test_a_failed_login_is_answered_only_after_a_delay(
    make_site: MakeSite, server: str, tmp_path: Path
) -> None:
    auth = AuthConfig(
        trusted_networks=make_config(tmp_path).auth.trusted_networks,
        failed_login_delay=0.3, max_failed_login_delay=0.3,
    )
    site = await make_site(server, auth=auth)

    def scenario() -> None:
        client = site.client()
        started = time.monotonic()
        response = client.command(b"L", b'LOGIN "' + ALICE.encode() + b'" "wrong"')
        elapsed = time.monotonic() - started
        assert_wire(response, b"L NO ", TEXT, b"\r\n")
        assert elapsed >= 0.25, f"answered after {elapsed:.3f}s"

    await run(scenario)


# -- SELECT, pipelining, IDLE ------------------------------------------------------------------


@pytest.mark.parametrize("server", gap("SELECT sends neither [UNSEEN], [UIDNEXT] nor [PERMANENTFLAGS]"))
@ensure
async def test_select_sends_unseen_uidnext_and_permanentflags(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE, flags={"\\Seen"})
        site.deliver(SIMPLE)
        client = site.logged_in()
        response = client.select()
        assert wire_contains(response, b"\r\n* OK [UNSEEN 2] ", TEXT, b"\r\n"), response
        assert wire_contains(response, b"\r\n* OK [UIDNEXT 3] ", TEXT, b"\r\n"), response
        assert wire_contains(response, b"\r\n* OK [PERMANENTFLAGS (\\", TEXT, b")] ", TEXT, b"\r\n"), response

    await run(scenario)


@pytest.mark.parametrize("server", gap("a FETCH pipelined after SELECT is BAD: state changes in a callback (#9282)"))
@ensure
async def test_fetch_pipelined_right_after_select(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE)
        client = site.logged_in()
        client.send(b"a SELECT INBOX\r\nb FETCH 1 (UID)\r\n")
        assert_wire(
            client.until_tagged(b"a", b"b"),
            ANYTHING, b"a OK ", TEXT, b"\r\n* 1 FETCH (UID 1)\r\nb OK ", TEXT, b"\r\n",
        )

    await run(scenario)


@pytest.mark.parametrize("server", gap("any line ends IDLE, not only DONE"))
@ensure
async def test_idle_is_not_ended_by_a_line_other_than_done(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.logged_in()
        client.select()
        client.send(b"I IDLE\r\n")
        assert_wire(client.line(), b"+", TEXT, b"\r\n")
        client.send(b"X NOOP\r\n")
        assert_wire(client.until_tagged(b"I"), b"I BAD ", TEXT, b"\r\n")
        assert_wire(client.command(b"N", b"NOOP"), b"N OK ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("IMailboxListener has no expunge: other sessions never see EXPUNGE"))
@ensure
async def test_an_expunge_by_another_session_reaches_an_idling_session(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE, flags={"\\Deleted"})
        site.take_recent()
        other = site.logged_in()
        other.select()
        idler = site.logged_in()
        idler.select()
        idler.send(b"I IDLE\r\n")
        idler.line()
        assert_wire(other.command(b"X", b"EXPUNGE"), b"* 1 EXPUNGE\r\nX OK ", TEXT, b"\r\n")
        idler.send(b"DONE\r\n")
        assert_wire(idler.until_tagged(b"I"), b"* 1 EXPUNGE\r\nI OK ", TEXT, b"\r\n")

    await run(scenario)


# -- FETCH and SEARCH --------------------------------------------------------------------------


@pytest.mark.parametrize("server", gap("partial FETCH <0.10> announces 10 bytes' origin but sends the whole body"))
@ensure
async def test_partial_fetch_returns_only_the_requested_bytes(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE)
        client = site.logged_in()
        client.select()
        assert_wire(
            client.command(b"F", b"FETCH 1 (BODY.PEEK[]<0.10>)"),
            b"* 1 FETCH (BODY[]<0> {10}\r\nFrom: Bob )\r\nF OK ", TEXT, b"\r\n",
        )

    await run(scenario)


@pytest.mark.parametrize("server", gap("SEARCH KEYWORD is always false"))
@ensure
async def test_search_keyword_finds_a_keyword(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE)
        site.deliver(SIMPLE)
        client = site.logged_in()
        client.select()
        client.command(b"K", b"STORE 2 +FLAGS.SILENT ($Important)")
        assert_wire(client.command(b"S", b"SEARCH KEYWORD $Important"), b"* SEARCH 2\r\nS OK ", TEXT, b"\r\n")
        assert_wire(client.command(b"U", b"SEARCH UNKEYWORD $Important"), b"* SEARCH 1\r\nU OK ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("SEARCH TEXT ignores the header"))
@ensure
async def test_search_text_looks_at_the_header_too(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE)
        client = site.logged_in()
        client.select()
        assert_wire(client.command(b"B", b'SEARCH TEXT "line two"'), b"* SEARCH 1\r\nB OK ", TEXT, b"\r\n")
        assert_wire(client.command(b"S", b'SEARCH TEXT "hello there"'), b"* SEARCH 1\r\nS OK ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("a SEARCH that matches nothing omits '* SEARCH'"))
@ensure
async def test_an_empty_search_result_still_sends_search(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE)
        client = site.logged_in()
        client.select()
        assert_wire(client.command(b"S", b"SEARCH DELETED"), b"* SEARCH\r\nS OK ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("SEARCH SUBJECT/FROM/TO/HEADER compare str with bytes: 'SEARCH failed'"))
@ensure
async def test_search_by_header_fields(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE)
        client = site.logged_in()
        client.select()
        assert_wire(client.command(b"S", b"SEARCH SUBJECT hello"), b"* SEARCH 1\r\nS OK ", TEXT, b"\r\n")
        assert_wire(client.command(b"F", b"SEARCH FROM bob"), b"* SEARCH 1\r\nF OK ", TEXT, b"\r\n")

    await run(scenario)


# -- COPY, MOVE, EXPUNGE, UNSELECT -------------------------------------------------------------


@pytest.mark.parametrize("server", gap("COPY to a missing mailbox: NO built from str, so BAD (#12262)"))
@ensure
async def test_copy_to_a_missing_mailbox_says_trycreate(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE)
        client = site.logged_in()
        client.select()
        assert_wire(client.command(b"C", b"COPY 1 Nope"), b"C NO [TRYCREATE] ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("no UIDPLUS: COPY gives no COPYUID (#7336)"))
@ensure
async def test_copy_answers_copyuid(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE)
        client = site.logged_in()
        client.select()
        assert_wire(client.command(b"C", b"COPY 1 Trash"), b"C OK [COPYUID ", NUM, b" 1 1] ", TEXT, b"\r\n")
        assert site.uids("Trash") == [1]

    await run(scenario)


@pytest.mark.parametrize("server", gap("no MOVE (RFC 6851)"))
@ensure
async def test_move(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE)
        site.deliver(SIMPLE)
        site.take_recent()
        client = site.logged_in()
        client.select()
        assert_wire(
            client.command(b"M", b"MOVE 1 Trash"),
            b"* OK [COPYUID ", NUM, b" 1 1] ", TEXT, b"\r\n* 1 EXPUNGE\r\nM OK ", TEXT, b"\r\n",
        )
        assert site.uids() == [2]
        assert site.uids("Trash") == [1]

    await run(scenario)


@pytest.mark.parametrize("server", gap("no UID EXPUNGE (UIDPLUS): UID allows COPY/FETCH/STORE/SEARCH only"))
@ensure
async def test_uid_expunge_removes_only_the_given_uids(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE, flags={"\\Deleted"})
        site.deliver(SIMPLE, flags={"\\Deleted"})
        site.take_recent()
        client = site.logged_in()
        client.select()
        assert_wire(client.command(b"X", b"UID EXPUNGE 2"), b"* 2 EXPUNGE\r\nX OK ", TEXT, b"\r\n")
        assert site.uids() == [1]

    await run(scenario)


@pytest.mark.parametrize("server", gap("no UNSELECT (RFC 3691)"))
@ensure
async def test_unselect_leaves_deleted_messages_alone(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        site.deliver(SIMPLE, flags={"\\Deleted"})
        client = site.logged_in()
        client.select()
        assert_wire(client.command(b"U", b"UNSELECT"), b"U OK ", TEXT, b"\r\n")
        assert_wire(client.command(b"F", b"FETCH 1 (FLAGS)"), b"F BAD ", TEXT, b"\r\n")
        assert site.uids() == [1]

    await run(scenario)


# -- other extensions --------------------------------------------------------------------------


@pytest.mark.parametrize("server", gap("no ENABLE (RFC 5161): 'Unsupported command'"))
@ensure
async def test_enable(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.logged_in()
        # Nothing is enabled by an unknown name, but the command is understood.
        assert_wire(client.command(b"E", b"ENABLE X-NO-SUCH-EXTENSION"), b"* ENABLED\r\nE OK ", TEXT, b"\r\n")

    await run(scenario)


@pytest.mark.parametrize("server", gap("no ID (RFC 2971)"))
@ensure
async def test_id(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.client()
        assert_wire(
            client.command(b"I", b'ID ("name" "test")'), b'* ID ("name" ', TEXT, b")\r\nI OK ", TEXT, b"\r\n"
        )

    await run(scenario)


@pytest.mark.parametrize(
    "server", gap("LIST shows the mailbox's message flags as attributes: no CHILDREN, no SPECIAL-USE")
)
@ensure
async def test_list_attributes_are_children_and_special_use(make_site: MakeSite, server: str) -> None:
    site = await make_site(server)

    def scenario() -> None:
        client = site.logged_in()
        assert_wire(
            client.command(b"L", b'LIST "" "%"'),
            b'* LIST (\\HasNoChildren \\Drafts) "/" "Drafts"\r\n'
            b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n'
            b'* LIST (\\HasNoChildren \\Junk) "/" "Junk"\r\n'
            b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"\r\n'
            b'* LIST (\\HasNoChildren \\Trash) "/" "Trash"\r\n'
            b"L OK ", TEXT, b"\r\n",
        )

    await run(scenario)


def test_every_scenario_runs_on_both_servers() -> None:
    """A test added here without ``gap(...)`` would prove nothing about Twisted."""
    import inspect
    import sys

    module = sys.modules[__name__]
    for name, function in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_") or name == "test_every_scenario_runs_on_both_servers":
            continue
        marks = getattr(function, "pytestmark", [])
        params = [m for m in marks if m.name == "parametrize" and m.args[0] == "server"]
        assert params, f"{name} is not parametrised over both servers"
