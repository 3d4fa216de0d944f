"""Password logins per second and the node's memory after them, with and without the auth cache.

Starts one real ``twistd mailcluster`` node on the embedded store per mode,
provisions 40 users, and runs ``--logins`` IMAP LOGIN/LOGOUT cycles spread over
the users from ``--clients`` concurrent clients (so each user logs in many
times, as Thunderbird's several connections do). Reports logins per second,
p50/p99, and the node's RSS before and after. Modes, side by side in one run:

* ``no_cache``: ``auth.cache_ttl = 0``, every login pays one Argon2id
  verification (19 MiB, about 20-50 ms of a core);
* ``cache``: the default; a login with a password verified in the last few
  minutes is checked against the cache instead.

  .venv/bin/python benchmarks/login_rate.py --logins 1000 --clients 8
"""

from __future__ import annotations

import argparse
import imaplib
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from harness import BIN, free_port, provision, rss_kib, wait_for

PASSWORD = "benchmark password"
USERS = [f"user{n}@bench.test" for n in range(40)]


def run_mode(root: Path, data: Path, name: str, config: str, logins: int, clients: int) -> dict[str, object]:
    workdir = root / name
    workdir.mkdir()
    (workdir / "node.toml").write_text(config)
    ports = {p: free_port() for p in ("smtp", "pop3", "imap", "imaps", "pop3s")}
    log = workdir / "twistd.out"
    process = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--data", str(data),
         "--config", str(workdir / "node.toml"),
         *(f"--{p}=tcp:{port}:interface=127.0.0.1" for p, port in ports.items())],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=workdir,
    )
    try:
        wait_for(ports["imap"], process, log)
        time.sleep(1)
        before = rss_kib(process.pid)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        counter = iter(range(logins))

        def worker() -> None:
            for n in counter:  # shared: each login is done once, by whichever client is free
                started = time.perf_counter()
                try:
                    session = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=60)
                    session.login(USERS[n % len(USERS)], PASSWORD)
                    session.logout()
                except Exception as e:  # counted; the figures say how many
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)

        threads = [threading.Thread(target=worker) for _ in range(clients)]
        began = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - began
        time.sleep(1)
        after = rss_kib(process.pid)
        latencies.sort()

        def percentile(p: float) -> float:
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1) if latencies else 0.0

        return {
            "logins": len(latencies), "seconds": round(elapsed, 2),
            "logins_per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": percentile(0.5), "p99_ms": percentile(0.99),
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1),
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--modes", default="no_cache,cache", help="comma-separated: no_cache, cache, default")
    args = parser.parse_args()
    configs = {
        "no_cache": "[auth]\ncache_ttl = 0\n",
        "cache": "",
        # the node's defaults whatever they are: what a tree without the cache measures
        "default": "",
    }
    with tempfile.TemporaryDirectory(prefix="login-bench-") as tmp:
        root = Path(tmp)
        data = root / "data"
        provision(data, "bench.test", USERS, PASSWORD)
        results: dict[str, object] = {"logins": args.logins, "clients": args.clients, "users": len(USERS)}
        for mode in args.modes.split(","):
            results[mode] = run_mode(root, data, mode, configs[mode], args.logins, args.clients)
        modes = [m for m in ("no_cache", "cache") if m in results]
        if len(modes) == 2:
            no_cache, cache = (results[m] for m in modes)
            assert isinstance(no_cache, dict) and isinstance(cache, dict)
            results["cache_speedup"] = round(cache["logins_per_second"] / no_cache["logins_per_second"], 2)
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
