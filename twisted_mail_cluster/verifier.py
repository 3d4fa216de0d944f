"""Checking passwords: Argon2id on a pool of its own, and a short-lived cache of good ones.

Argon2id is meant to be slow and to need memory (19 MiB and tens of
milliseconds of a core per check, passwords.py).  Two things follow for a
server that many clients log in to:

* The checks run on a small thread pool of their own, one thread per core:
  more threads would not check faster, would take 19 MiB each at once, and in
  the reactor's shared pool would crowd out the store's work.  glibc keeps
  memory freed by a thread in that thread's arena for re-use, which after a
  burst of logins left the node at several hundred MiB for good; so the
  buffers are made to come from mmap (``mallopt``), which returns them to the
  system as soon as they are freed.
* A password that was right a few minutes ago is, for the same stored hash,
  still right (Dovecot's auth cache): Thunderbird opens up to five
  connections, mbsync and phones reconnect all day, and each would otherwise
  pay a whole Argon2 check.  The cache holds no password: its keys are a
  keyed hash (HMAC-SHA-256 with a key made at start-up, never stored) of the
  user and the password, and its values the stored hash that password was
  checked against.  A hit counts only while the user's stored hash is still
  that one, and the stored hash is read from the store at every login, so a
  ``user passwd`` or ``user remove`` made anywhere (any node, the admin tool)
  takes effect at once on every node, with no message between them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import os
import secrets
from collections import OrderedDict

import structlog
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from .names import loggable_user
from .passwords import verify_password
from .twisted_types import INodeReactor, installed_reactor

__all__ = ["Verifier", "return_freed_memory_to_the_system"]

log = structlog.get_logger(__name__)

#: glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3


def return_freed_memory_to_the_system(threshold: int = 1024 * 1024) -> bool:
    """Serve allocations of ``threshold`` bytes and more from mmap, so freeing returns them.

    Setting it also turns off glibc's dynamic threshold, which otherwise rises
    to the size of the last freed mmap chunk (Argon2's 19 MiB) and from then
    on keeps such buffers in per-thread arenas.  Not glibc (musl, macOS): nothing
    to do, and False.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


class Verifier:
    """Whether a password is right for a stored hash; the slow part off the reactor, once."""

    def __init__(self, clock: IReactorTime, threads: int = 0, cache_ttl: float = 300.0,
                 cache_size: int = 10_000, reactor: INodeReactor | None = None) -> None:
        """``clock`` times the cache (a test's Clock will do); ``reactor``, the running
        one by default, is where the pool's results come back."""
        self._clock = clock
        self._reactor = reactor if reactor is not None else installed_reactor()
        self._pool = ThreadPool(minthreads=0, maxthreads=threads or os.cpu_count() or 1, name="argon2")
        self._started = False
        self._ttl = cache_ttl
        self._size = cache_size
        self._key = secrets.token_bytes(32)
        #: keyed hash of (user, password) -> (stored hash it matched, until when)
        self._cache: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        #: Argon2 checks run so far (the throttle is tested by counting them).
        self.checks = 0

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._pool.stop()

    def verify(self, user: str, stored_hash: str | None, password: str) -> Deferred[bool]:
        """Fire with whether ``password`` is right; ``stored_hash`` None: no such user.

        An unknown user costs a whole check too, so that timing tells nobody
        which addresses exist.
        """
        key = self._cache_key(user, password)
        if stored_hash is not None and self._cached(key) == stored_hash:
            log.debug("password.cached", user=loggable_user(user))
            return succeed(True)
        self.start()
        self.checks += 1
        checked: Deferred[bool] = deferToThreadPool(self._reactor, self._pool, verify_password, stored_hash, password)

        def remember(ok: bool) -> bool:
            log.debug("password.checked", user=loggable_user(user), ok=ok)
            if ok and stored_hash is not None:
                self._remember(key, stored_hash)
            return ok

        return checked.addCallback(remember)

    def forget(self) -> None:
        """Drop every cached password (the manhole's lever, after a leak was suspected)."""
        self._cache.clear()

    def _cache_key(self, user: str, password: str) -> bytes:
        message = user.encode("utf-8") + b"\0" + password.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _cached(self, key: bytes) -> str | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        stored_hash, until = entry
        if self._clock.seconds() >= until:
            del self._cache[key]
            return None
        return stored_hash

    def _remember(self, key: bytes, stored_hash: str) -> None:
        if self._ttl <= 0:
            return
        self._cache[key] = (stored_hash, self._clock.seconds() + self._ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
