"""Request spans reach a real OTLP receiver, routing decisions included, and go upstream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fake_upstream import FakeUpstream
from tests.otlp_receiver import OTLPReceiver
from tests.servers import DEMO_KEY, Gateway, backend, gateway_config, poll_until, start_gateway

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


def chat(gateway: Gateway, **headers: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {DEMO_KEY}", **headers},
        json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]},
    )


def span_of(receiver: OTLPReceiver, request_id: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for span in list(receiver.spans):
            if span["attributes"].get("vgate.request_id") == request_id:
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
