"""Key → slot → worker routing. One key always maps to one slot, and a slot to one worker.

Slots decouple the key space from the worker count: every LMDB key that belongs to a routing
key is prefixed with its slot, so moving between worker counts moves whole slots.
"""

from __future__ import annotations

import struct

import xxhash

SLOTS = 4096
_SLOT = struct.Struct(">H")

_hash64 = xxhash.xxh3_64_intdigest
_hash128 = xxhash.xxh3_128_digest


def slot_of(key: bytes) -> int:
    """The slot (0..SLOTS-1) of a routing key."""
    return _hash64(key) % SLOTS


def worker_of(slot: int, workers: int) -> int:
    """The worker that owns a slot."""
    return slot % workers


def slot_prefix(slot: int) -> bytes:
    """The 2-byte big-endian prefix of every LMDB key in a slot."""
    return _SLOT.pack(slot)


def identity_hash(source: str, event_id: str) -> bytes:
    """16-byte hash of a CloudEvent's duplicate identity (source, id)."""
    return _hash128(f"{source}\x00{event_id}".encode())


def gate_hash(source: str, partitionkey: str) -> bytes:
    """16-byte hash of a sequence stream's identity (source, partition key)."""
    return _hash128(f"{source}\x00{partitionkey}".encode())
