"""Cross-node IDLE latency: from SMTP's 250 on node B to the untagged EXISTS on node A.

Starts two real `twistd mailcluster` nodes sharing one Cassandra keyspace and
one RabbitMQ vhost, provisions a user, opens an IMAP session on node A, SELECTs
INBOX and enters IDLE; then delivers N messages one after the other over SMTP
to node B and, for each, measures the time from the 250 reply to the matching
`* n EXISTS` on node A.  Prints one JSON object with p50/p90/p99/max.

Needs a Cassandra node and a RabbitMQ broker (see docs/cassandra.md and
docs/rabbitmq.md):
  python3 tools/cassandra.py start --name node1
  python3 tools/rabbitmq.py start
  .venv/bin/python benchmarks/idle_latency.py --count 300
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
USER = "idle@bench.test"
PASSWORD = "benchmark password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_amqp_url() -> str:
    """The URL of the project's own broker (tools/rabbitmq.py), if it is the one in use."""
    spec = importlib.util.spec_from_file_location("mailcluster_rabbitmq_tool", ROOT / "tools" / "rabbitmq.py")
    if spec is None or spec.loader is None:
        raise SystemExit("tools/rabbitmq.py not found: pass --amqp")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return str(module.RabbitNode.load().url)


def start_node(config: Path, data: Path, smtp: int, imap: int, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--config", str(config), "--data", str(data),
         "--smtp", f"tcp:{smtp}:interface=127.0.0.1", "--imap", f"tcp:{imap}:interface=127.0.0.1",
         "--imaps", f"tcp:{free_port()}:interface=127.0.0.1", "--no-pop3"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    for port in (smtp, imap):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text(errors="replace")[-3000:]) from None
                time.sleep(0.05)
    return process


class Idle:
    """An IMAP session in IDLE that reports each EXISTS with the time it arrived."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""
        self.line()
        self.command(b"L", f'LOGIN "{USER}" "{PASSWORD}"'.encode())
        self.command(b"S", b"SELECT INBOX")
        self.sock.sendall(b"I IDLE\r\n")
        while not self.line().startswith(b"+"):
            pass

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("IMAP connection closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def command(self, tag: bytes, text: bytes) -> None:
        self.sock.sendall(tag + b" " + text + b"\r\n")
        while True:
            line = self.line()
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(line)
                return

    def wait_exists(self, count: int, timeout: float = 10.0) -> float:
        """Monotonic time at which `* count EXISTS` (or more) arrived."""
        self.sock.settimeout(timeout)
        while True:
            line = self.line()
            if line.endswith(b" EXISTS") and int(line.split()[1]) >= count:
                return time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--cassandra", default="127.0.0.1:9042")
    parser.add_argument("--amqp", default=None, help="amqp://user:password@host:port/vhost")
    args = parser.parse_args()
    amqp = args.amqp or default_amqp_url()
    host, _, port = args.cassandra.partition(":")
    keyspace = f"idle_{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "cluster.toml"
        config.write_text(
            f'[store]\nbackend = "cassandra"\n[store.cassandra]\ncontact_points = ["{host}"]\n'
            f'port = {port or 9042}\nkeyspace = "{keyspace}"\nreplication = {{ dc1 = 1 }}\n'
            f'[events]\nbus = "rabbitmq"\n[events.rabbitmq]\nurl = "{amqp}"\n'
        )
        admin = [str(BIN / "mailcluster-admin"), "--config", str(config), "--data", str(root / "admin")]
        subprocess.run([*admin, "domain", "add", "bench.test"], check=True, capture_output=True)
        subprocess.run([*admin, "user", "add", USER], input=PASSWORD + "\n", text=True, check=True, capture_output=True)
        ports = {name: free_port() for name in ("smtp_a", "imap_a", "smtp_b", "imap_b")}
        node_a = start_node(config, root / "a", ports["smtp_a"], ports["imap_a"], root / "a.log")
        node_b = start_node(config, root / "b", ports["smtp_b"], ports["imap_b"], root / "b.log")
        try:
            time.sleep(1.0)  # both buses connected (they connect in the background)
            idle = Idle(ports["imap_a"])
            latencies: list[float] = []
            with smtplib.SMTP("127.0.0.1", ports["smtp_b"], timeout=30) as smtp:
                for n in range(1, args.count + 1):
                    smtp.sendmail("load@remote.test", [USER], f"Subject: idle {n}\r\n\r\nbody {n}\r\n".encode())
                    accepted = time.monotonic()
                    latencies.append(idle.wait_exists(n) - accepted)
        finally:
            node_a.terminate()
            node_b.terminate()
            node_a.wait(60)
            node_b.wait(60)
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)

    print(json.dumps({
        "benchmark": "idle_latency",
        "deliveries": len(latencies),
        "latency_ms_p50": pct(0.50),
        "latency_ms_p90": pct(0.90),
        "latency_ms_p99": pct(0.99),
        "latency_ms_max": round(ordered[-1] * 1000, 2),
        "latency_ms_mean": round(statistics.mean(ordered) * 1000, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
