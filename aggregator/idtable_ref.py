"""The pure-Python reference of `_idtable.IdTable` (AGGREGATOR_PURE_CORE=1): a set of the
18-byte dedup keys (2-byte slot + 16-byte identity hash) of one dedup generation's ids
that are not sealed yet (store.py, format 4). Same API and results as the compiled twin
(tests/test_idtable.py compares them)."""

from __future__ import annotations

REC = 18
SLOTS = 1 << 16


class IdTable:
    """A set of 18-byte keys; `seal_slice` hands them out in sorted order, slot by slot."""

    def __init__(self) -> None:
        self._keys: set[bytes] = set()
        self._sorted: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def nbytes(self) -> int:
        return REC * len(self._keys)  # a model: the set's real footprint is ~10x

    def add(self, keys: bytes) -> None:
        """Add the 18-byte keys joined in `keys` (a key already there stays once)."""
        if len(keys) % REC:
            raise ValueError("keys: a multiple of 18 bytes")
        before = len(self._keys)
        self._keys.update(keys[i:i + REC] for i in range(0, len(keys), REC))
        if len(self._keys) != before:
            self._sorted = None

    def __contains__(self, key: bytes) -> bool:
        if len(key) != REC:
            raise ValueError("a key is 18 bytes")
        return key in self._keys

    def seal_slice(self, first_slot: int, budget: int) -> tuple[bytes, int]:
        """(keys, next slot): the keys of slots >= first_slot in sorted order, at least
        `budget` of them unless fewer are left, whole slots; the next slot to seal after them,
        or 65536 when no key of a later slot is left."""
        if self._sorted is None:
            self._sorted = sorted(self._keys)
        s = self._sorted
        lo = next((i for i, k in enumerate(s) if int.from_bytes(k[:2], "big") >= first_slot),
                  len(s))
        if lo == len(s):
            return b"", SLOTS
        end = min(lo + max(budget, 1), len(s))
        last = s[end - 1][:2]
        while end < len(s) and s[end][:2] == last:
            end += 1
        return b"".join(s[lo:end]), (int.from_bytes(last, "big") + 1 if end < len(s)
                                     else SLOTS)

    def keys(self, first_slot: int = 0) -> bytes:
        """The keys of slots >= first_slot, joined (in no particular order)."""
        return b"".join(k for k in self._keys if int.from_bytes(k[:2], "big") >= first_slot)

    def hashes(self, first_slot: int = 0) -> bytes:
        """The 16-byte identity hashes (the slot cut off) of the keys of slots >=
        first_slot, joined."""
        return b"".join(k[2:] for k in self._keys if int.from_bytes(k[:2], "big") >= first_slot)
