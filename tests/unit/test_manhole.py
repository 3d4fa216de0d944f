"""The SSH manhole, driven by Debian's OpenSSH client against a real listener.

The server runs in the test reactor; ``ssh`` runs in a thread (through
``deferToThread``) so the reactor stays free to answer it.
"""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import Service
from twisted.conch.manhole_ssh import ConchFactory
from twisted.conch.ssh.keys import Key
from twisted.internet.threads import deferToThread

from twisted_mail_cluster.config import ManholeConfig
from twisted_mail_cluster.manhole import HOST_KEY_NAME, load_or_create_host_key, make_manhole_service

pytestmark = pytest.mark.skipif(
    shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
    reason="needs the OpenSSH client: apt-get install openssh-client",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


class Manhole:
    """A started manhole service and what a client needs to reach it."""

    def __init__(self, tmp_path: Path, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.port = free_port()
        self.data_dir = tmp_path / "data"
        self.admin_key = keygen(tmp_path / "admin_key")
        self.other_key = keygen(tmp_path / "other_key")
        self.authorized_keys = tmp_path / "authorized_keys"
        self.authorized_keys.write_bytes(Path(f"{self.admin_key}.pub").read_bytes())
        self.config = ManholeConfig(
            enabled=True,
            listen=f"tcp:{self.port}:interface=127.0.0.1",
            authorized_keys=self.authorized_keys,
            username="admin",
        )
        self.service: Service = make_manhole_service(self.config, self.data_dir, namespace)

    def ssh(
        self, *args: str, key: Path | None = None, user: str = "admin", stdin: bytes = b"", command: str | None = None
    ) -> Any:
        """Run ssh in a thread; the Deferred fires with the CompletedProcess."""
        command = [
            "ssh",
            "-F", "/dev/null",
            "-i", str(key or self.admin_key),
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=20",
            "-p", str(self.port),
            *args,
            f"{user}@127.0.0.1",
            *([command] if command is not None else []),
        ]
        return deferToThread(subprocess.run, command, input=stdin, capture_output=True, timeout=60)


@pytest.fixture
def manhole(tmp_path: Path) -> Generator[Manhole, None, None]:
    m = Manhole(tmp_path, {"answer": 42, "greeting": "hello from the node", "shared": []})
    m.service.startService()
    yield m
    pytest_twisted.blockon(m.service.stopService())


@pytest_twisted.inlineCallbacks
def test_piped_session_evaluates_expressions(manhole: Manhole) -> Generator[Any, Any, None]:
    result = yield manhole.ssh("-T", stdin=b"1+1\nanswer * 2\ngreeting\n")
    assert result.returncode == 0, result.stderr
    assert b"\r\n2\r\n" in result.stdout
    assert b"\r\n84\r\n" in result.stdout
    assert b"\r\n'hello from the node'\r\n" in result.stdout
    assert result.stderr == b""


@pytest_twisted.inlineCallbacks
def test_pty_session_ends_with_ctrl_d(manhole: Manhole) -> Generator[Any, Any, None]:
    result = yield manhole.ssh("-tt", stdin=b"x = 6 * 7\nx\n\x04")
    assert result.returncode == 0, result.stderr
    assert b"\r\n42\r\n" in result.stdout


@pytest_twisted.inlineCallbacks
def test_sessions_share_the_objects_not_the_names(manhole: Manhole) -> Generator[Any, Any, None]:
    """Each session gets a copy of the namespace dict (Manhole.__init__): the objects are the node's."""
    yield manhole.ssh("-T", stdin=b"shared.append('from session 1')\nmarker = 1\n")
    result = yield manhole.ssh("-T", stdin=b"shared\nmarker\n")
    assert b"\r\n['from session 1']\r\n" in result.stdout
    assert b"\r\nNameError: name 'marker' is not defined\r\n" in result.stdout
    assert manhole.namespace["shared"] == ["from session 1"]


@pytest_twisted.inlineCallbacks
def test_wrong_key_is_refused(manhole: Manhole) -> Generator[Any, Any, None]:
    result = yield manhole.ssh("-T", key=manhole.other_key, stdin=b"1+1\n")
    assert result.returncode == 255
    assert result.stdout == b""
    assert result.stderr == b"admin@127.0.0.1: Permission denied (publickey).\r\n"


@pytest_twisted.inlineCallbacks
def test_right_key_for_another_user_is_refused(manhole: Manhole) -> Generator[Any, Any, None]:
    result = yield manhole.ssh("-T", user="root", stdin=b"1+1\n")
    assert result.returncode == 255
    assert result.stderr == b"root@127.0.0.1: Permission denied (publickey).\r\n"


@pytest_twisted.inlineCallbacks
def test_passwords_are_not_even_offered(manhole: Manhole) -> Generator[Any, Any, None]:
    result = yield manhole.ssh(
        "-T", "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,keyboard-interactive"
    )
    assert result.returncode == 255
    # The server's list of methods that can continue is "publickey" alone.
    assert result.stderr == b"admin@127.0.0.1: Permission denied (publickey).\r\n"


@pytest_twisted.inlineCallbacks
def test_removing_a_key_takes_effect_without_restart(manhole: Manhole) -> Generator[Any, Any, None]:
    manhole.authorized_keys.write_text("# revoked\n")
    result = yield manhole.ssh("-T", stdin=b"1+1\n")
    assert result.returncode == 255
    manhole.authorized_keys.write_bytes(Path(f"{manhole.other_key}.pub").read_bytes())
    result = yield manhole.ssh("-T", key=manhole.other_key, stdin=b"1+1\n")
    assert result.returncode == 0
    assert b"\r\n2\r\n" in result.stdout


@pytest_twisted.inlineCallbacks
def test_broken_lines_do_not_lock_out_the_good_keys(manhole: Manhole) -> Generator[Any, Any, None]:
    good = Path(f"{manhole.admin_key}.pub").read_text()
    manhole.authorized_keys.write_text(
        "# admins\n"
        "ssh-ed25519 AAAA\n"  # truncated: struct.error inside Key.fromString
        'from="10.0.0.0/8" ' + good  # options are not understood: that line is refused
        + "ssh-rsa !!!!\n" + good
    )
    result = yield manhole.ssh("-T", stdin=b"1+1\n")
    assert result.returncode == 0, result.stderr
    assert b"\r\n2\r\n" in result.stdout


@pytest_twisted.inlineCallbacks
def test_options_lines_are_refused_not_half_honoured(manhole: Manhole) -> Generator[Any, Any, None]:
    good = Path(f"{manhole.admin_key}.pub").read_text()
    manhole.authorized_keys.write_text('from="127.0.0.1" ' + good)
    result = yield manhole.ssh("-T", stdin=b"1+1\n")
    assert result.returncode == 255


@pytest_twisted.inlineCallbacks
def test_commands_are_refused_with_status_1(manhole: Manhole) -> Generator[Any, Any, None]:
    result = yield manhole.ssh("-T", command="1+1")
    assert result.returncode == 1
    assert result.stdout == b"manhole: commands are not supported, log in without one\r\n"


@pytest_twisted.inlineCallbacks
def test_clients_see_the_saved_host_key(manhole: Manhole) -> Generator[Any, Any, None]:
    key_file = manhole.data_dir / HOST_KEY_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public = Path(f"{key_file}.pub").read_text().split()
    result = yield deferToThread(
        subprocess.run,
        ["ssh-keyscan", "-T", "20", "-t", "ed25519", "-p", str(manhole.port), "127.0.0.1"],
        capture_output=True,
        timeout=60,
    )
    scanned = result.stdout.decode().split()
    assert scanned == [f"[127.0.0.1]:{manhole.port}", public[0], public[1]]


def test_host_key_is_generated_once_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "hostkey"
    first = load_or_create_host_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert first.sshType() == b"ssh-ed25519"
    assert load_or_create_host_key(path) == first
    assert Key.fromFile(f"{path}.pub") == first.public()


def test_configured_host_key_is_used(tmp_path: Path) -> None:
    path = tmp_path / "my_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(path)], check=True)
    keys = tmp_path / "authorized_keys"
    keys.write_bytes(Path(f"{keygen(tmp_path / 'admin')}.pub").read_bytes())
    config = ManholeConfig(enabled=True, listen="tcp:0:interface=127.0.0.1", authorized_keys=keys, host_key=path)
    service = make_manhole_service(config, tmp_path / "data", {})
    factory = service.factory  # type: ignore[attr-defined]
    assert factory.privateKeys == {b"ssh-rsa": Key.fromFile(str(path))}
    assert factory.publicKeys == {b"ssh-rsa": Key.fromFile(str(path)).public()}
    assert not (tmp_path / "data").exists()  # nothing generated when a key is given


def test_host_keys_stay_on_the_instance(tmp_path: Path) -> None:
    """ConchFactory's class-level key dicts are shared by every factory in the process."""
    keys = tmp_path / "authorized_keys"
    keys.write_bytes(Path(f"{keygen(tmp_path / 'admin')}.pub").read_bytes())
    config = ManholeConfig(enabled=True, listen="tcp:0:interface=127.0.0.1", authorized_keys=keys)
    one = make_manhole_service(config, tmp_path / "one", {}).factory  # type: ignore[attr-defined]
    two = make_manhole_service(config, tmp_path / "two", {}).factory  # type: ignore[attr-defined]
    assert ConchFactory.publicKeys == {} and ConchFactory.privateKeys == {}
    assert one.privateKeys != two.privateKeys


def test_a_public_key_as_host_key_is_refused(tmp_path: Path) -> None:
    key = keygen(tmp_path / "k")
    with pytest.raises(ValueError, match=r"is a public key, a private key is needed$"):
        load_or_create_host_key(Path(f"{key}.pub"))


def test_authorized_keys_are_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^manhole.authorized_keys is required"):
        make_manhole_service(ManholeConfig(enabled=True), tmp_path, {})
