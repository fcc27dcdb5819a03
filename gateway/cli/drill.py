"""`vgate drill FILE...`: run drill files against a live gateway, report, and judge.

Exit status: 0 if every drill passed, 1 if one failed (or was interrupted), 2 if a drill
file or the config is wrong (nothing ran).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from gateway.config import load_config
from gateway.errors import ConfigError

logger = logging.getLogger("vgate.drill")

DEFAULT_OUT = Path(".run/drill/reports")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="drill files (Chaos Toolkit)")
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the gateway (default: %(default)s)"
    )
    parser.add_argument(
        "--config",
        required=True,
        help="the gateway's config file: its slos: judge the drills, and config swaps write it",
    )
    parser.add_argument(
        "--key-env",
        default="VGATE_DRILL_KEY",
        help="variable holding the API key of the drill's load (default: %(default)s)",
    )
    parser.add_argument(
        "--admin-key-env",
        default="VGATE_DRILL_ADMIN_KEY",
        help="variable holding the gateway's admin key (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="report folder (default: %(default)s)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        metavar="N",
        help="the load's clients, for every drill (default: each drill file's own)",
    )
    parser.add_argument(
        "--wait-ready",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for the gateway's /ready",
    )


def run(args: argparse.Namespace) -> int:
    from chaos.drill.report import progress_line, verdict_table, write_report
    from chaos.drill.runner import load_drill, run_drill
    from chaos.drill.session import DrillSession, GatewayTarget

    _quiet_http_logs()
    # Ctrl-C interrupts a drill (its rollbacks run), even where the shell that started it in
    # the background left SIGINT ignored. SIGTERM does too (Chaos Toolkit's handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config_file = Path(args.config)
    try:
        config = load_config(config_file)
        drills = [load_drill(Path(file), config, clients=args.clients) for file in args.files]
    except ConfigError as error:
        print(f"vgate drill: {error}", file=sys.stderr)
        return 2
    key = os.environ.get(args.key_env)
    if not key:
        print(f"vgate drill: set {args.key_env} to the API key of the load", file=sys.stderr)
        return 2
    target = GatewayTarget(
        url=args.url,
        key=key,
        admin_key=os.environ.get(args.admin_key_env) or None,
        config_file=config_file,
    )
    if args.wait_ready and not _ready(args.url, args.wait_ready):
        print(
            f"vgate drill: {args.url}/ready did not answer 200 in {args.wait_ready:g}s",
            file=sys.stderr,
        )
        return 1

    def progress(session: DrillSession) -> None:
        logger.info("%s", progress_line(session.now(), session.requests(), session.phase))

    results = []
    try:
        for drill in drills:
            logger.info("drill %s: %s", drill.name, drill.title)
            result = run_drill(drill, target, config, progress)
            files = write_report(result, args.out)
            logger.info(
                "drill %s: %s (%s); report %s",
                drill.name,
                "passed" if result.passed else "FAILED",
                result.status,
                files.markdown,
            )
            results.append(result)
            if result.status == "interrupted":  # Ctrl-C or SIGTERM: its rollbacks ran
                logger.warning("interrupted: the drills left are not run")
                break
    except KeyboardInterrupt:  # between drills
        logger.warning("interrupted: the drills left are not run")
        print(verdict_table(results))
        return 1
    print(verdict_table(results))
    return 0 if results and all(result.passed for result in results) else 1


def _ready(url: str, timeout_s: float) -> bool:
    import httpx  # the drill extra's, as everything `vgate drill` uses beyond the gateway's

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url.rstrip("/") + "/ready", timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def _quiet_http_logs() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    for name in ("httpx", "httpx2", "httpcore", "openai"):  # a line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
