"""Every CQL statement the Cassandra store runs, prepared once at start.

Table names are qualified with the keyspace (``{ks}``, filled in at
prepare time) rather than relying on ``USE``, which Cassandra 5 warns is
ambiguous with prepared statements.

Lightweight transactions (``IF ...``) are named ``*_lwt``: a glance at this
file shows that none of them is used by delivery, POP3 listing, retrieval or
deletion when the IMAP view is disabled (the zero-LWT POP3 path), which
``tests/integration`` proves against ``system.paxos``.
"""

from __future__ import annotations

_IMAP_ROW = "uid, message_id, flags, modseq, size, expunged"
_MAILBOX = "id, owner, name, uidvalidity, special_use"

STATEMENTS: dict[str, str] = {
    # directory (provisioning: LWT allowed, it is not on the mail path)
    "domain_insert_lwt": "INSERT INTO {ks}.domains (name) VALUES (?) IF NOT EXISTS",
    "domain_get": "SELECT name FROM {ks}.domains WHERE name = ?",
    "domain_list": "SELECT name FROM {ks}.domains",
    "domain_delete": "DELETE FROM {ks}.domains WHERE name = ?",
    "user_insert_lwt": "INSERT INTO {ks}.users (address, domain, password_hash) VALUES (?, ?, ?) IF NOT EXISTS",
    "user_get": "SELECT address, password_hash FROM {ks}.users WHERE address = ?",
    "user_all": "SELECT address, password_hash FROM {ks}.users",
    "user_set_hash": "UPDATE {ks}.users SET password_hash = ? WHERE address = ?",
    "user_delete": "DELETE FROM {ks}.users WHERE address = ?",
    "domain_user_insert": "INSERT INTO {ks}.users_by_domain (domain, address) VALUES (?, ?)",
    "domain_user_list": "SELECT address FROM {ks}.users_by_domain WHERE domain = ?",
    "domain_user_any": "SELECT address FROM {ks}.users_by_domain WHERE domain = ? LIMIT 1",
    "domain_user_delete": "DELETE FROM {ks}.users_by_domain WHERE domain = ? AND address = ?",
    "counter_get": "SELECT value FROM {ks}.counters WHERE name = ?",
    "counter_init_lwt": "INSERT INTO {ks}.counters (name, value) VALUES (?, ?) IF NOT EXISTS",
    "counter_set_lwt": "UPDATE {ks}.counters SET value = ? WHERE name = ? IF value = ?",
    # mailboxes
    "mailbox_insert": f"INSERT INTO {{ks}}.mailboxes ({_MAILBOX}) VALUES (?, ?, ?, ?, ?)",
    "mailbox_get": f"SELECT {_MAILBOX} FROM {{ks}}.mailboxes WHERE id = ?",
    "mailbox_rename": "UPDATE {ks}.mailboxes SET name = ? WHERE id = ?",
    "mailbox_delete": "DELETE FROM {ks}.mailboxes WHERE id = ?",
    "owner_mailbox_insert_lwt": (
        "INSERT INTO {ks}.mailboxes_by_owner (owner, name, id, uidvalidity, special_use)"
        " VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
    ),
    "owner_mailbox_get": (
        "SELECT owner, name, id, uidvalidity, special_use FROM {ks}.mailboxes_by_owner"
        " WHERE owner = ? AND name = ?"
    ),
    "owner_mailbox_list": (
        "SELECT owner, name, id, uidvalidity, special_use FROM {ks}.mailboxes_by_owner WHERE owner = ?"
    ),
    "owner_mailbox_count": "SELECT COUNT(*) FROM {ks}.mailboxes_by_owner WHERE owner = ?",
    "owner_mailbox_delete": "DELETE FROM {ks}.mailboxes_by_owner WHERE owner = ? AND name = ?",
    "subscription_insert": "INSERT INTO {ks}.subscriptions (owner, name) VALUES (?, ?)",
    "subscription_get": "SELECT name FROM {ks}.subscriptions WHERE owner = ? AND name = ?",
    "subscription_list": "SELECT name FROM {ks}.subscriptions WHERE owner = ?",
    "subscription_delete": "DELETE FROM {ks}.subscriptions WHERE owner = ? AND name = ?",
    "subscription_delete_all": "DELETE FROM {ks}.subscriptions WHERE owner = ?",
    # content
    "blob_insert": (
        "INSERT INTO {ks}.blobs (id, size, chunk_size, chunks, structure, created)"
        " VALUES (?, ?, ?, ?, ?, toTimestamp(now()))"
    ),
    "blob_get": "SELECT id, size, chunk_size, chunks, structure FROM {ks}.blobs WHERE id = ?",
    "blob_all": "SELECT id, chunks, created FROM {ks}.blobs",
    "blob_delete": "DELETE FROM {ks}.blobs WHERE id = ?",
    "chunk_insert": "INSERT INTO {ks}.blob_chunks (blob_id, seq, sha256, data) VALUES (?, ?, ?, ?)",
    "chunk_get": "SELECT sha256, data FROM {ks}.blob_chunks WHERE blob_id = ? AND seq = ?",
    "chunk_delete": "DELETE FROM {ks}.blob_chunks WHERE blob_id = ? AND seq = ?",
    "ref_insert": "INSERT INTO {ks}.blob_refs (blob_id, message_id) VALUES (?, ?)",
    "ref_any": "SELECT message_id FROM {ks}.blob_refs WHERE blob_id = ? LIMIT 1",
    "ref_delete": "DELETE FROM {ks}.blob_refs WHERE blob_id = ? AND message_id = ?",
    "message_insert": (
        "INSERT INTO {ks}.messages (id, mailbox_id, blob_id, size, internal_date) VALUES (?, ?, ?, ?, ?)"
    ),
    "message_set_uid": "UPDATE {ks}.messages SET uid = ? WHERE id = ?",
    "message_get": "SELECT id, mailbox_id, blob_id, size, internal_date, uid FROM {ks}.messages WHERE id = ?",
    "message_delete": "DELETE FROM {ks}.messages WHERE id = ?",
    # POP3 view: plain writes only
    "pop3_insert": "INSERT INTO {ks}.pop3_view (mailbox_id, message_id, size) VALUES (?, ?, ?)",
    "pop3_list": "SELECT message_id, size FROM {ks}.pop3_view WHERE mailbox_id = ?",
    "pop3_delete": "DELETE FROM {ks}.pop3_view WHERE mailbox_id = ? AND message_id = ?",
    "pop3_delete_all": "DELETE FROM {ks}.pop3_view WHERE mailbox_id = ?",
    # IMAP view
    "imap_init": (
        "INSERT INTO {ks}.imap_view (mailbox_id, uidnext, highest_modseq, first_recent_uid)"
        " VALUES (?, 1, 1, 1)"
    ),
    "imap_counters": (
        "SELECT uidnext, highest_modseq, first_recent_uid FROM {ks}.imap_view WHERE mailbox_id = ? LIMIT 1"
    ),
    "imap_all": (
        f"SELECT {_IMAP_ROW}, uidnext, highest_modseq, first_recent_uid"
        " FROM {ks}.imap_view WHERE mailbox_id = ?"
    ),
    "imap_rows_in": f"SELECT {_IMAP_ROW} FROM {{ks}}.imap_view WHERE mailbox_id = ? AND uid IN ?",
    "imap_row_insert": (
        "INSERT INTO {ks}.imap_view (mailbox_id, uid, message_id, flags, modseq, size, expunged)"
        " VALUES (?, ?, ?, ?, ?, ?, false)"
    ),
    "imap_row_flags": "UPDATE {ks}.imap_view SET flags = ?, modseq = ? WHERE mailbox_id = ? AND uid = ?",
    "imap_row_expunge": (
        "UPDATE {ks}.imap_view SET expunged = true, modseq = ? WHERE mailbox_id = ? AND uid = ?"
    ),
    "imap_delete_all": "DELETE FROM {ks}.imap_view WHERE mailbox_id = ?",
    "imap_counters_lwt": (
        "UPDATE {ks}.imap_view SET uidnext = ?, highest_modseq = ? WHERE mailbox_id = ?"
        " IF uidnext = ? AND highest_modseq = ?"
    ),
    "imap_recent_lwt": "UPDATE {ks}.imap_view SET first_recent_uid = ? WHERE mailbox_id = ? IF first_recent_uid = ?",
}


def for_keyspace(keyspace: str) -> dict[str, str]:
    return {name: cql.replace("{ks}", keyspace) for name, cql in STATEMENTS.items()}
