"""Write back-pressure for protocols that stream large responses.

A transport accepts only one registered producer.  Rather than registering a
different producer for every file we stream (Twisted's FileSender), each
connection registers one ``WriteGate`` for its whole life; code that writes
a lot awaits ``gate.wait()`` between chunks and so never holds more than the
transport's buffer in memory, however slow the client reads.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class WriteGate:
    """Open while the transport can take data; closed while its buffer is full."""

    def __init__(self) -> None:
        self._paused = False
        self._stopped = False
        self._waiting: list[Deferred[None]] = []

    @property
    def stopped(self) -> bool:
        return self._stopped

    def wait(self) -> Deferred[None]:
        """Fire when writing may go on (at once if the gate is open)."""
        if not self._paused or self._stopped:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._release()

    def stopProducing(self) -> None:
        """The connection is gone: let every writer run to its end (writes are dropped)."""
        self._stopped = True
        self._release()

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
