"""Assemble one node: store, event bus, protocols, manhole, logging.

``make_service`` runs inside twistd before the reactor starts and before any
port is opened, so it may block: it opens the embedded store once to create
or check its schema, and a store that cannot be opened stops start-up with
one line on stderr and a non-zero exit status.  The Cassandra store connects
when the node starts; the listeners open once it answers.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any, NoReturn

import structlog
from twisted.application import strports
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.protocols.tls import TLSMemoryBIOFactory

from .config import Config
from .events.inprocess import InProcessEventBus
from .events.interfaces import IEventBus
from .events.mail_log import GROUP as MAIL_LOG_GROUP
from .events.mail_log import MailLog
from .events.rabbitmq import RabbitMQEventBus
from .imap.server import IMAPFactory
from .logs import LoggingMultiService
from .manhole import make_manhole_service
from .node import Node, build_node
from .options import MailClusterOptions
from .pop3.server import POP3Factory
from .smtp.server import SMTPFactory
from .store.cassandra import CassandraStore
from .store.embedded import EmbeddedStore, check_database
from .store.interfaces import IMailStore
from .tls.certificates import CertificateError
from .tls.server import ServerTLS, TLSReloadService, load_server_tls
from .twisted_types import INodeReactor, installed_reactor
from .private_files import keep_private
from .verifier import return_freed_memory_to_the_system

log = structlog.get_logger(__name__)

DATABASE_NAME = "mailcluster.sqlite3"


class NodeService(MultiService):
    """The node: the store and the bus first, the protocol listeners once they are ready.

    Listening only after the store answers means a client never meets a
    node that accepts a connection and then cannot serve it (a Cassandra
    backend takes a few seconds to connect).  On shutdown the listeners
    stop first, then the bus and the store.  A store that cannot start
    stops the process with exit status 1.
    """

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node
        self._started: Deferred[Any] | None = None

    def privilegedStartService(self) -> None:
        """Bind nothing yet: the listeners bind when the store is ready (see _ready).

        So ports below 1024 need the capability to bind them held by the
        running process (systemd AmbientCapabilities=CAP_NET_BIND_SERVICE, or
        setcap on the interpreter), not a root start that drops privileges.
        """

    def startService(self) -> None:
        Service.startService(self)  # the children (listeners) start when the store is ready
        d = DeferredList([self.node.store.start(), self.node.bus.start()], fireOnOneErrback=True)
        d.addCallback(lambda _: self._register_group_listeners())
        d.addCallback(self._ready)
        d.addErrback(self._failed)
        self._started = d

    def _register_group_listeners(self) -> Deferred[Any]:
        """The cluster-wide listeners this node takes part in (a RabbitMQ bus not yet
        connected keeps them and starts consuming once it is)."""
        config = self.node.config
        listeners = []
        if config.events.mail_log is not None:
            mail_log = MailLog(config.events.mail_log, config.hostname, self.node.reactor)
            listeners.append(self.node.bus.register_group(mail_log, MAIL_LOG_GROUP))
        return DeferredList(listeners, fireOnOneErrback=True)

    def _ready(self, _: Any) -> None:
        if self.running:
            for child in self:
                child.startService()
            log.info("node.started", hostname=self.node.config.hostname, store=type(self.node.store).__name__)

    def _failed(self, failure: Any) -> None:
        failure = getattr(failure.value, "subFailure", failure)
        log.critical("node.start_failed", error=repr(failure.value))
        reactor = self.node.reactor
        reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        reactor.stop()

    async def _stop(self) -> None:
        await MultiService.stopService(self)
        await DeferredList([self.node.bus.stop(), self.node.store.close()])

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def _exit_failed() -> None:
    """twistd has no exit status of its own: a node that could not start says so with 1."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def database_path(config: Config) -> Path:
    return config.data_dir / DATABASE_NAME


def open_store(config: Config, reactor: INodeReactor) -> IMailStore:
    """The configured store; the embedded one's schema is checked now, before any port."""
    if config.store.backend == "cassandra":
        return CassandraStore(config.store.cassandra, reactor, imap_enabled=config.imap.enabled)
    path = database_path(config)
    try:
        check_database(path)
    except (OSError, sqlite3.Error, RuntimeError) as e:
        _refuse(f"cannot open the store at {path}: {e}")
    return EmbeddedStore(path, reactor)


def open_bus(config: Config, reactor: INodeReactor) -> IEventBus:
    """In-process for one node; RabbitMQ for a cluster (it connects, and reconnects, by itself)."""
    if config.events.bus == "rabbitmq":
        return RabbitMQEventBus(config.events.rabbitmq.url, reactor, ca_file=config.events.rabbitmq.ca_file)
    return InProcessEventBus(reactor)


#: ``kill -USR2 PID`` writes every thread's Python stack to standard error (the
#: twistd log with -n): what an operator, or a test, needs from a node that hangs.
#: (SIGUSR1 is twistd's: it reopens the log file.)
STACK_DUMP_SIGNAL = signal.SIGUSR2


def make_service(options: MailClusterOptions, reactor: INodeReactor | None = None) -> LoggingMultiService:
    if reactor is None:
        reactor = installed_reactor()
    config = options.config
    faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True)
    # Argon2's 19 MiB buffers would otherwise stay in glibc's per-thread arenas (verifier.py).
    return_freed_memory_to_the_system()
    top = LoggingMultiService(getattr(options, "parent", None), config.log.level)
    if config.events.mail_log is not None and not config.events.mail_log.parent.is_dir():
        _refuse(f"events.mail_log: the directory {config.events.mail_log.parent} does not exist")
    try:
        for warning in keep_private(config.data_dir):
            log.warning("files.not_private", problem=warning)
    except OSError as e:
        _refuse(f"server.data: cannot create {config.data_dir}: {e.strerror or e}")
    server_tls = open_tls(config)
    TLSReloadService(server_tls, reactor).setServiceParent(top)
    store = open_store(config, reactor)
    bus = open_bus(config, reactor)
    node = build_node(config, store, bus, reactor, server_tls)
    node_service = NodeService(node)
    node_service.setServiceParent(top)
    _listen(node_service, config.smtp.listen, SMTPFactory(node))
    pop3, imap = POP3Factory(node), IMAPFactory(node)
    _listen(node_service, config.pop3.listen, pop3)
    _listen(node_service, config.pop3.listen_tls, _implicit_tls(server_tls, pop3))
    _listen(node_service, config.imap.listen, imap)
    _listen(node_service, config.imap.listen_tls, _implicit_tls(server_tls, imap))
    if config.manhole.enabled:
        namespace = {"node": node, "store": store, "bus": bus, "accounts": node.accounts,
                     "mailboxes": node.mailboxes, "config": config, "service": top}
        try:
            manhole = make_manhole_service(config.manhole, config.data_dir, namespace)
        except (ValueError, OSError) as e:
            _refuse(f"manhole: {e}")
        manhole.setServiceParent(top)
    return top


def open_tls(config: Config) -> ServerTLS:
    """The node's certificates, checked now: a bad file stops start-up with one line naming it."""
    try:
        server_tls, warnings = load_server_tls(config.tls, config.data_dir, config.hostname)
    except CertificateError as e:
        _refuse(str(e))
    for warning in warnings:
        log.warning("tls.warning", problem=warning)
    return server_tls


def _implicit_tls(server_tls: ServerTLS, factory: Any) -> TLSMemoryBIOFactory:
    """RFC 8314 implicit TLS: the protocol starts once the handshake is done."""
    wrapped = TLSMemoryBIOFactory(server_tls, False, factory)
    wrapped.noisy = False
    return wrapped


def _refuse(message: str) -> NoReturn:
    """Stop start-up with one line and status 1 (we are still before the reactor)."""
    sys.stderr.write(f"twistd mailcluster: {message}\n")
    sys.exit(1)


def _listen(parent: IServiceCollection, endpoints: tuple[str, ...], factory: Any) -> None:
    for endpoint in endpoints:
        strports.service(endpoint, factory).setServiceParent(parent)
