"""The JAMES-3623 scenario: SMTP deliveries at a fixed rate, then a POP3 cycle per user.

Apache James measured this on its distributed server (4 James nodes, 6
Cassandra nodes, two datacenters): 73 mails/s with LWT-based UIDs, 85 mails/s
with a messageId-based POP3 view.  Here, on one machine:

1. start a real `twistd mailcluster` (embedded store, or Cassandra with or
   without the IMAP view) and provision 80 users with `mailcluster-admin`;
2. send R mails per second for T seconds over SMTP (open loop: each message
   has a scheduled send time; a late send counts against the rate), each to
   one random user, over W persistent connections;
3. POP3 STAT every user; then LIST, UIDL, RETR one, DELE everything, QUIT.

Prints one JSON object: achieved delivery rate, SMTP latency p50/p99 (from
MAIL FROM to the 250 after DATA), errors, POP3 phase times.

Usage (from the repository root, with .venv):
  .venv/bin/python benchmarks/james3623.py --backend embedded --rate 100 --seconds 30
  .venv/bin/python benchmarks/james3623.py --backend cassandra-pop3 --rate 150 --seconds 30
  .venv/bin/python benchmarks/james3623.py --backend cassandra-imap --rate 100 --seconds 30
The Cassandra variants need a node answering on --cassandra (default 127.0.0.1:9042):
  python3 tools/cassandra.py start --name bench --address 127.0.0.1 --dc dc1
Each run uses a fresh keyspace.
"""

from __future__ import annotations

import argparse
import json
import poplib
import queue
import random
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
DOMAIN = "bench.test"
PASSWORD = "benchmark password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(backend: str, cassandra: str, keyspace: str) -> str:
    if backend == "embedded":
        return ""
    host, _, port = cassandra.partition(":")
    imap = backend == "cassandra-imap"
    return (
        f'[store]\nbackend = "cassandra"\n'
        f'[store.cassandra]\ncontact_points = ["{host}"]\nport = {port or 9042}\n'
        f'keyspace = "{keyspace}"\nreplication = {{ dc1 = 1 }}\n'
        f"[imap]\nenabled = {'true' if imap else 'false'}\n"
        + ("" if imap else "listen = []\n")
    )


def provision(admin_args: list[str], users: list[str]) -> None:
    admin = str(BIN / "mailcluster-admin")
    subprocess.run([admin, *admin_args, "domain", "add", DOMAIN], check=True, capture_output=True)
    for user in users:
        subprocess.run([admin, *admin_args, "user", "add", user], input=PASSWORD + "\n",
                       text=True, check=True, capture_output=True)


def wait_for(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text(errors="replace")[-4000:]) from None
            time.sleep(0.1)


def message(user: str, n: int) -> bytes:
    body = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 40).encode()
    return (
        f"From: load@remote.test\r\nTo: {user}\r\nSubject: load {n}\r\n"
        f"Message-ID: <{uuid.uuid4()}@remote.test>\r\n\r\n"
    ).encode() + body


def send_load(port: int, users: list[str], rate: float, seconds: float, workers: int) -> dict[str, object]:
    """Open-loop load: message i is due at start + i/rate; workers take them in order."""
    total = int(rate * seconds)
    due: queue.Queue[int | None] = queue.Queue()
    for i in range(total):
        due.put(i)
    for _ in range(workers):
        due.put(None)
    latencies: list[float] = []
    lateness: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.5

    def worker() -> None:
        client: smtplib.SMTP | None = None
        while True:
            i = due.get()
            if i is None:
                break
            wait = start + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", port, timeout=60)
                    client.ehlo("load.test")
                user = random.choice(users)
                began = time.monotonic()
                client.sendmail("load@remote.test", [user], message(user, i))
                ended = time.monotonic()
                with lock:
                    latencies.append(ended - began)
                    lateness.append(began - (start + i / rate))
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                if client is not None:
                    client.close()
                client = None
        if client is not None:
            client.quit()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1) if latencies else 0.0

    return {
        "offered_rate": rate,
        "sent": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "achieved_rate": round(len(latencies) / elapsed, 1),
        "elapsed_seconds": round(elapsed, 2),
        "smtp_latency_ms_p50": pct(0.50),
        "smtp_latency_ms_p99": pct(0.99),
        "smtp_latency_ms_max": round(latencies[-1] * 1000, 1) if latencies else 0.0,
        "max_lateness_ms": round(max(lateness, default=0) * 1000, 1),
        "median_lateness_ms": round(statistics.median(lateness) * 1000, 1) if lateness else 0.0,
    }


def pop3_phase(port: int, users: list[str]) -> dict[str, object]:
    started = time.monotonic()
    total = 0
    for user in users:
        pop = poplib.POP3("127.0.0.1", port, timeout=60)
        pop.user(user)
        pop.pass_(PASSWORD)
        total += pop.stat()[0]
        pop.quit()
    stat_seconds = time.monotonic() - started
    started = time.monotonic()
    deleted = 0
    for user in users:
        pop = poplib.POP3("127.0.0.1", port, timeout=60)
        pop.user(user)
        pop.pass_(PASSWORD)
        count, _ = pop.stat()
        pop.list()
        pop.uidl()
        if count:
            pop.retr(1)
        for n in range(1, count + 1):
            pop.dele(n)
            deleted += 1
        pop.quit()
    cycle_seconds = time.monotonic() - started
    left = 0
    for user in users:
        pop = poplib.POP3("127.0.0.1", port, timeout=60)
        pop.user(user)
        pop.pass_(PASSWORD)
        left += pop.stat()[0]
        pop.quit()
    return {
        "messages_found_by_stat": total,
        "stat_all_users_seconds": round(stat_seconds, 2),
        "dele_quit_all_users_seconds": round(cycle_seconds, 2),
        "deleted": deleted,
        "left_after_quit": left,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("embedded", "cassandra-pop3", "cassandra-imap"), default="embedded")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--users", type=int, default=80)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--cassandra", default="127.0.0.1:9042")
    args = parser.parse_args()
    users = [f"user{i:03d}@{DOMAIN}" for i in range(args.users)]
    keyspace = f"bench_{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "bench.toml"
        config.write_text(config_text(args.backend, args.cassandra, keyspace))
        data = root / "data"
        admin_args = ["--config", str(config), "--data", str(data)]
        provision(admin_args, users)
        smtp_port, pop3_port = free_port(), free_port()
        log = root / "twistd.out"
        process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--config", str(config),
             "--data", str(data), "--smtp", f"tcp:{smtp_port}:interface=127.0.0.1",
             "--pop3", f"tcp:{pop3_port}:interface=127.0.0.1", "--pop3s", f"tcp:{free_port()}:interface=127.0.0.1",
             "--no-imap"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT,
        )
        try:
            wait_for(smtp_port, process, log)
            wait_for(pop3_port, process, log)
            smtp = send_load(smtp_port, users, args.rate, args.seconds, args.workers)
            pop3 = pop3_phase(pop3_port, users)
        finally:
            process.terminate()
            process.wait(60)
    print(json.dumps({
        "benchmark": "james3623",
        "backend": args.backend,
        "users": args.users,
        "workers": args.workers,
        "smtp": smtp,
        "pop3": pop3,
    }, indent=2))


if __name__ == "__main__":
    main()
