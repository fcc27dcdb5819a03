"""The in-process response cache: an LRU bounded by entries and bytes, entries with a TTL."""

from __future__ import annotations

import asyncio

from policies.cache import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(store: MemoryStore, key: str) -> bytes | None:
    entry = asyncio.run(store.get(key))
    return None if entry is None else entry.body


def test_bounded_by_entries_least_recently_used_first() -> None:
    store = MemoryStore(maxsize=2, max_bytes=1 << 20, clock=Clock())
    store.put("r:s:a", b"A", 60)
    store.put("r:s:b", b"B", 60)
    assert get(store, "r:s:a") == b"A"  # a is now the most recently used
    store.put("r:s:c", b"C", 60)
    assert get(store, "r:s:b") is None
    assert get(store, "r:s:a") == b"A" and get(store, "r:s:c") == b"C"
    assert store.evictions == 1
    assert store.size() == (2, 2)


def test_bounded_by_bytes() -> None:
    store = MemoryStore(maxsize=100, max_bytes=10, clock=Clock())
    store.put("r:s:a", b"x" * 4, 60)
    store.put("r:s:b", b"y" * 4, 60)
    store.put("r:s:c", b"z" * 4, 60)  # 12 bytes: a goes
    assert get(store, "r:s:a") is None
    assert store.size() == (2, 8)
    store.put("r:s:d", b"w" * 11, 60)  # larger than the whole store: never kept
    assert get(store, "r:s:d") is None
    assert store.size() == (2, 8)
    store.put("r:s:b", b"v", 60)  # replacing an entry counts its new size only
    assert store.size() == (2, 5)


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    store = MemoryStore(maxsize=10, max_bytes=1000, clock=clock)
    store.put("r:s:a", b"A", 30)
    clock.now += 29.9
    entry = asyncio.run(store.get("r:s:a"))
    assert entry is not None and entry.created == 1000.0
    clock.now += 0.1
    assert get(store, "r:s:a") is None
    assert store.size() == (0, 0)
    assert store.evictions == 0  # expiry is not an eviction


def test_clear_by_route_or_scope() -> None:
    store = MemoryStore(maxsize=10, max_bytes=1000, clock=Clock())
    for key in ("r1:s1:a", "r1:s2:b", "r2:s1:c", "r2:s2:d"):
        store.put(key, b"x", 60)
    assert asyncio.run(store.clear(route_tag="r1")) == 2
    assert asyncio.run(store.clear(scope_tag="s1")) == 1
    assert get(store, "r2:s2:d") == b"x"
    assert asyncio.run(store.clear()) == 1
    assert store.size() == (0, 0)
