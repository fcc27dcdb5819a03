"""vgate: an OpenAI-compatible inference gateway for vLLM workers and OpenAI."""

__version__ = "0.1.0"
