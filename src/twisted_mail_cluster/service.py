"""Assemble one node: store, event bus, protocols, manhole, logging.

``make_service`` runs inside twistd before the reactor starts and before any
port is opened, so it may block: it opens the embedded store once to create
or check its schema, and a store that cannot be opened stops start-up with
one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any, NoReturn

import structlog
from twisted.application import strports
from twisted.application.service import IServiceCollection, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorCore

from .config import Config
from .events.inprocess import InProcessEventBus
from .imap.server import IMAPFactory
from .logs import LoggingMultiService
from .manhole import make_manhole_service
from .node import Node, build_node
from .options import MailClusterOptions
from .pop3.server import POP3Factory
from .smtp.server import SMTPFactory
from .store.embedded import EmbeddedStore, check_database

log = structlog.get_logger(__name__)

DATABASE_NAME = "mailcluster.sqlite3"


class NodeService(Service):
    """Starts the store and the bus with the node, and closes them on shutdown."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def startService(self) -> None:
        super().startService()
        d = DeferredList([self.node.store.start(), self.node.bus.start()], fireOnOneErrback=True)
        d.addCallback(lambda _: log.info("node.started", hostname=self.node.config.hostname))
        d.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        log.critical("node.start_failed", error=str(failure.value))
        reactor: Any = self.node.reactor
        reactor.stop()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return DeferredList([self.node.bus.stop(), self.node.store.close()])


def database_path(config: Config) -> Path:
    return config.data_dir / DATABASE_NAME


def open_store(config: Config, reactor: IReactorCore) -> EmbeddedStore:
    """The configured store, its schema checked now (config validation allows only embedded)."""
    path = database_path(config)
    try:
        check_database(path)
    except (OSError, sqlite3.Error, RuntimeError) as e:
        _refuse(f"cannot open the store at {path}: {e}")
    return EmbeddedStore(path, reactor)  # type: ignore[arg-type]


def make_service(options: MailClusterOptions, reactor: IReactorCore | None = None) -> LoggingMultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor  # type: ignore[assignment]
    config = options.config
    top = LoggingMultiService(getattr(options, "parent", None), config.log.level)
    store = open_store(config, reactor)  # type: ignore[arg-type]
    bus = InProcessEventBus(reactor)  # type: ignore[arg-type]
    node = build_node(config, store, bus, reactor)  # type: ignore[arg-type]
    NodeService(node).setServiceParent(top)
    _listen(top, config.smtp.listen, SMTPFactory(node))
    _listen(top, config.pop3.listen, POP3Factory(node))
    _listen(top, config.imap.listen, IMAPFactory(node))
    if config.manhole.enabled:
        namespace = {"node": node, "store": store, "bus": bus, "accounts": node.accounts,
                     "mailboxes": node.mailboxes, "config": config, "service": top}
        try:
            manhole = make_manhole_service(config.manhole, config.data_dir, namespace)
        except (ValueError, OSError) as e:
            _refuse(f"manhole: {e}")
        manhole.setServiceParent(top)
    return top


def _refuse(message: str) -> NoReturn:
    """Stop start-up with one line and status 1 (we are still before the reactor)."""
    sys.stderr.write(f"twistd mailcluster: {message}\n")
    sys.exit(1)


def _listen(parent: IServiceCollection, endpoints: tuple[str, ...], factory: Any) -> None:
    for endpoint in endpoints:
        strports.service(endpoint, factory).setServiceParent(parent)
