"""The project as a user installs it: the wheel, a fresh venv, a directory outside the checkout.

The test venv has the checkout on ``sys.path`` (an editable install), so a
missing file in the wheel or a dropin Twisted cannot find would go unseen by
every other test.  Here the wheel is built, its file list checked, and it is
installed into a fresh venv that borrows only the dependencies from the test
venv: a ``.pth`` line naming the test venv's site-packages adds that folder,
but (unlike a site folder) does not run the ``.pth`` files in it, so the
editable install's path to the checkout stays out.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import smtplib
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers.mailserver import free_port, stop_or_explain, wait_for_ports

ROOT = Path(__file__).resolve().parents[2]
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the tree git knows, so that a build/ or egg-info left in the checkout
    # by someone's earlier build cannot slip into (or hide a gap in) the wheel.
    tree = out / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = tree / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(tree)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("twisted_mail_cluster-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    site = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip())
    (site / "test-dependencies.pth").write_text(f"{SITE_PACKAGES}\n")
    return venv


def test_the_wheel_holds_the_package_and_the_dropin_and_nothing_else(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    metadata = {top for top in tops if top.endswith(".dist-info")}
    assert len(metadata) == 1 and tops - metadata == {"twisted_mail_cluster", "twisted"}, tops
    assert [n for n in names if n.startswith("twisted/")] == ["twisted/plugins/mailcluster_plugin.py"]
    assert "twisted_mail_cluster/py.typed" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "build/"))]


def test_the_checkout_never_shadows_the_installed_twisted() -> None:
    """From the repository root, ``twisted`` is still the installed one: our twisted/
    folder has no __init__.py and only adds its plugins folder to Twisted's."""
    shown = subprocess.run(
        [sys.executable, "-c", "import twisted, twisted.plugins; print(twisted.__file__)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert Path(shown.stdout.strip()).is_relative_to(SITE_PACKAGES), shown.stdout
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()


def test_an_installed_wheel_serves_from_outside_the_checkout(fresh_venv: Path, tmp_path: Path) -> None:
    python = str(fresh_venv / "bin" / "python")
    where = subprocess.run([python, "-c", "import twisted_mail_cluster; print(twisted_mail_cluster.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(fresh_venv), "the package came from the checkout"
    twistd = [python, "-c", "from twisted.scripts.twistd import run; run()"]
    helped = subprocess.run([*twistd, "mailcluster", "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "--smtp" in helped.stdout and "--imap" in helped.stdout
    assert (fresh_venv / "bin" / "mailcluster-admin").exists()

    ports = {"smtp": free_port(), "pop3": free_port(), "imap": free_port(), "imaps": free_port(),
             "pop3s": free_port()}
    log = tmp_path / "node.log"
    node = subprocess.Popen(
        [*twistd, "-n", "--pidfile=", "mailcluster",
         *(f"--{name}=tcp:{port}:interface=127.0.0.1" for name, port in ports.items())],
        cwd=tmp_path, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for_ports(node, tuple(ports.values()), log)
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as smtp:
            assert smtp.ehlo("client.test")[0] == 250
        pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=10)
        assert pop.getwelcome().startswith(b"+OK")
        pop.quit()
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=10)
        assert imap.welcome.startswith(b"* OK")
        imap.logout()
        assert (tmp_path / "mailcluster-data").is_dir()
        assert not (tmp_path / "twistd.pid").exists()
    finally:
        node.terminate()
        stop_or_explain(node, log)
