"""The SMTP server over real TCP on 127.0.0.1, driven by smtplib, raw sockets and swaks.

Clients run in threads while the server runs in the test reactor.  Tests
parametrised with ``SERVERS`` also run against plain Twisted ESMTP as a
strict xfail: they check a fix, and they fail without it.
"""

from __future__ import annotations

import os
import time
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet.protocol import ServerFactory
from twisted.internet.utils import getProcessOutputAndValue

from tests.helpers.smtp import (
    ALICE,
    BOB,
    CAROL,
    HOSTNAME,
    MESSAGE,
    PASSWORD,
    SENDER,
    SERVERS,
    RawClient,
    Start,
    codes,
    in_thread,
    wait_for,
)
from twisted_mail_cluster.config import DEFAULT_MAX_MESSAGE_SIZE, SmtpConfig
from twisted_mail_cluster.smtp.server import SMTPFactory, SMTPServer
from twisted_mail_cluster.store.errors import TemporaryFailure

ensure = pytest_twisted.ensureDeferred
DATA_GO = "354 End data with <CR><LF>.<CR><LF>"


def scenario(server: Any, script: Any) -> Any:
    """Run ``script(client)`` on a fresh raw connection, in a thread."""

    def run() -> Any:
        client = server.raw()
        try:
            return script(client)
        finally:
            client.close()

    return in_thread(run)


def envelope(client: RawClient) -> list[str]:
    """MAIL, RCPT alice, DATA, one at a time (not pipelined)."""
    return [
        client.command(b"MAIL FROM:<x@remote.test>"),
        client.command(b"RCPT TO:<alice@example.test>"),
        client.command(b"DATA"),
    ]


# -- EHLO ------------------------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_ehlo_advertises_extensions_and_auth_for_trusted_peer(start: Start, server: str) -> None:
    """Twisted advertised only AUTH and STARTTLS (smtp.py ``ESMTP.extensions``)."""
    site = await start(server)
    greeting, ehlo = await scenario(site, lambda c: (c.greeting, c.hello()))
    assert [line[4:] for line in ehlo[1:]] == [
        "PIPELINING",
        f"SIZE {DEFAULT_MAX_MESSAGE_SIZE}",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "AUTH PLAIN LOGIN",
    ]
    assert ehlo[0] == f"250-{HOSTNAME}"
    assert [line[:4] for line in ehlo] == ["250-"] * 5 + ["250 "]
    assert greeting == [f"220 {HOSTNAME} ESMTP twisted-mail-cluster"]


@ensure
async def test_untrusted_peer_is_offered_no_auth_and_refused_it(start: Start) -> None:
    site = await start(trusted=False)

    def script(client: RawClient) -> tuple[list[str], str, str]:
        return client.hello(), client.command(b"AUTH PLAIN AGFsaWNlAHB3"), client.command(b"NOOP")

    ehlo, auth, noop = await scenario(site, script)
    assert [line[4:] for line in ehlo[1:]] == [
        "PIPELINING", f"SIZE {DEFAULT_MAX_MESSAGE_SIZE}", "8BITMIME", "ENHANCEDSTATUSCODES",
    ]
    assert auth == "538 5.7.11 Encryption required for requested authentication mechanism"
    assert noop == "250 2.0.0 Ok"
    assert site.node.guard.failures("127.0.0.1") == 0


# -- delivery -----------------------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_three_recipients_share_one_stored_copy(start: Start, server: str) -> None:
    """Twisted makes one IMessage, hence one delivery, per recipient (smtp.py do_DATA)."""
    site = await start(server)

    def send() -> tuple[int, bytes]:
        with site.smtp() as client:
            client.ehlo()
            client.mail(SENDER)
            for rcpt in (ALICE, BOB.upper(), CAROL):
                assert client.rcpt(rcpt)[0] == 250
            return client.data(MESSAGE)

    with capture_logs() as logs:
        code, text = await in_thread(send)
    assert code == 250
    assert site.store.deliveries == 1  # one deliver call for all three
    copies = [await site.inbox_entries(user) for user in (ALICE, BOB, CAROL)]
    assert [len(c) for c in copies] == [1, 1, 1]
    infos = [c[0][0] for c in copies]
    assert len({info.blob_id for info in infos}) == 1  # the content is stored once
    assert len({info.message_id for info in infos}) == 3

    assert text.startswith(b"2.0.0 Ok: stored as ")
    transaction_id = text.split()[-1].decode()
    content = copies[0][0][1]
    assert content.endswith(MESSAGE)
    lines = content[: len(content) - len(MESSAGE)].split(b"\r\n")
    assert lines[0] == f"Return-Path: <{SENDER}>".encode()
    assert lines[1] == b"Received: from client.example ([127.0.0.1])"
    by = f"\tby {HOSTNAME} (twisted-mail-cluster) with ESMTP id {transaction_id}; ".encode()
    assert lines[2].startswith(by)  # three recipients: no "for" clause
    assert abs(parsedate_to_datetime(lines[2][len(by):].decode()).timestamp() - time.time()) < 60
    assert lines[3:] == [b""]

    [delivered] = [e for e in logs if e["event"] == "smtp.delivered"]
    assert delivered["recipients"] == 3
    assert delivered["sender"] == SENDER
    assert delivered["size"] == len(content)
    assert delivered["id"] == transaction_id
    assert sorted(delivered["message_ids"]) == sorted(str(i.message_id) for i in infos)


@ensure
async def test_single_recipient_trace_fields_and_dot_unstuffing(start: Start) -> None:
    site = await start()

    def script(client: RawClient) -> list[str]:
        client.hello()
        client.send(b"MAIL FROM:<>\r\nRCPT TO:<Alice@Example.TEST>\r\nDATA\r\n")
        replies = client.replies(3)
        # No header at all, a stuffed dot line, a lone stuffed dot.
        client.send(b"first body line\r\n..hidden\r\n..\r\nlast\r\n.\r\n")
        return replies + client.replies(1)

    replies = await scenario(site, script)
    assert replies[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", DATA_GO]
    assert replies[3].startswith("250 2.0.0 Ok: stored as ")
    [content] = await site.inbox(ALICE)
    lines = content.split(b"\r\n")
    assert lines[0] == b"Return-Path: <>"
    assert lines[1] == b"Received: from client.example ([127.0.0.1])"
    assert lines[2] == f"\tby {HOSTNAME} (twisted-mail-cluster) with ESMTP id {replies[3][-12:]}".encode()
    assert lines[3].startswith(b"\tfor <Alice@Example.TEST>; ")
    # A body without a header gets a blank line after our fields (RFC 5322 2.1).
    assert lines[4:] == [b"", b"first body line", b".hidden", b".", b"last", b""]


@ensure
async def test_bare_lf_text_is_normalised_and_only_crlf_dot_crlf_ends_data(start: Start) -> None:
    """LF-only text (smtplib sends bytes as they are) is read line by line, and
    a dot next to a bare LF never ends the data: no command can be smuggled."""
    site = await start()

    def script(client: RawClient) -> list[str]:
        client.hello()
        replies = envelope(client)
        client.send(
            b"Subject: lf\nA\n..dot\n"
            b"hello\n.\r\nMAIL FROM:<smuggled@remote.test>\r\n"  # LF . CRLF: text
            b"\r\n.\nRCPT TO:<bob@example.test>\r\n"  # CRLF . LF: text
            b"end\r\n.\r\n"
        )
        replies += client.replies(1)
        assert client.nothing_within(0.2)
        return replies

    replies = await scenario(site, script)
    assert codes(replies) == [250, 250, 354, 250]
    [stored] = await site.inbox(ALICE)
    assert stored.split(b"\r\n", 4)[4] == (
        b"Subject: lf\r\nA\r\n.dot\r\nhello\r\n\r\nMAIL FROM:<smuggled@remote.test>\r\n"
        b"\r\n\r\nRCPT TO:<bob@example.test>\r\nend\r\n"
    )
    assert await site.inbox(BOB) == []


@ensure
async def test_helo_gives_smtp_and_auth_gives_esmtpa(start: Start) -> None:
    site = await start()

    def send(authenticate: bool) -> None:
        with site.smtp() as client:
            if authenticate:
                client.login(ALICE, PASSWORD)
                client.sendmail(ALICE, [BOB], MESSAGE)
            else:
                client.helo()
                client.sendmail(SENDER, [BOB], MESSAGE)

    await in_thread(send, False)
    await in_thread(send, True)
    first, second = await site.inbox(BOB)
    assert b") with SMTP id " in first.split(b"\r\n")[2]
    assert b") with ESMTPA id " in second.split(b"\r\n")[2]
    assert second.startswith(f"Return-Path: <{ALICE}>\r\n".encode())


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_duplicate_recipients_are_delivered_once(start: Start, server: str) -> None:
    site = await start(server)

    def send() -> dict[str, Any]:
        with site.smtp() as client:
            return client.sendmail(SENDER, [ALICE, "ALICE@example.test", ALICE], MESSAGE)

    assert await in_thread(send) == {}
    assert len(await site.inbox(ALICE)) == 1


# -- refusals ---------------------------------------------------------------------------------


@ensure
async def test_unknown_user_and_relay_are_refused(start: Start) -> None:
    site = await start()

    def script(client: RawClient) -> list[str]:
        client.hello()
        client.send(
            b"MAIL FROM:<sender@remote.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\n"
            b"RCPT TO:<someone@elsewhere.test>\r\n"
            b"DATA\r\n"
        )
        return client.replies(4)

    with capture_logs() as logs:
        replies = await scenario(site, script)
    assert replies == [
        "250 2.1.0 Ok",
        "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown",
        "550 5.7.1 <someone@elsewhere.test>: Relay access denied: this server only accepts"
        " mail for its own domains; outbound delivery is not available in this version",
        "554 5.5.1 Error: no valid recipients",
    ]
    rejected = [(e["reason"], e["recipient"]) for e in logs if e["event"] == "smtp.rejected"]
    assert rejected == [
        ("unknown user", "nobody@example.test"),
        ("relay denied", "someone@elsewhere.test"),
    ]


@ensure
async def test_postmaster_is_accepted_and_routed(start: Start) -> None:
    """RFC 5321 4.5.1: "Postmaster" with and without a local domain MUST be accepted."""
    unrouted = await start()

    def refused(client: RawClient) -> list[str]:
        client.hello()
        client.send(b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<Postmaster>\r\n")
        return client.replies(2)

    replies = await scenario(unrouted, refused)
    assert replies[1].startswith("550 5.1.1 ")  # nobody to read it: refuse rather than lose it

    site = await start(smtp=SmtpConfig(postmaster=BOB))

    def accepted(client: RawClient) -> list[str]:
        client.hello()
        client.send(
            b"MAIL FROM:<sender@remote.test>\r\n"
            b"RCPT TO:<Postmaster>\r\n"
            b"RCPT TO:<POSTMASTER@example.test>\r\n"
            b"DATA\r\n"
        )
        replies = client.replies(4)
        client.send(b"Subject: to the postmaster\r\n\r\nhello\r\n.\r\n")
        return replies + client.replies(1)

    replies = await scenario(site, accepted)
    assert [r[:3] for r in replies] == ["250", "250", "250", "354", "250"]
    (stored,) = await site.inbox(BOB)  # both names are one mailbox: stored once
    assert b"Subject: to the postmaster" in stored


@ensure
async def test_authenticated_user_cannot_relay_either(start: Start) -> None:
    site = await start()

    def send() -> tuple[int, bytes]:
        with site.smtp() as client:
            client.login(ALICE, PASSWORD)
            client.mail(ALICE)
            return client.rcpt("friend@elsewhere.test")

    code, text = await in_thread(send)
    assert code == 550
    assert text == (
        b"5.7.1 <friend@elsewhere.test>: Relay access denied: this server only accepts"
        b" mail for its own domains; outbound delivery is not available in this version"
    )


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_mail_from_parameters(start: Start, server: str) -> None:
    """Twisted ignored every parameter, SIZE=999999999 included (smtp.py do_MAIL)."""
    site = await start(server)

    def script(client: RawClient) -> list[str]:
        client.hello()
        answers = []
        for params in (
            f"SIZE={DEFAULT_MAX_MESSAGE_SIZE + 1}",
            "SIZE=12x",
            "BODY=BINARYMIME",
            "SMTPUTF8",
            "FOO=bar",
            "SIZE=100 SIZE=100",
            f"BODY=8bitmime SIZE={DEFAULT_MAX_MESSAGE_SIZE}",
            "",  # a transaction is open: nested
        ):
            answers.append(client.command(f"MAIL FROM:<{SENDER}> {params}".rstrip().encode()))
        answers.append(client.command(b"RSET"))
        answers.append(client.command(b"MAIL FROM:<> AUTH=<>"))
        return answers

    with capture_logs() as logs:
        answers = await scenario(site, script)
    assert codes(answers) == [552, 501, 501, 555, 555, 501, 250, 503, 250, 250]
    assert answers == [
        f"552 5.3.4 Message size exceeds fixed limit of {DEFAULT_MAX_MESSAGE_SIZE} bytes",
        "501 5.5.4 Bad SIZE parameter",
        "501 5.5.4 Bad BODY parameter",
        "555 5.5.4 Unsupported option: SMTPUTF8",
        "555 5.5.4 Unsupported option: FOO",
        "501 5.5.4 Duplicate parameter SIZE",
        "250 2.1.0 Ok",
        "503 5.5.1 Error: nested MAIL command",
        "250 2.0.0 Ok",
        "250 2.1.0 Ok",
    ]
    assert [e["code"] for e in logs if e["event"] == "smtp.rejected"][0] == 552


@ensure
async def test_rcpt_parameters_are_refused(start: Start) -> None:
    site = await start()

    def script(client: RawClient) -> list[str]:
        client.hello()
        client.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test> NOTIFY=NEVER\r\n")
        return client.replies(2)

    assert await scenario(site, script) == ["250 2.1.0 Ok", "555 5.5.4 Unsupported option: NOTIFY"]


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_oversize_message_is_refused_at_the_dot_and_nothing_stored(
    start: Start, server: str
) -> None:
    limit = 2000
    site = await start(server, smtp=SmtpConfig(max_message_size=limit))

    def script(client: RawClient) -> list[str]:
        client.hello()
        replies = envelope(client)
        client.send(b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 40 + b".\r\n")  # 3216 bytes
        replies += client.replies(1)
        # The connection is still usable, and a message within the limit goes through.
        replies += envelope(client)
        client.send(b"Subject: small\r\n\r\nok\r\n.\r\n")
        return replies + client.replies(1)

    replies = await scenario(site, script)
    assert codes(replies) == [250, 250, 354, 552, 250, 250, 354, 250]
    assert replies[3] == f"552 5.3.4 Error: message file too big (limit {limit} bytes)"
    assert replies[7].startswith("250 2.0.0 Ok: stored as ")
    [stored] = await site.inbox(ALICE)
    assert stored.endswith(b"Subject: small\r\n\r\nok\r\n")
    assert site.store.deliveries == 1


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_too_many_recipients(start: Start, server: str) -> None:
    site = await start(server, smtp=SmtpConfig(max_recipients=2))

    def script(client: RawClient) -> list[str]:
        client.hello()
        client.send(
            b"MAIL FROM:<x@remote.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\n"  # a repeat is not one more
            b"RCPT TO:<carol@example.test>\r\n"
        )
        return client.replies(5)

    replies = await scenario(site, script)
    assert codes(replies) == [250, 250, 250, 250, 452]
    assert replies[4] == "452 4.5.3 Error: too many recipients"


# -- pipelining ----------------------------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_pipelined_replies_come_back_in_order(start: Start, server: str) -> None:
    """Twisted #8126: a slow RCPT lookup let later replies overtake it.

    Alice's lookup is made slow, so on plain Twisted her 250 comes after the
    unknown user's 550, and DATA is answered before any recipient was accepted.
    """
    site = await start(server)
    site.store.lookup_delays[ALICE] = 0.2

    def script(client: RawClient) -> list[str]:
        client.hello()
        client.send(
            b"MAIL FROM:<x@remote.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\n"
            b"DATA\r\n"
        )
        replies = client.replies(5)
        client.send(MESSAGE + b".\r\nRSET\r\nQUIT\r\n")
        replies += client.replies(3)
        return replies, client.closed()

    replies, closed = await scenario(site, script)
    assert codes(replies) == [250, 250, 550, 250, 354, 250, 250, 221]
    assert closed
    assert replies == [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown",
        "250 2.1.5 Ok",
        DATA_GO,
        replies[5],
        "250 2.0.0 Ok",
        "221 2.0.0 Bye",
    ]
    assert replies[5].startswith("250 2.0.0 Ok: stored as ")
    assert len(await site.inbox(ALICE)) == 1
    assert len(await site.inbox(BOB)) == 1


# -- store failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("error", [TemporaryFailure("cluster unavailable"), RuntimeError("bug")])
@ensure
async def test_store_failure_is_451_and_nothing_stored(
    start: Start, server: str, error: Exception
) -> None:
    """Twisted answered 550 for any failure (smtp.py _messageHandled): a bounce for a hiccup."""
    site = await start(server)
    site.store.deliver_error = error

    def send() -> tuple[int, bytes]:
        with site.smtp() as client:
            client.ehlo()
            client.mail(SENDER)
            client.rcpt(ALICE)
            client.rcpt(BOB)
            return client.data(MESSAGE)

    with capture_logs() as logs:
        code, text = await in_thread(send)
    assert code == 451
    assert text == b"4.3.0 Error: temporary failure storing the message, try again later"
    assert await site.inbox(ALICE) == []
    assert await site.inbox(BOB) == []
    [failure] = [e for e in logs if e["event"] == "smtp.delivery_failed"]
    assert failure["log_level"] == "error"
    assert failure["recipients"] == 2
    assert failure["exception"].startswith("Traceback")
    assert f"{type(error).__name__}: " in failure["exception"]


@ensure
async def test_lookup_failure_is_451(start: Start) -> None:
    site = await start()
    site.store.lookup_error = TemporaryFailure("timeout")

    def send() -> tuple[int, bytes]:
        with site.smtp() as client:
            client.ehlo()
            client.mail(SENDER)
            return client.rcpt(ALICE)

    with capture_logs() as logs:
        assert await in_thread(send) == (451, b"4.3.0 Temporary lookup failure, try again later")
    [failure] = [e for e in logs if e["event"] == "smtp.lookup_failed"]
    assert "TemporaryFailure: timeout" in failure["exception"]


# -- lines and commands -----------------------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_overlong_data_line_is_refused_and_never_read_as_commands(
    start: Start, server: str
) -> None:
    """Twisted went back to command mode mid-message (smtp.py lineLengthExceeded)."""
    site = await start(server, smtp=SmtpConfig(max_line_length=1000))

    def script(client: RawClient) -> list[str]:
        client.hello()
        replies = envelope(client)
        client.send(b"Subject: long\r\n\r\n")
        client.send(b"z" * 30000)  # no CRLF yet, longer than any limit...
        client.send(b"RSET\r")  # ...its tail looks like a command, and the CRLF is split
        client.send(b"\nQUIT\r\nMAIL FROM:<evil@remote.test>\r\n" + b"w" * 998 + b"\r\n.\r\n")
        replies += client.replies(1)
        assert client.nothing_within(0.2)  # one reply for all of it
        replies.append(client.command(b"RSET"))  # still usable
        # A line of exactly the limit (998 + CRLF = 1000 octets) is fine.
        replies += envelope(client)
        client.send(b"Subject: ok\r\n\r\n" + b"v" * 998 + b"\r\n.\r\n")
        return replies + client.replies(1)

    replies = await scenario(site, script)
    assert codes(replies) == [250, 250, 354, 554, 250, 250, 250, 354, 250]
    assert replies[3] == (
        "554 5.6.0 Error: message has a line longer than 1000 bytes (RFC 5321 4.5.3.1.6)"
    )
    [stored] = await site.inbox(ALICE)
    assert stored.endswith(b"Subject: ok\r\n\r\n" + b"v" * 998 + b"\r\n")


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_noop_vrfy_and_bad_bytes_keep_the_session(start: Start, server: str) -> None:
    """RFC 5321 4.5.1 requires NOOP and VRFY; Twisted had neither, and a
    non-ASCII command raised UnicodeDecodeError in lookupMethod, dropping the connection."""
    site = await start(server)

    def script(client: RawClient) -> list[str]:
        client.hello()
        return [
            client.command(b"NOOP"),
            client.command(b"VRFY alice"),
            client.command(b"NOOP \xff\xfe"),
            client.command(b"\xc3\xa9HLO x"),
            client.command(b"RSET"),
        ]

    replies = await scenario(site, script)
    assert codes(replies) == [250, 252, 500, 500, 250]
    assert replies == [
        "250 2.0.0 Ok",
        "252 2.5.2 Cannot VRFY user, but will accept message for local users",
        "500 5.5.2 Error: bad syntax",
        "500 5.5.2 Error: bad syntax",
        "250 2.0.0 Ok",
    ]


@ensure
async def test_commands_and_sequence_errors(start: Start) -> None:
    site = await start(smtp=SmtpConfig(max_line_length=1000))

    def script(client: RawClient) -> list[str]:
        answers = [
            client.command(b"MAIL FROM:<x@remote.test>"),
            client.command(b"HELO"),
            client.command(b"HELO client.example"),
            client.command(b"RCPT TO:<alice@example.test>"),
            client.command(b"DATA"),
            client.command(b"MAIL FROM:<x@remote.test>"),
            client.command(b"DATA"),
            client.command(b"RSET"),
            client.command(b"MAIL FROM:x@@"),
            client.command(b"STARTTLS"),
            client.command(b"BOGUS"),
            client.command(b""),
            client.command(b"EHLO evil\nBcc: x@y"),  # a bare LF never reaches a header
            client.command(b"NOOP " + b"n" * 2000),
            client.command(b"QUIT"),
        ]
        assert client.closed()
        return answers

    assert await scenario(site, script) == [
        "503 5.5.1 Error: send HELO/EHLO first",
        "501 5.5.4 Syntax: HELO hostname",
        f"250 {HOSTNAME}",
        "503 5.5.1 Error: need MAIL command",
        "503 5.5.1 Error: need MAIL command",
        "250 2.1.0 Ok",
        "503 5.5.1 Error: need RCPT command",
        "250 2.0.0 Ok",
        "501 5.1.7 Bad sender address syntax",
        "502 5.5.1 Error: STARTTLS is not available",
        "502 5.5.2 Error: command not recognized",
        "500 5.5.2 Error: bad syntax",
        "500 5.5.2 Error: bad syntax",
        "500 5.5.2 Error: line too long",
        "221 2.0.0 Bye",
    ]


@ensure
async def test_a_bug_in_a_command_closes_with_421_and_a_logged_traceback(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = await start()

    def broken(self: SMTPServer, rest: bytes) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(SMTPServer, "do_NOOP", broken)

    def script(client: RawClient) -> tuple[str, bool]:
        return client.command(b"NOOP"), client.closed()

    with capture_logs() as logs:
        assert await scenario(site, script) == (
            f"421 4.3.0 {HOSTNAME} Error: internal error, closing connection", True
        )
    [error] = [e for e in logs if e["event"] == "smtp.internal_error"]
    assert "KeyError: 'bug'" in error["exception"]


@ensure
async def test_idle_connection_is_closed_with_421(start: Start) -> None:
    site = await start(clock=True, smtp=SmtpConfig(timeout=30.0))
    assert site.clock is not None
    client = await in_thread(site.raw)
    assert await in_thread(client.command, b"NOOP") == "250 2.0.0 Ok"
    site.clock.advance(29.9)
    assert await in_thread(client.nothing_within, 0.1)
    site.clock.advance(0.1)
    assert await in_thread(client.replies, 1) == [f"421 4.4.2 {HOSTNAME} Error: timeout exceeded"]
    assert await in_thread(client.closed)


@ensure
async def test_no_idle_timeout_while_the_server_makes_the_client_wait(start: Start) -> None:
    site = await start(clock=True, smtp=SmtpConfig(timeout=30.0))
    assert site.clock is not None
    site.store.lookup_delays[ALICE] = 0.5  # long enough to advance the clock meanwhile
    client = await in_thread(site.raw)
    await in_thread(client.hello)
    await in_thread(client.send, b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert await in_thread(client.replies, 1) == ["250 2.1.0 Ok"]
    site.clock.advance(60)  # the lookup is still running: that is not the client idling
    assert await in_thread(client.replies, 1) == ["250 2.1.5 Ok"]
    site.clock.advance(29.9)
    assert await in_thread(client.command, b"NOOP") == "250 2.0.0 Ok"


@ensure
async def test_connection_open_and_close_are_logged(start: Start) -> None:
    site = await start()

    def script(client: RawClient) -> int:
        client.command(b"QUIT")
        return int(client.sock.getsockname()[1])

    with capture_logs() as logs:
        port = await scenario(site, script)
        await wait_for(lambda: any(e["event"] == "connection.close" for e in logs))
    events = [
        {k: e[k] for k in ("event", "protocol", "remote", "port", "local_port")}
        for e in logs
        if e["event"].startswith("connection.")
    ]
    listener = site.port
    assert events == [
        {"event": "connection.open", "protocol": "smtp", "remote": "127.0.0.1", "port": port, "local_port": listener},
        {"event": "connection.close", "protocol": "smtp", "remote": "127.0.0.1", "port": port, "local_port": listener},
    ]


def test_factory_is_a_server_factory() -> None:
    assert issubclass(SMTPFactory, ServerFactory)


# -- a real client -------------------------------------------------------------------------------------


async def swaks(port: int, *args: str) -> tuple[bytes, int]:
    out, err, code = await getProcessOutputAndValue(
        "/usr/bin/swaks",
        ["--server", "127.0.0.1", "--port", str(port), "--helo", "client.example", *args],
        env=dict(os.environ),
    )
    return out + err, code


@ensure
async def test_swaks_pipelined_delivery(start: Start) -> None:
    site = await start()
    output, code = await swaks(
        site.port, "--from", SENDER, "--to", f"{ALICE},{BOB}", "--pipeline",
        "--h-Subject", "probe", "--body", "hello from swaks",
    )
    assert code == 0, output.decode()
    assert b"<** " not in output  # how swaks marks an error reply
    for user in (ALICE, BOB):
        [stored] = await site.inbox(user)
        assert stored.startswith(f"Return-Path: <{SENDER}>\r\nReceived: from client.example".encode())
        assert b"\r\nSubject: probe\r\n" in stored
        assert b"\r\n\r\nhello from swaks\r\n" in stored


@ensure
async def test_swaks_auth_login(start: Start) -> None:
    site = await start()
    output, code = await swaks(
        site.port, "--from", ALICE, "--to", BOB,
        "--auth", "LOGIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
        "--body", "signed in",
    )
    assert code == 0, output.decode()
    [stored] = await site.inbox(BOB)
    assert b") with ESMTPA id " in stored
    assert b"\r\n\r\nsigned in\r\n" in stored
