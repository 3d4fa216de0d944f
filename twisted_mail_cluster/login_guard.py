"""Who may try a password, and when: the policy every protocol applies around a login.

* Passwords cross in clear only from ``auth.trusted_networks``; otherwise only
  over TLS (:meth:`LoginGuard.plaintext_allowed`).
* Failed logins slow their source down: each failure from an address (an IPv4
  address, or an IPv6 /64, which one host usually owns whole) doubles the
  delay, from ``failed_login_delay`` up to ``max_failed_login_delay``.  The
  failure's answer waits that long, and **until then no login from that
  address is checked at all**: it is refused at once as a temporary failure
  (:meth:`LoginGuard.admit`), on any connection.  Delaying only the answer,
  as before, let a client that closed each connection after a quarter of a
  second have 40 passwords checked in 10 s.  A user who mistyped waits for
  the answer anyway, so the refusal only meets clients that do not wait.
* The same counting per account, for many addresses trying one account: from
  the ACCOUNT_HOLD_AFTER-th failure on, the account is held for addresses
  that have not logged in to it lately (a typo or two holds nobody), and an
  address that did is never held back by it, so an attacker cannot lock the
  real user out.
* A cap on checks in flight per address and per node.  Logins over it wait
  for their turn (a NAT full of users, Thunderbird's five connections) in a
  short queue, and are refused only past it; when its turn comes, a login is
  looked at again, so fifty parallel guesses get a handful checked: the first
  failure holds the address, and the rest are refused without a check.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ._deferred import deferred

__all__ = ["LoginGuard", "LoginThrottled", "Network", "client_key"]

log = structlog.get_logger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: How long a successful login exempts its address from the account's throttle.
KNOWN_ADDRESS_SECONDS = 7 * 24 * 3600
#: Failures on one account (from any addresses) before the account is held.
ACCOUNT_HOLD_AFTER = 3
#: Logins that may wait for a check slot, per address and on the whole node.  Each one
#: holds a connection, so the connection limits bound these too.
MAX_WAITING_PER_ADDRESS = 256
MAX_WAITING = 4096


class LoginThrottled(Exception):
    """A login refused before its password was looked at: answer with a temporary failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Failures:
    count: int
    last: float
    #: No login of this source is checked before this time.
    until: float


class _Ticket:
    """One password check in flight; release it once the check answered."""

    def __init__(self, guard: LoginGuard, address: str) -> None:
        self._guard = guard
        self._address = address
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._guard._check_done(self._address)


class LoginGuard:
    #: Remember at most this many addresses (and accounts); the oldest are forgotten first.
    MAX_TRACKED = 100_000

    def __init__(
        self,
        clock: IReactorTime,
        trusted_networks: Iterable[Network],
        failed_login_delay: float = 2.0,
        max_failed_login_delay: float = 30.0,
        failure_window: float = 300.0,
        max_checks_per_address: int = 3,
        max_checks: int = 32,
    ) -> None:
        self._clock = clock
        self._trusted = tuple(trusted_networks)
        self._base = failed_login_delay
        self._max = max_failed_login_delay
        self._window = failure_window
        self._max_per_address = max_checks_per_address
        self._max_checks = max_checks
        self._by_address: OrderedDict[str, _Failures] = OrderedDict()
        self._by_account: OrderedDict[str, _Failures] = OrderedDict()
        #: (account, address) -> when that address last logged in to that account.
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._in_flight: dict[str, int] = {}
        self._in_flight_total = 0
        #: Logins waiting for a check slot, in arrival order: (address, fired when it is their turn).
        self._waiting: deque[tuple[str, Deferred[None]]] = deque()

    def plaintext_allowed(self, host: str, encrypted: bool = False) -> bool:
        """Whether a password may cross this connection (TLS, or a trusted network)."""
        if encrypted:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._trusted)

    # -- before the check ------------------------------------------------------------

    @deferred
    async def admit(self, host: str, account: str | bytes) -> _Ticket:
        """Fire with a ticket once a password check may start; fail with LoginThrottled
        (and nothing is checked) while the address or account is held, or the queue is full."""
        address, user = client_key(host), _account_key(account)
        self._refuse_if_held(address, user)
        if not self._has_room(address):
            if (len(self._waiting) >= MAX_WAITING
                    or sum(1 for a, _ in self._waiting if a == address) >= MAX_WAITING_PER_ADDRESS):
                raise LoginThrottled("too many logins at once")
            turn: Deferred[None] = Deferred()
            self._waiting.append((address, turn))
            await turn  # _next_turns counted the slot for us
            try:
                self._refuse_if_held(address, user)  # a failure while it waited holds it too
            except LoginThrottled:
                self._check_done(address)
                raise
            return _Ticket(self, address)
        self._in_flight[address] = self._in_flight.get(address, 0) + 1
        self._in_flight_total += 1
        return _Ticket(self, address)

    def _refuse_if_held(self, address: str, user: str) -> None:
        now = self._clock.seconds()
        if self._held(self._by_address, address, now):
            raise LoginThrottled("failed logins from this address")
        if self._held(self._by_account, user, now) and not self._is_known(user, address, now):
            raise LoginThrottled("failed logins to this account")

    def _has_room(self, address: str) -> bool:
        return self._in_flight.get(address, 0) < self._max_per_address and self._in_flight_total < self._max_checks

    def _check_done(self, address: str) -> None:
        self._in_flight_total -= 1
        left = self._in_flight[address] - 1
        if left:
            self._in_flight[address] = left
        else:
            del self._in_flight[address]
        self._next_turns()

    def _next_turns(self) -> None:
        """Wake, in order, the waiting logins for which there is room now.

        Their slots are taken before any of them runs: a woken login may be
        refused at once and give its slot back, which comes back here.
        """
        woken = []
        for entry in list(self._waiting):
            if self._in_flight_total >= self._max_checks:
                break
            address, turn = entry
            if self._in_flight.get(address, 0) < self._max_per_address:
                self._waiting.remove(entry)
                self._in_flight[address] = self._in_flight.get(address, 0) + 1
                self._in_flight_total += 1
                woken.append(turn)
        for turn in woken:
            turn.callback(None)

    def _held(self, table: OrderedDict[str, _Failures], key: str, now: float) -> bool:
        entry = table.get(key)
        return entry is not None and now < entry.until

    def _is_known(self, user: str, address: str, now: float) -> bool:
        last = self._known.get((user, address))
        return last is not None and now - last < KNOWN_ADDRESS_SECONDS

    # -- after the check -------------------------------------------------------------

    def failed(self, host: str, account: str | bytes | None = None) -> float:
        """Record a failure; return how long its answer waits (and the source is held)."""
        now = self._clock.seconds()
        address = client_key(host)
        delay, count = self._count(self._by_address, address, now)
        if account is not None:
            self._count(self._by_account, _account_key(account), now, hold_after=ACCOUNT_HOLD_AFTER)
        log.info("login.throttled", remote=address, failures=count, delay=delay)
        return delay

    def _count(
        self, table: OrderedDict[str, _Failures], key: str, now: float, hold_after: int = 1
    ) -> tuple[float, int]:
        entry = table.pop(key, None)
        count = entry.count + 1 if entry is not None and now - entry.last <= self._window else 1
        delay = min(self._base * (2 ** (count - 1)), self._max)
        table[key] = _Failures(count, now, now + delay if count >= hold_after else now)
        _forget_oldest(table, self.MAX_TRACKED)
        return delay, count

    def succeeded(self, host: str, account: str | bytes | None = None) -> None:
        address = client_key(host)
        self._by_address.pop(address, None)
        if account is not None:
            pair = (_account_key(account), address)
            self._known.pop(pair, None)
            self._known[pair] = self._clock.seconds()
            _forget_oldest(self._known, self.MAX_TRACKED)

    def failures(self, host: str) -> int:
        entry = self._by_address.get(client_key(host))
        if entry is None or self._clock.seconds() - entry.last > self._window:
            return 0
        return entry.count


def _forget_oldest(table: OrderedDict[Any, Any], size: int) -> None:
    while len(table) > size:
        table.popitem(last=False)


def client_key(host: str) -> str:
    """Whom failures are counted against: an IPv4 address, or an IPv6 /64.

    One IPv6 host usually owns a whole /64 and can pick a new address for
    every attempt, so counting per address would let it dodge the delay.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _account_key(account: str | bytes) -> str:
    """The account a login names, as the throttle counts it (no validation: any junk counts)."""
    text = account.decode("utf-8", "replace") if isinstance(account, bytes) else account
    return text.strip().lower()[:320]
