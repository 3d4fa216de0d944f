"""Real server processes: ``twistd -n mailcluster`` with a temporary data folder.

Each test gets a node of its own on free loopback ports, provisioned with
``mailcluster-admin`` exactly as an operator would.  Tests talk to it with
real clients only (smtplib, poplib, imaplib, and Debian's mail clients).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
DOMAIN = "example.test"
PASSWORD = "s3cret-Pa55 word"
USERS = ("alice", "bob", "carol")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def admin(data: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "mailcluster-admin"), "--data", str(data), *args],
        input=None if password is None else password + "\n",
        capture_output=True, text=True, timeout=60,
    )


@dataclass
class MailServer:
    """One running node and how to reach it."""

    data: Path
    workdir: Path
    smtp: int = field(default_factory=free_port)
    pop3: int = field(default_factory=free_port)
    imap: int = field(default_factory=free_port)
    imaps: int = field(default_factory=free_port)
    pop3s: int = field(default_factory=free_port)
    #: A TOML file for what options do not cover ([tls], [auth], timeouts).
    config: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "twistd.out"

    def args(self) -> list[str]:
        return [
            str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster",
            "--data", str(self.data), "--hostname", "mx.example.test",
            "--smtp", f"tcp:{self.smtp}:interface=127.0.0.1",
            "--pop3", f"tcp:{self.pop3}:interface=127.0.0.1",
            "--imap", f"tcp:{self.imap}:interface=127.0.0.1",
            "--imaps", f"tcp:{self.imaps}:interface=127.0.0.1",
            "--pop3s", f"tcp:{self.pop3s}:interface=127.0.0.1",
            *(["--config", str(self.config)] if self.config is not None else []),
        ]

    def start(self) -> None:
        """Start the node; pick other ports if one was taken meanwhile (free_port() only
        found it free: another process may bind it before twistd does)."""
        for attempt in range(3):
            log = self.log_path.open("ab")
            self.process = subprocess.Popen(self.args(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for_ports(self.process, (self.smtp, self.pop3, self.imap, self.imaps, self.pop3s), self.log_path)
                return
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in self.log_path.read_text(errors="replace"):
                    raise
                self.smtp, self.pop3, self.imap, self.imaps, self.pop3s = (free_port() for _ in range(5))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(sig)
        return stop_or_explain(process, self.log_path)

    def log_events(self) -> list[dict[str, object]]:
        """The JSON log lines the node wrote so far."""
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events


class LineClient:
    """A raw socket that reads up to a marker: for exact replies, and what clients do wrong."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def until(self, marker: bytes, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {marker!r} in {self.buffer!r}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(self.buffer)
            self.buffer += chunk
        index = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:index], self.buffer[index:]
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def stop_or_explain(process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> int:
    """Wait for a signalled node to exit; if it hangs, fail with its threads' stacks
    (twistd mailcluster dumps them on SIGUSR2) and the end of its log."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR2)
        time.sleep(1)
        process.kill()
        process.wait(timeout=10)
        raise AssertionError(
            f"twistd did not stop within {timeout}s; its stacks and the end of its log:\n"
            + log.read_text(errors="replace")[-20000:]
        ) from None


def wait_for_ports(process: subprocess.Popen[bytes], ports: tuple[int, ...], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if process.poll() is not None:
            raise RuntimeError(f"twistd exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"ports {pending} not listening:\n{log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5).close()
            pending.pop(0)
        except OSError:
            time.sleep(0.05)


@pytest.fixture
def provisioned(tmp_path: Path) -> Path:
    """A data folder with domain example.test and users alice, bob, carol."""
    data = tmp_path / "data"
    result = admin(data, "domain", "add", DOMAIN)
    assert result.returncode == 0, result.stderr
    for user in USERS:
        result = admin(data, "user", "add", f"{user}@{DOMAIN}", password=PASSWORD)
        assert result.returncode == 0, result.stderr
    return data


@pytest.fixture
def server(tmp_path: Path, provisioned: Path) -> Iterator[MailServer]:
    workdir = tmp_path / "run"
    workdir.mkdir()
    node = MailServer(provisioned, workdir)
    node.start()
    try:
        yield node
    finally:
        if node.process is not None:
            node.stop()


#: The config of a node that trusts no network: a password needs TLS, also from loopback.
UNTRUSTED = "[auth]\ntrusted_networks = []\n"


def node_with(tmp_path: Path, provisioned: Path, config: str, name: str = "run") -> MailServer:
    """A started node on ``provisioned`` with the TOML ``config``, in ``tmp_path / name``."""
    workdir = tmp_path / name
    workdir.mkdir()
    toml = workdir / "node.toml"
    toml.write_text(config)
    node = MailServer(provisioned, workdir, config=toml)
    node.start()
    return node


@contextmanager
def running(tmp_path: Path, provisioned: Path, config: str, name: str = "run") -> Iterator[MailServer]:
    """A node started with ``config`` for the length of the block, stopped even if the test fails."""
    node = node_with(tmp_path, provisioned, config, name)
    try:
        yield node
    finally:
        if node.process is not None:
            node.stop()


@pytest.fixture
def untrusted(tmp_path: Path, provisioned: Path) -> Iterator[MailServer]:
    """A node on its self-signed certificate, for which loopback is no trusted network."""
    with running(tmp_path, provisioned, UNTRUSTED) as node:
        yield node


@pytest.fixture
def isolated_home(tmp_path: Path) -> dict[str, str]:
    """Environment for Debian clients: their state files stay in the test's folder."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ)
    env["HOME"] = str(home)
    return env
