"""Where getmail6 may run from a test: a state folder and a Maildir it can deliver into.

getmail refuses to deliver as root: run as root, it delivers as "nobody", who
must reach and write the Maildir, and pytest's tmp_path is 0700.  So the
folders are made in a 0755 temporary folder of their own, the Maildir owned
by nobody when the tests run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GetmailFolders:
    base: Path
    state: Path
    maildir: Path
    #: The getmailrc [destination] line that makes getmail deliver as nobody, or "".
    user_line: str


@contextmanager
def getmail_folders() -> Iterator[GetmailFolders]:
    base = Path(tempfile.mkdtemp(prefix="getmail-test-"))
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir()
        maildir = base / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        as_root = os.geteuid() == 0
        if as_root:
            nobody = pwd.getpwnam("nobody")
            for folder in (maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
                os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        yield GetmailFolders(base, state, maildir, "user = nobody\n" if as_root else "")
    finally:
        shutil.rmtree(base, ignore_errors=True)
