"""tls/client.py: real TLS handshakes on loopback, with certificates of the test CA.

The servers are Twisted TLS listeners in the test process (the reactor of
pytest-twisted); the clients are the two stacks the node uses: Twisted's
``wrapClientTLS`` with ``twisted_creator`` (the RabbitMQ bus) and a socket
wrapped by ``stdlib_context`` (what cassandra-driver does with it).  A
certificate signed by another CA, or one that does not name the address
connected to, must fail the handshake, and ``describe_tls_failure`` must say
which in one line.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from tests.helpers.tools import load_tool
from twisted_mail_cluster.tls.client import describe_tls_failure, stdlib_context, twisted_creator

test_ca = load_tool("test_ca.py", "mailcluster_test_ca")

CA_KEY = "events.rabbitmq.ca_file"


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.transport.write(data)


class NotTLS(Protocol):
    """What RabbitMQ's clear listener does with bytes that are not AMQP: its header, then close."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.transport.write(b"AMQP\x00\x00\x09\x01")
        self.transport.loseConnection()


@dataclass
class Servers:
    ca: Path
    other_ca: Path
    #: port of a TLS echo server whose certificate (of ``ca``) names 127.0.0.1
    good: int
    #: port of one whose certificate (of ``ca``) names 127.0.0.2 only
    wrong_name: int
    #: port of a server that does not speak TLS
    plain: int


def _tls_server(files: Any) -> Any:
    pem = Path(files.key).read_bytes() + Path(files.certificate).read_bytes()
    options = PrivateCertificate.loadPEM(pem).options()
    return reactor.listenSSL(0, Factory.forProtocol(Echo), options, interface="127.0.0.1")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("tls")
    ca_dir = root / "ca"
    good = test_ca.server_files(root / "good", ["127.0.0.1"], [], ca_dir=ca_dir)
    wrong = test_ca.server_files(root / "wrong", ["127.0.0.2"], [], ca_dir=ca_dir)
    other_ca = Path(test_ca.ensure_ca(root / "other-ca", name="another CA"))
    ports = [_tls_server(good), _tls_server(wrong),
             reactor.listenTCP(0, Factory.forProtocol(NotTLS), interface="127.0.0.1")]
    try:
        yield Servers(Path(good.ca), other_ca, *(p.getHost().port for p in ports))
    finally:
        for port in ports:
            port.stopListening()


# -- Twisted (the RabbitMQ bus)


class Client(Protocol):
    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if not self.done.called:
            self.done.callback(data)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        if not self.done.called:
            self.done.errback(reason)


async def twisted_exchange(port: int, ca: Path | None, host: str = "127.0.0.1") -> bytes:
    endpoint = wrapClientTLS(twisted_creator(host, ca), TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5))
    client = await endpoint.connect(Factory.forProtocol(Client))
    # (the endpoint gives back the wrapped protocol, ours)
    return await client.done


@pytest_twisted.ensureDeferred
async def test_twisted_client_trusts_the_configured_ca(servers: Servers) -> None:
    assert await twisted_exchange(servers.good, servers.ca) == b"ping"


@pytest_twisted.ensureDeferred
async def test_twisted_client_refuses_another_ca(servers: Servers) -> None:
    with pytest.raises(SSL.Error) as info:
        await twisted_exchange(servers.good, servers.other_ca)
    assert describe_tls_failure(info.value, CA_KEY) == (
        "TLS handshake failed (certificate verify failed): the server's certificate does not verify against "
        "the CAs of events.rabbitmq.ca_file (the system's trust store when unset): signed by another CA, or expired"
    )


@pytest_twisted.ensureDeferred
async def test_twisted_client_refuses_the_system_store_for_a_private_ca(servers: Servers) -> None:
    with pytest.raises(SSL.Error):
        await twisted_exchange(servers.good, None)


@pytest_twisted.ensureDeferred
async def test_twisted_client_checks_the_ip_address(servers: Servers) -> None:
    with pytest.raises(VerificationError) as info:
        await twisted_exchange(servers.wrong_name, servers.ca)
    assert describe_tls_failure(info.value, CA_KEY) == (
        "TLS: the server's certificate does not name 127.0.0.1 (the host name or IP address connected to)"
    )


@pytest_twisted.ensureDeferred
async def test_twisted_client_meets_a_port_without_tls(servers: Servers) -> None:
    with pytest.raises(SSL.Error) as info:
        await twisted_exchange(servers.plain, servers.ca)
    message = describe_tls_failure(info.value, CA_KEY)
    assert message is not None and message.startswith("TLS handshake failed (")
    assert message.endswith("the server did not answer in TLS: is that port its TLS listener?"), message


def test_twisted_client_refuses_tls_before_1_2(servers: Servers) -> None:
    creator = twisted_creator("127.0.0.1", servers.ca)
    # The OpenSSL context the creator's connections come from (a private attribute of
    # Twisted's ClientTLSOptions); SSL_CTX_set_options(0) answers the options in force.
    context = creator._createConnection.__self__.getContext()  # type: ignore[attr-defined]
    options = context.set_options(0)
    assert options & SSL.OP_NO_SSLv3 and options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1
    assert not options & SSL.OP_NO_TLSv1_2 and not options & SSL.OP_NO_TLSv1_3


# -- the standard library (cassandra-driver)


def stdlib_exchange(port: int, ca: Path | None, host: str = "127.0.0.1") -> bytes:
    """What cassandra-driver does: wrap a socket with the context, server_hostname the endpoint's address."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with stdlib_context(ca).wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"ping")
            return tls.recv(4)


def test_stdlib_context_settings(servers: Servers) -> None:
    context = stdlib_context(servers.ca)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is True
    assert len(context.get_ca_certs()) == 1
    assert stdlib_context(None).verify_mode == ssl.CERT_REQUIRED


@pytest_twisted.ensureDeferred
async def test_stdlib_client_trusts_the_configured_ca(servers: Servers) -> None:
    assert await deferToThread(stdlib_exchange, servers.good, servers.ca) == b"ping"


@pytest_twisted.ensureDeferred
async def test_stdlib_client_refuses_another_ca(servers: Servers) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        await deferToThread(stdlib_exchange, servers.good, servers.other_ca)
    message = describe_tls_failure(info.value, "store.cassandra.tls_ca_file")
    assert message is not None
    assert message.startswith("TLS handshake failed (certificate verify failed: unable to get local issuer")
    assert "store.cassandra.tls_ca_file" in message


@pytest_twisted.ensureDeferred
async def test_stdlib_client_checks_the_ip_address(servers: Servers) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        await deferToThread(stdlib_exchange, servers.wrong_name, servers.ca)
    assert "IP address mismatch" in str(info.value.verify_message)


def test_describe_ignores_other_errors() -> None:
    assert describe_tls_failure(ConnectionRefusedError(111, "refused"), CA_KEY) is None


# -- cassandra-driver's view of a failed handshake (store/cassandra/connection.py)


def test_cassandra_session_context_follows_the_configuration(servers: Servers) -> None:
    from twisted_mail_cluster.config import CassandraConfig
    from twisted_mail_cluster.store.cassandra.connection import CassandraSession

    assert CassandraSession(CassandraConfig(), reactor).ssl_context() is None
    context = CassandraSession(CassandraConfig(tls=True, tls_ca_file=servers.ca), reactor).ssl_context()
    assert context is not None and context.check_hostname and len(context.get_ca_certs()) == 1


@pytest.mark.parametrize(("cause", "advice"), [
    ("Tried connecting to [('127.0.0.9', 9042)]. Last error: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
     "failed: unable to get local issuer certificate (_ssl.c:1006)",
     "the node's certificate does not verify against store.cassandra.tls_ca_file"),
    ("Tried connecting to [('127.0.0.9', 9042)]. Last error: [SSL: WRONG_VERSION_NUMBER] wrong version number "
     "(_ssl.c:1006)", "the node does not answer in TLS"),
])
def test_cassandra_tls_failure_is_one_line(cause: str, advice: str) -> None:
    from cassandra.cluster import NoHostAvailable

    from twisted_mail_cluster.store.cassandra.connection import _tls_failure

    error = NoHostAvailable("Unable to connect to any servers", {"127.0.0.9:9042": OSError(None, cause)})
    message = _tls_failure(error)
    assert message is not None and "\n" not in message
    assert message.startswith(f"TLS to Cassandra at 127.0.0.9:9042 failed ({cause.split('Last error: ')[1]}")
    assert advice in message


def test_cassandra_failure_without_tls_is_left_alone() -> None:
    from cassandra.cluster import NoHostAvailable

    from twisted_mail_cluster.store.cassandra.connection import _tls_failure

    refused = NoHostAvailable("Unable to connect to any servers", {"127.0.0.9:9042": ConnectionRefusedError(111, "x")})
    assert _tls_failure(refused) is None
