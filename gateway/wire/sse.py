"""Server-sent events from an upstream: split into whole events, observed as they pass.

Events are forwarded whole and as soon as they are complete, never merged across reads
or re-chunked, so an error event the gateway adds can never land inside a half-sent one.
Every data event is parsed (orjson: under a microsecond for a chunk): one that does not
parse as a JSON object is dropped and counted, never forwarded to break the client's parser.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from gateway.errors import GatewayError, MalformedStream

DONE_EVENT = b"data: [DONE]\n\n"  # the stream's last event, as OpenAI ends one
_MAX_PENDING = 1024 * 1024  # one event larger than this is not an LLM stream chunk


class ChunkRecorder(Protocol):
    def record(self, payload: dict[str, Any]) -> None: ...


class SSEObserver:
    """Splits upstream bytes into events and records what the stream has said so far."""

    __slots__ = (
        "_cr",
        "_held",
        "_pending",
        "done",
        "drop_usage_chunk",
        "error",
        "finished",
        "malformed",
        "recorder",
        "usage",
    )

    def __init__(self, *, drop_usage_chunk: bool) -> None:
        # An unfinished event's pieces, joined only once its end arrives: joining on every
        # read would copy a slowly trickled event over and over (quadratic up to the cap).
        self._pending: list[bytes] = []
        self._held = 0
        self._cr = False  # the last read ended in "\r": its "\n" may open the next one
        # Set when the gateway asked for usage on the client's behalf: the usage-only
        # chunk is then the gateway's, not the client's.
        self.drop_usage_chunk = drop_usage_chunk
        self.done = False
        self.finished = False
        self.error: dict[str, Any] | None = None
        self.malformed = 0  # data events dropped because they were not JSON objects
        self.usage: dict[str, Any] | None = None
        # Sees every chunk forwarded, for stream resumption (policies.resume.Transcript).
        self.recorder: ChunkRecorder | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Whole events completed by `chunk`, ready to forward (maybe b"")."""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                self._cr, chunk = True, chunk[:-1]
            chunk = chunk.replace(b"\r\n", b"\n")
        pending = self._pending
        if pending:
            if b"\n\n" not in chunk and not (
                chunk.startswith(b"\n") and pending[-1].endswith(b"\n")
            ):
                self._hold(chunk)  # still no event's end: keep the piece, copy nothing
                return b""
            pending.append(chunk)
            data = b"".join(pending)
            self._pending, self._held = [], 0
        else:
            data = chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._hold(data)
            return b""
        rest = data[end + 2 :]
        if rest:
            self._hold(rest)
        complete = data[: end + 2]
        if end and complete.find(b"\n\n") == end:
            # One whole event, the usual read of a stream: passed on as it came, uncopied.
            return complete if self._observe(complete[:end]) else b""
        out: list[bytes] = []
        for event in complete.split(b"\n\n"):
            if event and self._observe(event):
                out.append(event)
                out.append(b"\n\n")
            if self.done or self.error is not None:
                break
        return b"".join(out)

    def _hold(self, piece: bytes) -> None:
        if not piece:
            return
        self._held += len(piece)
        if self._held > _MAX_PENDING:
            raise MalformedStream("an upstream event exceeded 1 MiB")
        self._pending.append(piece)

    def flush(self) -> bytes:
        """At end of stream: a final event that lacked its blank line, if any."""
        rest = b"".join(self._pending).strip()
        self._pending, self._held = [], 0
        if rest and self._observe(rest):
            return rest + b"\n\n"
        return b""

    def _observe(self, event: bytes) -> bool:
        """Record what `event` says; False when it must not be forwarded."""
        if event.startswith(b"data: ") and b"\n" not in event:
            data = event[6:]
        elif b"data:" in event:
            data = b"\n".join(
                line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
            )
        else:
            return True  # a comment or a field-only event: harmless, passed on
        if data.startswith(b"[DONE]"):
            self.done = True
            return True
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
        if type(payload) is not dict:
            self.malformed += 1
            return False
        choices = payload.get("choices")
        if choices:
            for choice in choices:
                if type(choice) is dict and choice.get("finish_reason") is not None:
                    self.finished = True
        usage = payload.get("usage")
        if type(usage) is dict:
            self.usage = usage
            if self.drop_usage_chunk and not choices:
                return False
        error = payload.get("error")
        if type(error) is dict:
            # The events before it are still the answer's: the caller forwards them, then
            # ends or resumes the stream. The error event itself is the gateway's to word.
            self.error = error
            return False
        if self.recorder is not None:
            self.recorder.record(payload)
        return True


def data_event(data: bytes) -> bytes:
    """One event carrying `data` (a JSON document on one line), as it goes on the wire."""
    return b"data: " + data + b"\n\n"


def error_event(error: GatewayError) -> bytes:
    """A started stream's last word when it cannot be finished: the error's body, the
    same bytes a status answer would carry, as an event (and no [DONE] after it)."""
    return data_event(error.body())


def is_done(event: bytes) -> bool:
    """Whether a whole event (its blank line stripped) is the stream's [DONE]."""
    return event.startswith(b"data: [DONE]") or event.startswith(b"data:[DONE]")
