from __future__ import annotations

import orjson

from gateway.errors import MalformedStream, UpstreamError
from gateway.wire.sse import DONE_EVENT, SSEObserver, error_event, is_done


def chunk(content: str, finish: str | None = None) -> bytes:
    payload = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


USAGE = (
    b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def test_whole_events_pass_through_unchanged() -> None:
    observer = SSEObserver(drop_usage_chunk=False)
    stream = chunk("a") + chunk("b", "stop") + USAGE + DONE
    assert observer.feed(stream) == stream
    assert observer.done and observer.finished
    assert observer.usage == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_events_split_across_reads_are_held_until_whole() -> None:
    observer = SSEObserver(drop_usage_chunk=False)
    stream = chunk("hello") + chunk("world", "length") + DONE
    out = b""
    for index in range(len(stream)):
        piece = observer.feed(stream[index : index + 1])
        if piece:
            assert piece.endswith(b"\n\n")
        out += piece
    assert out == stream
    assert observer.done and observer.finished


def test_crlf_events_are_normalised() -> None:
    observer = SSEObserver(drop_usage_chunk=False)
    assert observer.feed(chunk("x").replace(b"\n", b"\r\n")) == chunk("x")


def test_crlf_events_read_a_byte_at_a_time_are_normalised() -> None:
    """ "\r\n\r\n" split over reads, even between "\r" and "\n", still ends an event."""
    observer = SSEObserver(drop_usage_chunk=False)
    stream = chunk("hello") + chunk("world", "stop") + DONE
    crlf = stream.replace(b"\n", b"\r\n")
    out = b"".join(observer.feed(crlf[i : i + 1]) for i in range(len(crlf)))
    assert out == stream and observer.done


def test_a_trickled_event_is_held_in_pieces_not_copied_on_every_read() -> None:
    """Joining the pending bytes on every read copied a slowly trickled event over and
    over: 512 KiB a byte at a time meant some 137 GB of copying. Now nothing is joined
    until the event's end arrives."""
    observer = SSEObserver(drop_usage_chunk=False)
    event = chunk("x" * 512 * 1024)
    for index in range(0, len(event) - 2, 64):
        assert observer.feed(event[index : min(index + 64, len(event) - 2)]) == b""
    assert len(observer._pending) > 1000  # the pieces as they came: none joined yet
    assert observer.feed(b"\n\n") == event


def test_usage_chunk_asked_for_by_the_gateway_is_dropped() -> None:
    observer = SSEObserver(drop_usage_chunk=True)
    out = observer.feed(chunk("a", "stop") + USAGE + DONE)
    assert out == chunk("a", "stop") + DONE
    assert observer.usage is not None and observer.usage["completion_tokens"] == 2


def test_not_finished_until_a_finish_reason_arrives() -> None:
    observer = SSEObserver(drop_usage_chunk=False)
    observer.feed(chunk("a"))
    assert not observer.finished
    observer.feed(chunk("b", "stop"))
    assert observer.finished and not observer.done


def test_nothing_after_done_is_forwarded() -> None:
    observer = SSEObserver(drop_usage_chunk=False)
    assert observer.feed(DONE + chunk("late")) == DONE


def test_error_event_is_recorded_not_forwarded_and_ends_the_batch() -> None:
    observer = SSEObserver(drop_usage_chunk=False)
    error = b'data: {"error": {"message": "bad", "code": 400}}\n\n'
    # What came before the error is the answer's and is forwarded; the error and all
    # after it are not (the gateway words its own error event).
    assert observer.feed(chunk("a") + error + chunk("late")) == chunk("a")
    assert observer.error == {"message": "bad", "code": 400}


def test_final_event_without_blank_line_is_flushed() -> None:
    observer = SSEObserver(drop_usage_chunk=False)
    assert observer.feed(b"data: [DONE]") == b""
    assert observer.flush() == DONE
    assert observer.done


def test_oversized_event_is_refused() -> None:
    observer = SSEObserver(drop_usage_chunk=False)
    try:
        observer.feed(b"data: " + b"x" * (1024 * 1024 + 1))
    except MalformedStream:
        return
    raise AssertionError("a 1 MiB event without an end was accepted")


def test_an_error_event_carries_the_same_body_as_an_error_answer() -> None:
    error = UpstreamError("m", code="upstream_stream_broken")
    assert error_event(error) == b"data: " + error.body() + b"\n\n"
    assert orjson.loads(error_event(error)[6:]) == {
        "error": {
            "message": "m",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_stream_broken",
        }
    }


def test_done_is_recognised_with_or_without_the_space() -> None:
    assert DONE_EVENT == DONE
    assert is_done(DONE.rstrip()) and is_done(b"data:[DONE]")
    assert not is_done(b'data: {"done": "[DONE]"}') and not is_done(b": [DONE]")


def test_one_event_per_read_as_streams_come() -> None:
    """The usual read holds one whole event: each is observed as in a batch, blank reads
    give nothing, and one that is not JSON is dropped and counted."""
    observer = SSEObserver(drop_usage_chunk=True)
    assert observer.feed(chunk("a")) == chunk("a")
    assert observer.feed(b"\n\n") == b""
    assert observer.feed(b"data: {not json\n\n") == b"" and observer.malformed == 1
    assert observer.feed(b": a comment\n\n") == b": a comment\n\n"
    assert observer.feed(chunk("b", "stop")) == chunk("b", "stop") and observer.finished
    assert observer.feed(USAGE) == b""  # the gateway's own usage chunk
    assert observer.usage is not None
    assert observer.feed(DONE) == DONE and observer.done
