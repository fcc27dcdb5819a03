"""What one simulated worker is: its models, speed, limits and starting faults.

A frozen value, built by the command line (`chaos.sim.cli`) or by tests directly, and read by
every part of the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chaos.faults import Faults

__all__ = ["SimSettings"]


@dataclass(frozen=True, slots=True)
class SimSettings:
    models: tuple[str, ...] = ("tiny-llama",)  # served model names; others get 404
    ttft_ms: float = 0.0  # delay before the first token (also before a non-stream reply)
    tokens_per_s: float = 0.0  # 0 = no delay between tokens
    tokens_per_chunk: int = 1  # tokens per SSE chunk
    max_num_seqs: int = 256  # requests generating at once; the rest wait
    max_model_len: int = 2048  # prompt_tokens + max_tokens over this gets 400
    default_max_tokens: int = 16
    embedding_dim: int = 384
    api_key: str | None = None  # when set, /v1/* requires "Authorization: Bearer <key>"
    # vLLM continues a final assistant message when asked (`continue_final_message`); off,
    # the worker refuses that field as OpenAI's API does, like a backend that cannot.
    continue_final_message: bool = True
    faults: Faults = field(default_factory=Faults)  # the faults to start with (chaos.faults)
