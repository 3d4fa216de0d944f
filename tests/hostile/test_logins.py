"""Password guessing against a real node: the throttle acts before any password is checked.

Findings 3, 4 and 10 of the hostile-client review.  Checks are counted from
the node's own debug lines (``password.checked`` for each Argon2id check,
``password.cached`` for each cache hit), never from timings.
"""

from __future__ import annotations

import base64
import imaplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.mailserver import PASSWORD, LineClient, MailServer, admin, node_with, running

from .conftest import ALICE, BOB, Bystander

THROTTLE = """
[log]
level = "debug"
[auth]
failed_login_delay = 30
max_failed_login_delay = 30
"""


@pytest.fixture
def guarded(tmp_path: Path, provisioned: Path) -> Iterator[MailServer]:
    with running(tmp_path, provisioned, THROTTLE, name="guarded") as node:
        yield node


@pytest.fixture
def quick(tmp_path: Path, provisioned: Path) -> Iterator[MailServer]:
    """Debug lines as above, but failures answered after 0.1 s (for tests that fail on purpose)."""
    with running(tmp_path, provisioned, THROTTLE.replace("= 30", "= 0.1"), name="quick") as node:
        yield node


def checks(node: MailServer) -> int:
    return sum(1 for e in node.log_events() if e["event"] == "password.checked")


def wait_for_checks(node: MailServer, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while checks(node) < count:
        assert time.monotonic() < deadline, f"{checks(node)} password checks, expected {count}"
        time.sleep(0.05)


def client(source: str, port: int) -> LineClient:
    """A connection from ``source`` (a loopback address): another client, as the node counts them."""
    line = LineClient.__new__(LineClient)
    line.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    line.buffer = b""
    line.until(b"\r\n")  # the greeting
    return line


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


#: Per protocol: how to try a password, and the temporary failure a throttled attempt gets.
ATTEMPTS: dict[str, tuple[Callable[[LineClient, str, str], bytes], bytes]] = {
    "imap": (lambda c, u, p: (c.send(f'a LOGIN "{u}" "{p}"\r\n'.encode()), c.until(b"\r\n"))[1],
             b"a NO [UNAVAILABLE] Too many login attempts, try again later.\r\n"),
    "pop3": (lambda c, u, p: (c.send(f"USER {u}\r\nPASS {p}\r\n".encode()), c.until(b"\r\n"), c.until(b"\r\n"))[2],
             b"-ERR [SYS/TEMP] Too many login attempts, try again later.\r\n"),
    "smtp": (lambda c, u, p: (c.send(b"EHLO c.test\r\n"), c.until(b"250 "), c.until(b"\r\n"),
                              c.send(b"AUTH PLAIN " + plain(u, p) + b"\r\n"), c.until(b"\r\n"))[4],
             b"454 4.7.0 Too many login attempts, try again later\r\n"),
}


def attempt_and_leave(source: str, port: int, protocol: str, user: str, password: str) -> None:
    """A guess whose answer the guesser does not wait for (it hangs up at once)."""
    line = client(source, port)
    if protocol == "imap":
        line.send(f'a LOGIN "{user}" "{password}"\r\n'.encode())
    elif protocol == "pop3":
        line.send(f"USER {user}\r\nPASS {password}\r\n".encode())
    else:
        line.send(b"EHLO c.test\r\nAUTH PLAIN " + plain(user, password) + b"\r\n")
    time.sleep(0.3)
    line.close()


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_a_throttled_address_is_refused_before_its_password_is_checked(guarded: MailServer, protocol: str) -> None:
    """Before: closing each connection after 0.25 s had 40 passwords checked in 10 s."""
    port = getattr(guarded, protocol)
    try_password, throttled = ATTEMPTS[protocol]
    attempt_and_leave("127.0.0.2", port, protocol, ALICE, "guess 1")
    wait_for_checks(guarded, 1)
    for guess in range(2, 12):  # the guesser goes on, a new connection each time
        attempt_and_leave("127.0.0.2", port, protocol, ALICE, f"guess {guess}")
    right = client("127.0.0.2", port)
    assert try_password(right, ALICE, PASSWORD) == throttled  # even the right password, at once
    right.close()
    assert checks(guarded) == 1  # nothing after the first failure was checked
    other = client("127.0.0.3", port)  # another address logs in as usual
    answer = try_password(other, BOB, PASSWORD)
    assert answer.startswith((b"a OK", b"+OK", b"235 ")), answer
    other.close()
    assert checks(guarded) == 2


def test_many_addresses_against_one_account_hold_that_account(guarded: MailServer) -> None:
    """The owner, who logged in from their address lately, is not locked out by it."""
    owner = client("127.0.0.1", guarded.imap)
    assert ATTEMPTS["imap"][0](owner, ALICE, PASSWORD).startswith(b"a OK")
    owner.close()
    for n in range(2, 9):  # a botnet, one guess per address
        attempt_and_leave(f"127.0.0.{n}", guarded.imap, "imap", ALICE, f"guess from {n}")
    wait_for_checks(guarded, 4)
    time.sleep(0.5)
    assert checks(guarded) == 4  # the owner's login and three guesses; then the account is held
    stranger = client("127.0.0.9", guarded.imap)
    assert ATTEMPTS["imap"][0](stranger, ALICE, PASSWORD) == ATTEMPTS["imap"][1]
    stranger.close()
    other = client("127.0.0.10", guarded.imap)
    assert ATTEMPTS["imap"][0](other, BOB, PASSWORD).startswith(b"a OK")  # other accounts are fine
    other.close()
    owner = client("127.0.0.1", guarded.imap)
    assert ATTEMPTS["imap"][0](owner, ALICE, PASSWORD).startswith(b"a OK")
    owner.close()
    assert checks(guarded) == 5  # the owner's second login came from the cache


def test_parallel_guesses_from_one_address_get_only_a_few_checks(guarded: MailServer, tmp_path: Path) -> None:
    """Before: 50 parallel attempts were all checked within 2.2 s."""
    answers: list[bytes] = []
    lock = threading.Lock()

    def guess(n: int) -> None:
        line = client("127.0.0.4", guarded.imap)
        line.send(f'a LOGIN "{ALICE}" "parallel guess {n}"\r\n'.encode())
        try:
            answer = line.until(b"\r\n", timeout=5)
        except TimeoutError:
            answer = b"(checked: its answer waits the failure delay)"
        with lock:
            answers.append(answer)
        line.close()

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    refused = [a for a in answers if a == ATTEMPTS["imap"][1]]
    assert len(answers) == 30
    assert checks(guarded) <= 3 and len(refused) == 30 - checks(guarded), (checks(guarded), answers)


def test_smtp_auth_hangs_up_after_three_failures(tmp_path: Path, provisioned: Path) -> None:
    node = node_with(tmp_path, provisioned, "[auth]\nfailed_login_delay = 0.05\nmax_failed_login_delay = 0.05\n")
    try:
        line = client("127.0.0.1", node.smtp)
        line.send(b"EHLO c.test\r\n")
        line.until(b"250 ")
        line.until(b"\r\n")
        for n in range(3):
            time.sleep(0.1)  # past the delay the failure put on this address
            line.send(b"AUTH PLAIN " + plain(ALICE, f"wrong {n}") + b"\r\n")
            assert line.until(b"\r\n") == b"535 5.7.8 Error: authentication failed\r\n"
        assert line.until(b"\r\n") == (
            b"421 4.7.0 mx.example.test Too many failed authentications, closing connection\r\n"
        )
        with pytest.raises(ConnectionError):
            line.until(b"\r\n", timeout=5)
    finally:
        node.stop()


def test_a_password_checked_lately_is_not_checked_again_until_it_changes(quick: MailServer) -> None:
    guarded = quick
    for _ in range(3):  # Thunderbird opening its connections
        session = imaplib.IMAP4("127.0.0.1", guarded.imap, timeout=10)
        session.login(ALICE, PASSWORD)
        session.logout()
    assert checks(guarded) == 1
    assert sum(1 for e in guarded.log_events() if e["event"] == "password.cached") == 2

    changed = admin(guarded.data, "user", "passwd", ALICE, password="a new passphrase")
    assert changed.returncode == 0, changed.stderr
    old = imaplib.IMAP4("127.0.0.1", guarded.imap, timeout=10)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        old.login(ALICE, PASSWORD)  # the cached old password counts for nothing any more
    assert checks(guarded) == 2

    removed = admin(guarded.data, "user", "remove", BOB)
    assert removed.returncode == 0, removed.stderr
    gone = client("127.0.0.5", guarded.imap)  # another address: the failure above holds 127.0.0.1
    assert ATTEMPTS["imap"][0](gone, BOB, PASSWORD).startswith(b"a NO [AUTHENTICATIONFAILED]")
    gone.close()


def test_user_names_in_log_lines_are_cut_and_escaped(quick: MailServer) -> None:
    """Before: 100 failures with 60,000-byte names grew the log by 6 MB, and names went in as typed."""
    guarded = quick
    bystander = Bystander(guarded)
    size_before = guarded.log_path.stat().st_size
    long_name = "x" * 8000  # the longest a LOGIN literal may be before login
    for n in range(20):
        line = client(f"127.0.0.{10 + n}", guarded.imap)
        line.send(b"a LOGIN {%d}\r\n" % len(long_name))
        line.until(b"\r\n")
        line.send(long_name.encode() + b' "guess"\r\n')
        line.until(b"\r\n")
        line.close()
    evil = client("127.0.0.40", guarded.imap)
    evil.send(b'a LOGIN "\x1b[2J\x1b]0;pwned\x07alice" "guess"\r\n')
    evil.until(b"\r\n")
    evil.close()
    failures = [e for e in guarded.log_events() if e["event"] == "login.failure"]
    assert len(failures) == 21
    assert all(len(str(e["user"])) <= 100 for e in failures)
    assert failures[0]["user"] == "x" * 64 + "... (8000 bytes)"
    assert failures[-1]["user"] == "\\x1b[2J\\x1b]0;pwned\\x07alice"
    assert guarded.log_path.stat().st_size - size_before < 50_000
    bystander.answers_within(1.0)
