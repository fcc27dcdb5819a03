"""vLLM's wire shapes for chat and completion answers, stream chunks and the model list.

Non-streaming replies are pydantic's model_dump() of vLLM's response models, nulls included;
stream chunks are model_dump_json(exclude_unset=True), so only the fields vLLM sets appear,
in its order. Pure functions of a `Job` (and an id), so the endpoints decide only timing.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from chaos.sim.engine import Job
from chaos.sim.protocol import RequestIds
from chaos.sim.settings import SimSettings
from chaos.sim.tokens import Sequence

__all__ = [
    "Renderer",
    "chat_role_chunk",
    "models_body",
    "token_chunk",
    "usage",
    "usage_chunk",
]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


class Renderer:
    """Renders answers with fresh request ids."""

    __slots__ = ("_ids",)

    def __init__(self, ids: RequestIds) -> None:
        self._ids = ids

    def completion(self, job: Job) -> bytes:
        """A non-streaming reply: pydantic's model_dump() of vLLM's response, nulls included."""
        choices: list[dict[str, Any]]
        totals = usage(job.prompt_tokens, job.completion_tokens)
        totals["prompt_tokens_details"] = None
        if job.chat:
            seq = job.sequences[0]
            choices = [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(seq.pieces),
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": seq.finish_reason,
                    "stop_reason": seq.stop_reason,
                    "token_ids": None,
                    "routed_experts": None,
                }
            ]
            return orjson.dumps(
                {
                    "id": self._ids.new("chatcmpl-"),
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": job.model,
                    "choices": choices,
                    "service_tier": None,
                    "system_fingerprint": None,
                    "usage": totals,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "prompt_text": None,
                    "kv_transfer_params": None,
                    "ec_transfer_params": None,
                    "metrics": None,
                }
            )
        choices = [
            {
                "index": seq.index,
                "text": "".join(seq.pieces),
                "logprobs": None,
                "finish_reason": seq.finish_reason,
                "stop_reason": seq.stop_reason,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
            for seq in job.sequences
        ]
        return orjson.dumps(
            {
                "id": self._ids.new("cmpl-"),
                "object": "text_completion",
                "created": int(time.time()),
                "model": job.model,
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": None,
                "usage": totals,
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        )

    def stream_head(self, job: Job) -> dict[str, Any]:
        """The fields every chunk of one stream shares."""
        chat = job.chat
        return {
            "id": self._ids.new("chatcmpl-" if chat else "cmpl-"),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": job.model,
        }


def chat_role_chunk(head: dict[str, Any], job: Job) -> dict[str, Any]:
    """A chat stream's first chunk: the assistant role, no text yet."""
    choice = {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    chunk = {**head, "choices": [choice]}
    if job.continuous_usage:
        chunk["usage"] = usage(job.prompt_tokens, 0)
    chunk["prompt_token_ids"] = None
    chunk["prompt_text"] = None
    return chunk


def token_chunk(
    head: dict[str, Any], job: Job, seq: Sequence, text: str, generated: int
) -> dict[str, Any]:
    """A chunk of `seq`'s text, `generated` being its tokens so far with this chunk's."""
    chat = job.chat
    last = generated == len(seq.pieces)
    choice: dict[str, Any]
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None}
    else:
        choice = {"index": seq.index, "text": text, "logprobs": None}
    choice["finish_reason"] = seq.finish_reason if last else None
    if last or not chat:
        choice["stop_reason"] = seq.stop_reason if last else None
    if not chat:
        choice["prompt_token_ids"] = None
    choice["token_ids"] = None
    chunk = {**head, "choices": [choice]}
    if job.continuous_usage:
        chunk["usage"] = usage(seq.prompt_tokens, generated)
    return chunk


def usage_chunk(head: dict[str, Any], job: Job) -> dict[str, Any]:
    """The stream's closing usage chunk (`stream_options.include_usage`)."""
    return {**head, "choices": [], "usage": usage(job.prompt_tokens, job.completion_tokens)}


def models_body(settings: SimSettings, created: int) -> bytes:
    """`GET /v1/models`: each served name as vLLM lists it."""
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": name,
                    "parent": None,
                    "max_model_len": settings.max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-{os.urandom(16).hex()}",
                            "object": "model_permission",
                            "created": created,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
                for name in settings.models
            ],
        }
    )
