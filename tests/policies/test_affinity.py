from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from policies.affinity import MAX_RING_POINTS, AffinityRing, key_hash, request_key
from policies.selection import LeastInFlight, create_selector

NAMES = ["w1", "w2", "w3", "w4"]
KEYS = [f"conversation-{number}" for number in range(10_000)]


@dataclass
class Backend:
    in_flight: int = 0
    latency_ewma_s: float = 0.0
    weight: int = 1

    @property
    def load(self) -> int:
        return self.in_flight


def ring(names: list[str] = NAMES, weights: list[int] | None = None) -> AffinityRing:
    return AffinityRing(names, weights or [1] * len(names), fallback=LeastInFlight())


def placement(selector: AffinityRing, pool: list[Backend], eligible: list[bool]) -> list[int]:
    """Where each of KEYS goes while nothing is in flight (capacity never binds)."""
    placed = [selector.pick(pool, eligible, key) for key in KEYS]
    assert None not in placed
    return [index for index in placed if index is not None]


def test_same_key_same_backend_while_load_allows() -> None:
    selector = ring()
    pool = [Backend() for _ in NAMES]
    home = selector.pick(pool, [True] * 4, "user-42")
    assert home is not None
    for round_ in range(20):
        for backend in pool:
            backend.in_flight = round_  # everyone equally busy: the key has no reason to move
        assert selector.pick(pool, [True] * 4, "user-42") == home
    # Busier than the others, but within 1 + epsilon of the fair share: it stays.
    for backend in pool:
        backend.in_flight = 10
    pool[home].in_flight = 12  # capacity: 1.25 * (42 + 1) / 4 = 13.4
    assert selector.pick(pool, [True] * 4, "user-42") == home


def test_a_hot_key_spills_to_the_next_backend_on_the_ring() -> None:
    selector = ring()
    pool = [Backend() for _ in NAMES]
    home = selector.pick(pool, [True] * 4, "hot")
    assert home is not None
    picks = []
    for _ in range(400):  # one key, every request still in flight
        index = selector.pick(pool, [True] * 4, "hot")
        assert index is not None
        picks.append(index)
        pool[index].in_flight += 1
    # The home backend fills to its capacity first, then the next one on the ring takes over.
    first_spill = next(index for index in picks if index != home)
    # With 1 in flight in all, capacity is ceil(1.25 * 2 / 4) = 1: the second request spills.
    assert picks.index(first_spill) == 1
    ejected = [True] * 4
    ejected[home] = False
    assert selector.pick([Backend() for _ in NAMES], ejected, "hot") == first_spill
    # No backend holds more than 1 + epsilon times its share: the key cannot melt one worker.
    assert max(backend.in_flight for backend in pool) <= math.ceil(1.25 * 400 / 4)
    # ...and it keeps as much as that bound allows at home and on the first spill.
    assert pool[home].in_flight >= 120 and pool[first_spill].in_flight >= 120


def test_load_stays_bounded_under_skewed_traffic_with_departures() -> None:
    selector = ring(["a", "b", "c", "d", "e"], [2, 1, 1, 1, 1])
    pool = [Backend(weight=weight) for weight in (2, 1, 1, 1, 1)]
    draw = random.Random(5)
    running: list[int] = []
    for _ in range(5_000):
        if running and draw.random() < 0.45:
            pool[running.pop(draw.randrange(len(running)))].in_flight -= 1
        hot = draw.random() < 0.6  # one key carries most of the traffic
        key = "tenant-big" if hot else f"user-{draw.randrange(1000)}"
        total = sum(backend.in_flight for backend in pool)
        index = selector.pick(pool, [True] * 5, key)
        assert index is not None
        # The paper's bound, by weight: below (1 + eps) * (total + 1) * weight / total weight.
        assert pool[index].in_flight < 1.25 * (total + 1) * pool[index].weight / 6
        pool[index].in_flight += 1
        running.append(index)


def test_removing_a_backend_moves_only_its_keys() -> None:
    selector = ring(["w1", "w2", "w3", "w4", "w5"])
    pool = [Backend() for _ in range(5)]
    before = placement(selector, pool, [True] * 5)
    after = placement(selector, pool, [True, True, False, True, True])
    moved = {
        number for number, (old, new) in enumerate(zip(before, after, strict=True)) if old != new
    }
    # Exactly the missing backend's keys move, all of them, and nothing else.
    assert moved == {number for number, old in enumerate(before) if old == 2}
    assert 0.15 <= len(moved) / len(KEYS) <= 0.25  # ~1/5
    # They come back when it does.
    assert placement(selector, pool, [True] * 5) == before


@pytest.mark.parametrize(
    ("names", "weights"),
    [(NAMES, [1, 1, 1, 1]), (["big", "small"], [3, 1]), (["a", "b", "c"], [5, 3, 2])],
)
def test_keys_spread_in_proportion_to_weight(names: list[str], weights: list[int]) -> None:
    selector = ring(names, weights)
    pool = [Backend(weight=weight) for weight in weights]
    counts = Counter(placement(selector, pool, [True] * len(names)))
    for index, weight in enumerate(weights):
        share = counts[index] / len(KEYS)
        expected = weight / sum(weights)
        assert abs(share - expected) <= 0.15 * expected, (names[index], share, expected)


def test_instances_from_the_same_config_choose_the_same() -> None:
    pool = [Backend() for _ in NAMES]
    first = placement(ring(), pool, [True] * 4)
    assert placement(ring(), pool, [True] * 4) == first
    # Placement follows the names, not their order in the configuration.
    reordered = ring(list(reversed(NAMES)))
    mapped = [NAMES[3 - index] for index in placement(reordered, pool, [True] * 4)]
    assert mapped == [NAMES[index] for index in first]
    # ...and the hash is the same in every process (CRC-32, not the salted hash()).
    assert key_hash("abc") == 0x352441C2


def test_without_a_key_the_least_loaded_backend_per_weight() -> None:
    selector = ring(["a", "b", "c"], [1, 1, 4])
    pool = [Backend(in_flight=3), Backend(in_flight=1), Backend(in_flight=2, weight=4)]
    assert selector.pick(pool, [True] * 3) == 2
    assert selector.pick(pool, [True, True, False], None) == 1


def test_only_eligible_backends_and_none_when_none_is() -> None:
    selector = ring()
    pool = [Backend() for _ in NAMES]
    for key in KEYS[:500]:
        assert selector.pick(pool, [False, True, False, False], key) == 1
    assert selector.pick(pool, [False] * 4, "user-1") is None
    assert selector.pick(pool, [False] * 4) is None


def test_the_ring_is_bounded() -> None:
    names = [f"b{number}" for number in range(200)]
    selector = ring(names, [1000] * 100 + [1] * 100)
    assert len(selector._points) <= MAX_RING_POINTS + len(names)
    assert selector.pick([Backend() for _ in names], [True] * 200, "k") is not None
    # A huge key costs no more than its first MAX_KEY_CHARS characters.
    assert key_hash("x" * 10_000_000) == key_hash("x" * 1024)


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        ring([], [])
    with pytest.raises(ValueError):
        ring(["a", "a"])
    with pytest.raises(ValueError):
        ring(["a", "b"], [1, 0])
    with pytest.raises(ValueError):
        AffinityRing(["a"], [1], fallback=LeastInFlight(), epsilon=0)


def test_create_selector_makes_affinity_and_every_strategy_takes_a_key() -> None:
    pool = [Backend() for _ in NAMES]
    selector = create_selector("affinity", [1] * 4, 0, names=NAMES, epsilon=0.5)
    assert isinstance(selector, AffinityRing)
    assert selector.pick(pool, [True] * 4, "user-7") == ring().pick(pool, [True] * 4, "user-7")
    for strategy in ("weighted", "least_inflight", "p2c_latency"):
        other = create_selector(strategy, [1] * 4, 0)
        assert other.pick(pool, [True] * 4, "user-7") is not None
        assert other.pick(pool, [True] * 4) is not None


def test_request_key_is_the_user_field_or_one_header_never_the_prompt() -> None:
    shared_system_prompt = {"role": "system", "content": "You are the tenant's assistant."}
    payload = {"messages": [shared_system_prompt, {"role": "user", "content": "hi"}]}
    headers = [(b"content-type", b"application/json"), (b"x-session-id", b"conv-7")]
    assert request_key(None, headers, payload) is None  # no user: no key, least load
    assert request_key(None, headers, {**payload, "user": "alice"}) == "alice"
    assert request_key(None, headers, {**payload, "user": 42}) is None
    assert request_key(None, headers, {**payload, "user": ""}) is None
    assert request_key(b"x-session-id", headers, {**payload, "user": "alice"}) == "conv-7"
    assert request_key(b"x-missing", headers, payload) is None
    assert request_key(b"x-session-id", [(b"x-session-id", b"")], payload) is None
