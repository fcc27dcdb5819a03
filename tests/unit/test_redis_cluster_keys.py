"""The Redis keys' names, as a Redis Cluster hashes them: whatever one script, MGET or
pipeline read touches together lives on one slot; what may spread, spreads; and on one
server the names stay as they were before clusters were supported."""

from __future__ import annotations

import fnmatch

import pytest
from redis.crc import key_slot

from gateway.config import RedisConfig
from gateway.wire.cachekey import cache_key, tag
from policies.breaker_sync import breaker_base
from policies.cache_redis import entry_name, entry_pattern, lease_name
from policies.limits_redis import RedisLimits
from policies.redis_state import create_client


def slot(name: str) -> int:
    return int(key_slot(name.encode()))


def test_every_breaker_key_and_the_channel_share_one_slot_on_a_cluster() -> None:
    base = breaker_base("vgate", cluster=True)
    assert base == "{vgate:breaker}"
    names = [f"{base}:{route}:{backend}" for route in ("a", "b{x}", "c") for backend in "xyz"]
    assert {slot(name) for name in [base, *names]} == {slot(base)}


def test_breaker_names_on_one_server_are_unchanged() -> None:
    assert breaker_base("vgate", cluster=False) == "vgate:breaker"


def test_a_cache_entry_and_its_lease_share_a_slot_and_entries_spread() -> None:
    prefix = "vgate:cache:"
    keys = [cache_key("/v1/chat/completions", "m", "key:a", {"n": n}) for n in range(50)]
    for key in keys:
        entry, lease = entry_name(prefix, key, cluster=True), lease_name(prefix, key, cluster=True)
        assert entry == f"{prefix}{{{key}}}" and lease == f"{prefix}lease:{{{key}}}"
        assert slot(entry) == slot(lease)
    assert len({slot(entry_name(prefix, key, cluster=True)) for key in keys}) > 40


def test_cache_names_on_one_server_are_unchanged() -> None:
    key = cache_key("/v1/chat/completions", "m", "key:a", {"n": 1})
    assert entry_name("vgate:cache:", key, cluster=False) == "vgate:cache:" + key
    assert lease_name("vgate:cache:", key, cluster=False) == "vgate:cache:lease:" + key


@pytest.mark.parametrize("cluster", [True, False])
def test_the_admin_pattern_matches_entries_not_leases(cluster: bool) -> None:
    prefix = "p:cache:"
    mine = cache_key("/v1/chat/completions", "m", "key:a", {"n": 1})
    other = cache_key("/v1/chat/completions", "n", "key:a", {"n": 1})
    pattern = entry_pattern(prefix, tag("m"), None, cluster=cluster)
    # Redis's glob has no special meaning for braces; fnmatch's neither.
    assert fnmatch.fnmatchcase(entry_name(prefix, mine, cluster=cluster), pattern)
    assert not fnmatch.fnmatchcase(entry_name(prefix, other, cluster=cluster), pattern)
    every = entry_pattern(prefix, None, None, cluster=cluster)
    assert fnmatch.fnmatchcase(entry_name(prefix, other, cluster=cluster), every)
    if cluster:  # the lease is no entry (one server's names keep their old pattern)
        assert not fnmatch.fnmatchcase(lease_name(prefix, mine, cluster=True), every)


def test_a_keys_limits_share_a_slot_and_keys_spread() -> None:
    # A client that never connects: naming needs none.
    limits = RedisLimits(create_client(RedisConfig(cluster={"nodes": ["127.0.0.1:1"]})))
    for key_id in ("key-1", "a:b", "x{y}"):
        names = limits.keys(key_id)
        assert len({slot(name) for name in names}) == 1, names
    assert len({slot(limits.keys(f"key-{n}")[0]) for n in range(50)}) > 40
