"""Write back-pressure: what a connection does while its client does not read.

A transport accepts only one registered producer.  Rather than registering a
different producer for every file we stream (Twisted's FileSender), each
connection registers one ``WriteGate`` for its whole life; code that writes
a lot awaits ``gate.wait()`` between chunks and so never holds more than the
transport's buffer in memory, however slow the client reads.

Small replies are the other half: a client that sends ``CAPA`` (or ``EHLO``,
or ``a CAPABILITY``) in a loop and never reads made the node buffer the
replies without end (417 MiB for 8.5 MB of ``CAPA``).  Every protocol
therefore stops reading its client while the gate is closed (``on_change``
tells it), and starts again once the transport's buffer has drained: the
client's own requests wait in the kernel, where they cost the node nothing.
Twisted closes the gate above the transport's buffer size (64 KiB) and opens
it when the buffer is empty again.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class WriteGate:
    """Open while the transport can take data; closed while its buffer is full."""

    def __init__(self, on_change: Callable[[bool], object] | None = None) -> None:
        """``on_change(closed)`` is called each time the gate closes or opens."""
        self._paused = False
        self._stopped = False
        self._waiting: list[Deferred[None]] = []
        self._on_change = on_change

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def closed(self) -> bool:
        """Whether the transport holds more unsent output than it wants to."""
        return self._paused and not self._stopped

    def wait(self) -> Deferred[None]:
        """Fire when writing may go on (at once if the gate is open)."""
        if not self._paused or self._stopped:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def pauseProducing(self) -> None:
        self._paused = True
        if self._on_change is not None:
            self._on_change(True)

    def resumeProducing(self) -> None:
        self._paused = False
        self._release()
        if self._on_change is not None and not self._stopped:
            self._on_change(False)

    def stopProducing(self) -> None:
        """The connection is gone: let every writer run to its end (writes are dropped)."""
        self._stopped = True
        self._release()

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
