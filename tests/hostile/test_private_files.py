"""What a node leaves on disk, and where its manhole may listen (findings 11 and 12)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from tests.helpers.mailserver import BIN, MailServer, free_port, node_with


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_a_node_keeps_its_files_to_itself_whatever_the_umask(tmp_path: Path) -> None:
    """Before: the data folder was 0755 and the SQLite files 0644: all mail readable by every local user."""
    data = tmp_path / "fresh"
    admin = subprocess.run([str(BIN / "mailcluster-admin"), "--data", str(data), "domain", "add", "example.test"],
                           capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.umask(0o022))
    assert admin.returncode == 0, admin.stderr
    workdir = tmp_path / "run"
    workdir.mkdir()
    node = MailServer(data, workdir)
    old = os.umask(0o022)  # the node inherits the usual shell umask
    try:
        node.start()
    finally:
        os.umask(old)
    node.stop()
    found = modes(data)
    assert found["."] == 0o700
    assert {name: mode for name, mode in found.items() if mode & 0o077} == {}, found
    assert any(name.startswith("mailcluster.sqlite3") for name in found)
    assert "tls/self-signed.key" in found


def test_an_open_data_folder_is_reported_at_start(tmp_path: Path, provisioned: Path) -> None:
    provisioned.chmod(0o755)
    node = node_with(tmp_path, provisioned, "")
    node.stop()
    warnings = [e for e in node.log_events() if e["event"] == "files.not_private"]
    assert any(f"{provisioned} can be read by other users (mode 0755)" in str(w["problem"]) for w in warnings), warnings
    assert stat.S_IMODE(provisioned.stat().st_mode) == 0o755  # reported, not changed behind the operator


def test_a_manhole_off_loopback_stops_start_up_with_one_line(tmp_path: Path, provisioned: Path) -> None:
    key = tmp_path / "admin_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = tmp_path / "manhole.toml"
    config.write_text(f'[manhole]\nenabled = true\nlisten = "tcp:{free_port()}:interface=0.0.0.0"\n'
                      f'authorized_keys = "{key}.pub"\n')
    result = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--data", str(provisioned),
         "--config", str(config), "--smtp", f"tcp:{free_port()}:interface=127.0.0.1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("twistd mailcluster: manhole.listen: ") and "is not a loopback address" in line
    assert "manhole.allow_non_loopback = true" in line
