"""Real vLLM behind `vgate up`: one stack for the whole session (starting it takes a minute).

Needs `.venv-vllm` (deploy/vllm/install.sh) and the tiny model (built here when missing).
`VGATE_VLLM_TESTS` decides what happens without them: `auto` (the default) skips these tests
with the reason, `require` (what `make test` and CI set) fails them, `off` (`make test-fast`)
skips them even when everything is there.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import REPO, free_port
from tests.upstack import Up, start_up

VLLM_VENV = REPO / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
TINY_MODEL = REPO / ".run" / "tiny-llama"
EMBED_MODEL = VLLM_VENV / "models" / "all-MiniLM-L6-v2"
MODE = os.environ.get("VGATE_VLLM_TESTS", "auto")
START_TIMEOUT_S = 600.0  # three workers at once on a busy 2-core machine: 50-120 s seen
MAX_MODEL_LEN = 2048  # long enough that a disconnect interrupts seconds of decoding

# As deploy/vllm/gateway.yaml, less the fixed ports.
CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}
COMMON_ARGS = [
    "--dtype",
    "float32",
    "--max-num-seqs",
    "16",
    "--enforce-eager",
    "--disable-access-log-for-endpoints",
    "/health,/metrics",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.timeout(900))  # the session's start-up counts here
            if MODE == "off":
                item.add_marker(pytest.mark.skip(reason="VGATE_VLLM_TESTS=off"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: runs against real vLLM workers (tests/vllm)")


@pytest.fixture(scope="session")
def vllm_ready() -> None:
    """The vLLM venv and the tiny model, or a skip (a failure under VGATE_VLLM_TESTS=require)."""
    missing = [str(p) for p in (VLLM_PYTHON, EMBED_MODEL) if not p.exists()]
    if missing:
        reason = f"no real vLLM here ({', '.join(missing)} missing): run deploy/vllm/install.sh"
        if MODE == "require":
            pytest.fail(f"VGATE_VLLM_TESTS=require: {reason}")
        pytest.skip(reason)
    subprocess.run(
        [str(VLLM_PYTHON), str(REPO / "deploy" / "vllm" / "build_tiny_model.py"), str(TINY_MODEL)],
        check=True,
        capture_output=True,
    )


def chat_worker(name: str, port: int, log_dir: Path) -> dict[str, Any]:
    return {
        "name": name,
        "model": str(TINY_MODEL),
        "served_name": "tiny-llama",
        "port": port,
        "args": [*COMMON_ARGS, "--max-model-len", str(MAX_MODEL_LEN)],
        "env": CPU_ENV,
        "log_dir": str(log_dir),
        "ready_timeout_s": START_TIMEOUT_S,
        "restart": {"initial_s": 1.0, "max_s": 10.0},
    }


@pytest.fixture(scope="session")
def stack(vllm_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """`vgate up`: w1 and w2 serve tiny-llama, e1 serves tiny-embed; `ghost` is a route to w1
    under a name it does not serve."""
    log_dir = tmp_path_factory.mktemp("vllm")
    w1, w2, e1 = free_port(), free_port(), free_port()
    config = {
        "models": [
            {
                "name": "tiny-llama",
                "aliases": ["default"],
                "context_window": MAX_MODEL_LEN,
                "timeouts": {"first_token_s": 120, "idle_s": 60, "total_s": 600},
            },
            {
                "name": "ghost",
                "backends": [
                    {
                        "name": "w1-ghost",
                        "provider": "vllm",
                        "url": f"http://127.0.0.1:{w1}",
                        "model": "no-such-model",
                    }
                ],
            },
        ],
        "workers": [
            chat_worker("w1", w1, log_dir),
            chat_worker("w2", w2, log_dir),
            {
                "name": "e1",
                "model": str(EMBED_MODEL),
                "served_name": "tiny-embed",
                "port": e1,
                "args": [*COMMON_ARGS, "--runner", "pooling", "--max-model-len", "256"],
                "env": CPU_ENV,
                "log_dir": str(log_dir),
                "ready_timeout_s": START_TIMEOUT_S,
            },
        ],
    }
    up = start_up(log_dir, config, timeout_s=START_TIMEOUT_S + 30)
    yield up
    up.stop(timeout_s=120)
