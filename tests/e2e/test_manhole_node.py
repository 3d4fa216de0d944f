"""The admin SSH manhole of a real `twistd mailcluster`: the running node is at hand."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.helpers.mailserver import MailServer, free_port, wait_for_ports


def test_manhole_reaches_the_running_store(tmp_path: Path, provisioned: Path) -> None:
    key = tmp_path / "admin_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    port = free_port()
    config = tmp_path / "manhole.toml"
    config.write_text(
        "[manhole]\nenabled = true\n"
        f'listen = "tcp:{port}:interface=127.0.0.1"\n'
        f'authorized_keys = "{key}.pub"\n'
    )
    node = MailServer(provisioned, tmp_path)
    node.process = subprocess.Popen([*node.args(), "--config", str(config)], cwd=tmp_path,
                                    stdout=node.log_path.open("ab"), stderr=subprocess.STDOUT)
    try:
        wait_for_ports(node.process, (node.imap, port), node.log_path)
        ssh = subprocess.Popen(
            ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-p", str(port), "-T", "admin@127.0.0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert ssh.stdin is not None
        # The store answers with a Deferred; the manhole prints its result when it fires.
        ssh.stdin.write(b"store.list_users()\n")
        ssh.stdin.flush()
        time.sleep(1.0)
        out, err = ssh.communicate(b"type(node.store).__name__, config.manhole.enabled\n", timeout=60)
        assert ssh.returncode == 0, err
        assert b"called back" in out and b"User(address='bob@example.test'" in out
        assert b"('EmbeddedStore', True)" in out
        # Bound to loopback: the configured interface, nothing else.
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        assert listening.stdout.split()[3] == f"127.0.0.1:{port}"
    finally:
        node.stop()
