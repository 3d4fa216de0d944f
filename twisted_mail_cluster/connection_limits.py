"""How many connections one client may hold, and how many a node takes per protocol.

450 idle connections from one address were all accepted: every one costs a
socket, buffers and a session, and a single host could take them all.  So
each protocol counts its connections per client (an IPv4 address, or an IPv6
/64, as the login throttle counts them) and in total, and refuses the one
over a limit with the protocol's own reply instead of a silent close, so that
a real client can say what happened.  IMAP also counts logins per user and
address (Dovecot's ``mail_max_userip_connections``, 10): a client that opens
session after session for one account is refused at login, its other
sessions untouched.  A node counts only its own connections; a cluster's
limit per client is the node's times the nodes behind the balancer.
"""

from __future__ import annotations

from collections import Counter

from .login_guard import client_key

__all__ = ["ConnectionLimits"]


class ConnectionLimits:
    """The counts of one protocol on one node."""

    def __init__(self, per_address: int, total: int, per_user_and_address: int | None = None) -> None:
        self.per_address = per_address
        self.total = total
        self.per_user_and_address = per_user_and_address
        self._by_address: Counter[str] = Counter()
        self._total = 0
        self._logins: Counter[tuple[str, str]] = Counter()

    def open(self, host: str) -> str | None:
        """Count a new connection; None if it may stay, else why it must not (then it is not counted)."""
        address = client_key(host)
        if self._total >= self.total:
            return "too many connections on this server"
        if self._by_address[address] >= self.per_address:
            return "too many connections from your address"
        self._by_address[address] += 1
        self._total += 1
        return None

    def close(self, host: str) -> None:
        """A counted connection is gone."""
        address = client_key(host)
        self._total -= 1
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]

    def log_in(self, user: str, host: str) -> bool:
        """Count a session of ``user`` from ``host``; False (and not counted) over the limit."""
        key = (user, client_key(host))
        if self.per_user_and_address is not None and self._logins[key] >= self.per_user_and_address:
            return False
        self._logins[key] += 1
        return True

    def log_out(self, user: str, host: str) -> None:
        key = (user, client_key(host))
        self._logins[key] -= 1
        if self._logins[key] <= 0:
            del self._logins[key]
