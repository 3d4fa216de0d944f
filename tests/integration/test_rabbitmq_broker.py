"""A real RabbitMQ (Debian's rabbitmq-server 3.10), run by tools/rabbitmq.py:
provisioning, publish and consume with pika, rabbitmqctl listings, a stop and
start cycle, a killed client's exclusive queue, a second node on its own ports.
No mocks, no skips: without rabbitmq-server these tests fail
(tools/install-test-deps installs it).

The broker starts once per session (see tests/rabbitmq_broker.py)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pika
import pytest
from pika.exceptions import AMQPConnectionError, ChannelClosedByBroker

from tests.rabbitmq_broker import TOOL_PATH, RabbitService, Vhost, eventually, tool

pytestmark = pytest.mark.timeout(300)


def report(message: str) -> None:
    # shown with -s, and in the captured output of a failing test
    print(f"[rabbitmq] {message}")


def connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                # /proc/net/tcp* prints each 32-bit word of the address in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


def queue_state(url: str, name: str) -> int:
    """200 if the queue exists and we may use it, 405 if it is another
    connection's exclusive queue, 404 if it does not exist (a passive declare)."""
    with closing(connect(url)) as conn:
        ch = conn.channel()
        try:
            ch.queue_declare(name, passive=True)
            return 200
        except ChannelClosedByBroker as e:
            return int(e.reply_code)


# -- the broker and what it provisions


def test_broker_is_up_with_our_vhost_and_user_only(rabbitmq: RabbitService) -> None:
    node = rabbitmq.node
    props = node.login()
    assert props["product"] == "RabbitMQ"
    assert props["version"].startswith("3."), props
    pid = node.pid()
    assert pid is not None
    if rabbitmq.started_here:
        rss = node.rss()
        report(f"broker {props['version']} on {props['platform']} up in {rabbitmq.start_seconds:.1f}s, "
               f"RSS {rss and rss // 2**20} MiB")

    vhosts = {v["name"] for v in node.ctl_json(["list_vhosts", "name"])}
    assert node.vhost in vhosts
    assert "/" not in vhosts  # load_definitions at boot: no default vhost ...
    users = {u["user"] for u in node.ctl_json(["list_users"])}
    assert node.user in users
    assert "guest" not in users  # ... and no guest user
    perms = node.ctl_json(["list_user_permissions", node.user])
    assert node.vhost in {p["vhost"] for p in perms}
    assert "/" not in {p["vhost"] for p in perms}
    own = next(p for p in perms if p["vhost"] == node.vhost)
    assert (own["configure"], own["write"], own["read"]) == (".*", ".*", ".*")

    with pytest.raises(tool.AmqpError) as refused:
        tool.amqp_login("127.0.0.1", node.port, "guest", "guest", "/")
    assert refused.value.code == 403
    with pytest.raises(tool.AmqpError) as refused:
        tool.amqp_login("127.0.0.1", node.port, node.user, node.password + "x", node.vhost)
    assert refused.value.code == 403

    # everything the broker listens on is on loopback: AMQP and the Erlang distribution
    listening = listening_sockets(pid)
    assert ("127.0.0.1", node.port) in listening
    assert ("127.0.0.1", node.dist_port) in listening
    if node.tls_port is not None:  # the TLS listener (tools/rabbitmq.py --tls), loopback too
        assert ("127.0.0.1", node.tls_port) in listening
    assert all(is_loopback(a) for a, _ in listening), listening


def test_publish_and_consume_with_pika(rabbitmq: RabbitService, rabbitmq_vhost: Vhost) -> None:
    with closing(connect(rabbitmq_vhost.url)) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.exchange_declare("t.events", "topic", durable=True)
        q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ch.queue_bind(q, "t.events", "mailbox.m1")
        props = pika.BasicProperties(content_type="application/json")
        for i in range(20):
            ch.basic_publish("t.events", "mailbox.m1", json.dumps({"v": 1, "n": i}).encode(), props)
        ch.basic_publish("t.events", "mailbox.m2", b"{}", props)  # bound nowhere: dropped

        got = []
        t0 = time.monotonic()
        for method, properties, body in ch.consume(q, inactivity_timeout=1.0):
            if method is None:
                break
            assert method.routing_key == "mailbox.m1"
            assert properties.content_type == "application/json"
            got.append(json.loads(body)["n"])
            ch.basic_ack(method.delivery_tag)
            if len(got) == 20:
                break
        ch.cancel()
        assert got == list(range(20))
        assert time.monotonic() - t0 < 5
        # auto-delete: the queue went with its last consumer, the connection is still open
        assert queue_state(rabbitmq_vhost.url, q) == 404

        # a round trip through the broker, publish to delivery, on one machine
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, "t.events", "mailbox.m1")
        latencies = []
        for _ in range(50):
            start = time.perf_counter()
            ch.basic_publish("t.events", "mailbox.m1", b"{}", props)
            while True:
                method, _, _ = ch.basic_get(q, auto_ack=True)
                if method is not None:
                    break
            latencies.append(time.perf_counter() - start)
        latencies.sort()
        report(f"publish (confirmed) + basic_get round trip: p50 {latencies[25] * 1000:.1f} ms, "
               f"max {latencies[-1] * 1000:.1f} ms over 50")


def test_rabbitmqctl_lists_queues_and_bindings(rabbitmq: RabbitService, rabbitmq_vhost: Vhost) -> None:
    vh = rabbitmq_vhost.name
    with closing(connect(rabbitmq_vhost.url)) as conn:
        ch = conn.channel()
        # the event bus's topology, in small
        ch.exchange_declare("p.events", "topic", durable=True)
        ch.exchange_declare("p.dead", "direct", durable=True)
        ch.queue_declare("p.group.g.dead", durable=True)
        ch.queue_bind("p.group.g.dead", "p.dead", "g")
        ch.queue_declare("p.group.g", durable=True,
                         arguments={"x-dead-letter-exchange": "p.dead", "x-dead-letter-routing-key": "g"})
        ch.queue_bind("p.group.g", "p.events", "#")
        node_q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for key in ("mailbox.a", "mailbox.b"):
            ch.queue_bind(node_q, "p.events", key)

        queues = {q.name: q for q in rabbitmq.queues(vh)}
        assert set(queues) == {"p.group.g.dead", "p.group.g", node_q}
        assert queues[node_q].exclusive and queues[node_q].auto_delete and not queues[node_q].durable
        assert queues["p.group.g"].durable and not queues["p.group.g"].exclusive
        assert not queues["p.group.g"].auto_delete
        assert queues["p.group.g"].arguments == {"x-dead-letter-exchange": "p.dead", "x-dead-letter-routing-key": "g"}
        assert queues["p.group.g.dead"].arguments == {}

        bindings = {(b.source, b.destination, b.routing_key) for b in rabbitmq.bindings(vh)}
        assert bindings == {("p.dead", "p.group.g.dead", "g"), ("p.events", "p.group.g", "#"),
                            ("p.events", node_q, "mailbox.a"), ("p.events", node_q, "mailbox.b")}
        implicit = [b for b in rabbitmq.bindings(vh, include_default=True) if b.source == ""]
        assert {b.destination for b in implicit} == set(queues)

        exchanges = rabbitmq.exchanges(vh)
        assert exchanges["p.events"]["type"] == "topic" and exchanges["p.events"]["durable"]
        assert exchanges["p.dead"]["type"] == "direct"

        ch.queue_unbind(node_q, "p.events", "mailbox.a")
        assert ("p.events", node_q, "mailbox.a") not in {
            (b.source, b.destination, b.routing_key) for b in rabbitmq.bindings(vh)}

        # the same through the command line
        out = subprocess.run(
            [sys.executable, str(TOOL_PATH), "--base", str(rabbitmq.node.base), "ctl", "--name",
             rabbitmq.node.name, "--", "list_queues", "-p", vh, "name", "exclusive"],
            capture_output=True, text=True, timeout=60, check=True).stdout
        assert f"{node_q}\ttrue" in out and "p.group.g\tfalse" in out

    # the connection closed: its exclusive queue went, with its bindings; the durable ones stay
    assert {q.name for q in rabbitmq.queues(vh)} == {"p.group.g.dead", "p.group.g"}
    assert {b.destination for b in rabbitmq.bindings(vh)} == {"p.group.g.dead", "p.group.g"}


CLIENT = r"""
import sys, pika
url, exchange, *keys = sys.argv[1:]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.exchange_declare(exchange, "topic", durable=True)
q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
for key in keys:
    ch.queue_bind(q, exchange, key)
print(q, flush=True)
while True:
    conn.sleep(1)
"""


def test_killed_client_leaves_no_queue_or_binding(rabbitmq: RabbitService, rabbitmq_vhost: Vhost) -> None:
    """A node that dies (SIGKILL, no AMQP close) loses its queue and bindings
    at once: the broker sees the TCP connection close."""
    vh = rabbitmq_vhost.name
    keys = [f"mailbox.{i:03d}" for i in range(50)]
    timings = []
    for attempt in range(3):
        child = subprocess.Popen([sys.executable, "-c", CLIENT, rabbitmq_vhost.url, "k.events", *keys],
                                 stdout=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([child.stdout], [], [], 30)
            assert ready, "the client did not declare its queue within 30s"
            queue = child.stdout.readline().strip()  # type: ignore[union-attr]
            assert queue.startswith("amq.gen-"), queue

            listed = rabbitmq.queue(queue, vh)
            assert listed is not None and listed.exclusive and listed.auto_delete
            assert {b.routing_key for b in rabbitmq.bindings(vh) if b.destination == queue} == set(keys)
            assert queue_state(rabbitmq_vhost.url, queue) == 405  # someone else's exclusive queue

            os.kill(child.pid, signal.SIGKILL)
            t0 = time.monotonic()
            eventually(lambda: queue_state(rabbitmq_vhost.url, queue) == 404, timeout=5.0, interval=0.01,
                       message="the killed client's queue is deleted")
            timings.append(time.monotonic() - t0)
        finally:
            child.kill()
            child.wait(10)
        assert rabbitmq.queue(queue, vh) is None
        assert [b for b in rabbitmq.bindings(vh) if b.destination == queue] == []
    assert [q.name for q in rabbitmq.queues(vh) if q.exclusive] == []
    report("SIGKILLed client's exclusive queue (50 bindings) gone after "
           + ", ".join(f"{t * 1000:.0f} ms" for t in timings))


def test_stop_and_start_keep_durable_messages(rabbitmq: RabbitService, rabbitmq_vhost: Vhost) -> None:
    node = rabbitmq.node
    conn = connect(rabbitmq_vhost.url)
    stop_seconds = start_seconds = 0.0
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare("s.durable", durable=True)
        transient = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ch.basic_publish("", "s.durable", b"persistent", pika.BasicProperties(delivery_mode=2))
        assert rabbitmq.queue("s.durable", rabbitmq_vhost.name).messages == 1

        rss = node.rss()
        t0 = time.monotonic()
        assert rabbitmq.stop()
        stop_seconds = time.monotonic() - t0
        assert not node.is_running()
        assert not tool.amqp_answers("127.0.0.1", node.port, timeout=1.0)
        with pytest.raises(AMQPConnectionError):  # the client saw the broker go
            conn.process_data_events(time_limit=1)
            conn.channel()
    finally:
        try:
            if conn.is_open:
                conn.close()
        except AMQPConnectionError:
            pass
        if not node.is_running():
            start_seconds = rabbitmq.start()
    assert node.is_up()
    report(f"stop {stop_seconds:.1f}s (RSS before {rss and rss // 2**20} MiB), "
           f"start with existing data {start_seconds:.1f}s")

    with closing(connect(rabbitmq_vhost.url)) as conn:
        ch = conn.channel()
        method, props, body = ch.basic_get("s.durable", auto_ack=True)
        assert body == b"persistent" and props.delivery_mode == 2
        ch.queue_delete("s.durable")
    assert rabbitmq.queue(transient, rabbitmq_vhost.name) is None


def test_command_line(rabbitmq: RabbitService) -> None:
    node = rabbitmq.node

    def tool_cli(*args: str) -> str:
        result = subprocess.run([sys.executable, str(TOOL_PATH), "--base", str(node.base), *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    status = tool_cli("status")
    line = next(line for line in status.splitlines() if line.startswith(node.name + " "))
    assert " up " in line and str(node.pid()) in line
    assert node.password not in status  # masked
    assert tool_cli("url", "--name", node.name).strip() == node.url
    t0 = time.monotonic()
    assert "already running" in tool_cli("start", "--name", node.name)  # idempotent
    report(f"'start' on a running node: {time.monotonic() - t0:.2f}s")
    assert node.vhost in tool_cli("ctl", "--name", node.name, "--", "list_vhosts")


# -- a second broker, on ports of its own, with its own epmd


def test_second_node_with_its_own_epmd(tmp_path: Path) -> None:
    node = tool.RabbitNode("second", port=free_port(), dist_port=free_port(), epmd_port=free_port(),
                           base=tmp_path / "nodes")
    epmd = node.epmd
    try:
        took = node.start(120)
        epmd_pid = epmd.pid()
        assert epmd_pid is not None, "the tool starts an epmd of its own on a free port"
        assert tool.epmd_names(node.epmd_port) == ["second"]
        for pid in (node.pid(), epmd_pid):
            listening = listening_sockets(pid)  # type: ignore[arg-type]
            assert listening and all(is_loopback(a) for a, _ in listening), listening
        assert node.ctl(["-q", "eval", "node()."]).strip() == "second@localhost"

        assert node.kill()
        assert not node.is_running() and epmd.pid() is None, "a killed broker's epmd goes too"
        assert tool.epmd_names(node.epmd_port) is None
        t0 = time.monotonic()
        node.start(120)  # recovers after the crash
        restart = time.monotonic() - t0
        assert node.is_up()
        t0 = time.monotonic()
        assert node.stop()
        stop = time.monotonic() - t0
        assert epmd.pid() is None and tool.epmd_names(node.epmd_port) is None
        assert not tool.amqp_answers("127.0.0.1", node.port, timeout=1.0)
        report(f"second node: fresh start {took:.1f}s, start after SIGKILL {restart:.1f}s, stop {stop:.1f}s")
    finally:
        node.kill()
        epmd.stop_if_unused()
