"""How a node reaches RabbitMQ: a TCP endpoint, wrapped in TLS for ``amqps://``.

pika's Twisted adapter ignores the host, port and TLS settings of its
connection parameters (TWISTED-NOTES section 7): whatever the endpoint
connects is what it speaks AMQP over.  So TLS is the endpoint's job here,
with ``wrapClientTLS``: the broker's certificate chain and host name are
verified during the handshake, before pika can send a byte of the login
(its PLAIN credentials go out only in answer to the broker's
``connection.start``, which a broker that failed verification never gets to
send).  A failed handshake ends the connection with the TLS error, which the
Reconnector logs (``bus.setup_failed``, see reconnect.describe) before it
tries again with its backoff.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pika
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

from ..tls.client import twisted_creator

#: Seconds a TCP connect may take.
CONNECT_TIMEOUT = 10


def is_tls(url: str) -> bool:
    return url.lower().startswith("amqps://")


def amqp_endpoint(
    reactor: Any, url: str, parameters: pika.URLParameters, ca_file: Path | None = None
) -> IStreamClientEndpoint:
    """The endpoint for ``url`` (host and port as pika parsed them: 5671 is amqps://'s default).

    ``ca_file``: PEM CA certificates to trust for amqps://; None, the system's.
    """
    tcp = TCP4ClientEndpoint(reactor, parameters.host, parameters.port, timeout=CONNECT_TIMEOUT)
    if not is_tls(url):
        return tcp
    return wrapClientTLS(twisted_creator(parameters.host, ca_file), tcp, clock=reactor)
