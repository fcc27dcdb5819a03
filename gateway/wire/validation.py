"""Request bodies: parsed once, checked enough to fail clearly, forwarded otherwise intact.

Only what the gateway relies on or what would make an upstream fail obscurely is checked;
unknown fields pass through untouched so new OpenAI parameters work without a release.

The one walk over the prompt-bearing fields (`measure_prompt`) does three jobs at once: it
checks their types (a wrong one is 400 naming the field, never a 500 further in), and it
collects what the upstream renders into the model's input, as `Prompt`, for the guardrails
(its text) and the token estimate (its text, token ids, media parts and messages). What
counts as prompt text is decided here and nowhere else, so that the input cap, the deny
patterns and the estimate cannot disagree about it:

- chat: every message's `content` (a string; in a parts list: bare strings, the text of
  `text`, `input_text`, `output_text`, `summary_text` and `reasoning_text` parts, a `refusal`
  part's `refusal`, a `thinking` part's `thinking`; media parts count as media; a part of
  any other type counts all its keys and strings), and every other field of the message
  (`name`, `tool_calls` with their function names and arguments, `function_call`,
  `tool_call_id`, `reasoning`, `reasoning_content`, and anything else a chat template could
  render) by all its keys and strings; the request's `tools`, `functions`, `documents` and
  `chat_template_kwargs` the same way;
- completions: `prompt` (a string, strings, token ids or lists of token ids) and `suffix`;
- embeddings: `input` in the same shapes as `prompt`, and `messages` where a body has them
  (vLLM embeds those instead).

Token ids are counted as such (`Prompt.token_ids`): no text check can read them without the
model's tokenizer, so the deny patterns refuse them (see policies/guardrails.py).

A field whose effect on the prompt no text check can see (a request's own `chat_template`,
which can build any text; `prompt_embeds`) is noted as `Prompt.opaque`: the guardrails
refuse it while a text check is in force.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from gateway.errors import InvalidRequest

# The deepest nesting the gateway forwards: orjson.loads accepts 1024 levels, but the router
# re-serialises every request with orjson.dumps, whose limit is 254. Deeper is 400 here.
MAX_JSON_DEPTH = 254
# The largest integer orjson parses as one (a larger number becomes a float): token ids are
# integers from 0 to this.
MAX_TOKEN_ID = 2**64 - 1


class Endpoint(StrEnum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"

    @property
    def streams(self) -> bool:
        return self is not Endpoint.EMBEDDINGS


@dataclass(slots=True)
class Prompt:
    """What the upstream renders into the model's input, as measured by `measure_prompt`."""

    texts: list[str] = field(default_factory=list)  # text found so far: see all_texts
    token_ids: int = 0  # tokens given as ids (a completion's or an embedding's)
    media: int = 0  # image, audio, video and file parts
    messages: int = 0  # chat messages
    opaque: str | None = None  # the first field no text check can see into, by its name
    # JSON values rendered into the prompt whole (tool definitions, tool calls, fields of
    # kinds not known here), their keys and strings counting as text: checked for type by
    # the walk, their strings collected only when something asks (`all_texts`).
    rendered: list[Any] = field(default_factory=list)

    def all_texts(self) -> list[str]:
        """Every piece of the prompt's text. A request that no guardrail and no limit looks
        at never pays for collecting the strings of its tool definitions and tool calls."""
        if self.rendered:
            for value in self.rendered:
                _strings(value, self.texts)
            self.rendered.clear()
        return self.texts


@dataclass(slots=True)
class ProxyRequest:
    endpoint: Endpoint
    payload: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool
    prompt: Prompt = field(default_factory=Prompt)


ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Content parts whose text is rendered, and the key that holds it.
TEXT_PARTS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "summary_text": "text",
    "reasoning_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
# Content parts that reach the model as media, not text.
MEDIA_PARTS = frozenset(
    {
        "image_url",
        "input_image",
        "image",
        "image_embeds",
        "audio_url",
        "input_audio",
        "audio",
        "video_url",
        "video",
        "file",
        "input_file",
    }
)
# Message fields of a known type (anything else a message holds is only walked for text).
_MESSAGE_STRINGS = ("name", "tool_call_id", "reasoning", "reasoning_content", "refusal")
# Request fields a chat template renders into the prompt, besides the messages.
_RENDERED_CHAT_FIELDS = ("tools", "functions", "documents", "chat_template_kwargs")


def parse_request(endpoint: Endpoint, body: bytes) -> ProxyRequest:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc.msg} at byte {exc.pos}).",
            code="invalid_json",
        ) from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    _check_depth(body, payload)

    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "you must provide a model parameter as a non-empty string")

    prompt = measure_prompt(endpoint, payload)

    stream = False
    wants_usage = False
    if endpoint.streams:
        stream = _optional_bool(payload, "stream")
        options = payload.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise _invalid("stream_options", "must be an object")
            if not stream:
                raise _invalid("stream_options", "is only allowed when stream is true")
            wants_usage = _optional_bool(
                options, "include_usage", name="stream_options.include_usage"
            )
        for name in ("max_tokens", "max_completion_tokens", "n"):
            _optional_int(payload, name, minimum=1)
        if endpoint is Endpoint.COMPLETIONS:
            _optional_int(payload, "best_of", minimum=1)
        _optional_number(payload, "temperature", 0.0, 2.0)
        _optional_number(payload, "top_p", 0.0, 1.0)
    user = payload.get("user")
    if user is not None and type(user) is not str:
        raise _invalid("user", "must be a string")
    return ProxyRequest(endpoint, payload, model, stream, wants_usage, prompt=prompt)


def measure_prompt(endpoint: Endpoint, payload: dict[str, Any]) -> Prompt:
    """Check the prompt-bearing fields' types and collect what they render (see the module)."""
    prompt = Prompt()
    if endpoint is Endpoint.CHAT:
        _walk_messages(payload.get("messages"), prompt)
        for name in _RENDERED_CHAT_FIELDS:
            value = payload.get(name)
            if value is not None:
                prompt.rendered.append(value)
        if payload.get("chat_template") is not None:
            prompt.opaque = "chat_template"
    elif endpoint is Endpoint.COMPLETIONS:
        _walk_prompt("prompt", payload.get("prompt"), prompt)
        suffix = payload.get("suffix")
        if suffix is not None:
            if type(suffix) is not str:
                raise _invalid("suffix", "must be a string")
            prompt.texts.append(suffix)
        if payload.get("prompt_embeds") is not None:
            prompt.opaque = "prompt_embeds"
    else:
        _walk_prompt("input", payload.get("input"), prompt)
        if payload.get("messages") is not None:
            # vLLM embeds chat messages instead of `input` where a body has them.
            _walk_messages(payload["messages"], prompt)
    return prompt


def _check_depth(body: bytes, payload: dict[str, Any]) -> None:
    """400 for JSON nested deeper than the router can re-serialise.

    Serialising it once is the exact test, and the cheapest one found: orjson.dumps costs
    about 0.3 µs per KB of a chat body, against 0.75 µs per KB for merely counting its
    brackets with bytes.count (and 0.04 against 0.55 µs per KB for one long prompt string).
    A body too short to hold 255 levels of brackets skips it.
    """
    if len(body) <= 2 * MAX_JSON_DEPTH:
        return
    try:
        orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise InvalidRequest(
            f"The JSON body of your request is nested too deeply: the gateway accepts at "
            f"most {MAX_JSON_DEPTH} levels of arrays and objects.",
            code="invalid_json",
        ) from None


def _invalid(param: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{param}': {reason}.", param=param, code="invalid_value")


def _walk_messages(messages: Any, prompt: Prompt) -> None:
    if type(messages) is not list or not messages:
        raise _invalid("messages", "must be a non-empty array of message objects")
    texts = prompt.texts
    prompt.messages = len(messages)
    for index, message in enumerate(messages):
        if type(message) is not dict:
            raise _invalid(f"messages[{index}]", "must be an object")
        role = message.get("role")
        # type() first: a dict or a list is unhashable, and `in` a set would raise.
        if type(role) is not str or role not in ROLES:
            raise _invalid(f"messages[{index}].role", f"must be one of {', '.join(sorted(ROLES))}")
        content = message.get("content")
        if type(content) is str:
            texts.append(content)
        elif type(content) is list:
            _walk_parts(index, content, prompt)
        elif content is not None:
            raise _invalid(f"messages[{index}].content", "must be a string or an array of parts")
        # Most messages hold a role and content only: the other fields only where there are.
        if len(message) > 1 + ("content" in message):
            _walk_fields(index, message, prompt)


def _walk_fields(index: int, message: dict[str, Any], prompt: Prompt) -> None:
    """A message's fields besides role and content: each is rendered by chat templates."""
    texts = prompt.texts
    for key, value in message.items():
        if value is None or key == "role" or key == "content":
            continue
        if key in _MESSAGE_STRINGS:
            if type(value) is not str:
                raise _invalid(f"messages[{index}].{key}", "must be a string")
            texts.append(value)
        elif key == "tool_calls":
            if type(value) is not list:
                raise _invalid(f"messages[{index}].tool_calls", "must be an array of objects")
            for number, call in enumerate(value):
                _check_call(f"messages[{index}].tool_calls[{number}]", call)
            prompt.rendered.append(value)
        elif key == "function_call":
            _check_function(f"messages[{index}].function_call", value)
            prompt.rendered.append(value)
        else:
            # Anything else a chat template could render: counted, keys and strings.
            texts.append(key)
            prompt.rendered.append(value)


def _check_call(name: str, call: Any) -> None:
    """A tool call shaped as the upstream will read it: a name and arguments are strings."""
    if type(call) is not dict:
        raise _invalid(name, "must be an object")
    function = call.get("function")
    if function is not None:
        _check_function(f"{name}.function", function)


def _check_function(name: str, function: Any) -> None:
    if type(function) is not dict:
        raise _invalid(name, "must be an object")
    for key in ("name", "arguments"):
        value = function.get(key)
        if value is not None and type(value) is not str:
            raise _invalid(f"{name}.{key}", "must be a string")


def _walk_parts(index: int, parts: list[Any], prompt: Prompt) -> None:
    append = prompt.texts.append
    for part in parts:
        if type(part) is dict:
            kind = part.get("type")
            key: str | None = "text"
            if kind == "text":  # the common part first: this loop is on the hot path
                text = part.get("text")
                if type(text) is str:
                    append(text)
                    continue
            else:
                # type() first: a list or an object is unhashable.
                key = TEXT_PARTS.get(kind) if type(kind) is str else None
                if key is None:
                    if type(kind) is str and kind in MEDIA_PARTS:
                        prompt.media += 1
                    else:
                        # A part of a type not known here: whatever it holds counts as text.
                        prompt.rendered.append(part)
                    continue
                text = part.get(key)
                if type(text) is str:
                    append(text)
                    continue
            if text is not None:
                number = _position(parts, part)
                raise _invalid(f"messages[{index}].content[{number}].{key}", "must be a string")
        elif type(part) is str:
            append(part)  # a bare string in a parts list is text too
        else:
            raise _invalid(
                f"messages[{index}].content[{_position(parts, part)}]",
                "must be a string or a content part",
            )


def _position(items: list[Any], item: Any) -> int:
    """Where `item` (that very object) is in `items`: for an error message only."""
    return next(number for number, other in enumerate(items) if other is item)


def _walk_prompt(name: str, value: Any, prompt: Prompt) -> None:
    """A completion's `prompt` or an embedding's `input`: text, texts, ids or lists of ids."""
    if type(value) is str:
        prompt.texts.append(value)
        return
    if type(value) is not list or not value:
        raise _invalid(name, "must be a string or a non-empty array of strings or token ids")
    kinds = set(map(type, value))  # C speed, even for a long list of token ids
    if kinds == {str}:
        prompt.texts.extend(value)
    elif kinds == {int}:
        if min(value) < 0:
            number = next(i for i, item in enumerate(value) if item < 0)
            raise _invalid(f"{name}[{number}]", "must be a token id: an integer of at least 0")
        prompt.token_ids += len(value)
    elif kinds == {list}:
        for number, ids in enumerate(value):
            if not ids or set(map(type, ids)) != {int} or min(ids) < 0:
                raise _invalid(
                    f"{name}[{number}]", "must be a non-empty array of token ids (integers >= 0)"
                )
            prompt.token_ids += len(ids)
    else:
        first = type(value[0])
        number = 0  # the first item is of no accepted kind, or a later one differs from it
        if first in (str, int, list):
            number = next(i for i, item in enumerate(value) if type(item) is not first)
        raise _invalid(
            f"{name}[{number}]",
            "must be of the same kind as the array's first item: all strings, all token ids "
            "or all arrays of token ids",
        )


def _strings(value: Any, texts: list[str]) -> None:
    """Every string in `value`, object keys included, as a template rendering it would show.

    Recursion is bounded: bodies deeper than MAX_JSON_DEPTH are refused before any walk.
    """
    kind = type(value)
    if kind is str:
        texts.append(value)
    elif kind is list:
        for item in value:
            if type(item) is str:
                texts.append(item)
            elif type(item) in (dict, list):
                _strings(item, texts)
    elif kind is dict:
        for key, item in value.items():
            texts.append(key)
            if type(item) is str:
                texts.append(item)
            elif type(item) in (dict, list):
                _strings(item, texts)


def _optional_bool(payload: dict[str, Any], key: str, *, name: str | None = None) -> bool:
    value = payload.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name or key, "must be a boolean")
    return value


def _optional_int(payload: dict[str, Any], key: str, *, minimum: int) -> None:
    value = payload.get(key)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _invalid(key, f"must be an integer of at least {minimum}")


def _optional_number(payload: dict[str, Any], key: str, low: float, high: float) -> None:
    value = payload.get(key)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise _invalid(key, f"must be a number between {low:g} and {high:g}")
