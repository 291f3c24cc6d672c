"""A resident budget for one LMDB shard's memory map (service.lmdb_resident_bytes).

LMDB reads every page through one shared mapping of data.mdb (mdb.c, `mdb_env_map`:
``mmap(..., MAP_SHARED, fd, 0)``, writable with MDB_WRITEMAP). Each page a worker reads, or
writes through the map, stays mapped in the worker and counts in its RSS until the process
exits: with WRITEMAP, ~190 MiB per worker at 1M events, growing with the shard. The data is
page cache either way; the page-table entries only make it count as the worker's memory.

`MapResidency.after_commit` runs after each commit of the shard. When the process's
resident shared pages (``/proc/self/statm``, field 3: resident file-backed + shmem pages, one
``pread`` of ~2 µs) have grown by more than the budget since the last drop, it drops the
map's page-table entries with ``madvise(MADV_DONTNEED)``. madvise(2): for a shared file
mapping, "subsequent accesses of pages in the range will succeed, but will result in ...
repopulating the memory contents from the up-to-date contents of the underlying mapped
file". Nothing is discarded: the kernel moves a dirty page-table entry's dirty bit to the
page cache page as it unmaps it (``zap_pte_range`` -> ``folio_mark_dirty``), so a page not yet
written back still is, and the next touch is a minor fault that maps that same page.

Why this is safe at any moment between transactions (and would be even within one):
- LMDB keeps no state in the mapping that the page cache does not hold: the meta pages are
  pages 0 and 1 of the same MAP_SHARED mapping (`me_metas` point into it), read again on the
  next access; `mdb_env_sync` msyncs (WRITEMAP) or fdatasyncs the file, which writes back
  the page cache whether or not a page is mapped; the map's address and VMA stay (only the
  entries go), so no pointer LMDB or a reader holds becomes invalid.
- Readers of other processes have their own mappings, untouched; a reader's pages are kept
  from reuse by the reader table (lock.mdb), not by residency.
- MADV_DONTNEED discards data only for private (MAP_PRIVATE / anonymous) pages: only
  mappings of data.mdb marked shared (``s`` in /proc/self/maps) are advised.
A drop costs a minor fault for each page read again (the branch pages, at once; a page
written after a commit faults anyway, the commit's msync write-protected it); the budget
keeps a small shard from ever paying it. Measured (one in-process worker, 200k records, a
budget that drops after every commit): 3.9 ms per drop, 0.73 µs and +0.11 minor faults per
record. The bound is the budget between transactions and the budget plus one transaction's
pages within one; with random keys one transaction touches a large part of a small shard
(~80 MiB of a 240 MiB file), so the budget bounds the growth with history, not the
transaction (docs/configuration.md).

The map's address: py-lmdb's ``Environment.info()["map_addr"]`` is LMDB's ``me_mapaddr``, the
meta page's fixed-map address (0 without MDB_FIXEDMAP), not where the map is. It is taken
from /proc/self/maps (the data file's device and inode) at each drop, so a map moved by
`Shard.grow` (mdb_env_set_mapsize unmaps and maps again) or `Shard.reopen` is found where it
is now. madvise is called through ctypes: at most once per commit and only when over the
budget, where the syscall itself (unmapping thousands of pages) costs milliseconds and the
call's ~2 µs do not count; the per-commit check is the ``pread``.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # <asm-generic/mman-common.h> (Linux, every architecture)
PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int


def shared_mappings(path: Path) -> list[tuple[int, int]]:
    """(start, end) of this process's shared mappings of the file `path` (/proc/self/maps,
    matched by device and inode)."""
    st = os.stat(path)
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    out = []
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) < 5 or int(fields[4]) != st.st_ino or fields[1][3:4] != b"s":
                continue
            major, minor = fields[3].split(b":")
            if (int(major, 16), int(minor, 16)) != dev:
                continue
            start, end = fields[0].split(b"-")
            out.append((int(start, 16), int(end, 16)))
    return out


def drop_pages(start: int, end: int) -> None:
    """madvise(MADV_DONTNEED) over [start, end) of a shared file mapping (see the module
    docstring); OSError on failure."""
    if _madvise(start, end - start, MADV_DONTNEED) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def resident_shared_pages(fd: int) -> int:
    """The process's resident shared pages: /proc/self/statm's third field (file-backed +
    shmem), read from an open descriptor of it."""
    return int(os.pread(fd, 256, 0).split()[2])


class MapResidency:
    """Keeps the pages of one data file mapped in this process under a budget (bytes > 0).

    Open it in the process that uses the shard (the descriptor is of /proc/self at open). A
    worker process writes one shard; where one process writes several (tests), each budget
    also counts the others' pages, which only makes it drop sooner.
    """

    def __init__(self, data_file: Path, budget: int):
        self.data_file = data_file
        self.budget_pages = max(1, budget // PAGE)
        self.fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        self.drops = 0
        # what is resident besides the map (code, the rings' shmem, the map pages touched so
        # far) counts from here; after a drop, from what stays
        self.baseline = resident_shared_pages(self.fd)

    def after_commit(self) -> bool:
        """Drop the map's pages if they grew past the budget since the last drop; True if it
        dropped them. Call between transactions."""
        grown = resident_shared_pages(self.fd) - self.baseline
        if grown <= self.budget_pages:
            return False
        self.drop()
        return True

    def drop(self) -> None:
        """Unmap every resident page of the data file's shared mappings in this process."""
        for start, end in shared_mappings(self.data_file):
            drop_pages(start, end)
        self.drops += 1
        self.baseline = resident_shared_pages(self.fd)

    def rebase(self) -> None:
        """Count from what is resident now: after the map was unmapped and mapped again
        (`Shard.grow`, `Shard.reopen`), its pages are gone without a drop."""
        self.baseline = resident_shared_pages(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
