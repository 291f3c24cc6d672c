"""The data directory as the command line meets it: creating it privately, and reading its
layout back (how many workers wrote its shards).

File modes. ``aggregator run`` and ``aggregator demo`` set their process umask to
``service.umask`` (default ``0077``) before anything is created, and every file and
directory under the data dir is created with the plain POSIX modes (0666 files, 0777
directories, LMDB's ``data.mdb``/``lock.mdb`` included) so that the umask alone decides:
with the default the data dir is 0700 and its files 0600 (the views are readable by the
service's user only, whatever the HTTP token says). Worker and HTTP processes are spawned
children and inherit the umask. A data dir that already exists keeps its mode (and its
files theirs); :func:`more_open_than` tells the service to warn about it.

Layout. The shards stamp the worker count they were written by (``meta["workers"]``,
store.py); ``cli._written_workers`` reads it back through :func:`reshard.current_workers`
(above this module: store.py imports it), so ``get``/``stats`` need no ``--workers``, and a
directory without stamped shards is a :class:`DataDirError` rather than an empty answer.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DEFAULT_UMASK = 0o077
FILE_MODE = 0o666  # what every file under the data dir is created with (before the umask)


class DataDirError(Exception):
    """The data dir cannot be used as asked; the message is one line for the user."""


def apply_umask(umask: int) -> int:
    """Make ``umask`` the process umask (inherited by spawned workers); returns the old one."""
    return os.umask(umask)


def create(path: str | os.PathLike) -> Path:
    """Create the data dir (and missing parents) if needed; raise DataDirError when it cannot
    be created or is not a writable directory."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataDirError(f"data dir {path}: cannot create it: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataDirError(f"data dir {path}: not writable by this user")
    return path


def more_open_than(path: str | os.PathLike, umask: int) -> int | None:
    """The mode of ``path`` if it grants a permission that ``umask`` would have withheld
    (a data dir made before the umask setting, or by hand), else None."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    return mode if mode & umask else None


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` durable (after a create, rename or unlink in
    it: the reshard's swap, the saved bloom filter)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
