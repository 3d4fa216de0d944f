"""Our IMAP server against the RFCs it claims, checked on the wire byte for byte.

RFC 3501 (IMAP4rev1) with IDLE 2177, UIDPLUS 4315, MOVE 6851, NAMESPACE 2342,
ENABLE 5161, ID 2971, LITERAL+ 7888, SASL-IR 4959, SPECIAL-USE 6154,
UNSELECT 3691 and CHILDREN 3348; Dovecot's answers are the yardstick where an
RFC leaves room.  Every test runs a real node over real TCP; a blocking raw
client runs in a thread (tests/helpers/imap.py) while the reactor serves it,
and steps that belong in the reactor (deliveries, reading the store) go
through ``site.call``/``site.deliver``.

The parts that need two sessions (sequence numbers while another session
expunges, \\Recent, flag changes) drive both from one thread, one command at
a time, so each transcript is deterministic: events of the in-process bus
reach the other session in the reactor turn after the change, before the
next command can arrive.
"""

from __future__ import annotations

import base64
import re
import socket
import time
from typing import Any

import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.helpers.imap import (
    ALICE,
    BOB,
    PASSWORD,
    SIMPLE,
    MakeSite,
    Site,
    run,
)
from twisted_mail_cluster import __version__
from twisted_mail_cluster.config import ImapConfig

ensure = pytest_twisted.ensureDeferred

CAPABILITIES = b"IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE NAMESPACE UIDPLUS MOVE UNSELECT SPECIAL-USE CHILDREN"
SYSTEM_FLAGS = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft"
LOGGED_IN = b"L OK [CAPABILITY " + CAPABILITIES + b"] Logged in\r\n"

#: A message with a text part and an attached message (message/rfc822).
MULTIPART = (
    b"From: Bob <bob@example.test>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: Forwarded\r\n"
    b"X-Note: folded\r\n"
    b" continuation\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n'
    b"\r\n"
    b"--XX\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"See the attached message.\r\n"
    b"--XX\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: Carol <carol@example.test>\r\n"
    b"Subject: Inner\r\n"
    b"\r\n"
    b"Inner body.\r\n"
    b"--XX--\r\n"
)


def uidvalidity(site: Site, mailbox: str = "INBOX", user: str = ALICE) -> int:
    assert site.node is not None
    node = site.node

    async def get() -> int:
        box = await node.store.get_mailbox(user, mailbox)
        return box.uidvalidity

    return site.call(get)


def select_response(exists: int, recent: int, uidnext: int, validity: int, unseen: int | None = None,
                    keywords: bytes = b"", tag: bytes = b"S", readonly: bool = False) -> bytes:
    """What SELECT/EXAMINE must say, in our order (RFC 3501 6.3.1, Dovecot's order)."""
    flags = SYSTEM_FLAGS + keywords
    permanent = b"()" if readonly else b"(" + flags + b" \\*)"
    return (
        b"* FLAGS (" + flags + b")\r\n"
        + b"* %d EXISTS\r\n* %d RECENT\r\n" % (exists, recent)
        + (b"* OK [UNSEEN %d] First unseen.\r\n" % unseen if unseen else b"")
        + b"* OK [PERMANENTFLAGS " + permanent + b"] Flags permitted\r\n"
        + b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % validity
        + b"* OK [UIDNEXT %d] Predicted next UID\r\n" % uidnext
        + tag + (b" OK [READ-ONLY] Examine completed.\r\n" if readonly else b" OK [READ-WRITE] Select completed.\r\n")
    )


# == greeting, capabilities, authentication ==============================================


@ensure
async def test_greeting_and_capability(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        client = site.client()
        assert client.greeting == (
            b"* OK [CAPABILITY " + CAPABILITIES + b" AUTH=PLAIN] twisted-mail-cluster ready.\r\n"
        )
        assert client.command(b"C", b"CAPABILITY") == (
            b"* CAPABILITY " + CAPABILITIES + b" AUTH=PLAIN\r\nC OK Capability completed.\r\n"
        )
        assert client.login() == LOGGED_IN
        # Once logged in there is nothing to authenticate with any more.
        assert client.command(b"C", b"CAPABILITY") == (
            b"* CAPABILITY " + CAPABILITIES + b"\r\nC OK Capability completed.\r\n"
        )
        assert client.command(b"Z", b"LOGOUT") == b"* BYE Logging out\r\nZ OK Logout completed.\r\n"
        assert client.rest() == b""

    await run(scenario)


@ensure
async def test_authenticate_plain_with_initial_response_continuation_and_cancel(make_site: MakeSite) -> None:
    site = await make_site()
    plain = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())

    def scenario() -> None:
        # SASL-IR (RFC 4959): the response on the command line.
        client = site.client()
        assert client.command(b"A", b"AUTHENTICATE PLAIN " + plain) == (
            b"A OK [CAPABILITY " + CAPABILITIES + b"] Logged in\r\n"
        )
        # Without it: an empty continuation request, then the response.
        client = site.client()
        client.send(b"A AUTHENTICATE PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        client.send(plain + b"\r\n")
        assert client.until_tagged(b"A") == b"A OK [CAPABILITY " + CAPABILITIES + b"] Logged in\r\n"
        # "*" cancels the exchange: BAD (RFC 3501 6.2.2), and the session goes on.
        client = site.client()
        client.send(b"A AUTHENTICATE PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        client.send(b"*\r\n")
        assert client.until_tagged(b"A") == b"A BAD Authentication aborted by client\r\n"
        assert client.command(b"N", b"NOOP") == b"N OK NOOP completed.\r\n"
        # A wrong password, and an authorisation identity that is someone else.
        wrong = base64.b64encode(b"\0" + ALICE.encode() + b"\0wrong")
        assert client.command(b"B", b"AUTHENTICATE PLAIN " + wrong) == (
            b"B NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        )
        other = base64.b64encode(BOB.encode() + b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())
        assert client.command(b"C", b"AUTHENTICATE PLAIN " + other) == (
            b"C NO [AUTHORIZATIONFAILED] Authorization identity not allowed.\r\n"
        )
        assert client.command(b"D", b"AUTHENTICATE CRAM-MD5") == (
            b"D NO Unsupported authentication mechanism.\r\n"
        )

    await run(scenario)


@ensure
async def test_untrusted_peer_gets_logindisabled_and_no_plaintext_login(make_site: MakeSite) -> None:
    site = await make_site(trusted=False)
    refused = b" NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"

    def scenario() -> None:
        client = site.client()
        assert client.greeting == (
            b"* OK [CAPABILITY " + CAPABILITIES + b" LOGINDISABLED] twisted-mail-cluster ready.\r\n"
        )
        assert client.command(b"L", b'LOGIN "' + ALICE.encode() + b'" "' + PASSWORD.encode() + b'"') == b"L" + refused
        plain = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())
        assert client.command(b"A", b"AUTHENTICATE PLAIN " + plain) == b"A" + refused
        # Refused before the client could send its password.
        assert client.command(b"B", b"AUTHENTICATE PLAIN") == b"B" + refused
        assert client.command(b"S", b"SELECT INBOX") == b"S BAD Command not permitted in this state.\r\n"

    await run(scenario)


@ensure
async def test_three_failed_logins_end_the_connection(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        client = site.client()
        for tag in (b"A", b"B"):
            assert client.command(tag, b'LOGIN "' + ALICE.encode() + b'" "wrong"') == (
                tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
            )
        client.send(b'C LOGIN "' + ALICE.encode() + b'" "wrong"\r\nD NOOP\r\n')
        assert client.rest() == (
            b"C NO [AUTHENTICATIONFAILED] Authentication failed.\r\n* BYE Too many failed logins.\r\n"
        )

    await run(scenario)


@ensure
async def test_id_namespace_enable_and_bad_input(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        client = site.client()
        ours = b'* ID ("name" "twisted-mail-cluster" "version" "' + __version__.encode() + b'")\r\n'
        assert client.command(b"I", b'ID ("name" "mutt" "version" "2.2")') == ours + b"I OK ID completed.\r\n"
        assert client.command(b"J", b"ID NIL") == ours + b"J OK ID completed.\r\n"
        assert client.command(b"E", b"ENABLE CONDSTORE") == b"E BAD Command not permitted in this state.\r\n"
        client.login()
        assert client.command(b"N", b"NAMESPACE") == b'* NAMESPACE (("" "/")) NIL NIL\r\nN OK Namespace completed.\r\n'
        assert client.command(b"E", b"ENABLE X-ONE X-TWO") == b"* ENABLED\r\nE OK Enabled.\r\n"
        assert client.command(b"F", b"FROB") == b"F BAD Unknown command.\r\n"
        assert client.command(b"G", b"") == b"G BAD Missing or invalid command name.\r\n"
        client.send(b"+x NOOP\r\n")
        assert client.line() == b"* BAD Invalid tag.\r\n"
        assert client.command(b"H", b"FETCH 1 FLAGS") == b"H BAD Command not permitted in this state.\r\n"

    await run(scenario)


# == SELECT, EXAMINE, CLOSE, UNSELECT =======================================================


@ensure
async def test_select_and_examine_responses(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        site.deliver(SIMPLE, flags={"\\Seen"})
        site.deliver(SIMPLE, flags={"$Work"})
        validity = uidvalidity(site)
        client = site.logged_in()
        assert client.command(b"E", b"EXAMINE INBOX") == select_response(
            2, 0, 3, validity, unseen=2, keywords=b" $Work", tag=b"E", readonly=True
        )
        # EXAMINE claims no \Recent: the SELECT after it still gets both.
        assert client.command(b"S", b"SELECT inbox") == select_response(2, 2, 3, validity, unseen=2, keywords=b" $Work")
        other = site.logged_in()
        assert other.command(b"S", b"SELECT INBOX") == select_response(2, 0, 3, validity, unseen=2, keywords=b" $Work")
        assert client.command(b"T", b"SELECT Nope") == b"T NO [NONEXISTENT] Mailbox doesn't exist: Nope\r\n"
        # A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1).
        assert client.command(b"F", b"FETCH 1 FLAGS") == b"F BAD Command not permitted in this state.\r\n"

    await run(scenario)


@ensure
async def test_a_delivery_while_select_loads_the_mailbox_is_announced_at_its_end(make_site: MakeSite) -> None:
    """The event of a change made just after SELECT read its snapshot must not be lost."""
    site = await make_site()
    assert site.node is not None
    node = site.node
    real_snapshot = node.store.imap_snapshot

    async def snapshot_then_deliver(mailbox_id: Any) -> Any:
        snapshot = await real_snapshot(mailbox_id)
        node.store.imap_snapshot = real_snapshot  # once only
        box = await node.store.get_mailbox_by_id(mailbox_id)
        await node.mailboxes.deliver(await node.mailboxes.prepare(SIMPLE), [(box, frozenset())])
        await deferLater(reactor, 0.01, lambda: None)  # its event arrives meanwhile
        return snapshot

    def scenario() -> None:
        site.deliver(SIMPLE)
        site.take_recent()
        validity = uidvalidity(site)
        patched = lambda m: Deferred.fromCoroutine(snapshot_then_deliver(m))  # noqa: E731
        site.call(lambda: setattr(node.store, "imap_snapshot", patched))
        client = site.logged_in()
        stale = select_response(1, 0, 2, validity, unseen=1)
        assert client.command(b"S", b"SELECT INBOX") == (
            stale.replace(b"S OK", b"* 2 EXISTS\r\n* 1 RECENT\r\nS OK")
        )

    await run(scenario)


@ensure
async def test_examine_is_read_only(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        site.deliver(SIMPLE, flags={"\\Deleted"})
        client = site.logged_in()
        client.command(b"E", b"EXAMINE INBOX")
        # BODY[] (not PEEK) sets no \Seen in a read-only mailbox, and says no FLAGS.
        assert client.command(b"F", b"FETCH 1 BODY[TEXT]") == (
            b"* 1 FETCH (BODY[TEXT] {30}\r\nBody line one\r\nBody line two\r\n)\r\nF OK Fetch completed.\r\n"
        )
        assert client.command(b"G", b"FETCH 1 FLAGS") == b"* 1 FETCH (FLAGS (\\Deleted))\r\nG OK Fetch completed.\r\n"
        assert client.command(b"T", b"STORE 1 +FLAGS (\\Seen)") == b"T NO [READ-ONLY] Mailbox is read-only.\r\n"
        assert client.command(b"X", b"EXPUNGE") == b"X NO [READ-ONLY] Mailbox is read-only.\r\n"
        assert client.command(b"M", b"MOVE 1 Trash") == b"M NO [READ-ONLY] Mailbox is read-only.\r\n"
        # CLOSE of a read-only mailbox expunges nothing.
        assert client.command(b"C", b"CLOSE") == b"C OK Close completed.\r\n"
        assert site.uids() == [1]

    await run(scenario)


@ensure
async def test_close_expunges_silently_and_unselect_does_not(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        site.deliver(SIMPLE, flags={"\\Deleted"})
        site.deliver(SIMPLE)
        site.deliver(SIMPLE, flags={"\\Deleted"})
        client = site.logged_in()
        client.select()
        assert client.command(b"U", b"UNSELECT") == b"U OK Unselect completed.\r\n"
        assert site.uids() == [1, 2, 3]
        client.select()
        assert client.command(b"C", b"CLOSE") == b"C OK Close completed.\r\n"
        assert site.uids() == [2]
        assert client.command(b"F", b"FETCH 1 FLAGS") == b"F BAD Command not permitted in this state.\r\n"

    await run(scenario)


# == sequence numbers while other sessions change the mailbox ===================================


@ensure
async def test_another_sessions_expunge_is_reported_only_where_rfc3501_allows(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        for _ in range(3):
            site.deliver(SIMPLE)
        site.take_recent()
        mine, other = site.logged_in(), site.logged_in()
        mine.select()
        other.select()
        assert other.command(b"X", b"STORE 2 +FLAGS.SILENT (\\Deleted)") == b"X OK Store completed.\r\n"
        assert other.command(b"Y", b"EXPUNGE") == b"* 2 EXPUNGE\r\nY OK Expunge completed.\r\n"
        # FETCH, STORE and SEARCH must not send EXPUNGE (RFC 3501 7.4.1): the
        # numbering stays as the client knows it, the expunged message is a ghost.
        assert mine.command(b"A", b"FETCH 1:* (UID)") == (
            b"* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 2)\r\n* 3 FETCH (UID 3)\r\nA OK Fetch completed.\r\n"
        )
        assert mine.command(b"B", b"FETCH 2 (FLAGS)") == b"B NO [EXPUNGEISSUED] Some messages were expunged.\r\n"
        assert mine.command(b"C", b"FETCH 3 (UID)") == b"* 3 FETCH (UID 3)\r\nC OK Fetch completed.\r\n"
        assert mine.command(b"D", b"STORE 3 +FLAGS (\\Flagged)") == (
            b"* 3 FETCH (FLAGS (\\Flagged))\r\nD OK Store completed.\r\n"
        )
        assert mine.command(b"E", b"STORE 2 +FLAGS (\\Flagged)") == (
            b"E NO [EXPUNGEISSUED] Some messages were expunged.\r\n"
        )
        assert mine.command(b"F", b"SEARCH ALL") == b"* SEARCH 1 3\r\nF OK Search completed.\r\n"
        assert mine.command(b"G", b"COPY 2 Trash") == (
            b"* 2 EXPUNGE\r\nG NO [EXPUNGEISSUED] Some of the requested messages no longer exist.\r\n"
        )
        # Now the numbering has moved on.
        assert mine.command(b"H", b"FETCH 2 (UID)") == b"* 2 FETCH (UID 3)\r\nH OK Fetch completed.\r\n"
        # The UID forms may carry EXPUNGE.
        other.command(b"X", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        other.command(b"Y", b"EXPUNGE")
        assert mine.command(b"I", b"UID FETCH 3 (FLAGS)") == (
            b"* 2 FETCH (UID 3 FLAGS (\\Flagged))\r\n* 1 EXPUNGE\r\nI OK Fetch completed.\r\n"
        )
        assert mine.command(b"N", b"NOOP") == b"N OK NOOP completed.\r\n"

    await run(scenario)


@ensure
async def test_several_expunges_are_each_numbered_after_the_previous_one(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        for flags in ({"\\Deleted"}, set(), {"\\Deleted"}, {"\\Deleted"}, set()):
            site.deliver(SIMPLE, flags=flags)
        site.take_recent()
        mine, other = site.logged_in(), site.logged_in()
        mine.select()
        other.select()
        assert other.command(b"X", b"EXPUNGE") == (
            b"* 1 EXPUNGE\r\n* 2 EXPUNGE\r\n* 2 EXPUNGE\r\nX OK Expunge completed.\r\n"
        )
        assert mine.command(b"N", b"NOOP") == (
            b"* 1 EXPUNGE\r\n* 2 EXPUNGE\r\n* 2 EXPUNGE\r\nN OK NOOP completed.\r\n"
        )
        assert mine.command(b"F", b"FETCH 1:* (UID)") == (
            b"* 1 FETCH (UID 2)\r\n* 2 FETCH (UID 5)\r\nF OK Fetch completed.\r\n"
        )

    await run(scenario)


@ensure
async def test_a_move_by_another_session_and_new_mail_during_fetch(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        site.deliver(SIMPLE)
        site.deliver(SIMPLE)
        site.take_recent()
        mine, other = site.logged_in(), site.logged_in()
        mine.select()
        other.select()
        validity = uidvalidity(site, "Trash")
        assert other.command(b"M", b"UID MOVE 1 Trash") == (
            b"* OK [COPYUID %d 1 1] Moved UIDs.\r\n* 1 EXPUNGE\r\nM OK Move completed.\r\n" % validity
        )
        site.deliver(SIMPLE)
        # New mail may be announced during FETCH (EXISTS is not EXPUNGE);
        # this session is the first to hear of it, so it is \Recent here.
        assert mine.command(b"A", b"FETCH 2 (UID)") == (
            b"* 2 FETCH (UID 2)\r\n* 3 EXISTS\r\n* 1 RECENT\r\nA OK Fetch completed.\r\n"
        )
        assert mine.command(b"B", b"CHECK") == b"* 1 EXPUNGE\r\nB OK Check completed.\r\n"
        assert mine.command(b"C", b"FETCH 1:* (UID FLAGS)") == (
            b"* 1 FETCH (UID 2 FLAGS ())\r\n* 2 FETCH (UID 3 FLAGS (\\Recent))\r\nC OK Fetch completed.\r\n"
        )
        # The other session learns of the new message too, but not as \Recent.
        assert other.command(b"N", b"NOOP") == b"* 2 EXISTS\r\nN OK NOOP completed.\r\n"
        assert other.command(b"F", b"FETCH 2 (FLAGS)") == b"* 2 FETCH (FLAGS ())\r\nF OK Fetch completed.\r\n"

    await run(scenario)


@ensure
async def test_recent_belongs_to_exactly_one_session(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        site.deliver(SIMPLE)
        first, second = site.logged_in(), site.logged_in()
        assert b"* 1 RECENT\r\n" in first.select()
        assert b"* 0 RECENT\r\n" in second.select()
        assert first.command(b"S", b"SEARCH RECENT") == b"* SEARCH 1\r\nS OK Search completed.\r\n"
        assert second.command(b"S", b"SEARCH RECENT") == b"* SEARCH\r\nS OK Search completed.\r\n"
        assert first.command(b"T", b"SEARCH NEW") == b"* SEARCH 1\r\nT OK Search completed.\r\n"
        # A new message goes to whichever session hears of it first.
        site.deliver(SIMPLE)
        assert second.command(b"N", b"NOOP") == b"* 2 EXISTS\r\n* 1 RECENT\r\nN OK NOOP completed.\r\n"
        assert first.command(b"N", b"NOOP") == b"* 2 EXISTS\r\nN OK NOOP completed.\r\n"
        assert first.command(b"F", b"FETCH 1:2 (FLAGS)") == (
            b"* 1 FETCH (FLAGS (\\Recent))\r\n* 2 FETCH (FLAGS ())\r\nF OK Fetch completed.\r\n"
        )
        assert second.command(b"F", b"FETCH 1:2 (FLAGS)") == (
            b"* 1 FETCH (FLAGS ())\r\n* 2 FETCH (FLAGS (\\Recent))\r\nF OK Fetch completed.\r\n"
        )
        # \Recent cannot be stored.
        assert first.command(b"R", b"STORE 1 -FLAGS (\\Recent)") == (
            b"* 1 FETCH (FLAGS (\\Recent))\r\nR OK Store completed.\r\n"
        )

    await run(scenario)


# == STORE and flags ===========================================================================


@ensure
async def test_store_echoes_flags_unless_silent(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        site.deliver(SIMPLE)
        site.deliver(SIMPLE)
        site.take_recent()
        client = site.logged_in()
        client.select()
        assert client.command(b"A", b"STORE 1:2 +FLAGS (\\Flagged \\Seen)") == (
            b"* 1 FETCH (FLAGS (\\Flagged \\Seen))\r\n* 2 FETCH (FLAGS (\\Flagged \\Seen))\r\nA OK Store completed.\r\n"
        )
        assert client.command(b"B", b"STORE 1 -FLAGS.SILENT (\\Flagged)") == b"B OK Store completed.\r\n"
        assert client.command(b"C", b"UID STORE 2 FLAGS (\\Answered)") == (
            b"* 2 FETCH (FLAGS (\\Answered) UID 2)\r\nC OK Store completed.\r\n"
        )
        # A STORE that changes nothing still echoes the flags.
        assert client.command(b"D", b"STORE 1 +FLAGS \\Seen") == (
            b"* 1 FETCH (FLAGS (\\Seen))\r\nD OK Store completed.\r\n"
        )
        assert client.command(b"E", b"FETCH 1:2 FLAGS") == (
            b"* 1 FETCH (FLAGS (\\Seen))\r\n* 2 FETCH (FLAGS (\\Answered))\r\nE OK Fetch completed.\r\n"
        )
        assert client.command(b"F", b"STORE 1 +FLAGS (\\Bogus)") == b"F BAD unknown system flag \\Bogus\r\n"
        assert client.command(b"G", b"STORE 1 XFLAGS (\\Seen)") == b"G BAD expected FLAGS, +FLAGS or -FLAGS\r\n"

    await run(scenario)


@ensure
async def test_another_sessions_flag_changes_arrive_as_unsolicited_fetch(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        site.deliver(SIMPLE)
        site.deliver(SIMPLE)
        site.take_recent()
        mine, other = site.logged_in(), site.logged_in()
        mine.select()
        other.select()
        assert other.command(b"A", b"STORE 2 +FLAGS.SILENT (\\Seen)") == b"A OK Store completed.\r\n"
        assert mine.command(b"F", b"FETCH 1 (UID)") == (
            b"* 1 FETCH (UID 1)\r\n* 2 FETCH (FLAGS (\\Seen) UID 2)\r\nF OK Fetch completed.\r\n"
        )
        # Reported once only.
        assert mine.command(b"N", b"NOOP") == b"N OK NOOP completed.\r\n"
        # This session's own STORE is not echoed a second time when its event comes back.
        assert mine.command(b"S", b"STORE 1 +FLAGS (\\Answered)") == (
            b"* 1 FETCH (FLAGS (\\Answered))\r\nS OK Store completed.\r\n"
        )
        assert mine.command(b"N", b"NOOP") == b"N OK NOOP completed.\r\n"
        assert other.command(b"N", b"NOOP") == b"* 1 FETCH (FLAGS (\\Answered) UID 1)\r\nN OK NOOP completed.\r\n"

    await run(scenario)


@ensure
async def test_a_new_keyword_updates_flags_and_permanentflags(make_site: MakeSite) -> None:
    site = await make_site()
    flags_with_work = (
        b"* FLAGS (" + SYSTEM_FLAGS + b" $Work)\r\n"
        b"* OK [PERMANENTFLAGS (" + SYSTEM_FLAGS + b" $Work \\*)] Flags permitted\r\n"
    )

    def scenario() -> None:
        site.deliver(SIMPLE)
        site.take_recent()
        mine, other = site.logged_in(), site.logged_in()
        mine.select()
        other.select()
        # The client hears of the keyword before it sees it on a message.
        assert mine.command(b"K", b"STORE 1 +FLAGS ($Work)") == (
            flags_with_work + b"* 1 FETCH (FLAGS ($Work))\r\nK OK Store completed.\r\n"
        )
        # Keywords compare case-insensitively: no second keyword, no new FLAGS.
        assert mine.command(b"L", b"STORE 1 +FLAGS ($WORK)") == (
            b"* 1 FETCH (FLAGS ($Work))\r\nL OK Store completed.\r\n"
        )
        assert mine.command(b"S", b"SEARCH KEYWORD $work") == b"* SEARCH 1\r\nS OK Search completed.\r\n"
        assert other.command(b"N", b"NOOP") == (
            flags_with_work + b"* 1 FETCH (FLAGS ($Work) UID 1)\r\nN OK NOOP completed.\r\n"
        )

    await run(scenario)


# == STATUS ======================================================================================


@ensure
async def test_status_of_another_and_of_the_selected_mailbox(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        site.deliver(SIMPLE, flags={"\\Seen"})
        site.deliver(SIMPLE)
        trash = uidvalidity(site, "Trash")
        client = site.logged_in()
        assert client.command(b"A", b"STATUS Trash (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)") == (
            b'* STATUS "Trash" (MESSAGES 0 RECENT 0 UIDNEXT 1 UIDVALIDITY %d UNSEEN 0)\r\n'
            b"A OK Status completed.\r\n" % trash
        )
        assert client.command(b"B", b"STATUS INBOX (MESSAGES RECENT UNSEEN)") == (
            b'* STATUS "INBOX" (MESSAGES 2 RECENT 2 UNSEEN 1)\r\nB OK Status completed.\r\n'
        )
        client.select()
        site.deliver(SIMPLE)
        # For the selected mailbox the client's view is brought up to date
        # first, and STATUS agrees with it (the \Recent ones are this session's).
        assert client.command(b"C", b"STATUS INBOX (MESSAGES RECENT UIDNEXT UNSEEN)") == (
            b"* 3 EXISTS\r\n* 3 RECENT\r\n"
            b'* STATUS "INBOX" (MESSAGES 3 RECENT 3 UIDNEXT 4 UNSEEN 2)\r\nC OK Status completed.\r\n'
        )
        assert client.command(b"D", b"STATUS Nope (MESSAGES)") == b"D NO [NONEXISTENT] Mailbox doesn't exist: Nope\r\n"
        assert client.command(b"E", b"STATUS INBOX (BOGUS)") == b"E BAD unknown STATUS item BOGUS\r\n"

    await run(scenario)


# == APPEND ======================================================================================


@ensure
async def test_append_with_flags_and_date_time(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        validity = uidvalidity(site)
        client = site.logged_in()
        client.send(b'A APPEND INBOX (\\Seen $Work) "17-Jul-1996 02:44:25 -0700" {%d}\r\n' % len(SIMPLE))
        assert client.line() == b"+ Ready for literal data\r\n"
        client.send(SIMPLE + b"\r\n")
        assert client.until_tagged(b"A") == b"A OK [APPENDUID %d 1] Append completed.\r\n" % validity
        client.select()
        # The same instant as given; the zone is not kept (the store holds a timestamp).
        assert client.command(b"F", b"FETCH 1 (FLAGS INTERNALDATE RFC822.SIZE)") == (
            b'* 1 FETCH (FLAGS ($Work \\Recent \\Seen) INTERNALDATE "17-Jul-1996 09:44:25 +0000" RFC822.SIZE %d)\r\n'
            b"F OK Fetch completed.\r\n" % len(SIMPLE)
        )
        assert client.command(b"B", b"FETCH 1 BODY.PEEK[]") == (
            b"* 1 FETCH (BODY[] {%d}\r\n%s)\r\nB OK Fetch completed.\r\n" % (len(SIMPLE), SIMPLE)
        )

    await run(scenario)


@ensure
async def test_append_to_the_selected_mailbox_announces_exists(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        validity = uidvalidity(site)
        client = site.logged_in()
        client.select()
        assert client.command(b"A", b"APPEND INBOX {%d+}\r\n%s" % (len(SIMPLE), SIMPLE)) == (
            b"* 1 EXISTS\r\n* 1 RECENT\r\nA OK [APPENDUID %d 1] Append completed.\r\n" % validity
        )
        # Into another mailbox: nothing to announce here.
        trash = uidvalidity(site, "Trash")
        assert client.command(b"B", b"APPEND Trash {%d+}\r\n%s" % (len(SIMPLE), SIMPLE)) == (
            b"B OK [APPENDUID %d 1] Append completed.\r\n" % trash
        )

    await run(scenario)


@ensure
async def test_append_refusals(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        client = site.logged_in()
        assert client.command(b"A", b"APPEND Nope {%d+}\r\n%s" % (len(SIMPLE), SIMPLE)) == (
            b"A NO [TRYCREATE] Mailbox doesn't exist: Nope\r\n"
        )
        assert client.command(b"B", b"APPEND INBOX {0+}\r\n") == b"B NO Can't save a zero byte message.\r\n"
        assert client.command(b"C", b"APPEND INBOX (\\Recent) {%d+}\r\n%s" % (len(SIMPLE), SIMPLE)) == (
            b"C BAD \\Recent cannot be stored\r\n"
        )
        bad_date = b'APPEND INBOX "31-Feb-2020 00:00:00 +0000" {%d+}\r\n%s' % (len(SIMPLE), SIMPLE)
        assert client.command(b"D", bad_date) == b"D BAD invalid date\r\n"
        assert site.uids() == []

    await run(scenario)


# == COPY, MOVE, UID ranges =====================================================================


@ensure
async def test_copyuid_and_move_with_non_contiguous_sets(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        for _ in range(5):
            site.deliver(SIMPLE)
        site.take_recent()
        trash = uidvalidity(site, "Trash")
        client = site.logged_in()
        client.select()
        assert client.command(b"A", b"UID COPY 5,1,3 Trash") == (
            b"A OK [COPYUID %d 1,3,5 1:3] Copy completed.\r\n" % trash
        )
        assert client.command(b"B", b"MOVE 2,4 Trash") == (
            b"* OK [COPYUID %d 2,4 4:5] Moved UIDs.\r\n* 2 EXPUNGE\r\n* 3 EXPUNGE\r\nB OK Move completed.\r\n" % trash
        )
        assert client.command(b"C", b"UID COPY 2 Trash") == b"C OK No messages found.\r\n"
        assert client.command(b"D", b"COPY 1 nope") == b"D NO [TRYCREATE] Mailbox doesn't exist: nope\r\n"
        assert site.uids() == [1, 3, 5]
        assert site.uids("Trash") == [1, 2, 3, 4, 5]

    await run(scenario)


@ensure
async def test_uid_ranges_with_star_beyond_the_last_uid(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        for _ in range(3):
            site.deliver(SIMPLE)
        site.take_recent()
        client = site.logged_in()
        client.select()
        # RFC 3501 6.4.8: "*" is the largest UID in use, so 5:* is 3:5.
        assert client.command(b"A", b"UID FETCH 5:* (FLAGS)") == (
            b"* 3 FETCH (UID 3 FLAGS ())\r\nA OK Fetch completed.\r\n"
        )
        assert client.command(b"B", b"UID FETCH 4:7 (FLAGS)") == b"B OK Fetch completed.\r\n"
        assert client.command(b"C", b"UID SEARCH UID 5:*") == b"* SEARCH 3\r\nC OK Search completed.\r\n"
        assert client.command(b"D", b"FETCH *:2 (UID)") == (
            b"* 2 FETCH (UID 2)\r\n* 3 FETCH (UID 3)\r\nD OK Fetch completed.\r\n"
        )
        # A message number the client cannot know is an error.
        assert client.command(b"E", b"FETCH 4 (UID)") == b"E BAD message sequence number out of range\r\n"
        assert client.command(b"F", b"SEARCH 2:*") == b"* SEARCH 2 3\r\nF OK Search completed.\r\n"

    await run(scenario)


@ensure
async def test_search_keys_and_charsets(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        site.deliver(SIMPLE, flags={"\\Answered"})
        site.deliver(MULTIPART)
        site.take_recent()
        client = site.logged_in()
        client.select()
        assert client.command(b"A", b"SEARCH OR ANSWERED SUBJECT forwarded NOT FROM carol") == (
            b"* SEARCH 1 2\r\nA OK Search completed.\r\n"
        )
        # The text of an attached message is part of the body; headers are not.
        assert client.command(b"B", b'SEARCH BODY "inner body"') == b"* SEARCH 2\r\nB OK Search completed.\r\n"
        assert client.command(b"H", b"SEARCH BODY forwarded") == b"* SEARCH\r\nH OK Search completed.\r\n"
        assert client.command(b"C", b"SEARCH LARGER %d" % len(SIMPLE)) == b"* SEARCH 2\r\nC OK Search completed.\r\n"
        assert client.command(b"D", b"SEARCH SENTBEFORE 1-Jan-1995 UNANSWERED") == (
            b"* SEARCH\r\nD OK Search completed.\r\n"
        )
        assert client.command(b"E", b"SEARCH CHARSET UTF-8 HEADER X-Note continuation") == (
            b"* SEARCH 2\r\nE OK Search completed.\r\n"
        )
        assert client.command(b"F", b"SEARCH CHARSET ISO-8859-1 SUBJECT x") == (
            b"F NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset\r\n"
        )
        assert client.command(b"G", b"SEARCH FROBNICATE") == b"G BAD unknown search key FROBNICATE\r\n"

    await run(scenario)


@ensure
async def test_literal_size_limits(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        client = site.client()
        # Strings (a password, a search key) are small: BAD before the continuation.
        client.send(b"A LOGIN {70000}\r\n")
        assert client.line() == b"A BAD Literal too big.\r\n"
        client.login()
        client.send(b"B APPEND INBOX {4000000000}\r\n")
        assert client.line() == b"B NO [TOOBIG] Literal too big.\r\n"
        assert client.command(b"N", b"NOOP") == b"N OK NOOP completed.\r\n"
        # A non-synchronising literal is already on its way: there is no way
        # to skip it, so the connection ends (RFC 7888 section 4).
        client.send(b"C APPEND INBOX {4000000000+}\r\n" + b"x" * 1000)
        assert client.rest() == b"* BYE [TOOBIG] Literal too big.\r\n"

    await run(scenario)


# == FETCH sections ==============================================================================


@ensure
async def test_fetch_header_fields_mime_and_nested_message_sections(make_site: MakeSite) -> None:
    site = await make_site()

    def literal(data: bytes) -> bytes:
        return b"{%d}\r\n%s" % (len(data), data)

    def scenario() -> None:
        site.deliver(MULTIPART)
        site.take_recent()
        client = site.logged_in()
        client.select()
        fields = b"From: Bob <bob@example.test>\r\nSubject: Forwarded\r\n\r\n"
        assert client.command(b"A", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (subject FROM)])") == (
            b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT FROM)] " + literal(fields) + b")\r\nA OK Fetch completed.\r\n"
        )
        others = (
            b"To: Alice <alice@example.test>\r\nX-Note: folded\r\n continuation\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
        )
        assert client.command(b"B", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS.NOT (From Subject)])") == (
            b"* 1 FETCH (BODY[HEADER.FIELDS.NOT (FROM SUBJECT)] " + literal(others) + b")\r\nB OK Fetch completed.\r\n"
        )
        assert client.command(b"C", b"FETCH 1 (BODY.PEEK[1.MIME] BODY.PEEK[1])") == (
            b"* 1 FETCH (BODY[1.MIME] " + literal(b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")
            + b" BODY[1] " + literal(b"See the attached message.") + b")\r\nC OK Fetch completed.\r\n"
        )
        inner_header = b"From: Carol <carol@example.test>\r\nSubject: Inner\r\n\r\n"
        assert client.command(b"D", b"FETCH 1 (BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT] BODY.PEEK[2])") == (
            b"* 1 FETCH (BODY[2.HEADER] " + literal(inner_header)
            + b" BODY[2.TEXT] " + literal(b"Inner body.")
            + b" BODY[2] " + literal(inner_header + b"Inner body.") + b")\r\nD OK Fetch completed.\r\n"
        )
        assert client.command(b"E", b"FETCH 1 (BODY.PEEK[2.HEADER.FIELDS (Subject)]<2.5> BODY.PEEK[9])") == (
            b'* 1 FETCH (BODY[2.HEADER.FIELDS (SUBJECT)]<2> {5}\r\nbject BODY[9] "")\r\nE OK Fetch completed.\r\n'
        )
        header_end = MULTIPART.index(b"\r\n\r\n") + 4
        assert client.command(b"F", b"FETCH 1 (RFC822.HEADER)") == (
            b"* 1 FETCH (RFC822.HEADER " + literal(MULTIPART[:header_end]) + b")\r\nF OK Fetch completed.\r\n"
        )
        # RFC822.TEXT sets \Seen like BODY[TEXT], and says so.
        assert client.command(b"G", b"FETCH 1 (RFC822.TEXT)") == (
            b"* 1 FETCH (RFC822.TEXT " + literal(MULTIPART[header_end:]) + b" FLAGS (\\Seen))\r\n"
            b"G OK Fetch completed.\r\n"
        )
        # A partial beyond the end is an empty string.
        assert client.command(b"H", b"FETCH 1 (BODY.PEEK[TEXT]<100000.10>)") == (
            b'* 1 FETCH (BODY[TEXT]<100000> "")\r\nH OK Fetch completed.\r\n'
        )

    await run(scenario)


# == LIST, LSUB, CREATE ============================================================================


@ensure
async def test_list_patterns_reference_and_inbox(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        client = site.logged_in()
        assert client.command(b"C", b"CREATE Projects/2026/Q1") == b"C OK Create completed.\r\n"
        assert client.command(b"D", b"CREATE Projects/Old/") == b"D OK Create completed.\r\n"
        assert client.command(b"E", b"CREATE inbox") == b"E NO [ALREADYEXISTS] Mailbox already exists\r\n"
        assert client.command(b"A", b'LIST "" "Projects/%"') == (
            b'* LIST (\\HasChildren) "/" "Projects/2026"\r\n'
            b'* LIST (\\HasNoChildren) "/" "Projects/Old"\r\nA OK List completed.\r\n'
        )
        # The reference is prefixed to the pattern.
        assert client.command(b"B", b'LIST "Projects/" "%"') == (
            b'* LIST (\\HasChildren) "/" "Projects/2026"\r\n'
            b'* LIST (\\HasNoChildren) "/" "Projects/Old"\r\nB OK List completed.\r\n'
        )
        assert client.command(b"F", b'LIST "" "Projects*"') == (
            b'* LIST (\\HasChildren) "/" "Projects"\r\n'
            b'* LIST (\\HasChildren) "/" "Projects/2026"\r\n'
            b'* LIST (\\HasNoChildren) "/" "Projects/2026/Q1"\r\n'
            b'* LIST (\\HasNoChildren) "/" "Projects/Old"\r\nF OK List completed.\r\n'
        )
        # INBOX is case-insensitive; the rest of a name is not.
        assert client.command(b"G", b'LIST "" "iNbOx"') == (
            b'* LIST (\\HasNoChildren) "/" "INBOX"\r\nG OK List completed.\r\n'
        )
        assert client.command(b"H", b'LIST "" "projects"') == b"H OK List completed.\r\n"
        # The empty pattern asks for the delimiter (RFC 3501 6.3.8).
        assert client.command(b"I", b'LIST "" ""') == b'* LIST (\\Noselect) "/" ""\r\nI OK List completed.\r\n'
        assert client.command(b"J", b'LIST "" "*"') == (
            b'* LIST (\\HasNoChildren \\Drafts) "/" "Drafts"\r\n'
            b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n'
            b'* LIST (\\HasNoChildren \\Junk) "/" "Junk"\r\n'
            b'* LIST (\\HasChildren) "/" "Projects"\r\n'
            b'* LIST (\\HasChildren) "/" "Projects/2026"\r\n'
            b'* LIST (\\HasNoChildren) "/" "Projects/2026/Q1"\r\n'
            b'* LIST (\\HasNoChildren) "/" "Projects/Old"\r\n'
            b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"\r\n'
            b'* LIST (\\HasNoChildren \\Trash) "/" "Trash"\r\nJ OK List completed.\r\n'
        )

    await run(scenario)


@ensure
async def test_lsub_and_list_extended_selection_and_return_options(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        client = site.logged_in()
        client.command(b"C", b"CREATE Projects/2026")
        # New accounts have their default mailboxes subscribed.
        assert client.command(b"U", b"UNSUBSCRIBE Junk") == b"U OK Unsubscribe completed.\r\n"
        for name in (b"Gone", b"Projects/2026"):
            assert client.command(b"S", b"SUBSCRIBE " + name) == b"S OK Subscribe completed.\r\n"
        assert client.command(b"A", b'LSUB "" "*"') == (
            b'* LSUB (\\HasNoChildren \\Drafts) "/" "Drafts"\r\n'
            b'* LSUB (\\Noselect) "/" "Gone"\r\n'
            b'* LSUB (\\HasNoChildren) "/" "INBOX"\r\n'
            b'* LSUB (\\HasNoChildren) "/" "Projects/2026"\r\n'
            b'* LSUB (\\HasNoChildren \\Sent) "/" "Sent"\r\n'
            b'* LSUB (\\HasNoChildren \\Trash) "/" "Trash"\r\nA OK Lsub completed.\r\n'
        )
        # "Projects/2026" is subscribed but "Projects" is not: "%" must
        # return "Projects" flagged \Noselect (RFC 3501 6.3.9).
        assert client.command(b"B", b'LSUB "" "P%"') == (
            b'* LSUB (\\Noselect) "/" "Projects"\r\nB OK Lsub completed.\r\n'
        )
        assert client.command(b"C", b'LSUB "Projects/" "%"') == (
            b'* LSUB (\\HasNoChildren) "/" "Projects/2026"\r\nC OK Lsub completed.\r\n'
        )
        assert client.command(b"D", b'LIST (SUBSCRIBED) "" "*"') == (
            b'* LIST (\\HasNoChildren \\Drafts \\Subscribed) "/" "Drafts"\r\n'
            b'* LIST (\\NonExistent \\Subscribed) "/" "Gone"\r\n'
            b'* LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"\r\n'
            b'* LIST (\\HasNoChildren \\Subscribed) "/" "Projects/2026"\r\n'
            b'* LIST (\\HasNoChildren \\Sent \\Subscribed) "/" "Sent"\r\n'
            b'* LIST (\\HasNoChildren \\Trash \\Subscribed) "/" "Trash"\r\nD OK List completed.\r\n'
        )
        assert client.command(b"E", b'LIST (SPECIAL-USE) "" "*"') == (
            b'* LIST (\\HasNoChildren \\Drafts) "/" "Drafts"\r\n'
            b'* LIST (\\HasNoChildren \\Junk) "/" "Junk"\r\n'
            b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"\r\n'
            b'* LIST (\\HasNoChildren \\Trash) "/" "Trash"\r\nE OK List completed.\r\n'
        )
        assert client.command(b"F", b'LIST "" "%" RETURN (SPECIAL-USE SUBSCRIBED CHILDREN)') == (
            b'* LIST (\\HasNoChildren \\Drafts \\Subscribed) "/" "Drafts"\r\n'
            b'* LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"\r\n'
            b'* LIST (\\HasNoChildren \\Junk) "/" "Junk"\r\n'
            b'* LIST (\\HasChildren) "/" "Projects"\r\n'
            b'* LIST (\\HasNoChildren \\Sent \\Subscribed) "/" "Sent"\r\n'
            b'* LIST (\\HasNoChildren \\Trash \\Subscribed) "/" "Trash"\r\nF OK List completed.\r\n'
        )
        assert client.command(b"G", b"UNSUBSCRIBE Gone") == b"G OK Unsubscribe completed.\r\n"
        assert client.command(b"H", b"UNSUBSCRIBE Gone") == b"H NO Not subscribed to Gone\r\n"

    await run(scenario)


# == framing: pipelining, literals, IDLE ==========================================================


@ensure
async def test_pipelined_commands_with_literals_in_one_write(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        validity = uidvalidity(site)
        client = site.client()
        user, password = ALICE.encode(), PASSWORD.encode()
        client.send(
            b"A LOGIN {%d}\r\n%s {%d+}\r\n%s\r\n" % (len(user), user, len(password), password)
            + b"B SELECT INBOX\r\n"
            + b"C APPEND INBOX (\\Flagged) {%d}\r\n%s\r\n" % (len(SIMPLE), SIMPLE)
            + b"D UID FETCH 1 (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"
            + b"E SEARCH SUBJECT {5+}\r\nhello\r\n"
        )
        assert client.until_tagged(b"E") == (
            # Each synchronising literal is acknowledged once its command is read.
            b"+ Ready for literal data\r\n"
            + LOGGED_IN.replace(b"L OK", b"A OK")
            + select_response(0, 0, 1, validity, tag=b"B")
            + b"+ Ready for literal data\r\n"
            + b"* 1 EXISTS\r\n* 1 RECENT\r\n"
            + b"C OK [APPENDUID %d 1] Append completed.\r\n" % validity
            + b"* 1 FETCH (UID 1 FLAGS (\\Flagged \\Recent) BODY[HEADER.FIELDS (SUBJECT)] {24}\r\n"
            + b"Subject: Hello there\r\n\r\n)\r\nD OK Fetch completed.\r\n"
            + b"* SEARCH 1\r\nE OK Search completed.\r\n"
        )

    await run(scenario)


@ensure
async def test_a_literal_split_across_many_tcp_segments(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        client = site.logged_in()
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.send(b"A APPEND INBOX {%d}\r\n" % len(SIMPLE))
        assert client.line() == b"+ Ready for literal data\r\n"
        for start in range(0, len(SIMPLE), 7):
            client.send(SIMPLE[start:start + 7])
            time.sleep(0.001)
        client.send(b"\r")
        time.sleep(0.001)
        client.send(b"\n")
        assert re.fullmatch(rb"A OK \[APPENDUID \d+ 1\] Append completed\.\r\n", client.until_tagged(b"A"))
        client.select()
        assert client.command(b"F", b"FETCH 1 BODY.PEEK[]") == (
            b"* 1 FETCH (BODY[] {%d}\r\n%s)\r\nF OK Fetch completed.\r\n" % (len(SIMPLE), SIMPLE)
        )

    await run(scenario)


@ensure
async def test_a_dropped_connection_mid_literal_leaves_nothing_behind(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        client = site.logged_in()
        size = 3 * 1024 * 1024  # above the spool threshold: it is going to a file
        client.send(b"A APPEND INBOX {%d}\r\n" % size)
        assert client.line() == b"+ Ready for literal data\r\n"
        client.send(b"x" * (size // 2))
        client.close()
        # The server goes on serving, and nothing was stored.
        other = site.logged_in()
        assert other.command(b"N", b"NOOP") == b"N OK NOOP completed.\r\n"
        assert site.uids() == []

    with capture_logs() as logs:
        await run(scenario)
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []


@ensure
async def test_idle_reports_changes_and_done_may_share_a_packet_with_the_next_command(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        site.deliver(SIMPLE)
        site.take_recent()
        idler, other = site.logged_in(), site.logged_in()
        idler.select()
        other.select()
        idler.send(b"I IDLE\r\n")
        assert idler.line() == b"+ idling\r\n"
        site.deliver(SIMPLE)
        assert idler.line() == b"* 2 EXISTS\r\n"
        assert idler.line() == b"* 1 RECENT\r\n"
        other.command(b"A", b"STORE 1 +FLAGS.SILENT (\\Flagged)")
        assert idler.line() == b"* 1 FETCH (FLAGS (\\Flagged) UID 1)\r\n"
        other.command(b"B", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        assert idler.line() == b"* 1 FETCH (FLAGS (\\Deleted \\Flagged) UID 1)\r\n"
        other.command(b"C", b"EXPUNGE")
        assert idler.line() == b"* 1 EXPUNGE\r\n"
        idler.send(b"DONE\r\nN NOOP\r\n")
        assert idler.until_tagged(b"N") == b"I OK Idle completed.\r\nN OK NOOP completed.\r\n"
        # IDLE without a selected mailbox is allowed too.
        assert idler.command(b"U", b"UNSELECT") == b"U OK Unselect completed.\r\n"
        idler.send(b"J IDLE\r\n")
        assert idler.line() == b"+ idling\r\n"
        idler.send(b"done\r\n")
        assert idler.until_tagged(b"J") == b"J OK Idle completed.\r\n"

    await run(scenario)


# == the selected mailbox is deleted, timeouts ========================================================


@ensure
async def test_deletion_of_the_selected_mailbox_by_another_session_says_bye(make_site: MakeSite) -> None:
    site = await make_site()
    bye = b"* BYE Selected mailbox was deleted, have to disconnect.\r\n"

    def delete_behind_the_bus(name: str) -> None:
        """Remove a mailbox in the store only: no event, as when the bus was down."""
        assert site.node is not None
        node = site.node

        async def delete() -> None:
            box = await node.store.get_mailbox(ALICE, name)
            await node.store.delete_mailbox(box.id)

        site.call(delete)

    def scenario() -> None:
        other = site.logged_in()
        for name in (b"Doomed", b"Doomed2", b"Doomed3"):
            other.command(b"C", b"CREATE " + name)
        idler, busy, unaware = site.logged_in(), site.logged_in(), site.logged_in()
        idler.select(b"Doomed")
        busy.select(b"Doomed2")
        unaware.select(b"Doomed3")
        idler.send(b"I IDLE\r\n")
        idler.line()
        assert other.command(b"D", b"DELETE Doomed") == b"D OK Delete completed.\r\n"
        assert idler.rest() == bye
        assert other.command(b"E", b"DELETE Doomed2") == b"E OK Delete completed.\r\n"
        # Not idling: at the end of its next command, with no tagged reply after the BYE.
        busy.send(b"N NOOP\r\nM NOOP\r\n")
        assert busy.rest() == bye
        # No event at all: the next sync finds the mailbox gone.
        delete_behind_the_bus("Doomed3")
        unaware.send(b"N NOOP\r\n")
        assert unaware.rest() == bye

    with capture_logs() as logs:
        await run(scenario)
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []


@ensure
async def test_inactivity_timeouts(make_site: MakeSite) -> None:
    site = await make_site(imap=ImapConfig(login_timeout=0.2, idle_timeout=0.3))
    bye = b"* BYE Disconnected for inactivity.\r\n"

    def scenario() -> None:
        started = time.monotonic()
        assert site.client().rest() == bye  # before login
        assert time.monotonic() - started >= 0.2
        client = site.logged_in()
        client.select()
        started = time.monotonic()
        assert client.rest() == bye  # after login
        assert time.monotonic() - started >= 0.3
        client = site.logged_in()
        client.select()
        client.send(b"I IDLE\r\n")
        assert client.line() == b"+ idling\r\n"
        assert client.rest() == bye  # in IDLE (RFC 2177: clients re-IDLE every 29 minutes)

    with capture_logs() as logs:
        await run(scenario)
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []


@ensure
async def test_a_client_that_reads_a_large_fetch_slowly_is_not_timed_out(make_site: MakeSite) -> None:
    site = await make_site(imap=ImapConfig(idle_timeout=0.2))
    big = SIMPLE + b"0123456789abcdef" * (4 * 1024 * 1024 // 16) + b"\r\n"

    def scenario() -> None:
        site.deliver(big)
        client = site.client(receive_buffer=32 * 1024)
        sock = client.sock
        client.login()
        client.select()
        client.send(b"F FETCH 1 BODY.PEEK[]\r\n")
        received = b""
        deadline = time.monotonic() + 10
        while b"F OK" not in received and time.monotonic() < deadline:
            # A slow reader: at most a small receive buffer every 10 ms, so the
            # transfer spans several timeout periods without any input.
            time.sleep(0.01)
            try:
                chunk = sock.recv(256 * 1024)
            except socket.timeout:
                continue
            if not chunk:
                break
            received += chunk
        response, done, after = received.partition(b"F OK Fetch completed.\r\n")
        assert response == b"* 1 FETCH (BODY[] {%d}\r\n%s)\r\n" % (len(big), big)
        # Only once the answer is complete may inactivity end the session.
        assert after in (b"", b"* BYE Disconnected for inactivity.\r\n")

    await run(scenario)


@ensure
async def test_a_client_that_stops_reading_a_fetch_is_dropped_without_a_bye_in_the_literal(
    make_site: MakeSite,
) -> None:
    site = await make_site(imap=ImapConfig(idle_timeout=0.2))
    big = SIMPLE + b"0123456789abcdef" * (8 * 1024 * 1024 // 16) + b"\r\n"

    def scenario() -> None:
        site.deliver(big)
        client = site.client(receive_buffer=32 * 1024)
        sock = client.sock
        client.login()
        client.select()
        client.send(b"F FETCH 1 BODY.PEEK[]\r\n")
        time.sleep(0.8)  # several timeout periods without reading anything
        received = b""
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
        complete = b"* 1 FETCH (BODY[] {%d}\r\n%s)\r\nF OK Fetch completed.\r\n" % (len(big), big)
        # Cut short, and what did arrive is exactly the start of the response.
        assert 0 < len(received) < len(complete)
        assert complete.startswith(received)

    await run(scenario)


@ensure
async def test_an_overlong_command_line_gets_bye(make_site: MakeSite) -> None:
    site = await make_site()

    def scenario() -> None:
        client = site.logged_in()
        client.send(b"A FETCH " + b"1," * 40000 + b"1 FLAGS\r\n")
        assert client.rest() == b"* BYE Command line too long.\r\n"

    await run(scenario)
