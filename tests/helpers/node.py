"""Build a real node in the test process: embedded store in tmp_path, in-process bus.

Protocol tests listen on 127.0.0.1:0 with the real reactor and drive the
server with real clients (smtplib, poplib, imaplib in a thread; raw sockets
where exact bytes matter).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from twisted_mail_cluster.config import AuthConfig, Config
from twisted_mail_cluster.events.inprocess import InProcessEventBus
from twisted_mail_cluster.node import Node, build_node
from twisted_mail_cluster.store.embedded import EmbeddedStore

DOMAIN = "example.test"
PASSWORD = "correct horse battery staple"


def make_config(tmp_path: Path, trusted: bool = True, **sections: Any) -> Config:
    """Defaults, with tiny login delays; ``trusted=False`` makes loopback untrusted."""
    networks = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")) if trusted else (
        ipaddress.ip_network("192.0.2.0/24"),
    )
    config = Config(
        hostname="mx.example.test",
        data_dir=tmp_path,
        auth=AuthConfig(trusted_networks=networks, failed_login_delay=0.05, max_failed_login_delay=0.2),
    )
    return dataclasses.replace(config, **sections)


async def make_node(tmp_path: Path, users: tuple[str, ...] = ("alice", "bob", "carol"), **kwargs: Any) -> Node:
    """A started node with domain example.test and the given users (password PASSWORD)."""
    store = EmbeddedStore(tmp_path / "mailcluster.sqlite3", reactor)
    await store.start()
    bus = InProcessEventBus(reactor)
    node = build_node(make_config(tmp_path, **kwargs), store, bus, reactor)
    await node.accounts.add_domain(DOMAIN)
    for user in users:
        await node.accounts.add_user(f"{user}@{DOMAIN}", PASSWORD)
    return node


def listen(factory: Any) -> tuple[int, Any]:
    """Listen on an ephemeral loopback port; return (port number, listening port)."""
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port.getHost().port, port


def stop(port: Any, node: Node) -> Deferred[Any]:
    d = Deferred.fromCoroutine(_stop(port, node))
    return d


async def _stop(port: Any, node: Node) -> None:
    await port.stopListening()
    await node.store.close()
