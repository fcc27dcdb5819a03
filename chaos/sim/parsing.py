"""Reading chat and completion requests as vLLM validates them, into the engine's `Job`.

Field checks come first, as FastAPI validates the body before vLLM looks at the model; then
the model, the context length and `max_tokens`, with vLLM's messages. Prompt tokens are
counted here (see `chaos.sim.tokens`) and each prompt's output generated up front: the engine
only decides when it goes out.
"""

from __future__ import annotations

from typing import Any

import orjson

from chaos.sim.engine import Job, ModelStats
from chaos.sim.protocol import error, field_error, invalid, rejected
from chaos.sim.settings import SimSettings
from chaos.sim.tokens import (
    CHAT_TOKENS_GENERATION_PROMPT,
    CHAT_TOKENS_PER_MESSAGE,
    generate,
    words,
)

__all__ = ["RequestParser"]


class RequestParser:
    """Turns a request's JSON into a `Job`, or raises the HTTPError vLLM would answer."""

    __slots__ = ("_settings", "_stats")

    def __init__(self, settings: SimSettings, stats: dict[str, ModelStats]) -> None:
        self._settings = settings
        self._stats = stats

    def model(self, data: dict[str, Any]) -> tuple[str, ModelStats]:
        model = data.get("model")
        if model is None:
            model = self._settings.models[0]  # vLLM serves its first name when none is given
        elif type(model) is not str:
            raise field_error("model", "a valid string")
        stats = self._stats.get(model)
        if stats is None:
            raise error(f"The model `{model}` does not exist.", "NotFoundError", 404, "model")
        return model, stats

    def _max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        limit = self._settings.max_model_len
        if prompt_tokens >= limit:
            raise rejected(
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {prompt_tokens} input tokens. Please reduce the length of the input "
                "messages.",
                "input_tokens",
                prompt_tokens,
            )
        if requested is None:
            return min(self._settings.default_max_tokens, limit - prompt_tokens)
        if prompt_tokens + requested > limit:
            raise rejected(
                f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This "
                f"model's maximum context length is {limit} tokens and your request has "
                f"{prompt_tokens} input tokens ({requested} > {limit} - {prompt_tokens}).",
                "max_tokens",
                requested,
            )
        if requested < 1:
            raise rejected(
                f"max_tokens must be at least 1, got {requested}.", "max_tokens", requested
            )
        return requested

    def generation(self, data: dict[str, Any], chat: bool) -> Job:
        # Field checks first, as FastAPI validates the body before vLLM looks at the model.
        if chat:
            messages = data.get("messages")
            if type(messages) is not list or not messages:
                raise field_error("messages", "a non-empty list of messages")
            prompt_tokens = CHAT_TOKENS_GENERATION_PROMPT + CHAT_TOKENS_PER_MESSAGE * len(messages)
            for message in messages:
                if type(message) is not dict or type(message.get("role")) is not str:
                    raise field_error("messages", "a list of objects with a string role")
                content = message.get("content")
                if type(content) is str:
                    prompt_tokens += words(content)
                elif type(content) is list:
                    for part in content:
                        if type(part) is not dict:
                            raise field_error("messages.content", "a list of content parts")
                        text = part.get("text")
                        if part.get("type") == "text" and type(text) is str:
                            prompt_tokens += words(text)
                elif content is not None:
                    raise field_error("messages.content", "a string or a list of parts")
            skip, messages = self._continuation(data, messages)
            if skip is not None:
                # The final assistant message is continued, not closed and answered: its
                # role marker stands in for the generation prompt (ChatML, as vLLM renders it).
                prompt_tokens -= CHAT_TOKENS_PER_MESSAGE
            prompts: list[tuple[Any, int]] = [(messages, prompt_tokens)]
            requested = data.get("max_completion_tokens")
            if requested is None:
                requested = data.get("max_tokens")
        else:
            skip = None
            prompts = _prompts(data.get("prompt"))
            requested = data.get("max_tokens")
        if requested is not None and type(requested) is not int:
            raise field_error("max_tokens", "a valid integer")
        seed = data.get("seed")
        if seed is not None and type(seed) is not int:
            raise field_error("seed", "a valid integer")
        stop_field = data.get("stop")
        if stop_field is None:
            stop: tuple[str, ...] = ()
        elif type(stop_field) is str:
            stop = (stop_field,)
        elif type(stop_field) is list and all(type(s) is str for s in stop_field):
            stop = tuple(stop_field)
        else:
            raise field_error("stop", "a string or a list of strings")
        stream = data.get("stream")
        if stream is None:
            stream = False
        elif type(stream) is not bool:
            raise field_error("stream", "a valid boolean")
        options = data.get("stream_options")
        if options is not None and type(options) is not dict:
            raise field_error("stream_options", "a valid dictionary")
        if options and not stream:
            raise invalid(
                "Value error, Stream options can only be defined when `stream=True`. "
                "(parameter=stream_options)",
                "stream_options",
            )
        include_usage = bool(options and options.get("include_usage"))
        continuous_usage = include_usage and bool(options and options.get("continuous_usage_stats"))

        model, stats = self.model(data)
        sequences = []
        for index, (prompt, prompt_tokens) in enumerate(prompts):
            max_tokens = self._max_tokens(prompt_tokens, requested)
            material = orjson.dumps([model, prompt, seed], option=orjson.OPT_SORT_KEYS)
            sequence = generate(material, max_tokens, stop, skip=skip or 0)
            sequence.index = index
            sequence.prompt_tokens = prompt_tokens
            sequences.append(sequence)
        return Job(chat, model, stats, sequences, stream, include_usage, continuous_usage)

    def _continuation(
        self, data: dict[str, Any], messages: list[Any]
    ) -> tuple[int | None, list[Any]]:
        """For `continue_final_message`: how many tokens of the answer the final assistant
        message already holds, and the messages the answer is generated for.

        A prefill that is the start of what this worker would answer anyway is continued
        where it stops, as greedy decoding would; any other prefill is generated for afresh.
        """
        flag = data.get("continue_final_message")
        if flag is None or flag is False:
            return None, messages
        if type(flag) is not bool:
            raise field_error("continue_final_message", "a valid boolean")
        if not self._settings.continue_final_message:
            raise invalid(
                "Unrecognized request argument supplied: continue_final_message",
                "continue_final_message",
            )
        if data.get("add_generation_prompt", True) is not False:
            raise invalid(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        final = messages[-1]
        prefill = final.get("content")
        if final.get("role") != "assistant" or type(prefill) is not str:
            raise invalid(
                "continue_final_message is set but the final message is not an assistant "
                "message with text content.",
                "messages",
            )
        earlier = messages[:-1]
        count = words(prefill)
        model = data.get("model")
        if model is None:
            model = self._settings.models[0]
        material = orjson.dumps([model, earlier, data.get("seed")], option=orjson.OPT_SORT_KEYS)
        if "".join(generate(material, count, ()).pieces) == prefill:
            return count, earlier
        return 0, messages


def _prompts(prompt: Any) -> list[tuple[Any, int]]:
    """The prompts of a completion request: text, token ids, or a batch of either."""
    if type(prompt) is str and prompt:
        return [(prompt, words(prompt))]
    if type(prompt) is list and prompt:
        if all(type(item) is int for item in prompt):
            return [(prompt, len(prompt))]
        if all(type(item) is str for item in prompt):
            return [(item, words(item)) for item in prompt]
        if all(
            type(item) is list and item and all(type(i) is int for i in item) for item in prompt
        ):
            return [(item, len(item)) for item in prompt]
    raise invalid(
        "Value error, Either prompt or prompt_embeds must be provided and non-empty. "
        "(parameter=prompt)",
        "prompt",
    )
