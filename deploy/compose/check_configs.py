"""Check every vgate config that deploy/compose.yaml runs, as the containers would load it.

    python deploy/compose/check_configs.py RENDERED.json VGATE [DOCKERFILE]

RENDERED.json is `docker compose -f deploy/compose.yaml --profile ... config --format json`
(compose has resolved interpolation, anchors and the bind mounts' absolute sources); VGATE is
the `vgate` executable. For each service built from the Dockerfile's `gateway` target: the
bind mounts are copied into a scratch root at their container paths (so a config's relative
paths resolve as in the container), and `vgate check-config` runs on the `--config` the
service's command names, or on the embedded default without one, with exactly the VGATE_
environment the container gets (the image's ENV, then the service's `environment`). Exits 1
naming the service when a config fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

GATEWAY_TARGET = "gateway"
ENV_PREFIX = "VGATE_"
DEFAULT_COMMAND = ["serve"]  # the gateway image's CMD


def image_env(dockerfile: Path) -> dict[str, str]:
    """The VGATE_ variables the Dockerfile's ENV instructions set (the gateway stage's)."""
    found = re.findall(r"\b(VGATE_\w+)=(\S+)", dockerfile.read_text())
    return {name: value.rstrip("\\").strip() for name, value in found}


def config_argument(command: list[str]) -> str | None:
    """The container path after `--config` (or `--config=`), None for the embedded config."""
    for index, argument in enumerate(command):
        if argument == "--config" and index + 1 < len(command):
            return command[index + 1]
        if argument.startswith("--config="):
            return argument.split("=", 1)[1]
    return None


def lay_out_mounts(service: dict[str, Any], root: Path) -> None:
    """Copy the service's bind mounts under `root` at their container paths."""
    for volume in service.get("volumes") or []:
        if volume.get("type") != "bind":
            continue
        source = Path(volume["source"])
        target = root / volume["target"].lstrip("/")
        if not source.exists():
            raise SystemExit(f"bind mount source {source} does not exist")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)


def check_service(name: str, service: dict[str, Any], vgate: str, base_env: dict[str, str]) -> bool:
    environment = {key: str(value) for key, value in (service.get("environment") or {}).items()}
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env.update(base_env)
    env.update({key: value for key, value in environment.items() if key.startswith(ENV_PREFIX)})
    with tempfile.TemporaryDirectory(prefix=f"vgate-compose-{name}-") as scratch:
        root = Path(scratch)
        lay_out_mounts(service, root)
        container_path = config_argument(service.get("command") or DEFAULT_COMMAND)
        argv = [vgate, "check-config"]
        if container_path is not None:
            argv.append(str(root / container_path.lstrip("/")))
        shown = " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith(ENV_PREFIX))
        print(f"{name}: vgate check-config {container_path or '(embedded)'}  [{shown}]")
        done = subprocess.run(argv, env=env, check=False)
        return done.returncode == 0


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    rendered = json.loads(Path(argv[1]).read_text())
    vgate = argv[2]
    dockerfile = Path(argv[3] if len(argv) == 4 else "deploy/docker/Dockerfile")
    base_env = image_env(dockerfile)
    gateways = {
        name: service
        for name, service in rendered["services"].items()
        if (service.get("build") or {}).get("target") == GATEWAY_TARGET
    }
    if not gateways:
        print("no service is built from the gateway target", file=sys.stderr)
        return 1
    failed = [
        name
        for name, service in sorted(gateways.items())
        if not check_service(name, service, vgate, base_env)
    ]
    if failed:
        print(f"invalid gateway config in service(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
