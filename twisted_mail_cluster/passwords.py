"""Password hashing with Argon2id (RFC 9106), via argon2-cffi.

Hashing is deliberately slow, so callers run it in a thread
(``deferToThread``), never on the reactor.  Parameters follow OWASP's
minimum for Argon2id (19 MiB, 2 passes): strong enough to make a stolen
database expensive to attack, cheap enough that a node can verify a few
dozen logins per second per core.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)

#: Verified against when the user does not exist, so that a wrong address and
#: a wrong password take the same time (no user enumeration by timing).
_DECOY_HASH = _HASHER.hash("decoy password that nobody has")

MAX_PASSWORD_LENGTH = 1024


def hash_password(password: str) -> str:
    """Blocking: an encoded Argon2id hash with a fresh random salt."""
    if not password:
        raise ValueError("the password is empty")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_LENGTH} characters")
    return _HASHER.hash(password)


def verify_password(encoded: str | None, password: str) -> bool:
    """Blocking: whether ``password`` matches ``encoded`` (None: the user is unknown)."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        return _HASHER.verify(encoded or _DECOY_HASH, password) and encoded is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
