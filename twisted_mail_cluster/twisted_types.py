"""Types for the parts of Twisted the node uses, where Twisted's own are too narrow.

Twisted types ``Protocol.transport`` as ``Optional[ITransport]``: None before
``makeConnection``, and an interface that names only write and close.  Our
protocols run only between ``connectionMade`` and ``connectionLost``, and they
use more of a real TCP or TLS connection than that: the peer, abort, flow
control in both directions and STARTTLS.

Likewise each reactor interface names one facet (time, threads, ...), while a
node uses several of the one reactor it runs on.  Declaring both once here lets
mypy check every use, instead of each call site asserting or casting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReactorCore,
    IReactorThreads,
    IReactorTime,
    ISystemHandle,
    ITCPTransport,
    ITLSTransport,
)
from zope.interface import Attribute


class IServerTransport(ITLSTransport, IConsumer, IPushProducer, ISystemHandle):
    """A server-side stream connection (TCP, or TLS over TCP).

    ``getHandle()`` is the socket in clear, and the pyOpenSSL Connection once
    TLS started (implicit TLS or STARTTLS alike).
    """

    disconnecting = Attribute("True once loseConnection() was called.")


class INodeReactor(IReactorCore, IReactorTime, IReactorThreads):
    """What a node uses of its reactor: every Twisted reactor provides all of it."""


def installed_reactor() -> INodeReactor:
    """The global reactor, typed (``twisted.internet.reactor`` is a bare module attribute)."""
    from twisted.internet import reactor

    return cast(INodeReactor, reactor)


@dataclass(frozen=True)
class ConnectionInfo:
    """Who is on the other end, and which of our listeners they reached.

    Every protocol logs these same fields on ``connection.open`` and
    ``connection.close``, so that one client's connections can be followed
    across protocols and listeners (MX port, submission, implicit TLS).
    """

    #: The client's address.
    remote: str
    #: The client's port (what a NAT or firewall log names).
    port: int | None
    #: Our listening port the client connected to.
    local_port: int | None

    @classmethod
    def of(cls, transport: ITCPTransport) -> ConnectionInfo:
        peer, local = transport.getPeer(), transport.getHost()
        return cls(str(getattr(peer, "host", peer)), getattr(peer, "port", None), getattr(local, "port", None))

    def log_fields(self) -> dict[str, object]:
        return {"remote": self.remote, "port": self.port, "local_port": self.local_port}
