"""The cluster event bus on RabbitMQ (pika's Twisted adapter).

Topology (``prefix`` is ``mailcluster`` in production):

* one topic exchange ``<prefix>.events``; an event is published with the
  routing key ``mailbox.<mailbox id>``;
* one exclusive, auto-delete queue per node (server-named).  The node binds it
  to ``mailbox.<id>`` when its first local listener registers on that mailbox
  and unbinds it when the last one leaves, so 1,000 IDLE sessions on 50
  mailboxes make 50 bindings.  When the node dies its connection closes and
  the broker deletes the queue and its bindings: no stale registration;
* one durable queue ``<prefix>.group.<name>`` per group, bound to every event
  (``#``).  The nodes that register a group compete on it, so each event is
  handled once per cluster; a failure is retried with backoff (the message
  stays unacknowledged meanwhile, so a node that dies mid-retry hands it to
  another), then rejected into the group's dead-letter queue
  ``<prefix>.group.<name>.dead`` through the ``<prefix>.dead`` exchange.

The bus is a hint, the store is the truth: publishing never waits for the
broker, and while the broker is away ``dispatch`` fails at once (the caller
logs it), ``connected()`` is false (IMAP sessions then resynchronise from the
store at every command), and the connection is retried with backoff.  Each
new connection declares the topology again and re-binds every key that has
local listeners, without a restart.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import structlog
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from .amqp_link import amqp_endpoint
from .groups import GroupMembers, Listener
from .interfaces import IEventBus, IRegistration
from .model import Event, UnknownEvent, decode, encode
from .reconnect import AMQPFactory, Reconnector

log = structlog.get_logger(__name__)


ATTEMPT_HEADER = "x-mailcluster-attempt"
#: Unacknowledged events a node holds at once per queue (bounds its memory).
PREFETCH = 500
#: A group's consumer_tag while its basic.consume is on its way.
PENDING = "(pending)"
#: How long stop() waits for the broker to acknowledge the close.
CLOSE_TIMEOUT = 5.0


class BusUnavailable(Exception):
    """The broker cannot take the event now; the change it reports is stored anyway."""


@implementer(IRegistration)
@dataclass
class _Registration:
    _remove: Callable[[], Deferred[None]]
    _done: bool = False

    def unregister(self) -> Deferred[None]:
        if self._done:
            return succeed(None)
        self._done = True
        return self._remove()


@dataclass
class _Group(GroupMembers):
    #: Its consumer on the current connection (PENDING while basic.consume is on its way).
    consumer_tag: str | None = None


@implementer(IEventBus)
class RabbitMQEventBus:
    """IEventBus for a cluster of nodes sharing one RabbitMQ vhost.

    ``url`` is ``amqp://`` or ``amqps://`` (TLS, see amqp_link.py);
    ``ca_file`` holds the CA certificates an amqps:// broker is verified
    against (None: the system's trust store).
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        prefix: str = "mailcluster",
        retries: int = 5,
        first_backoff: float = 0.5,
        max_backoff: float = 30.0,
        heartbeat: int = 10,
        ca_file: Path | None = None,
    ) -> None:
        self._reactor = reactor
        self._prefix = prefix
        self._retries = retries
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._parameters = pika.URLParameters(url)
        self._parameters.heartbeat = heartbeat
        self._endpoint = amqp_endpoint(reactor, url, self._parameters, ca_file)
        self._service: Reconnector | None = None
        self._connection: TwistedProtocolConnection | None = None
        self._publish: TwistedChannel | None = None
        self._consume: TwistedChannel | None = None
        self._control: TwistedChannel | None = None
        self._queue_name: str | None = None
        self._keyed: dict[str, list[Listener]] = defaultdict(list)
        self._bound: set[str] = set()
        #: Keys whose queue.bind is on its way: a registration on such a key
        #: waits for it too, since events are not routed before it is done.
        self._binding: dict[str, Deferred[None]] = {}
        self._groups: dict[str, _Group] = {}
        #: Consumers this node cancelled itself (their loops end without alarm).
        self._cancelled_tags: set[str] = set()
        #: Connections set up so far (IEventBus.generation).
        self._generation = 0
        self._timers: list[IDelayedCall] = []
        self._stopping = False

    # -- names --------------------------------------------------------------------

    @property
    def exchange(self) -> str:
        return f"{self._prefix}.events"

    @property
    def dead_exchange(self) -> str:
        return f"{self._prefix}.dead"

    def group_queue(self, group: str) -> str:
        return f"{self._prefix}.group.{group}"

    def dead_queue(self, group: str) -> str:
        return f"{self.group_queue(group)}.dead"

    @staticmethod
    def routing_key(key: str) -> str:
        return f"mailbox.{key}"

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect in the background; fire at once (a node runs without its bus)."""
        self._stopping = False
        self._service = Reconnector(self._reactor, self._endpoint, AMQPFactory(self._parameters), self._setup)
        self._service.start()
        return succeed(None)

    def when_connected(self) -> Deferred[Any]:
        """Fire once connected and set up (tests and start-up checks use it)."""
        assert self._service is not None
        return self._service.when_connected()

    def stop(self) -> Deferred[None]:
        self._stopping = True
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        service, self._service = self._service, None
        if service is not None:
            service.halt()  # no new attempt while this connection closes
        connection = self._connection
        closed = connection.closed if connection is not None and connection.is_open else None
        self._drop_connection()  # pika closes the channels, then the connection
        if service is None:
            return succeed(None)
        return Deferred.fromCoroutine(self._stop_service(service, closed))

    async def _stop_service(self, service: Reconnector, closed: Deferred[Any] | None) -> None:
        """Stop reconnecting once the broker acknowledged the close (bounded in time).

        Dropping the TCP connection at once, before pika's Connection.Close
        went out (it first closes each channel), the broker would see the
        node vanish ("client unexpectedly closed TCP connection").
        """
        if closed is not None:
            waiter = _when_fired(closed)
            waiter.addTimeout(CLOSE_TIMEOUT, self._reactor)
            try:
                await waiter
            except DeferredTimeout:
                log.info("bus.close_timeout", seconds=CLOSE_TIMEOUT)
            await deferLater(self._reactor, 0, lambda: None)  # out of pika's callbacks
        await service.stop()

    def connected(self) -> bool:
        return self._publish is not None

    def generation(self) -> int:
        return self._generation

    # -- (re)connection: declare, bind, consume ------------------------------------------

    async def _setup(self, connection: TwistedProtocolConnection) -> None:
        """Declare, bind and consume on a new connection (the Reconnector closes it if this fails)."""
        try:
            await self._set_up(connection)
        except Exception:
            if self._connection is connection:
                self._drop_connection()
            raise

    async def _set_up(self, connection: TwistedProtocolConnection) -> None:
        await connection.ready
        publish = await connection.channel()
        consume = await connection.channel()
        # Declares and binds go on a channel of their own: a channel error
        # closes its channel, and closing the consuming channel would make
        # the broker delete the auto-delete queue with all its bindings.
        control = await connection.channel()
        await consume.basic_qos(prefetch_count=PREFETCH)
        await control.exchange_declare(exchange=self.exchange, exchange_type="topic", durable=True)
        await control.exchange_declare(exchange=self.dead_exchange, exchange_type="direct", durable=True)
        declared = await control.queue_declare(queue="", exclusive=True, auto_delete=True)
        queue_name = declared.method.queue
        self._connection, self._consume, self._control, self._queue_name = connection, consume, control, queue_name
        for channel in (publish, consume, control):
            channel.on_closed.addBoth(self._channel_closed, connection, channel)
        self._bound = set()
        for key in list(self._keyed):
            await self._bind(key)
        queue, tag = await consume.basic_consume(queue=queue_name, auto_ack=False)
        self._loop(queue, self._deliver_keyed, tag, connection)
        for group in list(self._groups):
            entry = self._groups.get(group)
            if entry is not None and entry.consumer_tag is None:  # a registration meanwhile may have started it
                await self._consume_group(group)
        self._publish = publish
        self._generation += 1
        connection.closed.addBoth(self._lost, connection)
        log.info("bus.connected", queue=queue_name, bindings=len(self._bound), groups=len(self._groups))

    def _is_current(self, connection: TwistedProtocolConnection) -> bool:
        """Whether ``connection`` is still the bus's: callbacks of one that was replaced do nothing."""
        return connection is self._connection

    def _channel_closed(self, reason: object, connection: TwistedProtocolConnection, channel: TwistedChannel) -> None:
        """A channel closed under a live connection: start over on a new connection.

        Re-declaring on a fresh connection is the one way to be sure the
        node's queue, its bindings and its consumers all exist again.
        """
        if connection.is_open and self._is_current(connection) and not self._stopping:
            log.warning("bus.channel_closed", reason=str(getattr(reason, "value", reason)))
            connection.close()

    def _lost(self, reason: object, connection: TwistedProtocolConnection) -> None:
        if connection is self._connection:
            self._drop_connection()
            if not self._stopping:
                log.warning("bus.disconnected", reason=str(getattr(reason, "value", reason)))

    def _drop_connection(self) -> None:
        connection = self._connection
        self._connection = self._publish = self._consume = self._control = self._queue_name = None
        self._bound = set()
        for group in self._groups.values():
            group.consumer_tag = None
        if connection is not None and connection.is_open:
            connection.close()

    # -- dispatch ------------------------------------------------------------------------

    def dispatch(self, event: Event) -> Deferred[None]:
        channel = self._publish
        if channel is None:
            return fail(BusUnavailable("not connected to RabbitMQ"))
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        d = channel.basic_publish(self.exchange, self.routing_key(event.key), encode(event), properties)
        return d.addCallback(lambda _: None)

    # -- key listeners: bind on the first, unbind after the last ------------------------------

    def register(self, listener: Listener, key: str) -> Deferred[IRegistration]:
        return Deferred.fromCoroutine(self._register(listener, key))

    async def _register(self, listener: Listener, key: str) -> _Registration:
        self._keyed[key].append(listener)
        if key not in self._bound and self._control is not None:
            await self._bind(key)
        elif key in self._binding:  # another registration started the bind: wait for it as well
            await _when_fired(self._binding[key])
        return _Registration(lambda: Deferred.fromCoroutine(self._unregister(listener, key)))

    async def _unregister(self, listener: Listener, key: str) -> None:
        listeners = self._keyed.get(key, [])
        if listener in listeners:
            listeners.remove(listener)
        if listeners:
            return
        self._keyed.pop(key, None)
        if key in self._bound and self._control is not None and self._queue_name is not None:
            self._bound.discard(key)
            try:
                await self._control.queue_unbind(
                    queue=self._queue_name, exchange=self.exchange, routing_key=self.routing_key(key)
                )
            except Exception as e:  # the connection went: its queue and bindings went with it
                log.info("bus.unbind_skipped", key=key, error=str(e))

    async def _bind(self, key: str) -> None:
        channel, queue = self._control, self._queue_name
        if channel is None or queue is None:
            return
        self._bound.add(key)
        bound: Deferred[None] = Deferred()
        self._binding[key] = bound
        try:
            await channel.queue_bind(queue=queue, exchange=self.exchange, routing_key=self.routing_key(key))
        except Exception as e:
            self._bound.discard(key)
            log.warning("bus.bind_failed", key=key, error=str(e))
        finally:
            if self._binding.get(key) is bound:
                del self._binding[key]
            bound.callback(None)

    def bindings(self) -> int:
        """Mailbox keys this node's queue is bound to (for tests and metrics)."""
        return len(self._bound)

    # -- groups: once per cluster, at least once --------------------------------------------

    def register_group(self, listener: Listener, group: str) -> Deferred[IRegistration]:
        return Deferred.fromCoroutine(self._register_group(listener, group))

    async def _register_group(self, listener: Listener, group: str) -> _Registration:
        entry = self._groups.setdefault(group, _Group())
        entry.listeners.append(listener)
        if entry.consumer_tag is None and self._consume is not None:
            connection = self._connection
            try:
                await self._consume_group(group)
            except Exception as e:
                # Not fatal: the next connection's set-up consumes every registered group.
                log.warning("bus.group_consume_failed", group=group, error=str(e))
                if connection is not None and connection.is_open and self._is_current(connection):
                    connection.close()
        return _Registration(lambda: Deferred.fromCoroutine(self._unregister_group(listener, group)))

    async def _unregister_group(self, listener: Listener, group: str) -> None:
        entry = self._groups.get(group)
        if entry is None or listener not in entry.listeners:
            return
        entry.listeners.remove(listener)
        if not entry.listeners:
            tag, entry.consumer_tag = entry.consumer_tag, None
            del self._groups[group]
            if tag is not None and tag != PENDING and self._consume is not None:
                self._cancelled_tags.add(tag)  # its loop ends now: not a broker's cancellation
                try:
                    await self._consume.basic_cancel(tag)
                except Exception as e:
                    log.info("bus.cancel_skipped", group=group, error=str(e))

    async def _declare_group(self, channel: TwistedChannel, group: str) -> None:
        await channel.queue_declare(queue=self.dead_queue(group), durable=True)
        await channel.queue_bind(queue=self.dead_queue(group), exchange=self.dead_exchange, routing_key=group)
        await channel.queue_declare(
            queue=self.group_queue(group), durable=True,
            arguments={"x-dead-letter-exchange": self.dead_exchange, "x-dead-letter-routing-key": group},
        )
        await channel.queue_bind(queue=self.group_queue(group), exchange=self.exchange, routing_key="#")

    async def _consume_group(self, group: str) -> None:
        control, channel, connection = self._control, self._consume, self._connection
        if control is None or channel is None or connection is None:
            return
        entry = self._groups[group]
        entry.consumer_tag = PENDING  # one consumer per group and connection, whoever starts it
        try:
            await self._declare_group(control, group)
            queue, tag = await channel.basic_consume(queue=self.group_queue(group), auto_ack=False)
        except Exception:
            if entry.consumer_tag == PENDING:
                entry.consumer_tag = None
            raise
        if self._groups.get(group) is not entry:  # its last listener left meanwhile (no loop reads it)
            await channel.basic_cancel(tag)
            return
        entry.consumer_tag = tag
        self._loop(queue, lambda message: self._deliver_group(group, message), tag, connection)

    # -- consuming ---------------------------------------------------------------------

    def _loop(self, queue: Any, handle: Callable[[Any], object], tag: str,
              connection: TwistedProtocolConnection) -> None:
        """Take messages one after the other until the consumer or its channel ends."""

        def next_message(_: object = None) -> None:
            d = queue.get()
            d.addCallback(lambda message: maybeDeferred(handle, message))
            d.addCallbacks(next_message, lambda failure: self._consumer_ended(failure, tag, connection))

        next_message()

    def _consumer_ended(self, failure: Failure, tag: str, connection: TwistedProtocolConnection) -> None:
        """A consumer the broker cancelled (its queue was deleted, the node holding a
        group queue went down) would leave the node deaf while connected() stays
        true: start over on a new connection, which declares and consumes again."""
        if tag in self._cancelled_tags:
            self._cancelled_tags.discard(tag)
            return
        if not failure.check(pika.exceptions.ConsumerCancelled):
            return  # the channel or connection closed: _channel_closed and _lost handle it
        if connection.is_open and self._is_current(connection) and not self._stopping:
            log.warning("bus.consumer_cancelled", consumer=tag)
            connection.close()

    def _deliver_keyed(self, message: Any) -> None:
        message.channel.basic_ack(message.method.delivery_tag)
        event = _decoded(message.body)
        if event is None:
            return
        for listener in list(self._keyed.get(event.key, ())):
            maybeDeferred(listener, event).addErrback(self._listener_failed, event)

    def _listener_failed(self, failure: Failure, event: Event) -> None:
        log.error("event.listener_failed", event_type=event.kind, error=failure.getErrorMessage())

    async def _deliver_group(self, group: str, message: Any) -> None:
        channel, tag = message.channel, message.method.delivery_tag
        event = _decoded(message.body)
        entry = self._groups.get(group)
        listener = entry.pick() if entry is not None else None
        if event is None:
            channel.basic_ack(tag)
            return
        if listener is None:
            channel.basic_nack(tag, requeue=True)  # another member will take it
            return
        headers = dict(message.properties.headers or {})
        attempt = int(headers.get(ATTEMPT_HEADER, 0))
        try:
            await maybeDeferred(listener, event)
        except Exception as e:
            await self._retry_or_bury(group, message, event, attempt, e)
            return
        channel.basic_ack(tag)

    async def _retry_or_bury(self, group: str, message: Any, event: Event, attempt: int, error: Exception) -> None:
        channel, tag = message.channel, message.method.delivery_tag
        if attempt >= self._retries:
            log.error("event.dead_letter", group=group, event_type=event.kind, error=str(error))
            channel.basic_reject(tag, requeue=False)  # to the dead-letter queue
            return
        delay = min(self._first_backoff * (2**attempt), self._max_backoff)
        log.warning(
            "event.retry", group=group, event_type=event.kind, attempt=attempt + 1, delay=delay, error=str(error)
        )
        await self._sleep(delay)
        if self._publish is None or channel.is_closed:
            return  # unacknowledged: the broker gives it to another consumer
        headers = dict(message.properties.headers or {})
        headers[ATTEMPT_HEADER] = attempt + 1
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=2, headers=headers)
        await self._publish.basic_publish("", self.group_queue(group), message.body, properties)
        channel.basic_ack(tag)

    def _sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = deferLater(self._reactor, seconds, lambda: None)
        return d

    # -- dead letters ------------------------------------------------------------------------

    def dead_letters(self, group: str) -> Deferred[list[Event]]:
        return Deferred.fromCoroutine(self._dead_letters(group))

    async def _dead_letters(self, group: str) -> list[Event]:
        """Read the group's dead letters without taking them away."""
        channel = await self._admin_channel(group)
        events: list[Event] = []
        try:
            while True:
                message = await channel.basic_get(self.dead_queue(group), auto_ack=False)
                if message is None:
                    break
                event = _decoded(message.body)
                if event is not None:
                    events.append(event)
        finally:
            await _close(channel)  # unacknowledged messages go back to the queue
        return events

    def replay_dead_letters(self, group: str) -> Deferred[int]:
        return Deferred.fromCoroutine(self._replay(group))

    async def _replay(self, group: str) -> int:
        channel = await self._admin_channel(group)
        count = 0
        try:
            while True:
                message = await channel.basic_get(self.dead_queue(group), auto_ack=False)
                if message is None:
                    break
                properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
                await channel.basic_publish("", self.group_queue(group), message.body, properties)
                channel.basic_ack(message.method.delivery_tag)
                count += 1
        finally:
            await _close(channel)
        return count

    async def _admin_channel(self, group: str) -> TwistedChannel:
        if self._connection is None:
            raise BusUnavailable("not connected to RabbitMQ")
        channel = await self._connection.channel()
        await self._declare_group(channel, group)
        return channel


def _when_fired(d: Deferred[Any]) -> Deferred[None]:
    """A new Deferred that fires when ``d`` does (several may wait on one ``d``)."""
    waiter: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        if not waiter.called:  # (a waiter may have timed out)
            waiter.callback(None)
        return result

    d.addBoth(fire)
    return waiter


def _decoded(body: bytes) -> Event | None:
    try:
        return decode(body)
    except UnknownEvent as e:
        log.warning("event.skipped", reason=str(e), size=len(body))
        return None


async def _close(channel: TwistedChannel) -> None:
    """Close a channel and wait until the broker confirmed (its unacked messages are back)."""
    if channel.is_open:
        closed = channel.on_closed
        channel.close()
        await closed
