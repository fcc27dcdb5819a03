"""What /metrics renders of counters other components keep: read at scrape time."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gateway.config import RedisConfig
from gateway.edge.metrics import CHAOS_EXPERIMENT_LABELS, GatewayMetrics
from gateway.edge.record import RequestRecord
from policies.limits import KeyLimits
from policies.limits_local import LocalLimits
from policies.limits_redis import FailoverLimits, RedisLimits
from policies.redis_state import create_client


def samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_local_limit_store_exports_the_active_states_it_dropped() -> None:
    metrics = GatewayMetrics(models=["m"], backends=["b"])
    store = LocalLimits(max_keys=1)
    metrics.watch_limits(store)
    for key in ("a", "b", "c"):  # each still counts its request when the next one comes
        assert (await store.admit(key, KeyLimits(rpm=10), 0)).allowed
    seen = samples(metrics)
    assert seen[("vgate_limits_evicted_active_total", ())] == 2
    assert ("vgate_limits_without_redis_total", (("mode", "open"),)) not in seen


async def test_a_shared_limit_store_exports_what_it_decided_without_redis() -> None:
    metrics = GatewayMetrics(models=["m"], backends=["b"])
    client = create_client(RedisConfig(url="redis://127.0.0.1:1/0", socket_timeout_s=1.0))
    shared = RedisLimits(client, timeout_s=1.0)
    store = FailoverLimits(shared, LocalLimits(), mode="closed", settle_deadline_s=0.1)
    metrics.watch_limits(store)
    try:
        refused = await store.admit("k", KeyLimits(rpm=10), 0)  # nothing listens on port 1
        assert not refused.allowed and refused.status == 503
        seen = samples(metrics)
        assert seen[("vgate_limits_without_redis_total", (("mode", "closed"),))] == 1
        assert seen[("vgate_limits_without_redis_total", (("mode", "open"),))] == 0
        assert seen[("vgate_limits_settles_lost_total", (("reason", "dropped"),))] == 0
        assert ("vgate_limits_settles_pending", ()) in seen
        assert seen[("vgate_limits_evicted_active_total", ())] == 0
    finally:
        await store.aclose()
        await client.aclose()


def test_chaos_injections_are_counted_under_a_bounded_label_set() -> None:
    metrics = GatewayMetrics(models=["m"], backends=["b"])
    metrics.chaos_injected("outage", "error")
    metrics.chaos_injected("outage", "error")
    metrics.chaos_injected("outage", "no-such-fault")  # never a label of its own
    for index in range(CHAOS_EXPERIMENT_LABELS + 5):
        metrics.chaos_injected(f"drill-{index}", "latency")
    seen = samples(metrics)
    injected = {
        labels: value
        for (name, labels), value in seen.items()
        if name == "vgate_chaos_injected_total"
    }
    assert injected[(("experiment", "outage"), ("fault", "error"))] == 2
    assert injected[(("experiment", "outage"), ("fault", "other"))] == 1
    # "outage" took one of the names: the last six experiments count as "other".
    assert injected[(("experiment", "other"), ("fault", "latency"))] == 6
    assert len({dict(labels)["experiment"] for labels in injected}) == CHAOS_EXPERIMENT_LABELS + 1


def test_time_per_output_token_is_a_streams_time_after_its_first_token_per_token() -> None:
    metrics = GatewayMetrics(models=["m"], backends=["b"])
    stream = RequestRecord("r1", 100.0, "POST", "/v1/chat/completions")
    stream.endpoint, stream.model, stream.backend, stream.status = "chat", "m", "b", 200
    stream.ttft_s, stream.completion_tokens = 0.5, 11  # 10 tokens after the first...
    metrics.observe(stream, 100.0 + 0.5 + 10 * 0.02)  # ...20 ms apart
    one_token = RequestRecord("r2", 100.0, "POST", "/v1/chat/completions")
    one_token.endpoint, one_token.model, one_token.backend, one_token.status = "chat", "m", "b", 200
    one_token.ttft_s, one_token.completion_tokens = 0.5, 1  # no time between tokens to tell
    metrics.observe(one_token, 101.0)
    whole = RequestRecord("r3", 100.0, "POST", "/v1/chat/completions")  # not streamed
    whole.endpoint, whole.model, whole.backend, whole.status = "chat", "m", "b", 200
    whole.completion_tokens = 50
    metrics.observe(whole, 102.0)
    seen = samples(metrics)
    labels = (("backend", "b"), ("model", "m"))
    assert seen[("vgate_tpot_seconds_count", labels)] == 1
    assert abs(seen[("vgate_tpot_seconds_sum", labels)] - 0.02) < 1e-9
    assert seen[("vgate_tpot_seconds_bucket", (*labels[:1], ("le", "0.025"), labels[1]))] == 1
    assert seen[("vgate_tpot_seconds_bucket", (*labels[:1], ("le", "0.01"), labels[1]))] == 0
