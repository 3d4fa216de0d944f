"""Identifiers that any node can mint without asking anyone.

A MessageId is a version-1 (time-based) UUID with a random node and clock
sequence, the same shape as Cassandra's ``timeuuid``: its embedded timestamp
orders the POP3 view by arrival, and its random bits make collisions between
nodes practically impossible without any coordination.  This is what lets the
POP3 path run with no lightweight transaction at all.
"""

from __future__ import annotations

import secrets
import time
import uuid

# 100-ns intervals between the UUID epoch (1582-10-15) and the Unix epoch.
_UUID_EPOCH_OFFSET = 0x01B21DD213814000


def new_message_id() -> uuid.UUID:
    """A fresh TimeUUID with random node bits (multicast bit set, RFC 4122 4.5)."""
    node = secrets.randbits(48) | 0x010000000000
    clock_seq = secrets.randbits(14)
    return uuid.uuid1(node=node, clock_seq=clock_seq)


def new_mailbox_id() -> uuid.UUID:
    """Mailbox ids only need to be unique, so a random UUID will do."""
    return uuid.uuid4()


def new_uidvalidity(last: int = 0) -> int:
    """A 32-bit UIDVALIDITY greater than ``last``, the previous one handed out.

    Seconds since the epoch, as Dovecot does, so that values stay increasing
    across restarts and a mailbox deleted and created again gets a larger
    one (RFC 3501 2.3.1.1); ``last + 1`` when several are made in one second.
    """
    return max(int(time.time()), last + 1) & 0xFFFFFFFF or 1


def message_id_time(message_id: uuid.UUID) -> int:
    """The TimeUUID's timestamp in 100-ns units since the Unix epoch: the POP3 order."""
    return message_id.time - _UUID_EPOCH_OFFSET


def parse_message_id(text: str) -> uuid.UUID:
    """Parse a message id as POP3 UIDL shows it; raises ValueError on anything else."""
    value = uuid.UUID(text)
    if value.version != 1:
        raise ValueError(f"not a TimeUUID: {text!r}")
    return value
