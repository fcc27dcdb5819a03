"""The gateway's own OpenAPI 3.1 description, served at `GET /openapi.json`.

Written to match what the edge accepts and answers, not OpenAI's whole API: a request body
is described by the checks `gateway.wire.validation` and the guardrails make (a body the schema
calls invalid is refused with 4xx, never forwarded), and every other field is allowed
through, as the gateway passes unknown fields upstream untouched. A body the schema calls
valid may still be refused by the upstream (its own validation, its context length), which
the gateway passes through. Responses are described as loosely as an OpenAI client reads
them, errors exactly: OpenAI's `{"error": {...}}`.

Built once per process from the configuration (the served models' names, the `n` cap) and
serialised once; a request for it costs what /health costs.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.config import GatewayConfig
from gateway.wire.validation import MAX_TOKEN_ID, MEDIA_PARTS, ROLES, TEXT_PARTS

_JSON = "application/json"
_NULL = {"type": "null"}


def _answer(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    """A whole (non-streaming) answer of `kind`, each choice holding `choice`'s fields."""
    return {
        "type": "object",
        "required": ["object", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        **choice,
                        "finish_reason": {"type": ["string", "null"]},
                    },
                },
            },
            "usage": _nullable(_ref("Usage")),
        },
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, _NULL]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref("Error")}}}


# Every answer the proxied endpoints may give besides 200: the gateway's own refusals and
# failures, and an upstream's client errors passed through as they came.
_PROXY_ERRORS = {
    "400": "The body is invalid (`param` names the field), a guardrail refused it, or the "
    "upstream refused it (a prompt too long for the model).",
    "401": "No API key, or one the gateway does not know.",
    "403": "The key may not use this model or feature, or its daily token quota is spent.",
    "404": "No model of that name (for a key limited to some models: not one of them).",
    "413": "The body is larger than `server.max_body_bytes`.",
    "422": "The upstream's validation refused the body (passed through).",
    "429": "A rate limit of the key (`Retry-After` says when to retry).",
    "500": "A failure inside the gateway: a bug, reported by request id.",
    "502": "The upstream failed or answered something that is not an answer.",
    "503": "No live backend for the model, or the gateway's queue is full.",
    "504": "The upstream did not answer in time.",
}
_AUTH_ERRORS = {
    "401": _PROXY_ERRORS["401"],
    "403": "The key is not allowed this.",
}


def _text_parts_schema() -> dict[str, Any]:
    """A content part as `gateway.wire.validation` reads it: text parts' text must be a string,
    any other part passes as it is (media parts, parts of types new to the gateway)."""
    by_key: dict[str, list[str]] = {}
    for kind, key in TEXT_PARTS.items():
        by_key.setdefault(key, []).append(kind)
    text_parts = [
        {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": kinds}, key: _nullable({"type": "string"})},
        }
        for key, kinds in by_key.items()
    ]
    other = {
        "type": "object",
        "description": "Media parts (" + ", ".join(sorted(MEDIA_PARTS)) + ") count as media; "
        "a part of any other type counts every key and string it holds as prompt text.",
        "not": {"required": ["type"], "properties": {"type": {"enum": list(TEXT_PARTS)}}},
    }
    return {"anyOf": [{"type": "string"}, *text_parts, other]}


def _function_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": _nullable({"type": "string"}),
            "arguments": _nullable({"type": "string"}),
        },
    }


def _message_schema() -> dict[str, Any]:
    string = _nullable({"type": "string"})
    return {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": sorted(ROLES)},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": _ref("ContentPart")},
                    _NULL,
                ]
            },
            "name": string,
            "tool_call_id": string,
            "reasoning": string,
            "reasoning_content": string,
            "refusal": string,
            "tool_calls": _nullable(
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"function": _nullable(_ref("FunctionCall"))},
                    },
                }
            ),
            "function_call": _nullable(_ref("FunctionCall")),
        },
        "description": "Every field but `role` counts as prompt text for the guardrails and "
        "the token estimate; other fields pass through.",
    }


def _prompt_schema(name: str) -> dict[str, Any]:
    token = {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}
    ids = {"type": "array", "minItems": 1, "items": token}
    return {
        "description": f"`{name}`: a string, or a non-empty array of strings, of token ids, "
        "or of non-empty arrays of token ids (one kind per array).",
        "anyOf": [
            {"type": "string"},
            {"type": "array", "minItems": 1, "items": {"type": "string"}},
            ids,
            {"type": "array", "minItems": 1, "items": ids},
        ],
    }


def _generation_properties(max_n: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields chat and completions share, and the schema of a choice count."""
    count = {"type": "integer", "minimum": 1}
    choices: dict[str, Any] = dict(count)
    if max_n is not None:
        choices["maximum"] = max_n
        choices["description"] = (
            f"At most {max_n} (guardrails.max_n) unless the key's own guardrails allow more."
        )
    return {
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable(
            {
                "type": "object",
                "description": "Only with `stream: true`.",
                "properties": {"include_usage": _nullable({"type": "boolean"})},
            }
        ),
        "max_tokens": _nullable(count),
        "n": _nullable(choices),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "user": _nullable({"type": "string"}),
    }, choices


def _request_schemas(models: list[str], max_n: int | None) -> dict[str, Any]:
    model = {
        "type": "string",
        "minLength": 1,
        "description": "A model name or alias this gateway serves (GET /v1/models); any other "
        "is 404.",
        "enum": models,
    }
    generation, choices = _generation_properties(max_n)
    # `stream_options` is refused unless `stream` is true.
    options_need_stream = [
        {"required": ["stream"], "properties": {"stream": {"const": True}}},
        {"properties": {"stream_options": _NULL}},
    ]
    return {
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "anyOf": options_need_stream,
            "properties": {
                "model": model,
                "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
                **generation,
                "max_completion_tokens": generation["max_tokens"],
            },
        },
        "CompletionRequest": {
            "type": "object",
            "required": ["model", "prompt"],
            "anyOf": options_need_stream,
            "properties": {
                "model": model,
                "prompt": _prompt_schema("prompt"),
                "suffix": _nullable({"type": "string"}),
                "best_of": _nullable(choices),
                **generation,
            },
        },
        "EmbeddingRequest": {
            "type": "object",
            "required": ["model", "input"],
            "properties": {
                "model": model,
                "input": _prompt_schema("input"),
                "messages": _nullable(
                    {
                        "type": "array",
                        "minItems": 1,
                        "items": _ref("ChatMessage"),
                        "description": "vLLM embeds chat messages instead of `input` where "
                        "a body has them; the guardrails read them too.",
                    }
                ),
                "user": _nullable({"type": "string"}),
            },
        },
    }


def _response_schemas() -> dict[str, Any]:
    usage = {
        "type": "object",
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": _nullable({"type": "string"}),
                        # An upstream's own error passed through may carry its status here.
                        "code": {"type": ["string", "integer", "null"]},
                    },
                }
            },
        },
        "Usage": usage,
        "ChatCompletion": _answer("chat.completion", {"message": {"type": "object"}}),
        "Completion": _answer("text_completion", {"text": {"type": "string"}}),
        "EmbeddingList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "object": {"const": "embedding"},
                            "index": {"type": "integer"},
                            "embedding": {
                                "anyOf": [
                                    {"type": "array", "items": {"type": "number"}},
                                    {"type": "string", "description": "base64"},
                                ]
                            },
                        },
                    },
                },
                "model": {"type": "string"},
                "usage": _nullable(_ref("Usage")),
            },
        },
        "Model": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": _ref("Model")},
            },
        },
    }


def _proxy_operation(summary: str, request: str, answer: str, streams: bool) -> dict[str, Any]:
    content: dict[str, Any] = {_JSON: {"schema": _ref(answer)}}
    if streams:
        # One server-sent event, as OpenAPI tools read an event stream: each event's fields.
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "description": "With `stream: true`: server-sent events, `data: {...}` chunks, "
                "then `data: [DONE]`; a failure after the first event is an error event and "
                "no [DONE].",
                "required": ["data"],
                "properties": {
                    "data": {"type": "string"},
                    "event": {"type": "string"},
                    "id": {"type": "string"},
                },
            }
        }
    responses: dict[str, Any] = {
        "200": {"description": "The upstream's answer.", "content": content}
    }
    responses.update({code: _error_response(text) for code, text in _PROXY_ERRORS.items()})
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {_JSON: {"schema": _ref(request)}}},
            "responses": responses,
        }
    }


def _get(summary: str, responses: dict[str, Any], *, auth: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    operation["security"] = [{"bearer": []}] if auth else []
    return {"get": operation}


def openapi_document(config: GatewayConfig) -> dict[str, Any]:
    """The description of this gateway, as configured."""
    models = [name for route in config.models for name in (route.name, *route.aliases)]
    schemas = {
        **_request_schemas(models, config.guardrails.max_n),
        "ChatMessage": _message_schema(),
        "ContentPart": _text_parts_schema(),
        "FunctionCall": _function_schema(),
        **_response_schemas(),
    }
    auth_errors = {code: _error_response(text) for code, text in _AUTH_ERRORS.items()}
    json_of = {"description": "OK", "content": {_JSON: {"schema": {"type": "object"}}}}
    paths = {
        "/v1/chat/completions": _proxy_operation(
            "Chat completion", "ChatCompletionRequest", "ChatCompletion", True
        ),
        "/v1/completions": _proxy_operation(
            "Text completion", "CompletionRequest", "Completion", True
        ),
        "/v1/embeddings": _proxy_operation(
            "Embeddings", "EmbeddingRequest", "EmbeddingList", False
        ),
        "/v1/models": _get(
            "The models the key may use, aliases included",
            {
                "200": {"description": "OK", "content": {_JSON: {"schema": _ref("ModelList")}}},
                **auth_errors,
            },
            auth=True,
        ),
        "/v1/models/{model}": {
            **_get(
                "One model by name or alias",
                {
                    "200": {"description": "OK", "content": {_JSON: {"schema": _ref("Model")}}},
                    **auth_errors,
                    "404": _error_response("No such model, or not one this key may use."),
                },
                auth=True,
            ),
            "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
        },
        "/health": _get(
            "Liveness: the process serves",
            {
                "200": {
                    "description": "OK",
                    "content": {
                        _JSON: {
                            "schema": {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"const": "ok"}},
                            }
                        }
                    },
                }
            },
            auth=False,
        ),
        "/ready": _get(
            "Readiness: every model has a backend passing its health checks",
            {
                "200": {**json_of, "description": "Ready; live and down backends per model."},
                "503": {**json_of, "description": "A model has no live backend."},
            },
            auth=False,
        ),
        "/metrics": _get(
            "Prometheus metrics",
            {
                "200": {
                    "description": "The Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
            auth=False,
        ),
        "/openapi.json": _get(
            "This description",
            {"200": {"description": "OpenAPI 3.1", "content": {_JSON: {"schema": {}}}}},
            auth=False,
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vgate",
            "version": "1",
            "description": "An OpenAI-compatible gateway in front of vLLM and OpenAI backends.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from the gateway's keys file.",
                }
            },
            "schemas": schemas,
        },
    }


def openapi_json(config: GatewayConfig) -> bytes:
    return orjson.dumps(openapi_document(config))
