"""A non-streaming answer built from the upstream's stream of the same answer.

Why: vLLM sends nothing for a non-streaming request until the whole answer is generated, so
only `total_s` can tell a stalled backend from a slow one. Asked for a stream instead, the
upstream shows its progress: `first_token_s` and `idle_s` apply, and a broken answer is
retried elsewhere before anything has reached the client. The client still gets the one
JSON object it asked for; this module builds it from the chunks, pure and without I/O.

The rules are those of OpenAI's own SDK when it accumulates a stream (`accumulate_delta`),
so the answer is what a client streaming the same request would have put together: text
fields concatenate, objects merge key by key, lists extend, `tool_calls` merge by their
`index`; `id` keeps its first value, `index`, `type` and `role` their last, and
`finish_reason` and vLLM's `stop_reason` their last non-null one.
"""

from __future__ import annotations

from typing import Any

# Requests vLLM never streams, or refuses to stream: they keep the non-streaming exchange.
# `best_of` above `n` and beam search are answered whole even when a stream is asked for;
# `prompt_logprobs` with `stream: true` is a 400.
_UNSTREAMABLE = ("use_beam_search", "prompt_logprobs")
_LAST_NON_NULL = frozenset({"finish_reason", "stop_reason"})
_INDEXED_LISTS = frozenset({"tool_calls"})  # lists whose items merge by their "index"
_NAMES = frozenset({"id", "index", "type", "role"})


class Incomplete(Exception):
    """The stream ended without a whole answer: no choices, an unfinished one, no usage.
    Its message completes "Backend 'name' ..."."""


def can_assemble(payload: dict[str, Any]) -> bool:
    """Whether a stream can stand in for this request's non-streamed answer."""
    for key in _UNSTREAMABLE:
        if payload.get(key) not in (None, False):
            return False
    best_of = payload.get("best_of")
    return best_of is None or best_of == (payload.get("n") or 1)


def streaming_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The request as a stream that ends with its usage (a shallow copy: the client's
    payload is left as it was, for a passthrough attempt on a fallback route)."""
    return {**payload, "stream": True, "stream_options": {"include_usage": True}}


class _Text(list[str]):
    """A string still arriving in pieces: joined once, at the end (never `+=` per chunk)."""


class _Indexed(dict[int, dict[str, Any]]):
    """A list whose items arrive in pieces that name their `index` (`tool_calls`)."""


class Assembler:
    """Collects a stream's chunks (it is the `SSEObserver`'s recorder) into one answer."""

    __slots__ = ("_choices", "_head", "_missing", "chat")

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self._head: dict[str, Any] | None = None  # top-level fields, from the first chunk on
        self._missing: list[str] = []  # top-level fields still null, filled in when they come
        self._choices: dict[int, dict[str, Any]] = {}

    def record(self, payload: dict[str, Any]) -> None:
        """Take in one chunk (a parsed `data:` event other than [DONE] or an error)."""
        head = self._head
        if head is None:
            self._head = head = {
                key: value for key, value in payload.items() if key not in ("choices", "usage")
            }
            self._missing = [key for key, value in head.items() if value is None]
        elif self._missing:
            filled = False
            for key in self._missing:
                if payload.get(key) is not None:
                    head[key] = payload[key]
                    filled = True
            if filled:
                self._missing = [key for key in self._missing if head[key] is None]
        choices = payload.get("choices")
        if not choices or type(choices) is not list:
            return
        for choice in choices:
            if type(choice) is not dict:
                continue
            index = choice.get("index", 0)
            if type(index) is not int:
                continue
            into = self._choices.get(index)
            if into is None:
                into = self._choices[index] = {}
            # `_accumulate` inlined for what nearly every chunk holds: nulls, the choice's
            # index and finish_reason, one piece of text (this runs once per token).
            for key, value in choice.items():
                if value is None:
                    into.setdefault(key, None)
                elif key in _LAST_NON_NULL or key == "index":
                    into[key] = value
                elif key == "delta" and type(value) is dict:
                    fields = into.get("delta")
                    if type(fields) is not dict:
                        into["delta"] = _start(key, value)
                        continue
                    for name, item in value.items():
                        held = fields.get(name)
                        if type(held) is _Text and type(item) is str:
                            held.append(item)
                        else:
                            _accumulate(fields, name, item)
                else:
                    held = into.get(key)
                    if type(held) is _Text and type(value) is str:
                        held.append(value)  # a completion's text
                    else:
                        _accumulate(into, key, value)

    def answer(self, usage: Any) -> dict[str, Any]:
        """The non-streaming answer, with `usage` (the stream's final usage chunk's).

        Raises `Incomplete` when the stream did not finish every choice or sent no usage:
        never a whole-looking answer that is not.
        """
        head = self._head
        if head is None or not self._choices:
            raise Incomplete("ended its stream without a choice")
        unfinished = [i for i, c in self._choices.items() if c.get("finish_reason") is None]
        if unfinished:
            raise Incomplete(f"ended its stream before choice {unfinished[0]} finished")
        if type(usage) is not dict:
            raise Incomplete("ended its stream without its usage")
        choices = [self._choice(i, self._choices[i]) for i in sorted(self._choices)]
        answer: dict[str, Any] = {
            "id": head.get("id"),
            "object": "chat.completion" if self.chat else "text_completion",
            "created": head.get("created"),
            "model": head.get("model"),
            "choices": choices,
            "usage": usage,
        }
        for key, value in head.items():
            if key not in answer:
                answer[key] = value
        return answer

    def _choice(self, index: int, parts: dict[str, Any]) -> dict[str, Any]:
        parts = {key: _render(value) for key, value in parts.items()}
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["message"] = _message(parts.pop("delta", None))
        else:
            text = parts.pop("text", None)
            choice["text"] = text if isinstance(text, str) else ""
        choice["logprobs"] = parts.pop("logprobs", None)
        choice["finish_reason"] = parts.pop("finish_reason")
        parts.pop("index", None)
        choice.update(parts)  # stop_reason (vLLM), token_ids...: as they came
        return choice


def _message(delta: Any) -> dict[str, Any]:
    fields = delta if isinstance(delta, dict) else {}
    message: dict[str, Any] = {
        "role": fields.pop("role", None) or "assistant",
        "content": fields.pop("content", None),
    }
    if fields.get("tool_calls") and not message["content"]:
        message["content"] = None  # vLLM's and OpenAI's: no text beside the tool calls
    message.update(fields)
    return message


def _accumulate(into: dict[str, Any], key: str, value: Any) -> None:
    """Merge one delta field into what arrived before (OpenAI SDK's rules, module doc)."""
    current = into.get(key)
    if key in _NAMES:
        # Names, not text: `id` keeps its first value, the others their last
        # (some servers repeat the role in every delta).
        if current is None or (value is not None and key != "id"):
            into[key] = value
    elif current is None:
        into[key] = _start(key, value)
    elif value is None:
        return
    elif type(current) is _Text:
        if type(value) is str:
            current.append(value)
        else:
            into[key] = _start(key, value)  # changed its type: the newest wins
    elif type(current) is _Indexed and type(value) is list:
        _merge_indexed(current, value)
    elif type(current) is dict and type(value) is dict:
        for name, item in value.items():
            _accumulate(current, name, item)
    elif type(current) is list and type(value) is list:
        current.extend(value)
    # Anything else (a number, a boolean) keeps its first value.


def _start(key: str, value: Any) -> Any:
    """A field's first value, in the form that lets later pieces join it."""
    kind = type(value)
    if kind is str:
        return _Text((value,))
    if kind is dict:
        fields: dict[str, Any] = {}
        for name, item in value.items():
            _accumulate(fields, name, item)
        return fields
    if kind is list:
        if key in _INDEXED_LISTS:
            indexed = _Indexed()
            _merge_indexed(indexed, value)
            return indexed
        return list(value)
    return value


def _merge_indexed(into: _Indexed, items: list[Any]) -> None:
    for position, item in enumerate(items):
        if type(item) is not dict:
            continue
        index = item.get("index", position)
        if type(index) is not int:
            continue
        entry = into.get(index)
        if entry is None:
            entry = into[index] = {}
        for name, value in item.items():
            _accumulate(entry, name, value)


def _render(value: Any) -> Any:
    """Accumulated pieces back to JSON values: texts joined, indexed lists in order."""
    kind = type(value)
    if kind is _Text:
        return "".join(value)
    if kind is _Indexed:
        # In order; the index itself is the stream's bookkeeping, not the answer's.
        items = (_render(value[index]) for index in sorted(value))
        return [{k: v for k, v in item.items() if k != "index"} for item in items]
    if kind is dict:
        return {key: _render(item) for key, item in value.items()}
    return value
