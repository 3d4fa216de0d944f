"""SMTP AUTH PLAIN/LOGIN through the cred portal, the login guard's delay, and what is logged."""

from __future__ import annotations

import base64
import smtplib
import time

import pytest
import pytest_twisted
from structlog.testing import capture_logs

from tests.helpers.smtp import (
    ALICE,
    BOB,
    PASSWORD,
    SERVERS,
    RawClient,
    Start,
    codes,
    in_thread,
    wait_for,
)

ensure = pytest_twisted.ensureDeferred


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


@ensure
async def test_auth_plain_success_is_logged_without_password(start: Start) -> None:
    site = await start()

    def login() -> tuple[int, bytes]:
        with site.smtp() as client:
            client.ehlo()
            return client.login(ALICE, PASSWORD)

    with capture_logs() as logs:
        assert await in_thread(login) == (235, b"2.7.0 Authentication successful")
    [success] = [e for e in logs if e["event"] == "login.success"]
    assert (success["user"], success["remote"], success["protocol"]) == (ALICE, "127.0.0.1", "smtp")
    assert PASSWORD not in repr(logs)


@ensure
async def test_auth_login_prompts_and_initial_response(start: Start) -> None:
    site = await start()

    def script(client: RawClient) -> list[str]:
        client.hello()
        return [
            client.command(b"AUTH LOGIN"),
            client.command(b64(ALICE)),
            client.command(b64(PASSWORD)),
            client.command(b"AUTH PLAIN"),  # once is enough
        ]

    def with_initial_response(client: RawClient) -> list[str]:
        client.hello()
        return [client.command(b"AUTH LOGIN " + b64(ALICE)), client.command(b64(PASSWORD))]

    assert await _scenario(site, script) == [
        "334 VXNlcm5hbWU6",  # "Username:"
        "334 UGFzc3dvcmQ6",  # "Password:"
        "235 2.7.0 Authentication successful",
        "503 5.5.1 Error: already authenticated",
    ]
    assert await _scenario(site, with_initial_response) == [
        "334 UGFzc3dvcmQ6",
        "235 2.7.0 Authentication successful",
    ]


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_auth_failure_waits_for_the_guard_delay(start: Start, server: str) -> None:
    """Twisted answered 535 at once; ours only once the node's clock passed the delay."""
    site = await start(server, clock=True)
    assert site.clock is not None
    client = await in_thread(site.raw)
    await in_thread(client.hello)
    with capture_logs() as logs:
        # NOOP is pipelined: it must wait too, or the delay would slow nobody down.
        await in_thread(client.send, b"AUTH PLAIN " + b64(f"\0{ALICE}\0wrong") + b"\r\nNOOP\r\n")
        assert await in_thread(client.nothing_within, 0.3)
        await wait_for(lambda: site.node.guard.failures("127.0.0.1") == 1)
        site.clock.advance(0.049)
        assert await in_thread(client.nothing_within, 0.1)
        site.clock.advance(0.001)
        replies = await in_thread(client.replies, 2)
    assert replies == ["535 5.7.8 Error: authentication failed", "250 2.0.0 Ok"]
    [failure] = [e for e in logs if e["event"] == "login.failure"]
    assert (failure["user"], failure["remote"], failure["delay"]) == (ALICE, "127.0.0.1", 0.05)
    assert "wrong" not in repr(logs)


@ensure
async def test_failures_count_up_and_success_resets_them(start: Start) -> None:
    site = await start()

    def login(user: str, password: str) -> int:
        """One PLAIN attempt (smtplib's login() would go on to try LOGIN too)."""
        with site.smtp() as client:
            client.ehlo()
            client.user, client.password = user, password
            try:
                return int(client.auth("PLAIN", client.auth_plain)[0])
            except smtplib.SMTPAuthenticationError as e:
                return int(e.smtp_code)

    began = time.monotonic()
    assert await in_thread(login, ALICE, "wrong") == 535
    assert time.monotonic() - began >= 0.05
    assert await in_thread(login, "nobody@example.test", PASSWORD) == 535
    assert site.node.guard.failures("127.0.0.1") == 2
    assert await in_thread(login, ALICE, PASSWORD) == 235
    assert site.node.guard.failures("127.0.0.1") == 0


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_bad_plain_responses_keep_the_session(start: Start, server: str) -> None:
    """Twisted: a PLAIN response without two NULs raised IllegalClientResponse out of
    state_AUTH (connection dropped), and an authorization identity was ignored."""
    site = await start(server)
    as_bob = b64(f"{BOB}\0{ALICE}\0{PASSWORD}")  # log in as alice, act as bob

    def script(client: RawClient) -> list[str]:
        client.hello()
        return [
            client.command(b"AUTH PLAIN " + b64("no-nul-at-all")),
            client.command(b"RSET"),
            client.command(b"AUTH PLAIN " + as_bob),
            client.command(b"RSET"),
        ]

    replies = await _scenario(site, script)
    assert codes(replies) == [501, 250, 535, 250]
    assert replies[0] == "501 5.5.2 Invalid authentication response"
    assert replies[2] == "535 5.7.8 Error: authentication failed"


@ensure
async def test_auth_syntax_and_sequence(start: Start) -> None:
    site = await start()

    def script(client: RawClient) -> list[str]:
        before = client.command(b"AUTH PLAIN")
        client.hello()
        return [
            before,
            client.command(b"AUTH"),
            client.command(b"AUTH PLAIN !!notbase64"),
            client.command(b"AUTH CRAM-MD5"),
            client.command(b"AUTH PLAIN"),
            client.command(b"*"),
            client.command(b"AUTH PLAIN ="),
            client.command(b"MAIL FROM:<x@remote.test>"),
            client.command(b"AUTH PLAIN"),
        ]

    assert await _scenario(site, script) == [
        "503 5.5.1 Error: send HELO/EHLO first",
        "501 5.5.4 Syntax: AUTH mechanism",
        "501 5.5.2 Cannot decode response",
        "504 5.5.4 Unrecognized authentication type",
        "334 ",
        "501 5.7.0 Authentication aborted",
        "501 5.5.2 Invalid authentication response",
        "250 2.1.0 Ok",
        "503 5.5.1 Error: MAIL transaction in progress",
    ]
    assert site.node.guard.failures("127.0.0.1") == 0


def _scenario(site: object, script: object) -> object:
    def run() -> object:
        client = site.raw()  # type: ignore[attr-defined]
        try:
            return script(client)  # type: ignore[operator]
        finally:
            client.close()

    return in_thread(run)
