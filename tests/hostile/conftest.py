"""Hostile clients against a real ``twistd mailcluster`` node (issue 10).

Each test attacks a running node the way a scanner, a brute-forcer or a
broken client would, then checks three things: the reply the attacker gets,
that a bystander's session (logged in before the attack) still answers within
a second, and, where memory is the point, how much the node grew.
"""

from __future__ import annotations

import imaplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mailserver import DOMAIN, PASSWORD, MailServer, running

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def rss_kib(pid: int) -> int:
    """The process's resident memory now, in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Bystander:
    """A user who logged in before the attack and expects the node to keep answering."""

    def __init__(self, node: MailServer, user: str = BOB) -> None:
        self.imap = imaplib.IMAP4("127.0.0.1", node.imap, timeout=10)
        self.imap.login(user, PASSWORD)
        self.imap.select("INBOX")

    def answers_within(self, seconds: float = 1.0) -> float:
        """NOOP's round trip; fails the test if it took longer than ``seconds``."""
        started = time.monotonic()
        assert self.imap.noop()[0] == "OK"
        elapsed = time.monotonic() - started
        assert elapsed < seconds, f"a bystander's NOOP took {elapsed:.2f}s"
        return elapsed

    def close(self) -> None:
        try:
            self.imap.logout()
        except (imaplib.IMAP4.abort, OSError):
            pass


@pytest.fixture
def hostile_node(tmp_path: Path, provisioned: Path) -> Iterator[MailServer]:
    """A default node (loopback trusted, so passwords in clear are allowed)."""
    with running(tmp_path, provisioned, "") as node:
        yield node


@pytest.fixture
def bystander(hostile_node: MailServer) -> Iterator[Bystander]:
    watcher = Bystander(hostile_node)
    try:
        yield watcher
    finally:
        watcher.close()
