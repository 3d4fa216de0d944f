"""The node's files are its user's alone: the store holds every message and every password hash.

SQLite creates its files with the process umask (0644 under the usual 022),
and so did everything else the node wrote: any local user could read all the
mail.  ``keep_private`` sets the umask to 077 for the process, so whatever it
creates from then on (the store and its journal, keys, certificates, the
mail log) is 0600 and every folder 0700, whatever the shell's umask was, and
makes the data folder 0700 if it is new.  An existing folder is not changed
behind the operator's back (it may be shared on purpose); it is reported.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["keep_private"]

PRIVATE_UMASK = 0o077


def keep_private(data_dir: Path) -> list[str]:
    """Private files from now on; the warnings to log about what already exists."""
    os.umask(PRIVATE_UMASK)
    if not data_dir.exists():
        data_dir.mkdir(mode=0o700, parents=True)
        return []
    warnings = []
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    if mode & 0o077:
        warnings.append(
            f"server.data: {data_dir} can be read by other users (mode {mode:04o}), and it holds all mail "
            f"and the password hashes; chmod 700 it"
        )
    for path in sorted(data_dir.glob("mailcluster.sqlite3*")):
        file_mode = stat.S_IMODE(path.stat().st_mode)
        if file_mode & 0o077:
            warnings.append(f"server.data: {path} can be read by other users (mode {file_mode:04o}); chmod 600 it")
    return warnings
