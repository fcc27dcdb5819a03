"""Request spans reach a real OTLP receiver, routing decisions and attempts included, and
go upstream; a request the ratio left out still arrives when it failed or was slow."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.edge.auth import hash_key
from tests.e2e.conftest import wait_for_line
from tests.fake_upstream import FakeUpstream
from tests.otlp_receiver import OTLPReceiver
from tests.servers import (
    DEMO_KEY,
    Gateway,
    backend,
    gateway_config,
    poll_until,
    start_gateway,
    start_redis,
)

REPLY = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "tiny-llama",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
)
UNCHECKED = {"enabled": False}
SERVER, CLIENT = 2, 3  # OTLP's span kinds
UNSET, ERROR = 0, 2  # OTLP's status codes


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    server = OTLPReceiver()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, FakeUpstream]]:
    fakes = {
        "ok": FakeUpstream("status", status=200, body=REPLY, retry_after=None),
        "failing": FakeUpstream("status", status=503, retry_after=None),
    }
    yield fakes
    for fake in fakes.values():
        fake.stop()


def start(
    logs: Path, receiver: OTLPReceiver, upstreams: dict[str, FakeUpstream], **tracing: Any
) -> Gateway:
    config = gateway_config(
        [
            {
                "name": "tiny-llama",
                "health": UNCHECKED,
                "retries": {"max_retries": 1, "backoff_initial_s": 0.001, "budget_ratio": 1.0},
                "non_stream": "passthrough",  # the fake answers every request with REPLY
                "backends": [
                    backend("down", upstreams["failing"].url, weight=100),
                    backend("up", upstreams["ok"].url),
                ],
            }
        ]
    )
    config["tracing"] = {
        "enabled": True,
        "endpoint": receiver.endpoint,
        "schedule_delay_s": 0.05,
        "service_name": "vgate-test",
        **tracing,
    }
    return start_gateway(logs, config)


@pytest.fixture(scope="module")
def gateway(
    logs: Path, receiver: OTLPReceiver, upstreams: dict[str, FakeUpstream]
) -> Iterator[Gateway]:
    process = start(logs, receiver, upstreams)
    yield process
    process.stop()


def chat(
    gateway: Gateway,
    model: str = "tiny-llama",
    params: dict[str, Any] | None = None,
    **headers: str,
) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {DEMO_KEY}", **headers},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], **(params or {})},
    )


def children_of(receiver: OTLPReceiver, span: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The spans under `span`, once `count` have arrived, in the order they started."""

    def arrived() -> list[dict[str, Any]] | None:
        found = [s for s in list(receiver.spans) if s["parent_span_id"] == span["span_id"]]
        return found if len(found) >= count else None

    children: list[dict[str, Any]] = poll_until(arrived)
    return sorted(children, key=lambda child: child["start"])


def span_of(receiver: OTLPReceiver, request_id: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for span in list(receiver.spans):
            if span["kind"] == SERVER and span["attributes"].get("vgate.request_id") == request_id:
                return span
        return None

    return poll_until(found)  # type: ignore[no-any-return]


def test_a_request_span_carries_its_routing_decisions(
    gateway: Gateway, receiver: OTLPReceiver, upstreams: dict[str, FakeUpstream]
) -> None:
    response = chat(gateway)
    assert response.status_code == 200
    span = span_of(receiver, response.headers["x-request-id"])
    assert span["name"] == "POST /v1/chat/completions"
    assert span["resource"]["service.name"] == "vgate-test"
    assert span["content_type"] == "application/x-protobuf"
    attributes = span["attributes"]
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.request.model"] == "tiny-llama"
    assert attributes["vgate.backend"] == "up"
    assert attributes["vgate.attempts"] == 2
    assert attributes["gen_ai.usage.output_tokens"] == 1
    assert attributes["enduser.id"] == "demo"
    decisions = [e["attributes"] for e in span["events"] if e["name"] == "vgate.route.decision"]
    assert [d["vgate.choice"] for d in decisions] == ["down", "up"]
    assert decisions[1]["vgate.reason"] == "weighted, avoiding backends tried"
    candidates = orjson.loads(decisions[0]["vgate.candidates"])
    assert [c["name"] for c in candidates] == ["down", "up"]
    assert span["end"] > span["start"]
    # The span named upstream is this one: a traced vLLM continues the trace.
    sent = upstreams["ok"].requests[-1]["headers"]["traceparent"]
    assert sent == f"00-{span['trace_id']}-{span['span_id']}-01"


def test_an_incoming_traceparent_is_continued(gateway: Gateway, receiver: OTLPReceiver) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    response = chat(gateway, traceparent=f"00-{trace_id}-{parent_id}-01")
    span = span_of(receiver, response.headers["x-request-id"])
    assert span["trace_id"] == trace_id
    assert span["parent_span_id"] == parent_id


def test_an_unsampled_parent_is_not_exported_but_propagated(
    gateway: Gateway, receiver: OTLPReceiver, upstreams: dict[str, FakeUpstream]
) -> None:
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    chat(gateway, traceparent=f"00-{trace_id}-00f067aa0ba902b7-00")
    sent = upstreams["ok"].requests[-1]["headers"]["traceparent"]
    assert sent.startswith(f"00-{trace_id}-") and sent.endswith("-00")
    # A later, sampled request's span arrives; the unsampled one never does.
    span_of(receiver, chat(gateway).headers["x-request-id"])
    assert not any(s["trace_id"] == trace_id for s in receiver.spans)


def test_a_garbled_traceparent_starts_a_new_trace(gateway: Gateway, receiver: OTLPReceiver) -> None:
    response = chat(gateway, traceparent="00-zz-not-a-trace")
    span = span_of(receiver, response.headers["x-request-id"])
    assert span["parent_span_id"] == "" and len(span["trace_id"]) == 32


def test_an_absent_collector_never_holds_up_requests(
    logs: Path, upstreams: dict[str, FakeUpstream]
) -> None:
    nowhere = OTLPReceiver()
    nowhere.stop()  # its port is now closed: every export fails
    gateway = start(logs, nowhere, upstreams, export_timeout_s=0.2)
    exporter_lines = []
    try:
        statuses = {chat(gateway).status_code for _ in range(20)}
        assert statuses == {200}
        assert gateway.popen.poll() is None
        # The first failed export is logged...
        poll_until(lambda: EXPORTER_LOGGER in gateway.log(), timeout_s=30)
        statuses = {chat(gateway).status_code for _ in range(10)}
        assert statuses == {200}
    finally:
        gateway.stop()  # ...and the spans queued since fail again at the shutdown's flush
        exporter_lines = [line for line in gateway.log().splitlines() if EXPORTER_LOGGER in line]
    # ...but said once a minute, not once per batch.
    assert len(exporter_lines) == 1, exporter_lines


EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter:"


@pytest.fixture(scope="module")
def tail_upstreams() -> Iterator[dict[str, FakeUpstream]]:
    fakes = {
        "ok": FakeUpstream("status", status=200, body=REPLY, retry_after=None),
        "slow": FakeUpstream("status", status=200, body=REPLY, retry_after=None, delay_s=0.6),
        "failing": FakeUpstream("status", status=503, retry_after=None),
        "down": FakeUpstream("status", status=503, retry_after=None),
    }
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.fixture(scope="module")
def unsampled(
    logs: Path, receiver: OTLPReceiver, tail_upstreams: dict[str, FakeUpstream]
) -> Iterator[Gateway]:
    """A gateway sampling nothing by ratio, keeping what fails or takes over 0.3 s; its
    "retried" route answers from "up" after "down"'s 503."""
    passthrough = {"health": UNCHECKED, "non_stream": "passthrough"}
    config = gateway_config(
        [
            {**passthrough, "name": name, "backends": [backend(name, tail_upstreams[name].url)]}
            for name in ("ok", "slow", "failing")
        ]
        + [
            {
                **passthrough,
                "name": "retried",
                "retries": {"max_retries": 1, "backoff_initial_s": 0.001, "budget_ratio": 1.0},
                "backends": [
                    backend("down", tail_upstreams["down"].url, weight=100),
                    backend("up", tail_upstreams["ok"].url),
                ],
            }
        ]
    )
    config["tracing"] = {
        "enabled": True,
        "endpoint": receiver.endpoint,
        "schedule_delay_s": 0.05,
        "service_name": "vgate-test",
        "sample_ratio": 0.0,
        "keep_slow_s": 0.3,
    }
    process = start_gateway(logs, config)
    yield process
    process.stop()


def test_failed_and_slow_requests_are_kept_though_the_ratio_left_them_out(
    unsampled: Gateway, receiver: OTLPReceiver, tail_upstreams: dict[str, FakeUpstream]
) -> None:
    fast = chat(unsampled, "ok")
    failed = chat(unsampled, "failing")
    slow = chat(unsampled, "slow")
    assert (fast.status_code, failed.status_code, slow.status_code) == (200, 502, 200)
    kept = span_of(receiver, failed.headers["x-request-id"])
    assert kept["status"] == ERROR and kept["attributes"]["http.response.status_code"] == 502
    assert "gen_ai.response.model" not in kept["attributes"]  # nothing answered
    attempts = children_of(receiver, kept, kept["attributes"]["vgate.attempts"])
    for attempt in attempts:  # the route's one backend, retried once
        assert attempt["status"] == ERROR
        assert attempt["attributes"]["http.response.status_code"] == 503
        assert kept["start"] <= attempt["start"] <= attempt["end"] <= kept["end"]
    kept_slow = span_of(receiver, slow.headers["x-request-id"])
    assert kept_slow["end"] - kept_slow["start"] >= 0.6e9
    [slow_attempt] = children_of(receiver, kept_slow, 1)
    assert slow_attempt["end"] - slow_attempt["start"] >= 0.6e9
    # Both told their upstream "not sampled": the decision came at the end.
    for name in ("failing", "slow"):
        assert tail_upstreams[name].requests[-1]["headers"]["traceparent"].endswith("-00")
    # The fast success was dropped: exported spans come in order, and the slow request's
    # came after it ended, so the fast one's would be here by now.
    fast_id = fast.headers["x-request-id"]
    assert not any(s["attributes"].get("vgate.request_id") == fast_id for s in receiver.spans)
    line = wait_for_line(unsampled, fast_id)  # lines are batched: wait for this one
    assert "trace_id" not in line


def test_each_attempt_is_a_child_span_and_the_request_has_genai_attributes(
    unsampled: Gateway, receiver: OTLPReceiver
) -> None:
    params = {"max_tokens": 16, "temperature": 0.5, "top_p": 0.9, "stop": ["END"]}
    # Its caller sampled it: the ratio (0 here) is not asked.
    parent = "00-6bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    response = chat(unsampled, "retried", params, traceparent=parent)
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    span = span_of(receiver, request_id)
    assert span["kind"] == SERVER and span["status"] == UNSET
    assert span["parent_span_id"] == "00f067aa0ba902b7"
    attributes = span["attributes"]
    stop = attributes.pop("gen_ai.request.stop_sequences")
    assert [value.string_value for value in stop.values] == ["END"]
    assert {key: value for key, value in attributes.items() if key.startswith("gen_ai.")} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "retried",
        "gen_ai.response.model": "retried",
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 1,
        "gen_ai.request.max_tokens": 16,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.request.top_p": 0.9,
    }
    # The 503 from "down", retried on "up": two attempts, in order, inside the request.
    refused, answered = children_of(receiver, span, 2)
    for attempt in (refused, answered):
        assert attempt["trace_id"] == span["trace_id"]
        assert attempt["name"] == "chat retried" and attempt["kind"] == CLIENT
        assert attempt["resource"]["service.name"] == "vgate-test"
    assert span["start"] <= refused["start"] <= refused["end"] <= answered["start"]
    assert answered["start"] <= answered["end"] <= span["end"]
    assert refused["status"] == ERROR
    assert {k: v for k, v in refused["attributes"].items() if k != "vgate.ttfb_s"} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "retried",
        "vgate.request_id": request_id,
        "vgate.route": "retried",
        "vgate.backend": "down",
        "vgate.attempt": 1,
        "vgate.attempt.outcome": "upstream_error",
        "http.response.status_code": 503,
        "error.type": "upstream_error",
    }
    assert answered["status"] == UNSET
    assert answered["attributes"]["vgate.backend"] == "up"
    assert answered["attributes"]["vgate.attempt"] == 2
    assert answered["attributes"]["vgate.attempt.outcome"] == "ok"
    assert answered["attributes"]["http.response.status_code"] == 200
    assert 0 < answered["attributes"]["vgate.ttfb_s"] <= (answered["end"] - span["start"]) / 1e9
    assert [e["name"] for e in answered["events"]] == ["vgate.first_byte"]
    # The access-log line names the trace.
    line = wait_for_line(unsampled, request_id)
    assert line["trace_id"] == span["trace_id"]


def test_calls_to_redis_are_child_spans(
    logs: Path, receiver: OTLPReceiver, upstreams: dict[str, FakeUpstream], tmp_path: Path
) -> None:
    """A key with limits checked in Redis, and the response cache on Redis: the admission
    and the lookup are spans of their own under the request's."""
    limited = "vg-test-traced-limits-0123456789ab"
    keys = tmp_path / "keys.yaml"
    entry = {"id": "key-traced", "name": "traced", "sha256": hash_key(limited)}
    keys.write_text(orjson.dumps({"keys": [{**entry, "limits": {"rpm": 1000}}]}).decode())
    redis = start_redis(logs)
    config = gateway_config(
        [
            {
                "name": "tiny-llama",
                "health": UNCHECKED,
                "non_stream": "passthrough",
                "backends": [backend("up", upstreams["ok"].url)],
            }
        ]
    )
    config["keys"] = {"file": str(keys)}
    config["redis"] = {"url": redis.url}
    config["cache"] = {"enabled": True, "backend": "redis"}
    config["tracing"] = {
        "enabled": True,
        "endpoint": receiver.endpoint,
        "schedule_delay_s": 0.05,
    }
    gateway = start_gateway(logs, config)
    try:
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {limited}"},
            json={
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0,
            },
        )
        assert response.status_code == 200, response.text
        span = span_of(receiver, response.headers["x-request-id"])
        children = children_of(receiver, span, 3)
        calls = [c for c in children if c["attributes"].get("db.system.name") == "redis"]
        # The admission first, then the cache's lookups of the key: with requests
        # coalescing across processes (the default with the Redis backend) a lookup is the
        # script that also claims the key's lease.
        limits, *lookups = [(c["name"], c["kind"], c["status"]) for c in calls]
        assert limits == ("EVALSHA limits", CLIENT, UNSET)
        assert lookups and set(lookups) == {("EVALSHA cache", CLIENT, UNSET)}
        for call in calls:
            assert call["trace_id"] == span["trace_id"]
            assert span["start"] <= call["start"] <= call["end"] <= span["end"]
            assert call["attributes"]["vgate.request_id"] == response.headers["x-request-id"]
        (attempt,) = [c for c in children if c not in calls]
        assert calls[-1]["end"] <= attempt["start"]  # looked up before the upstream was asked
    finally:
        gateway.stop()
        redis.stop()
