"""What /metrics renders of counters other components keep: read at scrape time."""

from __future__ import annotations

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import RedisConfig
from gateway.edge.metrics import (
    ATTEMPT_RESULT_LABELS,
    CHAOS_EXPERIMENT_LABELS,
    KEY_LABELS,
    GatewayMetrics,
)
from gateway.edge.record import RequestRecord
from gateway.router.outcome import AttemptRecord
from policies.limits import KeyLimits
from policies.limits_local import LocalLimits
from policies.limits_redis import FailoverLimits, RedisLimits
from policies.load import LoadReport, UpstreamLoad
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


def chat_record(request_id: str = "r", status: int = 200) -> RequestRecord:
    record = RequestRecord(request_id, 100.0, "POST", "/v1/chat/completions")
    record.endpoint, record.model, record.backend, record.status = "chat", "m", "b", status
    return record


def test_the_renamed_families_are_served_under_their_old_names_too() -> None:
    metrics = GatewayMetrics(models=["m"], backends=["b"])
    record = chat_record()
    record.ttft_s, record.prompt_tokens, record.completion_tokens = 0.2, 7, 3
    metrics.observe(record, 100.3)
    seen = samples(metrics)
    chat = (("endpoint", "chat"), ("model", "m"))
    assert seen[("vgate_request_latency_seconds_count", chat)] == 1
    assert seen[("vgate_ttft_seconds_count", (("model", "m"),))] == 1
    assert seen[("vgate_tokens_generated_total", (("model", "m"),))] == 3
    assert seen[("vgate_tokens_prompt_total", (("model", "m"),))] == 7
    # Every sample of a renamed family, under the old name with the same labels and value.
    for old, new in (
        ("vgate_request_duration_seconds", "vgate_request_latency_seconds"),
        ("vgate_time_to_first_token_seconds", "vgate_ttft_seconds"),
    ):
        renamed = {(n.replace(new, old), labels): v for (n, labels), v in seen.items() if new in n}
        assert len(renamed) == 19  # 16 buckets, count, sum, created
        assert {key: seen[key] for key in renamed} == renamed
    assert seen[("vgate_tokens_total", (("kind", "completion"), ("model", "m")))] == 3
    assert seen[("vgate_tokens_total", (("kind", "prompt"), ("model", "m")))] == 7

    off = GatewayMetrics(models=["m"], backends=["b"], legacy_names=False)
    off.observe(record, 100.3)
    names = {name for name, _ in samples(off)}
    assert "vgate_ttft_seconds_count" in names
    assert not {n for n in names if n.startswith(("vgate_request_duration", "vgate_time_to_first"))}
    assert "vgate_tokens_total" not in names


def test_a_kept_traces_id_is_an_exemplar_in_openmetrics_only() -> None:
    metrics = GatewayMetrics(models=["m"], backends=["b"])
    traced = chat_record("traced")
    traced.ttft_s, traced.trace = 0.2, (0xABC, 1, 0, 1_700_000_000_000_000_000)
    metrics.observe(traced, 100.25)
    unsampled = chat_record("unsampled")  # the ratio left it out and its end did not keep it
    unsampled.ttft_s, unsampled.trace = 0.02, (0xDEF, 2, 0, 0)
    metrics.observe(unsampled, 100.04)

    body, content_type = metrics.exposition(
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"  # Prometheus 2.x's
    )
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    exemplars = {
        (sample.name, sample.labels.get("le")): sample.exemplar
        for family in openmetrics_families(body.decode())  # type: ignore[no-untyped-call]
        for sample in family.samples
        if sample.exemplar is not None
    }
    trace_id = {"trace_id": f"{0xABC:032x}"}
    assert {key: (e.labels, e.value) for key, e in exemplars.items()} == {
        ("vgate_request_latency_seconds_bucket", "0.25"): (trace_id, 0.25),
        ("vgate_ttft_seconds_bucket", "0.25"): (trace_id, 0.2),
    }
    text, plain = metrics.exposition(None)
    assert plain.startswith("text/plain; version=0.0.4")
    assert b"trace_id" not in text and text == metrics.render()


def test_upstream_attempts_are_counted_per_backend_and_result() -> None:
    metrics = GatewayMetrics(models=["m"], backends=["b", "c"])
    record = chat_record()
    first, second, stranger = AttemptRecord("m", "b", 0.0), AttemptRecord("m", "c", 0.0), None
    first.failed("upstream_timeout")
    stranger = AttemptRecord("m", "not-configured", 0.0)
    record.tried = [first, second, stranger]
    metrics.observe(record, 101.0)
    for index in range(ATTEMPT_RESULT_LABELS + 3):
        many = chat_record()
        failed = AttemptRecord("m", "b", 0.0)
        failed.failed(f"code_{index}")
        many.tried = [failed]
        metrics.observe(many, 101.0)
    attempts = {
        labels: value
        for (name, labels), value in samples(metrics).items()
        if name == "vgate_backend_attempts_total"
    }
    assert attempts[(("backend", "b"), ("result", "upstream_timeout"))] == 1
    assert attempts[(("backend", "c"), ("result", "ok"))] == 1
    assert not [labels for labels in attempts if ("backend", "not-configured") in labels]
    # "upstream_timeout" and "ok" took two of the results: five codes count as "other".
    assert attempts[(("backend", "b"), ("result", "other"))] == 5


def test_limit_refusals_are_counted_by_key_name_under_a_bounded_label_set() -> None:
    metrics = GatewayMetrics(models=["m"], backends=["b"])

    def refused(key: str, code: str, attempts: int = 0) -> None:
        record = chat_record(status=429)
        record.caller, record.error, record.attempts = key, code, attempts
        metrics.observe(record, 100.1)

    refused("alice", "rate_limit_exceeded")
    refused("alice", "rate_limit_exceeded")
    refused("alice", "insufficient_quota")
    refused("bob", "rate_limit_exceeded", attempts=1)  # an upstream's own 429: not bob's limit
    refused("bob", "upstream_timeout")
    for index in range(KEY_LABELS + 2):
        refused(f"key-{index}", "concurrency_limit_exceeded")
    refusals = {
        labels: value
        for (name, labels), value in samples(metrics).items()
        if name == "vgate_limit_refusals_total"
    }
    assert refusals[(("code", "rate_limit_exceeded"), ("key", "alice"))] == 2
    assert refusals[(("code", "insufficient_quota"), ("key", "alice"))] == 1
    assert not [labels for labels in refusals if ("key", "bob") in labels]
    assert refusals[(("code", "concurrency_limit_exceeded"), ("key", "other"))] == 3
    assert len({dict(labels)["key"] for labels in refusals}) == KEY_LABELS + 1


def test_the_breaker_state_is_one_of_three_per_backend() -> None:
    metrics = GatewayMetrics(models=["m"], backends=["b"])

    def states() -> dict[str, float]:
        return {
            dict(labels)["state"]: value
            for (name, labels), value in samples(metrics).items()
            if name == "vgate_breaker_state" and ("backend", "b") in labels
        }

    assert states() == {"closed": 1, "open": 0, "half-open": 0}
    metrics.breaker_changed("b", "closed", "open")
    assert states() == {"closed": 0, "open": 1, "half-open": 0}
    metrics.breaker_changed("b", "open", "half-open")
    assert states() == {"closed": 0, "open": 0, "half-open": 1}
    metrics.extend(["m"], ["new"])  # a reload: b gone, new added
    seen = samples(metrics)
    assert seen[("vgate_breaker_state", (("backend", "new"), ("state", "closed")))] == 1
    assert not [labels for name, labels in seen if ("backend", "b") in labels and "state" in name]


def test_each_backends_vllm_queue_is_what_it_last_reported() -> None:
    metrics = GatewayMetrics(["m"], ["w1", "w2", "w3"])
    reported, never, stale = UpstreamLoad(), UpstreamLoad(), UpstreamLoad()
    reported.update(LoadReport(running=3, waiting=7, at=1.0), own_in_flight=2)
    stale.update(LoadReport(running=1, waiting=1, at=1.0), own_in_flight=0)
    stale.expire(now=100.0, max_age_s=5.0)  # too old: steers nothing, reports nothing
    metrics.watch_upstream_queues(
        [("w1", reported), ("w2", never), ("w3", stale), ("gone", reported)]
    )
    queues = {
        labels: value
        for (name, labels), value in samples(metrics).items()
        if name == "vgate_upstream_requests"
    }
    assert queues == {
        (("backend", "w1"), ("state", "running")): 3.0,
        (("backend", "w1"), ("state", "waiting")): 7.0,
    }
