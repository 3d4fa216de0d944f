"""What TLS costs: IMAP logins and SMTP deliveries per second, over TLS and in clear, in one run.

Starts one real ``twistd mailcluster`` node on the embedded store (its
self-signed certificate), provisions users, then alternates rounds of each
mode for the same number of seconds with the same number of concurrent
clients, so that both see the same machine:

* IMAP: connect, (TLS), LOGIN, LOGOUT. Modes: ``clear`` (port 143 style, from a
  trusted network), ``starttls``, ``imaps`` (implicit TLS).
* SMTP: connect, EHLO, (STARTTLS, EHLO), MAIL, RCPT, DATA of a 2 KiB message,
  QUIT. Modes: ``clear``, ``starttls``.

Every connection is a new one with a full handshake (no session resumption):
the worst case, as a client that opens one connection per message sees it.
Prints one JSON object: per mode the operations per second (median of the
rounds), p50/p99 latency and errors, and the TLS/clear ratios.

  .venv/bin/python benchmarks/tls_overhead.py --seconds 10 --rounds 3 --clients 8
"""

from __future__ import annotations

import argparse
import imaplib
import json
import smtplib
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import BIN, free_port, provision, wait_for

PASSWORD = "benchmark password"
USERS = [f"user{n}@bench.test" for n in range(40)]
MESSAGE = b"Subject: tls benchmark\r\nFrom: load@remote.test\r\n\r\n" + b"x" * 2000 + b"\r\n"


def imap_login(mode: str, ports: dict[str, int], context: ssl.SSLContext, user: str) -> None:
    if mode == "imaps":
        session: imaplib.IMAP4 = imaplib.IMAP4_SSL("localhost", ports["imaps"], ssl_context=context, timeout=30)
    else:
        session = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
        if mode == "starttls":
            session.starttls(context)
    session.login(user, PASSWORD)
    session.logout()


def smtp_delivery(mode: str, ports: dict[str, int], context: ssl.SSLContext, user: str) -> None:
    with smtplib.SMTP("127.0.0.1", ports["smtp"], local_hostname="load.test", timeout=30) as smtp:
        if mode == "starttls":
            smtp.starttls(context=context)
        smtp.sendmail("load@remote.test", [user], MESSAGE)


@dataclass(frozen=True)
class Round:
    per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    first_error: str | None


def run_round(operation: Callable[[str, dict[str, int], ssl.SSLContext, str], None], mode: str,
              ports: dict[str, int], context: ssl.SSLContext, clients: int, seconds: float) -> Round:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(index: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            user = USERS[(index * 7 + n) % len(USERS)]
            n += 1
            started = time.perf_counter()
            try:
                operation(mode, ports, context, user)
            except Exception as e:  # counted, not fatal: the figures say how many
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    latencies.sort()

    def percentile(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1) if latencies else 0.0

    return Round(round(len(latencies) / elapsed, 1), percentile(0.5), percentile(0.99), len(errors),
                 errors[0] if errors else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one round of one mode")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode, interleaved")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tls-bench-") as tmp:
        root = Path(tmp)
        data = root / "data"
        provision(data, "bench.test", USERS, PASSWORD)
        ports = {name: free_port() for name in ("smtp", "imap", "imaps", "pop3", "pop3s")}
        log = root / "twistd.out"
        process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--data", str(data), "--hostname", "localhost",
             *(f"--{name}=tcp:{port}:interface=127.0.0.1" for name, port in ports.items())],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=root,
        )
        try:
            for port in ports.values():
                wait_for(port, process, log)
            context = ssl.create_default_context(cafile=str(data / "tls" / "self-signed.pem"))
            plan = [("imap_logins", imap_login, ("clear", "starttls", "imaps")),
                    ("smtp_deliveries", smtp_delivery, ("clear", "starttls"))]
            rounds: dict[str, dict[str, list[Round]]] = {name: {} for name, _, _ in plan}
            for _ in range(args.rounds):
                for name, operation, modes in plan:
                    for mode in modes:
                        result = run_round(operation, mode, ports, context, args.clients, args.seconds)
                        rounds[name].setdefault(mode, []).append(result)
            summary: dict[str, object] = {"clients": args.clients, "seconds_per_round": args.seconds,
                                          "rounds": args.rounds}
            for name, by_mode in rounds.items():
                figures: dict[str, object] = {}
                medians = {mode: statistics.median(r.per_second for r in results) for mode, results in by_mode.items()}
                for mode, results in by_mode.items():
                    figures[mode] = {
                        "per_second_median": medians[mode],
                        "per_second_rounds": [r.per_second for r in results],
                        "p50_ms_median": statistics.median(r.p50_ms for r in results),
                        "p99_ms_max": max(r.p99_ms for r in results),
                        "errors": sum(r.errors for r in results),
                        "first_error": next((r.first_error for r in results if r.first_error), None),
                    }
                for mode in by_mode:
                    if mode != "clear":
                        figures[f"{mode}_to_clear_ratio"] = round(medians[mode] / medians["clear"], 3)
                summary[name] = figures
            print(json.dumps(summary, indent=2))
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
