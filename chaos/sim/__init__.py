"""A simulated vLLM worker: the OpenAI-compatible surface of `vllm serve`, without a model.

Tests, demos, drills and benchmarks talk to this instead of real vLLM. It answers with vLLM's
own JSON shapes, status codes, error bodies, SSE framing and Prometheus metric names, and it
keeps vLLM's scheduling behaviour that a gateway cares about: at most `max_num_seqs` requests
generate at once (the rest wait, FIFO), and a client that disconnects aborts its request at once.

Output is deterministic. Each generated token is one word, with a leading space, from a fixed
256-word vocabulary, picked by SHAKE-256 over (model, prompt or messages, seed). The same request
always gets the same text and a different prompt gets different text. Because SHAKE's output
is a stream, a shorter `max_tokens` yields a prefix of a longer one, as greedy decoding would.
A completion ends with finish_reason "length" after `max_tokens` tokens, or "stop" where one of
the request's `stop` strings appears (the text is cut before it and `stop_reason` names it).

Token counting, which every `usage` block and metric follows:

- A prompt token is one whitespace-separated word of the prompt text; a prompt given as token
  ids counts one token per id.
- A chat prompt is the sum over messages of the words of their text content (a string, or the
  `text` parts of a content list), plus `CHAT_TOKENS_PER_MESSAGE` per message and
  `CHAT_TOKENS_GENERATION_PROMPT` once, standing in for a chat template's role markers.
- A completion token is one generated word.

Where this differs from real vLLM, on purpose:

- A request without `max_tokens` gets `default_max_tokens` (capped by the context). Real vLLM
  gives a chat request everything left of `max_model_len`, and a completion request 16.
- One worker serves chat, completions and embeddings for every `--model`; real vLLM serves
  embeddings only from a pooling model. `n` other than 1, logprobs and tools are not simulated.
- A batch of completion prompts holds one `max_num_seqs` slot, not one per prompt.

It can also misbehave on purpose, to test a router's resilience: errors at a given rate,
latency, hangs, connections reset or cut mid-stream, stalled streams, in-stream error events,
slow tokens and a failing /health. `chaos.faults` describes them; `--fault-*` flags set them at
start, and `PUT/GET/DELETE /sim/faults` and `GET /sim/stats` control and count them at run time.

The modules, from the ground up:

- `settings`: `SimSettings`, what one worker is.
- `protocol`: vLLM's error shapes, JSON and SSE responses, reading a body, request ids.
- `tokens`: the vocabulary, deterministic generation, token counting.
- `engine`: `max_num_seqs` slots, per-model counters, the token clock; a `Job` is one request.
- `parsing`: chat and completion requests validated as vLLM does, into a `Job`.
- `render`: the answers', stream chunks' and model list's wire shapes.
- `completions`, `embeddings`, `metrics`: the endpoints.
- `injection`: the faults of `chaos.faults` as the worker acts them.
- `app`: `SimWorker`, the ASGI app that composes the rest and routes to it.
- `cli`: `vgate sim`'s flags, and serving with uvicorn.
"""

from chaos.faults import Faults
from chaos.sim.app import SimWorker
from chaos.sim.cli import add_arguments, main, run, settings_from_args
from chaos.sim.settings import SimSettings
from chaos.sim.tokens import CHAT_TOKENS_GENERATION_PROMPT, CHAT_TOKENS_PER_MESSAGE, VOCABULARY

__all__ = [
    "CHAT_TOKENS_GENERATION_PROMPT",
    "CHAT_TOKENS_PER_MESSAGE",
    "VOCABULARY",
    "Faults",
    "SimSettings",
    "SimWorker",
    "add_arguments",
    "main",
    "run",
    "settings_from_args",
]
