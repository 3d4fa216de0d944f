"""What the benchmarks share: free loopback ports, a node's memory, waiting for a port, users.

Imported by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this
folder is on ``sys.path``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_for(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Until the node listens on ``port``; exit with its log if it died or never did."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"twistd exited:\n{log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"port {port} never opened:\n{log.read_text()}")
        time.sleep(0.1)


def provision(data: Path, domain: str, users: Iterable[str], password: str) -> None:
    """A domain and its users, with mailcluster-admin, as an operator would."""
    admin = [str(BIN / "mailcluster-admin"), "--data", str(data)]
    subprocess.run([*admin, "domain", "add", domain], check=True, capture_output=True)
    for user in users:
        subprocess.run([*admin, "user", "add", user], input=password + "\n", text=True, check=True,
                       capture_output=True)
