"""Real POP3 clients (fetchmail, getmail6) against the in-process server.

The server runs in the test reactor; the client is a child process
(getProcessOutputAndValue) with HOME in a temporary folder, so its state
(.fetchids, getmail's oldmail file) is private to the test.  The twistd
end-to-end tests come separately; this is interoperability only.
"""

from __future__ import annotations

import email
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from tests.helpers.getmail import getmail_folders
from tests.helpers.node import DOMAIN, PASSWORD, listen, make_node, stop
from twisted_mail_cluster.node import Node
from twisted_mail_cluster.pop3.server import POP3Factory

ensure = pytest_twisted.ensureDeferred
ALICE = f"alice@{DOMAIN}"
MESSAGES = [
    b"From: one@remote.test\r\nTo: alice@example.test\r\nSubject: first\r\n"
    b"Message-ID: <first@remote.test>\r\n\r\nhello\r\n.dotted line\r\n..two\r\nbye\r\n",
    b"From: two@remote.test\r\nTo: alice@example.test\r\nSubject: second\r\n"
    b"Message-ID: <second@remote.test>\r\n\r\n" + b"x" * 70 + b"\r\n" * 3,
]


class Served:
    def __init__(self, node: Node, port: int, listening: Any) -> None:
        self.node, self.port, self.listening = node, port, listening

    async def pop3_count(self) -> int:
        inbox = await self.node.accounts.inbox(ALICE)
        return len(await self.node.store.pop3_list(inbox.id))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    async def start() -> Served:
        node = await make_node(tmp_path / "node", users=("alice",))
        inbox = await node.accounts.inbox(ALICE)
        for raw in MESSAGES:
            await node.mailboxes.deliver(await node.mailboxes.prepare(raw), [(inbox, frozenset())])
        port, listening = listen(POP3Factory(node))
        return Served(node, port, listening)

    site = pytest_twisted.blockon(Deferred.fromCoroutine(start()))
    yield site
    pytest_twisted.blockon(stop(site.listening, site.node))


def bodies(messages: list[bytes]) -> set[bytes]:
    """What a client must have kept of each message: its body, byte for byte (LF endings)."""
    return {m.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n") for m in messages}


async def run(executable: str, args: list[str], home: Path) -> tuple[bytes, bytes, int]:
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}
    return await getProcessOutputAndValue(executable, args, env=env, path=str(home), reactor=reactor)


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed")
@ensure
async def test_fetchmail_keeps_then_deletes(served: Served, tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = tmp_path / "out"
    home.mkdir()
    out.mkdir()
    rc = home / "fetchmailrc"

    def write_rc(options: str) -> None:
        rc.write_text(
            "set no bouncemail\nset no syslog\n"
            f"poll 127.0.0.1 service {served.port} protocol POP3 uidl auth password timeout 30\n"
            f'  user "{ALICE}" there with password "{PASSWORD}" is "root" here '
            f"{options} no rewrite sslproto ''\n"
            f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
        )
        rc.chmod(0o600)

    async def fetch(options: str, expected_code: int = 0) -> list[bytes]:
        for f in out.iterdir():
            f.unlink()
        write_rc(options)
        stdout, stderr, code = await run(
            shutil.which("fetchmail") or "fetchmail", ["-f", str(rc), "--nodetach", "-v"], home
        )
        assert code == expected_code, stdout + stderr
        return [f.read_bytes() for f in sorted(out.iterdir())]

    kept = await fetch("keep")
    assert len(kept) == 2
    assert {m.split(b"\n\n", 1)[1] for m in kept} == bodies(MESSAGES)
    assert {email.message_from_bytes(m)["Message-ID"] for m in kept} == {
        "<first@remote.test>", "<second@remote.test>",
    }
    assert await served.pop3_count() == 2

    # The UIDLs it saved in HOME/.fetchids still name the same messages: nothing new.
    assert await fetch("keep", expected_code=1) == []  # 1: "no mail"
    assert await served.pop3_count() == 2

    deleted = await fetch("fetchall")  # fetches both again, then deletes them
    assert {m.split(b"\n\n", 1)[1] for m in deleted} == bodies(MESSAGES)
    assert await served.pop3_count() == 0


@pytest.mark.skipif(shutil.which("getmail") is None, reason="getmail6 is not installed")
@ensure
async def test_getmail_keeps_then_deletes(served: Served, tmp_path: Path) -> None:
    with getmail_folders() as folders:
        state, maildir, base = folders.state, folders.maildir, folders.base

        async def fetch(delete: bool) -> list[bytes]:
            (state / "getmailrc").write_text(
                "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
                f"port = {served.port}\nusername = {ALICE}\npassword = {PASSWORD}\n"
                "[destination]\ntype = Maildir\n"
                f"path = {maildir}/\n" + folders.user_line
                + "[options]\nread_all = true\n"
                f"delete = {'true' if delete else 'false'}\nverbose = 2\n"
            )
            (state / "getmailrc").chmod(stat.S_IRUSR | stat.S_IWUSR)
            stdout, stderr, code = await run(
                shutil.which("getmail") or "getmail",
                [f"--getmaildir={state}", f"--rcfile={state}/getmailrc"],
                base,
            )
            assert code == 0, stdout + stderr
            new = sorted((maildir / "new").iterdir())
            found = [f.read_bytes() for f in new]
            for f in new:
                f.unlink()
            return found

        kept = await fetch(delete=False)
        assert {m.split(b"\n\n", 1)[1] for m in kept} == bodies(MESSAGES)
        assert await served.pop3_count() == 2

        deleted = await fetch(delete=True)
        assert {m.split(b"\n\n", 1)[1] for m in deleted} == bodies(MESSAGES)
        assert await served.pop3_count() == 0
