"""Guardrails: operational limits on what a request may ask, checked before it is routed.

Three checks, all on the parsed request and nothing else, cheapest first:

- **max_tokens cap** (per key): a request asking for more than the key's `max_tokens` (as
  `max_tokens`, or `max_completion_tokens` on chat) is refused with 400 `max_tokens_exceeded`
  naming the parameter and the cap. It is refused rather than clamped: a client that asked
  for 4,000 tokens and silently got 256 would read a cut-off answer as the model's whole one.
  A request that names no limit is given the cap (`max_completion_tokens` on chat,
  `max_tokens` on completions), so omitting it is no way around the cap.
- **input size** (per key, else the global default): the UTF-8 bytes of the prompt's text
  (chat messages' content strings and text parts, a completion's prompt strings, an
  embedding's input strings; token-id prompts are not text and are bounded by the body
  limit alone). Over the cap: 400 `input_too_large` naming the field. 400, not 413, because
  the body was acceptable as HTTP (that is `server.max_body_bytes`, answered 413 before it is
  read); what is too large is the prompt, which is how OpenAI reports a too-long prompt too.
- **deny patterns** (global): regular expressions searched in the same text only (never in
  other fields, headers or the model name). A match is 400 `content_policy_violation`; the
  message gives the pattern's index in the config, never the text it matched. Nothing here
  logs: the access log has the request's error code, and never the prompt.

Patterns are compiled once, at start-up, and each searched once in the prompt's texts joined
by newlines. They are not joined into one alternation: that would cost `re` its fast search
for a pattern's literal start, which makes a case-sensitive pattern with one (`ssn-\\d+`)
about ten times cheaper than a case-insensitive one (`(?i)...`): roughly 0.5 µs against 5 µs
per KB of prompt. They are the operator's: Python's `re` backtracks, so avoid nested
quantifiers; the input size cap (or the body limit) bounds the text they run on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest
from gateway.validation import Endpoint, ProxyRequest

MAX_PATTERNS = 100
_CHAT, _COMPLETIONS, _EMBEDDINGS = Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS
MAX_PATTERN_CHARS = 1000

_TEXT_FIELD = {
    Endpoint.CHAT: "messages",
    Endpoint.COMPLETIONS: "prompt",
    Endpoint.EMBEDDINGS: "input",
}
# What a request that names no limit is given: OpenAI's current name on chat.
_DEFAULT_LIMIT_PARAM = {
    Endpoint.CHAT: "max_completion_tokens",
    Endpoint.COMPLETIONS: "max_tokens",
}


@dataclass(frozen=True, slots=True)
class KeyGuardrails:
    """One key's own guardrails, from the keys file. None: no cap of the key's own."""

    max_tokens: int | None = None  # the most a request may ask for per completion
    max_input_bytes: int | None = None  # overrides the global default, either way


def check_pattern(pattern: str) -> str | None:
    """Why `pattern` cannot be a deny pattern, or None when it can."""
    if not pattern:
        return "must not be empty"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    if compiled.search("") is not None:
        return "matches the empty string, so it would refuse every request"
    return None


def prompt_texts(endpoint: Endpoint, payload: dict[str, Any]) -> list[str]:
    """The prompt's text, piece by piece: what a person wrote, not the request's framing."""
    texts: list[str] = []
    if endpoint is _CHAT:
        for message in payload["messages"]:  # validated: a non-empty list
            content = message.get("content") if type(message) is dict else None
            if type(content) is str:
                texts.append(content)
            elif type(content) is list:
                for part in content:
                    if type(part) is dict and part.get("type") == "text":
                        text = part.get("text")
                        if type(text) is str:
                            texts.append(text)
    else:
        value = payload.get("prompt" if endpoint is _COMPLETIONS else "input")
        if type(value) is str:
            texts.append(value)
        elif type(value) is list:
            texts.extend(item for item in value if type(item) is str)
    return texts


def utf8_size(texts: Iterable[str]) -> int:
    # str.isascii() is O(1) in CPython: only non-ASCII text is encoded to be measured.
    size = 0
    for text in texts:
        size += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return size


class Guardrails:
    """The global guardrails (from the config) applied with one key's own (from its entry)."""

    __slots__ = ("_patterns", "active", "max_input_bytes", "pattern_sources")

    def __init__(
        self, deny_patterns: Sequence[str] = (), max_input_bytes: int | None = None
    ) -> None:
        self.pattern_sources = tuple(deny_patterns)
        self._patterns = tuple(re.compile(pattern) for pattern in deny_patterns)
        self.max_input_bytes = max_input_bytes
        # Whether any request needs looking at regardless of its key: the hot path's test.
        self.active = bool(self._patterns) or max_input_bytes is not None

    def check(self, request: ProxyRequest, key: KeyGuardrails | None) -> None:
        """Raise `InvalidRequest` if `request` breaks a guardrail; may set the token cap."""
        limit = self.max_input_bytes
        if key is not None:
            if key.max_tokens is not None and request.endpoint is not _EMBEDDINGS:
                _cap_tokens(request, key.max_tokens)
            if key.max_input_bytes is not None:
                limit = key.max_input_bytes
        if limit is None and not self._patterns:
            return
        texts = prompt_texts(request.endpoint, request.payload)
        field = _TEXT_FIELD[request.endpoint]
        if limit is not None:
            size = utf8_size(texts)
            if size > limit:
                whose = "this API key" if key is not None and key.max_input_bytes else "the gateway"
                raise InvalidRequest(
                    f"The text of '{field}' is {size:,} bytes; {whose} allows at most "
                    f"{limit:,} bytes per request.",
                    param=field,
                    code="input_too_large",
                )
        if self._patterns:
            index = self.denied(texts)
            if index is not None:
                raise InvalidRequest(
                    f"The request was refused by the gateway's content policy (deny pattern "
                    f"{index}).",
                    param=field,
                    code="content_policy_violation",
                )

    def denied(self, texts: Sequence[str]) -> int | None:
        """The index (in the config) of the first deny pattern found in `texts`, or None.

        The texts are searched as one, a line apart: one search per pattern, and a phrase
        split over two messages is still found.
        """
        if not texts:
            return None
        text = texts[0] if len(texts) == 1 else "\n".join(texts)
        for index, pattern in enumerate(self._patterns):
            if pattern.search(text) is not None:
                return index
        return None


def _cap_tokens(request: ProxyRequest, cap: int) -> None:
    payload = request.payload
    asked = False
    for param in ("max_tokens", "max_completion_tokens"):
        value = payload.get(param)
        if value is None:
            continue
        asked = True
        if isinstance(value, int) and value > cap:
            raise InvalidRequest(
                f"'{param}' is {value}, but this API key may ask for at most {cap} tokens per "
                "request.",
                param=param,
                code="max_tokens_exceeded",
            )
    if not asked:
        payload[_DEFAULT_LIMIT_PARAM[request.endpoint]] = cap
