"""How much memory does the server use to FETCH a large message over IMAP?

Starts a real `twistd mailcluster` on a temporary data folder, delivers one
large message over SMTP, restarts the node (so the delivery's own peak is
forgotten), then has imaplib FETCH BODY[] of it while reading slowly, and
reports the growth of the server's peak resident memory (VmHWM) during the
FETCH.  A server that assembled the body in memory would grow by at least
the message size; a streaming one grows by a small constant.

Usage: .venv/bin/python benchmarks/imap_fetch_memory.py [--size-mib 40]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
USER = "bench@example.test"
PASSWORD = "benchmark password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def current_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(data: Path, config: Path, smtp: int, imap: int, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--config", str(config),
         "--data", str(data), "--no-pop3",
         "--smtp", f"tcp:{smtp}:interface=127.0.0.1", "--imap", f"tcp:{imap}:interface=127.0.0.1",
         "--imaps", f"tcp:{free_port()}:interface=127.0.0.1"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    for port in (smtp, imap):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(log.read_text())
                time.sleep(0.05)
    return process


def big_message(size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n"
    body = line * (size // len(line))
    return b"From: bench@remote.test\r\nTo: " + USER.encode() + b"\r\nSubject: big\r\n\r\n" + body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=40)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, log, config = root / "data", root / "twistd.out", root / "bench.toml"
        config.write_text(f"[smtp]\nmax_message_size = {size * 2}\n")
        admin = str(BIN / "mailcluster-admin")
        subprocess.run([admin, "--data", str(data), "domain", "add", "example.test"], check=True, capture_output=True)
        subprocess.run([admin, "--data", str(data), "user", "add", USER], input=PASSWORD + "\n",
                       text=True, check=True, capture_output=True)
        smtp_port, imap_port = free_port(), free_port()
        server = start(data, config, smtp_port, imap_port, log)
        message = big_message(size)
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=300) as smtp:
            smtp.sendmail("bench@remote.test", [USER], message)
        delivery_seconds = time.monotonic() - started
        delivery_peak = peak_rss_kib(server.pid)
        server.terminate()
        server.wait(30)

        server = start(data, config, smtp_port, imap_port, log)
        try:
            imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=300)
            imap.login(USER, PASSWORD)
            imap.select("INBOX")
            before_peak = peak_rss_kib(server.pid)
            before_rss = current_rss_kib(server.pid)
            started = time.monotonic()
            _, fetched = imap.fetch("1", "(BODY.PEEK[])")
            fetch_seconds = time.monotonic() - started
            after_peak = peak_rss_kib(server.pid)
            imap.logout()
        finally:
            server.terminate()
            server.wait(30)
        body = fetched[0][1]
        result = {
            "benchmark": "imap_fetch_memory",
            "message_bytes": len(message),
            "fetched_ends_with_sent_message": body.endswith(message),
            "server_rss_before_fetch_kib": before_rss,
            "server_peak_growth_during_fetch_kib": after_peak - before_peak,
            "peak_growth_as_fraction_of_message": round((after_peak - before_peak) * 1024 / len(message), 4),
            "fetch_seconds": round(fetch_seconds, 3),
            "fetch_mib_per_second": round(len(message) / 1048576 / fetch_seconds, 1),
            "smtp_delivery_seconds": round(delivery_seconds, 3),
            "server_peak_rss_during_delivery_kib": delivery_peak,
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
