from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Process, start_sim


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def sims(logs: Path) -> Iterator[tuple[Process, Process]]:
    """Two fast simulated vLLM workers serving tiny-llama and tiny-embed."""
    first = start_sim(logs)
    second = start_sim(logs)
    yield first, second
    first.stop()
    second.stop()
