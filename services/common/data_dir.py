"""The data dir is its owner's alone: 0600 files, 0700 directories, whoever writes them.

It holds the SQLite database (with its -wal, -shm and -journal files), the mail drop, whose `.eml`
files carry live verification and reset links, the key-encryption key, the rendered Envoy config and
whatever later features put there. No single writer should have to remember that, so the rule is
kept as a class, in two parts:

- `restrict_new_files_to_owner` sets the process umask to 077. The `parley` CLI calls it first, for
  every command, so every file and directory any part of Parley creates, and any child it starts
  (Envoy, the edge process), is owner-only without asking. SQLite creates a database 0644 & ~umask
  and gives its -wal, -shm and -journal files the database's own mode.
- `prepare_data_dir` creates the data dir 0700, or takes group and other access away from an
  existing one and from everything in it. Data dirs of earlier versions (0644 databases and mails)
  are tightened that way when `parley up`, `parley migrate` or `parley admin` starts, before SQLite
  opens the database and copies its mode to new files.

Writers that create files also give explicit modes (`mkdir(mode=0o700)`, `os.open(..., 0o600)`), so
code run without the CLI, as in tests, is private too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

OWNER_ONLY_UMASK: Final = 0o077
PRIVATE_DIR_MODE: Final = 0o700
PRIVATE_FILE_MODE: Final = 0o600


def restrict_new_files_to_owner() -> None:
    """Make every file and directory this process and its children create owner-only (umask 077)."""
    os.umask(OWNER_ONLY_UMASK)


def prepare_data_dir(data_dir: Path) -> Path:
    """Create `data_dir` (0700) if needed, take group and other access away from it and everything
    under it, and return its resolved path.

    Only permissions are taken away, never given. Symbolic links are not followed, so nothing
    outside the data dir changes. An entry we may not change (another user's) is logged and left.
    """
    data_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    root = data_dir.resolve()
    _take_away_group_and_other_access(root)
    for directory, subdirectories, files in os.walk(root):
        for name in (*subdirectories, *files):
            _take_away_group_and_other_access(Path(directory, name))
    return root


def _take_away_group_and_other_access(path: Path) -> None:
    try:
        status = path.lstat()
        mode = stat.S_IMODE(status.st_mode)
        if stat.S_ISLNK(status.st_mode) or not mode & OWNER_ONLY_UMASK:
            return
        path.chmod(mode & ~OWNER_ONLY_UMASK)
    except FileNotFoundError:  # gone meanwhile, e.g. a SQLite journal
        return
    except PermissionError:
        logger.warning("cannot make %s owner-only: it belongs to another user; chmod go-rwx it", path)


def secret_file(path: Path, make: Callable[[], str]) -> str:
    """The secret kept in `path`, made with `make()` on first use (embedded mode's generated secrets).

    The file is written privately under a temporary name and then linked into place: the link fails
    if another process won the race, so every process reads the same secret and nobody reads half
    of one.
    """
    if not path.exists():
        path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        try:
            with os.fdopen(descriptor, "w", encoding="ascii") as handle:
                handle.write(make() + "\n")
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
                logger.info("created %s for embedded mode", path)
        finally:
            temporary.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        logger.warning("the secret file %s is readable by other users; chmod 600 it", path)
    return path.read_text(encoding="ascii").strip()
