"""`vgate keys create` sets every guardrail a key may have."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.cli import keys as keys_cli
from gateway.edge.auth import read_keys_file


def test_create_sets_every_key_guardrail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key's guardrails gained `max_n` (choices per request); `keys create` could not
    set it, so a key made with the CLI could only take the gateway-wide cap."""
    parser = argparse.ArgumentParser()
    keys_cli.add_arguments(parser)
    path = tmp_path / "keys.yaml"
    flags = ["--max-tokens", "100", "--max-input-bytes", "2000", "--max-n", "2"]
    args = parser.parse_args(["create", "--name", "team", "--file", str(path), *flags])
    assert keys_cli.run(args) == 0
    (entry,) = read_keys_file(path)
    assert entry.describe()["guardrails"] == {
        "max_tokens": 100,
        "max_input_bytes": 2000,
        "max_n": 2,
    }
    assert capsys.readouterr().out.strip()  # the secret, printed once
