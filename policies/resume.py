"""Stream resumption: what a client has of a broken stream, and how another backend goes on.

A stream that broke after reaching the client cannot be retried: the client holds part of
an answer. It can be continued. The `Transcript` records the answer text the client has
received. Then either

- prefill: the target continues the partial answer as an assistant message (vLLM's
  `continue_final_message`), and everything it sends is new text; or
- regenerate: the target answers the request afresh, and the `Splice` holds its output
  back until it has reproduced the text already delivered, then streams on. New text that
  departs from the delivered text ends the stream with an error (`Diverged`): a client
  must never receive a spliced answer that no model wrote.

Either way the events the client receives keep the original stream's `id` and `created`,
and a second role chunk never appears: the client sees one answer.

Token counts: the transcript counts chunks that carried text. vLLM sends one token per chunk
unless its stream interval is raised, so in prefill mode that count stands in for the tokens
already generated: it shortens `max_tokens` and moves the prefill from `prompt_tokens` to
`completion_tokens` in the usage the client receives. In regenerate mode usage is the new
backend's own, exact.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.wire.sse import DONE_EVENT, is_done

# Deltas whose content cannot be replayed as plain assistant text.
_UNREPLAYABLE_DELTA_KEYS = ("tool_calls", "function_call", "reasoning_content", "reasoning")


class Diverged(Exception):
    """A regenerated answer departs from the text the client already has."""


class Transcript:
    """The answer text a client has received on one stream, enough to continue it."""

    __slots__ = ("chat", "chunks", "created", "id", "max_chars", "pieces", "resumable", "size")

    def __init__(self, *, chat: bool, max_chars: int) -> None:
        self.chat = chat
        self.max_chars = max_chars
        self.pieces: list[str] = []
        self.size = 0
        self.chunks = 0  # chunks that carried text: the token estimate
        self.id: Any = None
        self.created: Any = None
        self.resumable = True

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def record(self, payload: dict[str, Any]) -> None:
        """Note one chunk the client is about to receive."""
        if self.id is None:
            self.id = payload.get("id")
            self.created = payload.get("created")
        if not self.resumable:
            return  # nothing more is needed of a stream that will not be resumed
        choices = payload.get("choices")
        if not choices:
            return
        if len(choices) != 1 or not isinstance(choices[0], dict):
            self._give_up()  # several choices: no single answer to continue
            return
        text = _text_of(choices[0], self.chat)
        if text is None:
            self._give_up()
        elif text:
            self.pieces.append(text)
            self.size += len(text)
            self.chunks += 1
            if self.size > self.max_chars:
                self._give_up()

    def _give_up(self) -> None:
        # The text is kept only to resume with: past this point holding it (and every
        # piece after it) would grow with the answer, without bound.
        self.resumable = False
        self.pieces = []


def _text_of(choice: dict[str, Any], chat: bool) -> str | None:
    """The answer text a choice carries ("" for none), or None if it is not plain text."""
    if choice.get("index", 0) != 0:
        return None
    if chat:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return ""
        # A plain loop: a generator here costs more than the rest of the chunk's handling.
        for key in _UNREPLAYABLE_DELTA_KEYS:
            if delta.get(key):
                return None
        content = delta.get("content")
    else:
        content = choice.get("text")
    if content is None:
        return ""
    return content if isinstance(content, str) else None


def prefill_payload(payload: dict[str, Any], transcript: Transcript) -> dict[str, Any]:
    """A chat request that continues the delivered text as the assistant's own message."""
    resumed = dict(payload)
    messages = list(payload["messages"])
    delivered = transcript.text
    last = messages[-1] if messages else None
    if (
        payload.get("continue_final_message")
        and isinstance(last, dict)
        and last.get("role") == "assistant"
        and isinstance(last.get("content"), str)
    ):
        # The client was continuing a message itself: the delivered text extends it.
        messages[-1] = {**last, "content": last["content"] + delivered}
    else:
        messages.append({"role": "assistant", "content": delivered})
    resumed["messages"] = messages
    resumed["continue_final_message"] = True
    resumed["add_generation_prompt"] = False
    for key in ("max_tokens", "max_completion_tokens"):
        limit = payload.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            resumed[key] = max(1, limit - transcript.chunks)
    return resumed


class Splice:
    """Rewrites a resuming backend's events into the continuation of the client's stream."""

    __slots__ = ("_pending", "_prefilled_chunks", "prefill", "transcript")

    def __init__(self, transcript: Transcript, *, prefill: bool) -> None:
        self.transcript = transcript
        self.prefill = prefill
        # Regenerating: the delivered text, still to be reproduced before anything goes out.
        self._pending = "" if prefill else transcript.text
        self._prefilled_chunks = transcript.chunks if prefill else 0

    def rewrite(self, events: bytes) -> bytes:
        """The client's share of `events` (whole SSE events), maybe b""."""
        out: list[bytes] = []
        for event in events.split(b"\n\n"):
            if not event:
                continue
            if is_done(event):
                if self._pending:
                    raise Diverged("the new answer ended before it reached the delivered text")
                out.append(DONE_EVENT)
                continue
            payload = _payload_of(event)
            if payload is None:
                continue  # not data: nothing the client needs from a resumed stream
            if not self._take(payload):
                continue
            payload["id"] = self.transcript.id
            payload["created"] = self.transcript.created
            self.transcript.record(payload)
            out.append(b"data: " + orjson.dumps(payload) + b"\n\n")
        return b"".join(out)

    def adjust_usage(self, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        """The usage the client gets: after a prefill, the prefill was the answer's, not the
        prompt's (see the module's note on token counts)."""
        if not self.prefill or not isinstance(usage, dict):
            return usage
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return usage
        moved = min(self._prefilled_chunks, prompt)
        return {
            **usage,
            "prompt_tokens": prompt - moved,
            "completion_tokens": completion + moved,
        }

    def _take(self, payload: dict[str, Any]) -> bool:
        """Trim `payload` to what the client lacks; False to drop it altogether."""
        usage = payload.get("usage")
        if isinstance(usage, dict):
            payload["usage"] = self.adjust_usage(usage)
        choices = payload.get("choices")
        if not choices:
            return isinstance(usage, dict)  # the usage chunk; anything else is noise
        if len(choices) != 1 or not isinstance(choices[0], dict):
            raise Diverged("the new answer has several choices")
        choice = choices[0]
        chat = self.transcript.chat
        if chat:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            delta.pop("role", None)  # the client had its role chunk
        text = _text_of(choice, chat)
        if text is None:
            raise Diverged("the new answer is not plain text")
        finished = choice.get("finish_reason") is not None
        pending = self._pending
        if pending:
            shared = min(len(text), len(pending))
            if text[:shared] != pending[:shared]:
                raise Diverged("the new answer departs from the text already delivered")
            self._pending = pending = pending[shared:]
            text = text[shared:]
            if chat:
                choice["delta"]["content"] = text
            else:
                choice["text"] = text
            if pending and finished:
                raise Diverged("the new answer ended before it reached the delivered text")
        return bool(text) or finished or isinstance(usage, dict)


def _payload_of(event: bytes) -> dict[str, Any] | None:
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        payload = orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None
