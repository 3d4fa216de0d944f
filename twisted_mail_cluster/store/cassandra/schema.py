"""The Cassandra schema: tables by access pattern, created idempotently, versioned.

Two tables carry the two views of a mailbox:

* ``pop3_view`` - partition mailbox id, clustering TimeUUID message id (so the
  partition reads in arrival order), the size.  Written on delivery and
  deleted on removal with plain writes: never conditional.
* ``imap_view`` - partition mailbox id, clustering UID.  The mailbox's
  counters (``uidnext``, ``highest_modseq``, ``first_recent_uid``) are STATIC
  columns of the same partition, so that allocating a UID and writing the
  row that uses it are one conditional batch on one partition: one Paxos
  round, and a UID is never visible before every smaller UID is.  This is
  the only place lightweight transactions live.  Removed messages stay as
  rows flagged ``expunged`` (with the MODSEQ of their removal) so that a
  session can ask "what changed since MODSEQ n", removals included; a
  maintenance pass purges old ones.

Content is written once per delivery: ``blobs`` (one row per content,
SHA-256 id, the MIME structure) and ``blob_chunks`` (one partition per 64 KiB
chunk, so a large message never becomes one huge partition), with
``blob_refs`` listing the messages that use a blob for garbage collection.

Migrations: ``MIGRATIONS[n]`` brings the schema from version n to n+1; the
version reached is kept in ``schema_version``.  Every statement is
idempotent (IF NOT EXISTS), so a node that died half-way just runs them again.
"""

from __future__ import annotations

from collections.abc import Mapping

SCHEMA_VERSION = 1


def keyspace_cql(keyspace: str, replication: Mapping[str, int]) -> str:
    dcs = ", ".join(f"'{dc}': {factor}" for dc, factor in sorted(replication.items()))
    return (
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} "
        f"WITH replication = {{'class': 'NetworkTopologyStrategy', {dcs}}}"
    )


VERSION_TABLE = "CREATE TABLE IF NOT EXISTS {ks}.schema_version (component text PRIMARY KEY, version int)"

_V1 = (
    "CREATE TABLE IF NOT EXISTS {ks}.domains (name text PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS {ks}.users (address text PRIMARY KEY, domain text, password_hash text)",
    "CREATE TABLE IF NOT EXISTS {ks}.users_by_domain (domain text, address text, PRIMARY KEY (domain, address))",
    "CREATE TABLE IF NOT EXISTS {ks}.counters (name text PRIMARY KEY, value bigint)",
    """CREATE TABLE IF NOT EXISTS {ks}.mailboxes (
        id uuid PRIMARY KEY, owner text, name text, uidvalidity bigint, special_use text)""",
    """CREATE TABLE IF NOT EXISTS {ks}.mailboxes_by_owner (
        owner text, name text, id uuid, uidvalidity bigint, special_use text,
        PRIMARY KEY (owner, name))""",
    "CREATE TABLE IF NOT EXISTS {ks}.subscriptions (owner text, name text, PRIMARY KEY (owner, name))",
    """CREATE TABLE IF NOT EXISTS {ks}.blobs (
        id text PRIMARY KEY, size bigint, chunk_size int, chunks int, structure text,
        created timestamp)""",
    """CREATE TABLE IF NOT EXISTS {ks}.blob_chunks (
        blob_id text, seq int, sha256 text, data blob, PRIMARY KEY ((blob_id, seq)))""",
    "CREATE TABLE IF NOT EXISTS {ks}.blob_refs (blob_id text, message_id timeuuid, PRIMARY KEY (blob_id, message_id))",
    """CREATE TABLE IF NOT EXISTS {ks}.messages (
        id timeuuid PRIMARY KEY, mailbox_id uuid, blob_id text, size bigint,
        internal_date double, uid bigint)""",
    """CREATE TABLE IF NOT EXISTS {ks}.pop3_view (
        mailbox_id uuid, message_id timeuuid, size bigint,
        PRIMARY KEY (mailbox_id, message_id))""",
    """CREATE TABLE IF NOT EXISTS {ks}.imap_view (
        mailbox_id uuid, uid bigint, message_id timeuuid, flags set<text>, modseq bigint,
        size bigint, expunged boolean,
        uidnext bigint static, highest_modseq bigint static, first_recent_uid bigint static,
        PRIMARY KEY (mailbox_id, uid))""",
)

MIGRATIONS: dict[int, tuple[str, ...]] = {0: _V1}


def qualified(statement: str, keyspace: str) -> str:
    """A schema statement with its table names in ``keyspace``."""
    return statement.replace("{ks}", keyspace)
