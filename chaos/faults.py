"""Fault injection for the simulated vLLM worker: a worker that misbehaves on purpose.

`Faults` says what goes wrong; `FaultInjector` decides, deterministically, which requests it
goes wrong for. The worker (`chaos.sim`; `chaos.sim.injection` acts them) applies them to POST
`/v1/chat/completions`, `/v1/completions` and `/v1/embeddings`, and lets tests change them at
run time through `PUT/GET/DELETE /sim/faults` and read `GET /sim/stats`.

They live beside the worker rather than inside it: what a fault is does not depend on who acts
it, and issue 10 plans injecting faults at the router's adapter seam too.

Which requests fail: the failure faults (`error_status`, `hang`, `reset`, `cut_after_chunks`,
`stall_after_chunks`, `garbage_after_chunks`, `error_event_first`) hit request n (counting from
0 since the faults were set) when floor((n + 1) * error_rate) > floor(n * error_rate), so a rate
of 0.5 fails every second request and exactly floor(N * rate) of the first N. A rate of 0 with
a failure fault set means every request. `latency_ms` and `tokens_per_s` apply to every
request; they slow a worker down but do not fail it, and are not counted as faults.

A request picked to fail gets the first of these that applies:

1. `hang`: the request takes a `max_num_seqs` slot and never gets an answer; when the client
   gives up, it is aborted and the slot freed.
2. `reset`: the connection is closed with nothing written (see `drop_connection`).
3. `error_status`: an HTTP error in vLLM's shape, with `Retry-After` when `retry_after_s` is
   set. With `error_event_first` too, streams get that status in the error event instead.
4. Streams only, once the request is valid: `error_event_first` answers 200 and one error
   event, then `[DONE]`; `cut_after_chunks` and `stall_after_chunks` let that many SSE events
   through (the `[DONE]` line counts as one), then close the connection mid-body or stop
   sending while keeping it open. A stream with fewer events than that ends normally.
   `garbage_after_chunks` sends one event of unparseable JSON after that many, then goes on.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from chaos.experiments import Share
from gateway.asgi import Send

__all__ = [
    "ConnectionDropped",
    "FaultInjector",
    "Faults",
    "add_fault_arguments",
    "drop_connection",
    "faults_from_args",
]


@dataclass(frozen=True, slots=True)
class Faults:
    error_status: int | None = None  # answer this status (400..599) instead of working
    error_rate: float = 0.0  # fraction of requests that fail (0..1); 0 = all, if any fault set
    retry_after_s: float | None = None  # Retry-After on injected errors (rounded up, >= 1)
    latency_ms: float = 0.0  # extra delay before answering (before headers), on every request
    hang: bool = False  # accept the request and never answer (until the client goes away)
    reset: bool = False  # close the connection without any response
    cut_after_chunks: int | None = None  # streams: this many SSE events, then drop the connection
    stall_after_chunks: int | None = None  # streams: this many SSE events, then send nothing more
    garbage_after_chunks: int | None = None  # streams: one unparseable event after this many
    error_event_first: bool = False  # streams: 200, one vLLM error event, then [DONE]
    tokens_per_s: float | None = None  # the token rate while set, instead of the worker's own
    health_status: int | None = None  # /health answers this status while set

    def __post_init__(self) -> None:
        for name, low, high in (("error_status", 400, 599), ("health_status", 200, 599)):
            status = getattr(self, name)
            if status is not None and not low <= status <= high:
                raise ValueError(f"{name} must be between {low} and {high}, got {status}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate}")
        for name in ("retry_after_s", "latency_ms", "tokens_per_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("cut_after_chunks", "stall_after_chunks", "garbage_after_chunks"):
            count = getattr(self, name)
            if count is not None and count < 0:
                raise ValueError(f"{name} must be >= 0, got {count}")

    @property
    def failing(self) -> bool:
        """Whether some requests are to fail (the faults `error_rate` picks requests for)."""
        return (
            self.error_status is not None
            or self.hang
            or self.reset
            or self.cut_after_chunks is not None
            or self.stall_after_chunks is not None
            or self.garbage_after_chunks is not None
            or self.error_event_first
        )

    @property
    def per_request(self) -> bool:
        """Whether inference requests need the fault path at all (`tokens_per_s` and
        `health_status` act elsewhere)."""
        return self.failing or self.latency_ms > 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Faults:
        """Faults from a decoded JSON object: missing fields keep their defaults; unknown
        fields, wrong types and out-of-range values raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError("faults must be a JSON object")
        unknown = sorted(set(data) - _FIELD_KINDS.keys())
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(map(str, unknown))}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            kind, optional = _FIELD_KINDS[name]
            if (value is None and optional) or type(value) is kind:
                values[name] = value
            elif kind is float and type(value) is int:
                values[name] = float(value)
            else:
                expected = {bool: "a boolean", int: "an integer", float: "a number"}[kind]
                raise ValueError(f"{name} must be {expected}{' or null' if optional else ''}")
        return cls(**values)


# Field name -> (JSON type, may be null). Spelled out rather than read from the annotations,
# which `from __future__ import annotations` leaves as strings.
_FIELD_KINDS: dict[str, tuple[type, bool]] = {
    "error_status": (int, True),
    "error_rate": (float, False),
    "retry_after_s": (float, True),
    "latency_ms": (float, False),
    "hang": (bool, False),
    "reset": (bool, False),
    "cut_after_chunks": (int, True),
    "stall_after_chunks": (int, True),
    "garbage_after_chunks": (int, True),
    "error_event_first": (bool, False),
    "tokens_per_s": (float, True),
    "health_status": (int, True),
}
assert _FIELD_KINDS.keys() == {field.name for field in fields(Faults)}


class FaultInjector:
    """The active faults, and which requests they hit.

    `requests` counts inference requests since the faults were set, `faulted` those a failure
    was injected into (the worker adds to it when it injects one).
    """

    __slots__ = ("_share", "faulted", "faults")

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = Faults()
        self.faulted = 0
        self._share = Share(0.0)
        self.set(faults or Faults())

    @property
    def requests(self) -> int:
        return self._share.asked

    def set(self, faults: Faults) -> None:
        """Make `faults` the active ones and start counting afresh."""
        rate = faults.error_rate if faults.error_rate > 0 else 1.0
        if not faults.failing:
            rate = 0.0
        self.faults = faults
        self.faulted = 0
        self._share = Share(rate)

    def admit(self) -> bool:
        """Count one inference request; whether it is picked to fail."""
        return self._share.pick()

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "faulted": self.faulted}


class ConnectionDropped(Exception):
    """Raised where the ASGI server offers no way to close a connection (see below)."""


def drop_connection(send: Send) -> None:
    """Close the client's connection now, writing nothing more.

    ASGI has no message for "abort this connection". What a server does when the app raises
    or returns early is the nearest thing, and it is not good enough: uvicorn answers an app
    that fails before `http.response.start` with a 500, and closes the connection (without
    the final chunk) when it fails after, but logs an error with a traceback each time.
    So this closes uvicorn's own transport, which its `send` (a bound method of its
    per-request cycle, in both the httptools and h11 implementations) carries. uvicorn then
    sees a client disconnect: `receive()` returns `http.disconnect`, later sends are dropped,
    and it logs nothing. The close is a graceful one (FIN, after what was written so far), so

    - before any response, httpx raises RemoteProtocolError("Server disconnected without
      sending a response.") and aiohttp ServerDisconnectedError;
    - mid-stream, the events sent so far arrive, then httpx raises RemoteProtocolError
      ("incomplete chunked read") and aiohttp ClientPayloadError: a broken body, never a
      clean end.

    (An RST instead, by SO_LINGER 0 and abort(), shows as httpx ReadError / aiohttp
    "Connection reset by peer", but can also discard events already sent.)

    Under another server, where the transport can't be found, this raises
    ConnectionDropped: after the response has started, ASGI servers close the connection
    for that too; before it, most answer 500.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    # Duck-typed: uvloop's transports are not asyncio.BaseTransport subclasses.
    close = getattr(transport, "close", None)
    if not callable(close):
        raise ConnectionDropped("cannot reach the connection to close it")
    close()


# --------------------------------------------------------------------------------------------
# Command line


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "fault injection", "the faults to start with; PUT /sim/faults changes them at run time"
    )
    group.add_argument("--fault-status", type=int, metavar="STATUS", help="answer this status")
    group.add_argument(
        "--fault-rate", type=float, default=0.0, metavar="RATE", help="fraction of requests hit"
    )
    group.add_argument("--fault-retry-after", type=float, metavar="SECONDS")
    group.add_argument("--fault-latency-ms", type=float, default=0.0, metavar="MS")
    group.add_argument("--fault-hang", action="store_true", help="never answer")
    group.add_argument("--fault-reset", action="store_true", help="close without a response")
    group.add_argument("--fault-cut-after", type=int, metavar="CHUNKS")
    group.add_argument("--fault-stall-after", type=int, metavar="CHUNKS")
    group.add_argument("--fault-garbage-after", type=int, metavar="CHUNKS")
    group.add_argument("--fault-error-event-first", action="store_true")
    group.add_argument("--fault-tokens-per-s", type=float, metavar="RATE")
    group.add_argument("--fault-health-status", type=int, metavar="STATUS")


def faults_from_args(args: argparse.Namespace) -> Faults:
    """The faults the command line asks for; ValueError if they are out of range."""
    return Faults(
        error_status=args.fault_status,
        error_rate=args.fault_rate,
        retry_after_s=args.fault_retry_after,
        latency_ms=args.fault_latency_ms,
        hang=args.fault_hang,
        reset=args.fault_reset,
        cut_after_chunks=args.fault_cut_after,
        stall_after_chunks=args.fault_stall_after,
        garbage_after_chunks=args.fault_garbage_after,
        error_event_first=args.fault_error_event_first,
        tokens_per_s=args.fault_tokens_per_s,
        health_status=args.fault_health_status,
    )
