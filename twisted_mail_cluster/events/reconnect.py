"""Keep one AMQP connection up: connect, set it up, and after a failure or a loss try again.

Twisted's ``ClientService`` does this, but not when its ``prepareConnection``
fails on a connection that is still open (RabbitMQ refused the login, a
declare was refused): it goes to its waiting state with the connection open,
and when the broker then closes it the disconnection meets a state with no
transition for it, an ``automat.NoTransition`` logged as "Unhandled Error"
at every attempt.  Here a failed set-up closes its connection and waits for
it to be gone before the next attempt is scheduled, and the reason is logged
in one line an operator can act on.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pika.connection
import pika.exceptions
import structlog
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from ..tls.client import describe_tls_failure

log = structlog.get_logger(__name__)

#: Longest a new connection may take to be set up (AMQP handshake, declares,
#: binds): a peer that accepts TCP and then says nothing sends no heartbeat yet.
SETUP_TIMEOUT = 30.0
#: A connection that stayed up this long resets the backoff; one lost sooner
#: (the broker closes it right after set-up) keeps backing off, so that a
#: node does not reconnect, and its sessions resync, twice a second for ever.
STABLE_AFTER = 10.0
#: Longest stop() waits for a closing connection to be gone before aborting it.
CLOSE_WAIT = 5.0


class AMQPProtocol(TwistedProtocolConnection):
    """pika's protocol, with ``lost``: fires once the TCP connection is gone, whatever happened."""

    #: pika's: fires with the protocol once AMQP is open, None once it fired or failed.
    ready: Deferred[AMQPProtocol] | None

    def __init__(self, parameters: pika.ConnectionParameters) -> None:
        super().__init__(parameters)
        self.lost: Deferred[None] = Deferred()
        self._state_when_lost: int | None = None

    def _on_connection_failed(self, connection: Any, error: Exception | None = None) -> None:
        """pika's own version fails ``ready`` with a bare AMQPConnectionError(attempts),
        and its Twisted adapter hands over Twisted's ConnectionDone where pika
        would name a refused login: tell the cause from how far the handshake got."""
        ready, self.ready = self.ready, None
        if ready is None:
            return
        if isinstance(error, pika.exceptions.ConnectionClosedByBroker):
            ready.errback(error)  # the broker said why (e.g. 403 ACCESS_REFUSED)
        elif self._state_when_lost == pika.connection.Connection.CONNECTION_START:
            ready.errback(pika.exceptions.ProbableAuthenticationError(repr(error)))
        elif self._state_when_lost == pika.connection.Connection.CONNECTION_TUNE:
            ready.errback(pika.exceptions.ProbableAccessDeniedError(repr(error)))
        else:
            ready.errback(error if isinstance(error, Exception) else pika.exceptions.AMQPConnectionError(repr(error)))

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        self._state_when_lost = self._impl.connection_state
        try:
            super().connectionLost(reason)
        finally:
            if not self.lost.called:
                self.lost.callback(None)


class AMQPFactory(Factory):
    def __init__(self, parameters: pika.ConnectionParameters) -> None:
        self.parameters = parameters

    def buildProtocol(self, addr: object) -> AMQPProtocol:  # noqa: N802 - Twisted's name
        protocol = AMQPProtocol(self.parameters)
        protocol.factory = self
        return protocol


def describe(error: BaseException) -> str:
    """What went wrong, for an operator."""
    tls = describe_tls_failure(error, "events.rabbitmq.ca_file")
    if tls is not None:
        return tls
    if isinstance(error, pika.exceptions.ProbableAuthenticationError):
        return "RabbitMQ refused the login: check the user and password in events.rabbitmq.url"
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return "RabbitMQ refused access to the vhost: check the vhost in events.rabbitmq.url and the user's permissions"
    return f"{type(error).__name__}: {error}"


class Reconnector:
    """One connection at a time, set up by ``prepare``; retried with backoff for ever.

    The delay before attempt n+1 after n failures in a row is
    ``min(max_delay, initial * factor**n)``, with ±20 % jitter so that the
    nodes of a cluster do not all come back in the same instant.  A
    connection that was set up and later lost is retried after ``initial``.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: IStreamClientEndpoint,
        factory: AMQPFactory,
        prepare: Callable[[AMQPProtocol], Coroutine[Any, Any, None]],
        initial: float = 0.5,
        factor: float = 2.0,
        max_delay: float = 10.0,
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._factory = factory
        self._prepare = prepare
        self._initial, self._factor, self._max_delay = initial, factor, max_delay
        self._failures = 0
        self._running = False
        self._connecting: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._protocol: AMQPProtocol | None = None
        self._ready: AMQPProtocol | None = None
        self._waiters: list[Deferred[AMQPProtocol]] = []

    def start(self) -> None:
        self._running = True
        self._attempt()

    def when_connected(self) -> Deferred[AMQPProtocol]:
        """Fire with the connection once one is set up (at once if it is)."""
        if self._ready is not None:
            return succeed(self._ready)
        waiter: Deferred[AMQPProtocol] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def halt(self) -> None:
        """No more attempts (the caller closes the current connection its own way first)."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(CancelledError("the bus stopped"))

    async def stop(self) -> None:
        """No more attempts; close the current connection and wait (bounded) until it is gone."""
        self.halt()
        protocol = self._protocol
        if protocol is not None and not protocol.lost.called:
            protocol.transport.loseConnection()
            await _gone(protocol, self._reactor)

    def _attempt(self) -> None:
        self._retry = None
        if self._running:
            Deferred.fromCoroutine(self._connect_and_serve()).addErrback(
                lambda failure: log.error("bus.reconnect_failed", error=failure.getErrorMessage())
            )

    async def _connect_and_serve(self) -> None:
        self._connecting = self._endpoint.connect(self._factory)
        try:
            # The endpoint is typed as giving any IProtocol; ours come from AMQPFactory.
            protocol = cast(AMQPProtocol, await self._connecting)
        except CancelledError:
            return
        except Exception as e:
            log.warning("bus.connect_failed", error=describe(e), failures=self._failures + 1)
            self._schedule()
            return
        finally:
            self._connecting = None
        self._protocol = protocol
        setup = Deferred.fromCoroutine(self._prepare(protocol))
        setup.addTimeout(SETUP_TIMEOUT, self._reactor)
        try:
            await setup
        except Exception as e:
            if self._running:
                reason = f"no answer within {SETUP_TIMEOUT:g}s" if isinstance(e, DeferredTimeout) else describe(e)
                log.warning("bus.setup_failed", error=reason, failures=self._failures + 1)
            if not protocol.lost.called:
                protocol.transport.loseConnection()
            await _gone(protocol, self._reactor)
            self._protocol = None
            self._schedule()
            return
        up_since = self._reactor.seconds()
        self._ready = protocol
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)
        await protocol.lost
        self._ready = self._protocol = None
        if self._reactor.seconds() - up_since >= STABLE_AFTER:
            self._failures = 0
        self._schedule()

    def _schedule(self) -> None:
        """The next attempt, after the backoff delay for the failures so far."""
        if not self._running:
            return
        delay = min(self._max_delay, self._initial * self._factor**self._failures)
        self._failures += 1
        self._retry = self._reactor.callLater(delay * random.uniform(0.8, 1.2), self._attempt)


async def _gone(protocol: AMQPProtocol, reactor: Any) -> None:
    """Wait for a closing connection to be gone; abort it if it takes longer than CLOSE_WAIT
    (a peer that stopped reading would keep loseConnection's buffer from ever flushing)."""
    if protocol.lost.called:
        return
    timer = reactor.callLater(CLOSE_WAIT, protocol.transport.abortConnection)
    try:
        await protocol.lost
    finally:
        if timer.active():
            timer.cancel()
