"""`vgate sim` (and `python -m chaos.sim`): the worker's flags, and serving it with uvicorn.

Every `SimSettings` field has a flag with the same default; the fault flags come from
`chaos.faults`. `run` returns the process's exit status: 2 for settings the worker refuses,
uvicorn's status when it cannot bind.
"""

from __future__ import annotations

import argparse
import sys

from chaos.faults import add_fault_arguments, faults_from_args
from chaos.sim.app import SimWorker
from chaos.sim.settings import SimSettings

__all__ = ["add_arguments", "main", "run", "settings_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SimSettings()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help=f"a served model name; repeat for several (default: {defaults.models[0]})",
    )
    parser.add_argument("--ttft-ms", type=float, default=defaults.ttft_ms)
    parser.add_argument("--tokens-per-s", type=float, default=defaults.tokens_per_s)
    parser.add_argument("--tokens-per-chunk", type=int, default=defaults.tokens_per_chunk)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--no-continue-final-message",
        dest="continue_final_message",
        action="store_false",
        help="refuse `continue_final_message` (400), like a backend that cannot continue",
    )
    add_fault_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    return SimSettings(
        models=tuple(args.models or SimSettings().models),
        ttft_ms=args.ttft_ms,
        tokens_per_s=args.tokens_per_s,
        tokens_per_chunk=args.tokens_per_chunk,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        embedding_dim=args.embedding_dim,
        api_key=args.api_key,
        continue_final_message=args.continue_final_message,
        faults=faults_from_args(args),
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        app = SimWorker(settings_from_args(args))
    except ValueError as exc:
        print(f"vgate sim: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        return exc.code if isinstance(exc.code, int) else 1
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.sim", description="A simulated vLLM worker."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
