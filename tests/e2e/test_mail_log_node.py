"""``[events] mail_log``: one twistd node writes a line per mailbox change, driven by real clients."""

from __future__ import annotations

import json
import poplib
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.helpers.mailserver import BIN, DOMAIN, PASSWORD, MailServer, free_port, wait_for_ports
from .test_single_node import logged_in, message

ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"


def lines(path: Path, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The file's lines once there are at least ``count`` (the write runs after the reply)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_mailbox_changes_are_logged(tmp_path: Path, provisioned: Path) -> None:
    log_file = tmp_path / "logs" / "mail-log.jsonl"
    log_file.parent.mkdir()
    config = tmp_path / "node.toml"
    config.write_text(f'[events]\nmail_log = "{log_file}"\n')
    node = MailServer(provisioned, tmp_path)
    node.process = subprocess.Popen([*node.args(), "--config", str(config)], cwd=tmp_path,
                                    stdout=node.log_path.open("ab"), stderr=subprocess.STDOUT)
    try:
        wait_for_ports(node.process, (node.smtp, node.pop3, node.imap), node.log_path)
        with smtplib.SMTP("127.0.0.1", node.smtp, timeout=30) as smtp:
            smtp.send_message(message("for both"), "sender@remote.test", [ALICE, BOB])
        added = lines(log_file, 2)
        assert sorted((e["event"], e["owner"], e["uids"]) for e in added) == [
            ("Added", ALICE, [1]), ("Added", BOB, [1])
        ]
        assert all(e["node"] == "mx.example.test" and e["logged_at"].endswith("+00:00") for e in added)
        assert added[0]["message_ids"] != added[1]["message_ids"]  # a message per recipient, one content

        imap = logged_in(node)
        imap.command("S", "SELECT INBOX")
        imap.command("F", "STORE 1 +FLAGS (\\Flagged)")
        imap.command("C", "CREATE Projects")
        imap.command("R", "RENAME Projects Archive")
        imap.command("D", "DELETE Archive")
        imap.command("E1", "STORE 1 +FLAGS.SILENT (\\Deleted)")
        assert b"* 1 EXPUNGE" in imap.command("E2", "EXPUNGE")
        imap.command("Z", "LOGOUT")
        imap.close()

        pop3 = poplib.POP3("127.0.0.1", node.pop3, timeout=30)
        pop3.user(BOB)
        pop3.pass_(PASSWORD)
        pop3.dele(1)
        pop3.quit()

        logged = lines(log_file, 10)
        alice = [(e["event"], e.get("uids"), e.get("name") or e.get("new_name")) for e in logged if e["owner"] == ALICE]
        assert alice == [
            ("Added", [1], None),
            ("FlagsUpdated", None, None),
            ("MailboxAdded", None, "Projects"),
            ("MailboxRenamed", None, "Archive"),
            ("MailboxDeleted", None, "Archive"),
            ("FlagsUpdated", None, None),
            ("Expunged", [1], None),
        ]
        flagged, deleted = [e["updates"] for e in logged if e["event"] == "FlagsUpdated"]
        assert [update[:2] for update in flagged] == [[1, ["\\Flagged"]]]
        assert [update[:2] for update in deleted] == [[1, ["\\Deleted", "\\Flagged"]]]
        assert deleted[0][2] > flagged[0][2]  # MODSEQs
        bob = [(e["event"], e.get("uids")) for e in logged if e["owner"] == BOB]
        assert bob == [("Added", [1]), ("Expunged", [1])]  # the POP3 deletion, at QUIT
        assert len({e["event_id"] for e in logged}) == len(logged) == 9
        assert PASSWORD not in log_file.read_text()
    finally:
        node.stop()


def test_a_missing_directory_stops_start_up_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[smtp]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
                      f'[events]\nmail_log = "{tmp_path / "nowhere" / "mail-log.jsonl"}"\n')
    fresh = tmp_path / "fresh-data"
    result = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--data", str(fresh), "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert not fresh.exists()  # refused before the store was created
    assert result.stderr.strip().splitlines() == [
        f"twistd mailcluster: events.mail_log: the directory {tmp_path / 'nowhere'} does not exist"
    ]
