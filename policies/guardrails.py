"""Guardrails: operational limits on what a request may ask, checked before it is routed.

Four checks, all on the parsed request and nothing else, cheapest first:

- **max_tokens cap** (per key): a request asking for more than the key's `max_tokens` (as
  `max_tokens`, or `max_completion_tokens` on chat) is refused with 400 `max_tokens_exceeded`
  naming the parameter and the cap. It is refused rather than clamped: a client that asked
  for 4,000 tokens and silently got 256 would read a cut-off answer as the model's whole one.
  A request that names no limit is given the cap (`max_completion_tokens` on chat,
  `max_tokens` on completions), so omitting it is no way around the cap.
- **n cap** (per key, else the global default, 16): `n` (and a completion's `best_of`) over it
  is 400 `integer_above_max_value` naming the parameter, as OpenAI answers an `n` over its
  own maximum. Every choice is a whole completion: without this cap `n: 1000` would ask a
  thousand times the `max_tokens` cap of work.
- **input size** (per key, else the global default): the UTF-8 bytes of the prompt's text,
  everything the upstream renders into the model's input as `gateway.wire.validation` measures it
  (message contents of every text shape, names, tool calls and their arguments, reasoning,
  tool definitions; a completion's prompt and suffix; an embedding's input). Token-id
  prompts are not text and are bounded by the body limit alone. Over the cap: 400
  `input_too_large` naming the request's main field. 400, not 413, because the body was
  acceptable as HTTP (that is `server.max_body_bytes`, answered 413 before it is read); what
  is too large is the prompt, which is how OpenAI reports a too-long prompt too.
- **deny patterns** (global): regular expressions searched in the same text only (never in
  other fields, headers or the model name). A match is 400 `content_policy_violation`; the
  message gives the pattern's index in the config, never the text it matched. Nothing here
  logs: the access log has the request's error code, and never the prompt.

While either text check is in force, a request holding a field whose effect on the prompt no
text check can see (a `chat_template` of its own, which can build any text; `prompt_embeds`)
is refused: 400 `unsupported_by_guardrails` naming the field. So is a prompt (or embedding
input) given as token ids while deny patterns are set: without the model's tokenizer they
cannot be searched, and a forbidden phrase sent as its token ids would pass. (The input size
cap does not count token ids: the body limit bounds them.)

Patterns are compiled once, at start-up, and each searched once in the prompt's texts joined
by newlines. They are not joined into one alternation: that would cost `re` its fast search
for a pattern's literal start, which makes a case-sensitive pattern with one (`ssn-\\d+`)
about ten times cheaper than a case-insensitive one (`(?i)...`): roughly 0.5 µs against 5 µs
per KB of prompt. They are the operator's: Python's `re` backtracks, so avoid nested
quantifiers; the input size cap (or the body limit) bounds the text they run on.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.config import GuardrailsConfig
from gateway.errors import InvalidRequest
from gateway.wire.validation import Endpoint, ProxyRequest

_EMBEDDINGS = Endpoint.EMBEDDINGS

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
# The parameters that multiply a request's completions, each capped by `max_n`.
_CHOICE_PARAMS = ("n", "best_of")


@dataclass(frozen=True, slots=True)
class KeyGuardrails:
    """One key's own guardrails, from the keys file. None: no cap of the key's own."""

    max_tokens: int | None = None  # the most a request may ask for per completion
    max_input_bytes: int | None = None  # overrides the global default, either way
    max_n: int | None = None  # choices per request (`n`, `best_of`); overrides the global cap


def utf8_size(texts: Iterable[str]) -> int:
    # str.isascii() is O(1) in CPython: only non-ASCII text is encoded to be measured.
    size = 0
    for text in texts:
        size += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return size


class Guardrails:
    """The global guardrails (from the config) applied with one key's own (from its entry)."""

    __slots__ = ("_patterns", "active", "max_input_bytes", "max_n")

    @classmethod
    def from_config(cls, rails: GuardrailsConfig) -> Guardrails:
        return cls(rails.deny_patterns, rails.max_input_bytes, rails.max_n)

    def __init__(
        self,
        deny_patterns: Sequence[str] = (),
        max_input_bytes: int | None = None,
        max_n: int | None = None,
    ) -> None:
        self._patterns = tuple(re.compile(pattern) for pattern in deny_patterns)
        self.max_input_bytes = max_input_bytes
        self.max_n = max_n
        # Whether any request needs looking at regardless of its key: the hot path's test.
        self.active = bool(self._patterns) or max_input_bytes is not None or max_n is not None

    def check(self, request: ProxyRequest, key: KeyGuardrails | None) -> ProxyRequest:
        """`request` as the gateway sends it on: the same, or, for a key with a token cap
        whose request names no limit, a copy asking for the cap. Raises `InvalidRequest`
        if it breaks a guardrail. The client's own payload is never changed."""
        checked = request
        limit = self.max_input_bytes
        max_n = self.max_n
        if key is not None:
            if key.max_tokens is not None and request.endpoint is not _EMBEDDINGS:
                checked = _cap_tokens(request, key.max_tokens)
            if key.max_input_bytes is not None:
                limit = key.max_input_bytes
            if key.max_n is not None:
                max_n = key.max_n
        if max_n is not None and request.endpoint is not _EMBEDDINGS:
            _cap_choices(request, max_n, key is not None and key.max_n is not None)
        if limit is None and not self._patterns:
            return checked
        prompt = request.prompt
        if prompt.opaque is not None:
            raise InvalidRequest(
                f"'{prompt.opaque}' is not accepted by this gateway: its guardrails check the "
                "prompt's text, and cannot see what this field would make of it.",
                param=prompt.opaque,
                code="unsupported_by_guardrails",
            )
        field = _TEXT_FIELD[request.endpoint]
        if prompt.token_ids and self._patterns:
            # Token ids are text the patterns cannot read: the forbidden phrase, tokenised.
            raise InvalidRequest(
                f"'{field}' as token ids is not accepted by this gateway: its deny patterns "
                "search the prompt's text, and cannot read token ids.",
                param=field,
                code="unsupported_by_guardrails",
            )
        texts = prompt.all_texts()
        if limit is not None:
            size = utf8_size(texts)
            if size > limit:
                whose = "this API key" if key is not None and key.max_input_bytes else "the gateway"
                raise InvalidRequest(
                    f"The text of '{field}' (with the other fields rendered into the prompt) "
                    f"is {size:,} bytes; {whose} allows at most {limit:,} bytes per request.",
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
        return checked

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


def _cap_choices(request: ProxyRequest, cap: int, keys_own: bool) -> None:
    payload = request.payload
    for param in _CHOICE_PARAMS:
        value = payload.get(param)
        # Validated: an int of at least 1 where present (best_of only on completions).
        if type(value) is int and value > cap:
            whose = "this API key" if keys_own else "the gateway"
            raise InvalidRequest(
                f"Invalid '{param}': {value} choices were asked for, but {whose} allows at "
                f"most {cap} per request.",
                param=param,
                code="integer_above_max_value",
            )


def _cap_tokens(request: ProxyRequest, cap: int) -> ProxyRequest:
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
    if asked:
        return request
    capped = {**payload, _DEFAULT_LIMIT_PARAM[request.endpoint]: cap}
    return dataclasses.replace(request, payload=capped)
