"""Every CQL statement the Cassandra store runs, prepared once at start.

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
    "domain_insert_lwt": "INSERT INTO domains (name) VALUES (?) IF NOT EXISTS",
    "domain_get": "SELECT name FROM domains WHERE name = ?",
    "domain_list": "SELECT name FROM domains",
    "domain_delete": "DELETE FROM domains WHERE name = ?",
    "user_insert_lwt": "INSERT INTO users (address, domain, password_hash) VALUES (?, ?, ?) IF NOT EXISTS",
    "user_get": "SELECT address, password_hash FROM users WHERE address = ?",
    "user_all": "SELECT address, password_hash FROM users",
    "user_set_hash": "UPDATE users SET password_hash = ? WHERE address = ?",
    "user_delete": "DELETE FROM users WHERE address = ?",
    "domain_user_insert": "INSERT INTO users_by_domain (domain, address) VALUES (?, ?)",
    "domain_user_list": "SELECT address FROM users_by_domain WHERE domain = ?",
    "domain_user_any": "SELECT address FROM users_by_domain WHERE domain = ? LIMIT 1",
    "domain_user_delete": "DELETE FROM users_by_domain WHERE domain = ? AND address = ?",
    "counter_get": "SELECT value FROM counters WHERE name = ?",
    "counter_init_lwt": "INSERT INTO counters (name, value) VALUES (?, ?) IF NOT EXISTS",
    "counter_set_lwt": "UPDATE counters SET value = ? WHERE name = ? IF value = ?",
    # mailboxes
    "mailbox_insert": f"INSERT INTO mailboxes ({_MAILBOX}) VALUES (?, ?, ?, ?, ?)",
    "mailbox_get": f"SELECT {_MAILBOX} FROM mailboxes WHERE id = ?",
    "mailbox_rename": "UPDATE mailboxes SET name = ? WHERE id = ?",
    "mailbox_delete": "DELETE FROM mailboxes WHERE id = ?",
    "owner_mailbox_insert_lwt": (
        "INSERT INTO mailboxes_by_owner (owner, name, id, uidvalidity, special_use)"
        " VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
    ),
    "owner_mailbox_get": (
        "SELECT owner, name, id, uidvalidity, special_use FROM mailboxes_by_owner"
        " WHERE owner = ? AND name = ?"
    ),
    "owner_mailbox_list": (
        "SELECT owner, name, id, uidvalidity, special_use FROM mailboxes_by_owner WHERE owner = ?"
    ),
    "owner_mailbox_delete": "DELETE FROM mailboxes_by_owner WHERE owner = ? AND name = ?",
    "subscription_insert": "INSERT INTO subscriptions (owner, name) VALUES (?, ?)",
    "subscription_get": "SELECT name FROM subscriptions WHERE owner = ? AND name = ?",
    "subscription_list": "SELECT name FROM subscriptions WHERE owner = ?",
    "subscription_delete": "DELETE FROM subscriptions WHERE owner = ? AND name = ?",
    "subscription_delete_all": "DELETE FROM subscriptions WHERE owner = ?",
    # content
    "blob_insert": (
        "INSERT INTO blobs (id, size, chunk_size, chunks, structure, created)"
        " VALUES (?, ?, ?, ?, ?, toTimestamp(now()))"
    ),
    "blob_get": "SELECT id, size, chunk_size, chunks, structure FROM blobs WHERE id = ?",
    "blob_all": "SELECT id, chunks, created FROM blobs",
    "blob_delete": "DELETE FROM blobs WHERE id = ?",
    "chunk_insert": "INSERT INTO blob_chunks (blob_id, seq, sha256, data) VALUES (?, ?, ?, ?)",
    "chunk_get": "SELECT sha256, data FROM blob_chunks WHERE blob_id = ? AND seq = ?",
    "chunk_delete": "DELETE FROM blob_chunks WHERE blob_id = ? AND seq = ?",
    "ref_insert": "INSERT INTO blob_refs (blob_id, message_id) VALUES (?, ?)",
    "ref_any": "SELECT message_id FROM blob_refs WHERE blob_id = ? LIMIT 1",
    "ref_delete": "DELETE FROM blob_refs WHERE blob_id = ? AND message_id = ?",
    "message_insert": (
        "INSERT INTO messages (id, mailbox_id, blob_id, size, internal_date) VALUES (?, ?, ?, ?, ?)"
    ),
    "message_set_uid": "UPDATE messages SET uid = ? WHERE id = ?",
    "message_get": "SELECT id, mailbox_id, blob_id, size, internal_date, uid FROM messages WHERE id = ?",
    "message_delete": "DELETE FROM messages WHERE id = ?",
    # POP3 view: plain writes only
    "pop3_insert": "INSERT INTO pop3_view (mailbox_id, message_id, size) VALUES (?, ?, ?)",
    "pop3_list": "SELECT message_id, size FROM pop3_view WHERE mailbox_id = ?",
    "pop3_delete": "DELETE FROM pop3_view WHERE mailbox_id = ? AND message_id = ?",
    "pop3_delete_all": "DELETE FROM pop3_view WHERE mailbox_id = ?",
    # IMAP view
    "imap_init": (
        "INSERT INTO imap_view (mailbox_id, uidnext, highest_modseq, first_recent_uid)"
        " VALUES (?, 1, 1, 1)"
    ),
    "imap_counters": (
        "SELECT uidnext, highest_modseq, first_recent_uid FROM imap_view WHERE mailbox_id = ? LIMIT 1"
    ),
    "imap_all": (
        f"SELECT {_IMAP_ROW}, uidnext, highest_modseq, first_recent_uid"
        " FROM imap_view WHERE mailbox_id = ?"
    ),
    "imap_rows_in": f"SELECT {_IMAP_ROW} FROM imap_view WHERE mailbox_id = ? AND uid IN ?",
    "imap_row_insert": (
        "INSERT INTO imap_view (mailbox_id, uid, message_id, flags, modseq, size, expunged)"
        " VALUES (?, ?, ?, ?, ?, ?, false)"
    ),
    "imap_row_flags": "UPDATE imap_view SET flags = ?, modseq = ? WHERE mailbox_id = ? AND uid = ?",
    "imap_row_expunge": (
        "UPDATE imap_view SET expunged = true, modseq = ? WHERE mailbox_id = ? AND uid = ?"
    ),
    "imap_delete_all": "DELETE FROM imap_view WHERE mailbox_id = ?",
    "imap_counters_lwt": (
        "UPDATE imap_view SET uidnext = ?, highest_modseq = ? WHERE mailbox_id = ?"
        " IF uidnext = ? AND highest_modseq = ?"
    ),
    "imap_recent_lwt": "UPDATE imap_view SET first_recent_uid = ? WHERE mailbox_id = ? IF first_recent_uid = ?",
}
