"""What both buses keep of a group listener on this node."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .model import Event

Listener = Callable[[Event], object]


@dataclass
class GroupMembers:
    """The group's listeners on this node: each event goes to one of them, in turn
    (the bus makes sure one node, and so one member, handles it)."""

    listeners: list[Listener] = field(default_factory=list)
    _turn: int = 0

    def pick(self) -> Listener | None:
        if not self.listeners:
            return None
        listener = self.listeners[self._turn % len(self.listeners)]
        self._turn += 1
        return listener
