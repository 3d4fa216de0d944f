"""Recipient harvesting and broken clients over SMTP (finding 8): Postfix's error limits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mailserver import LineClient, MailServer, running

from .conftest import Bystander


@pytest.fixture
def strict(tmp_path: Path, provisioned: Path) -> Iterator[MailServer]:
    with running(tmp_path, provisioned, "[smtp]\nerror_sleep = 0.2\n", name="strict") as node:
        yield node


def test_harvesting_recipients_slows_down_then_hangs_up(strict: MailServer) -> None:
    """Before: 10,000 pipelined RCPT TO for unknown users got 10,000 550 5.1.1 in 4.6 s."""
    bystander = Bystander(strict)
    raw = LineClient(strict.smtp)
    raw.until(b"\r\n")
    raw.send(b"EHLO harvester.test\r\n")
    raw.until(b"250 ")
    raw.until(b"\r\n")
    raw.send(b"MAIL FROM:<h@remote.test>\r\n")
    raw.until(b"\r\n")
    started = time.monotonic()
    raw.send(b"".join(b"RCPT TO:<guess%d@example.test>\r\n" % n for n in range(1000)))
    replies = []
    while True:
        try:
            replies.append(raw.until(b"\r\n", timeout=10))
        except ConnectionError:
            break  # the node hung up
    elapsed = time.monotonic() - started
    assert len(replies) == 21, replies
    assert all(r.startswith(b"550 5.1.1 ") for r in replies[:20])
    assert replies[20] == b"421 4.7.0 mx.example.test Error: too many errors\r\n"
    assert elapsed >= 9 * 0.2  # errors 11 to 19 each waited error_sleep before the next answer
    bystander.answers_within(1.0)
    bystander.close()


def test_a_few_errors_cost_nothing(strict: MailServer) -> None:
    raw = LineClient(strict.smtp)
    raw.until(b"\r\n")
    raw.send(b"EHLO typo.test\r\n" + b"NOOP x\r\n" + b"RCPT TO:<a@b>\r\n" * 5 + b"QUIT\r\n")
    lines = []
    while True:
        try:
            lines.append(raw.until(b"\r\n", timeout=5))
        except ConnectionError:
            break
    assert lines[-1].startswith(b"221 ")  # five errors: no wait, no hang-up
