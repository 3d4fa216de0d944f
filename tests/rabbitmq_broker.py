"""A real RabbitMQ for tests: pytest fixtures over ``tools/rabbitmq.py``.

``tests/conftest.py`` names this module in ``pytest_plugins``, so every test
takes these fixtures as arguments without importing them.

* ``rabbitmq`` (session scope): a broker of ours on 127.0.0.1:5673 (Debian's
  rabbitmq-server run by ``tools/rabbitmq.py``).  A node of ours already
  running on that port (e.g. started with ``python3 tools/rabbitmq.py start``)
  is reused and left running, which makes local iteration fast; otherwise the
  fixture starts a fresh node named ``test`` (user ``mailcluster``, password
  ``mailcluster-test``) and stops it at the end of the session.
  ``MAILCLUSTER_TEST_RABBITMQ_PORT`` moves it to another port.
  A test that stops the broker starts it again before it ends, since later
  tests share it.
* ``rabbitmq_vhost`` (module scope): a vhost of its own on that broker where
  the ``mailcluster`` user has full permissions, deleted at the end of the
  module; ``rabbitmq.unique_vhost()`` makes more.
* ``rabbitmq_tls`` (module scope): a broker with a TLS listener
  (``amqps://``, ``service.tls_url_for(vhost)``, verified with
  ``service.ca_file``).  The broker the ``rabbitmq`` fixture starts has one
  (on its AMQP port + 1000), so this is usually that broker; a reused broker
  without TLS gets a node ``test-tls`` beside it for the module.

Nothing here skips: without rabbitmq-server the fixtures raise and the tests
fail (tools/install-test-deps installs it).

``tools/rabbitmq.py`` is loaded under the module name
``mailcluster_rabbitmq_tool``, as ``tests/cassandra_cluster.py`` does for its tool.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers.tools import TOOLS, load_tool

TOOL_PATH = TOOLS / "rabbitmq.py"
TOOL_MODULE = "mailcluster_rabbitmq_tool"

T = TypeVar("T")

tool = load_tool(TOOL_PATH.name, TOOL_MODULE)
RabbitNode = tool.RabbitNode
RabbitToolError = tool.RabbitToolError

TEST_NAME = "test"
TEST_PASSWORD = "mailcluster-test"
TEST_PORT = int(os.environ.get("MAILCLUSTER_TEST_RABBITMQ_PORT", str(tool.AMQP_PORT)))
START_TIMEOUT = float(os.environ.get("MAILCLUSTER_TEST_RABBITMQ_TIMEOUT", "120"))


@dataclasses.dataclass(frozen=True)
class Queue:
    """A queue as ``rabbitmqctl list_queues`` shows it."""

    name: str
    durable: bool
    auto_delete: bool
    exclusive: bool
    arguments: dict[str, Any]
    messages: int
    consumers: int


@dataclasses.dataclass(frozen=True)
class Binding:
    """A binding as ``rabbitmqctl list_bindings`` shows it (source "" is the default exchange)."""

    source: str
    destination: str
    destination_kind: str
    routing_key: str
    arguments: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Vhost:
    name: str
    url: str


@dataclasses.dataclass
class RabbitService:
    """What a test needs to reach the broker, inspect it and stop it."""

    node: Any  # tool.RabbitNode
    started_here: bool = False
    #: seconds the fixture took to start the broker (0 when reused)
    start_seconds: float = 0.0
    made_vhosts: list[str] = dataclasses.field(default_factory=list)

    # -- reaching it
    @property
    def url(self) -> str:
        """amqp://mailcluster:PASSWORD@127.0.0.1:PORT/mailcluster"""
        return str(self.node.url)

    @property
    def vhost(self) -> str:
        return str(self.node.vhost)

    @property
    def port(self) -> int:
        return int(self.node.port)

    def url_for(self, vhost: str) -> str:
        return str(self.node.url_for(vhost))

    @property
    def tls_port(self) -> int | None:
        return None if self.node.tls_port is None else int(self.node.tls_port)

    @property
    def ca_file(self) -> Path:
        """The CA certificate that signed the TLS listener's certificate."""
        return Path(self.node.ca_file)

    def tls_url_for(self, vhost: str) -> str:
        """amqps://mailcluster:PASSWORD@127.0.0.1:TLS_PORT/VHOST"""
        return str(self.node.tls_url_for(vhost))

    # -- life cycle
    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Start the broker (keeping its data); the seconds taken."""
        return float(self.node.start(timeout))

    def stop(self) -> bool:
        return bool(self.node.stop())

    def kill(self) -> bool:
        return bool(self.node.kill())

    def is_up(self) -> bool:
        return bool(self.node.is_up())

    def rss(self) -> int | None:
        return self.node.rss()

    # -- rabbitmqctl
    def ctl(self, *args: str, check: bool = True) -> str:
        """rabbitmqctl with the node's environment: ``ctl("list_queues", "-p", vhost, "name")``."""
        return str(self.node.ctl(list(args), check=check))

    def queues(self, vhost: str | None = None) -> list[Queue]:
        return [Queue(name=q["name"], durable=bool(q["durable"]), auto_delete=bool(q["auto_delete"]),
                      exclusive=bool(q["exclusive"]), arguments=q["arguments"],
                      messages=int(q.get("messages") or 0), consumers=int(q.get("consumers") or 0))
                for q in self.node.queues(vhost)]

    def queue(self, name: str, vhost: str | None = None) -> Queue | None:
        return next((q for q in self.queues(vhost) if q.name == name), None)

    def bindings(self, vhost: str | None = None, *, include_default: bool = False) -> list[Binding]:
        """Bindings of a vhost; without the implicit ones of the default exchange
        unless ``include_default``."""
        return [Binding(**b) for b in self.node.bindings(vhost) if include_default or b["source"]]

    def exchanges(self, vhost: str | None = None) -> dict[str, dict[str, Any]]:
        """Exchanges by name (RabbitMQ's own "" and amq.* included)."""
        return {e["name"]: e for e in self.node.exchanges(vhost)}

    # -- isolation
    def unique_vhost(self, prefix: str = "t") -> Vhost:
        """A new vhost where our user has full permissions; deleted at the end
        of the session (or by delete_vhost)."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        url = self.node.add_vhost(name)
        self.made_vhosts.append(name)
        return Vhost(name, url)

    def delete_vhost(self, name: str) -> None:
        self.node.delete_vhost(name)
        if name in self.made_vhosts:
            self.made_vhosts.remove(name)

    def cleanup(self) -> None:
        """Delete the vhosts tests made (when the broker outlives the session)."""
        for name in list(self.made_vhosts):
            try:
                self.delete_vhost(name)
            except Exception as e:  # noqa: BLE001 - a leftover vhost only costs a little memory
                print(f"[rabbitmq] could not delete vhost {name}: {e!r}")


def eventually(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Call ``check`` until it returns something true; that value (or AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout}s (last: {value!r})")
        time.sleep(interval)


def start_broker(base: Path | None = None, port: int = TEST_PORT) -> RabbitService:
    """Reuse a running node of ours on ``port``, else start the fresh node ``test`` (with a TLS listener)."""
    base = Path(base or tool.DEFAULT_BASE)
    for node in tool.RabbitNode.all(base):
        if node.port == port and node.is_running():
            node.start(START_TIMEOUT)  # idempotent: provisions it again if needed
            return RabbitService(node, started_here=False)
    node = tool.RabbitNode.load_or_new(TEST_NAME, base, port=port, password=TEST_PASSWORD,
                                       tls_port=port + tool.TLS_PORT_OFFSET)
    node.stop()  # a leftover process of ours that no longer answers
    took = node.start(START_TIMEOUT, fresh=True)
    return RabbitService(node, started_here=True, start_seconds=took)


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitService]:
    service = start_broker()
    try:
        yield service
    finally:
        if service.started_here:
            service.stop()
        elif service.node.is_running():
            service.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def rabbitmq_tls(rabbitmq: RabbitService) -> Iterator[RabbitService]:
    if rabbitmq.tls_port is not None:
        yield rabbitmq
        return
    # A reused broker started without TLS: one of our own beside it, on free ports.
    node = tool.RabbitNode.load_or_new("test-tls", Path(tool.DEFAULT_BASE), port=_free_port(),
                                       dist_port=_free_port(), tls_port=_free_port(), password=TEST_PASSWORD)
    node.stop()
    service = RabbitService(node, started_here=True, start_seconds=node.start(START_TIMEOUT, fresh=True))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def rabbitmq_vhost(rabbitmq: RabbitService) -> Iterator[Vhost]:
    vhost = rabbitmq.unique_vhost("mod")
    try:
        yield vhost
    finally:
        if rabbitmq.node.is_running():
            rabbitmq.delete_vhost(vhost.name)
