"""`vgate`: the one command line. Verbs: serve, up, sim, check-config, route explain, keys,
slo rules and dashboards, drill."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gateway.config import GatewayConfig, ServerConfig, load_config
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.runtime.gateway import Gateway


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vgate", description="An OpenAI-compatible LLM gateway.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config file (default: the embedded default)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument(
        "--workers", type=int, help="override server.workers (gateway processes on the port)"
    )
    # How connections reach the workers (gateway/runtime/workers.py): the parent deals them
    # out (the default), or the kernel does (kept for measurements: bench/workers.py).
    serve.add_argument(
        "--balance",
        choices=("dispatch", "shared", "reuseport"),
        default="dispatch",
        help=argparse.SUPPRESS,
    )

    up = verbs.add_parser("up", help="start the config's vLLM workers, then serve in front of them")
    up.add_argument("--config", required=True, help="YAML config file with a workers: section")
    up.add_argument("--host", help="override server.host")
    up.add_argument("--port", type=int, help="override server.port")

    check = verbs.add_parser("check-config", help="validate a config file and its keys file")
    check.add_argument("file", nargs="?", help="YAML config file (default: the embedded default)")

    route = verbs.add_parser("route", help="routing tools")
    route_verbs = route.add_subparsers(dest="route_verb", required=True)
    explain = route_verbs.add_parser(
        "explain", help="replay a request's routing decisions from its access-log line"
    )
    explain.add_argument("log", nargs="?", help="access log file (default: standard input)")
    explain.add_argument("--config", help="the gateway's YAML config (default: the embedded one)")
    explain.add_argument("--request-id", help="the request (default: the last one logged)")

    keys = verbs.add_parser("keys", help="issue and list API keys (the keys file)")
    from gateway.cli import keys as keys_cli

    keys_cli.add_arguments(keys)

    drill = verbs.add_parser(
        "drill", help="run chaos drills (Chaos Toolkit files) on a live gateway, judged by SLOs"
    )
    from gateway.cli import drill as drill_cli

    drill_cli.add_arguments(drill)

    slo = verbs.add_parser("slo", help="service level objectives (the config's slos:)")
    slo_verbs = slo.add_subparsers(dest="slo_verb", required=True)
    slo_rules = slo_verbs.add_parser(
        "rules", help="write Prometheus recording rules and burn-rate alerts for the slos:"
    )
    slo_rules.add_argument("--config", help="YAML config file (default: the embedded default)")
    slo_rules.add_argument("-o", "--output", help="rule file to write (default: standard output)")
    slo_dashboards = slo_verbs.add_parser(
        "dashboards", help="write the Grafana dashboards (gateway, and the slos: overview)"
    )
    slo_dashboards.add_argument("--config", help="YAML config file (default: the embedded default)")
    slo_dashboards.add_argument("--out", required=True, help="folder to write the JSON files into")

    sim = verbs.add_parser("sim", help="run one simulated vLLM worker")
    from chaos import sim as sim_module

    sim_module.add_arguments(sim)

    args = parser.parse_args(argv)
    if args.verb == "sim":
        return sim_module.run(args)
    if args.verb == "check-config":
        return _check_config(args.file)
    if args.verb == "route":
        return _explain(args)
    if args.verb == "slo":
        from gateway.cli import slo as slo_cli

        if args.slo_verb == "dashboards":
            return slo_cli.write_dashboards(_load(args.config), args.out)
        return slo_cli.run(_load(args.config), args.output)
    if args.verb == "keys":
        return keys_cli.run(args)
    if args.verb == "drill":
        return drill_cli.run(args)
    if args.verb == "up":
        return _up(args)
    return _serve(args)


def _load(path: str | None) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"vgate: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_config(path: str | None) -> int:
    from gateway.runtime.gateway import Gateway

    config = _load(path)
    try:
        Gateway.from_config(config)  # keys file and credentials too; connects to nothing
    except ConfigError as exc:
        print(f"vgate: invalid configuration: {exc}", file=sys.stderr)
        return 2
    # Worth fixing, but the config works: still exit 0.
    for warning in (*config.warnings, *workers_warnings(config, config.server)):
        print(f"vgate: warning: {warning}", file=sys.stderr)
    models = ", ".join(route.name for route in config.models)
    print(f"{config.source}: ok ({len(config.models)} models: {models})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from gateway.cli.explain import explain

    config = _load(args.config)
    if args.log is None:
        return explain(config, sys.stdin, args.request_id, sys.stdout)
    try:
        with open(args.log, "rb") as log:
            return explain(config, log, args.request_id, sys.stdout)
    except OSError as exc:
        print(f"vgate: cannot read {args.log}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _server_settings(args: argparse.Namespace, config: GatewayConfig) -> ServerConfig:
    server = config.server
    overrides = {"host": args.host, "port": args.port, "workers": getattr(args, "workers", None)}
    if any(v is not None for v in overrides.values()):
        try:  # validated as the file's values are
            server = ServerConfig.model_validate(
                {**server.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            print(f"vgate: --{where}: {error['msg']}", file=sys.stderr)
            raise SystemExit(2) from None
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return server


def workers_warnings(config: GatewayConfig, server: ServerConfig) -> list[str]:
    """Several processes without Redis: each keeps its own limits, quotas and breakers."""
    if server.workers == 1 or config.redis.enabled:
        return []
    return [
        f"{config.source}: server.workers is {server.workers} but there is no redis: "
        f"each process keeps its own per-key rate limits, quotas and concurrency limits "
        f"(a key gets up to {server.workers}x its limits), its own circuit breakers and "
        f"its own memory cache; set redis.url, redis.sentinel or redis.cluster to share them"
    ]


def _log_warnings(config: GatewayConfig, server: ServerConfig | None = None) -> None:
    """What the configuration loads but may not do as it seems (after _server_settings,
    which starts the logging)."""
    for warning in (*config.warnings, *workers_warnings(config, server or config.server)):
        logging.getLogger("vgate.config").warning("%s", warning)


def _uvicorn_options(config: GatewayConfig, server: ServerConfig) -> dict[str, Any]:
    """uvicorn's settings, the same for `serve` and `up` (host, port and protocol aside: the
    protocol is the gateway's, `Gateway.connections`). The open-files limit is raised to fit
    `server.max_connections` and the upstream pools."""
    from gateway.edge.connections import connection_limits, raise_descriptor_limit

    upstream = sum(backend.max_connections for m in config.models for backend in m.backends)
    warning = raise_descriptor_limit(connection_limits(server), upstream)
    if warning is not None:
        logging.getLogger("vgate").warning("%s", warning)
    return {
        "ws": "none",
        "timeout_keep_alive": server.keep_alive_s,
        "lifespan": "on",
        "access_log": False,
        "proxy_headers": False,
        "log_level": "warning",
        "timeout_graceful_shutdown": int(server.graceful_shutdown_s),
        "server_header": False,
        "date_header": False,
    }


def _up(args: argparse.Namespace) -> int:
    from gateway.cli.up import up

    config = _load(args.config)
    server = _server_settings(args, config)
    _log_warnings(config)
    if server.workers > 1:  # its supervisor and its gateway share one process and loop
        logging.getLogger("vgate").warning(
            "server.workers is %d: `vgate up` serves in one process (run the workers' "
            "gateway with `vgate serve` for several)",
            server.workers,
        )
    return up(config, server, _uvicorn_options(config, server))


def reload_on_sighup(gateway: Gateway) -> None:
    """SIGHUP reloads the config (uvicorn handles only SIGINT and SIGTERM); where there is
    no SIGHUP, the file watcher and the admin call still do."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: gateway.request_reload("SIGHUP"))


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.runtime.app import create_app
    from gateway.runtime.drain import DrainingServer
    from gateway.runtime.gateway import Gateway

    config = _load(args.config)
    server = _server_settings(args, config)
    _log_warnings(config, server)
    if server.workers > 1:
        from gateway.runtime.workers import serve_workers

        options = _uvicorn_options(config, server)
        return serve_workers(config, server, options, balance=args.balance)
    try:
        gateway = Gateway.from_config(config)
    except ConfigError as exc:
        print(f"vgate: invalid configuration: {exc}", file=sys.stderr)
        return 2
    reload_on_sighup(gateway)
    uvicorn_config = uvicorn.Config(
        create_app(gateway),
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=gateway.connections.protocol_class(),
        **_uvicorn_options(config, server),
    )
    # SIGTERM: /ready 503 for server.drain_delay_s while serving, then uvicorn's drain.
    uvicorn_server = DrainingServer(
        uvicorn_config, gateway=gateway, drain_delay_s=server.drain_delay_s
    )
    try:
        uvicorn_server.run()
    except KeyboardInterrupt:  # a Ctrl-C before uvicorn's handlers were in place
        return 130
    return 0 if uvicorn_server.started else 3  # 3: uvicorn's start-up failure


if __name__ == "__main__":
    raise SystemExit(main())
