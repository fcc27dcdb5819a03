"""Debian's `prometheus` package for tests: promtool (rules, PromQL) and the server itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.servers import free_port


def installed(binary: str) -> str:
    """`binary` (promtool or prometheus); installed with apt-get (Debian's `prometheus`) when
    missing and this user can, as bench/wrk.py does for wrk; else the calling test is
    skipped."""
    found = shutil.which(binary)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
        ):
            done = subprocess.run(argv, env=env, capture_output=True, timeout=600, check=False)
            if argv[1] == "install" and done.returncode == 0:
                break
        found = shutil.which(binary)
    if found is None:
        pytest.skip(f"{binary} is not installed and could not be installed with apt-get")
    return found


class Prometheus:
    """A real Prometheus scraping `target` (host:port) every `interval`, evaluating `rules`
    as often, with exemplar storage on."""

    def __init__(
        self, binary: str, workdir: Path, target: str, rules: Path, *, interval: str = "1s"
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": "vgate", "static_configs": [{"targets": [target]}]},
            ],
        }
        config_path = workdir / "prometheus.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.popen = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--enable-feature=exemplar-storage",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("wb"),
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"prometheus not ready after {timeout_s}s")

    def get(self, path: str, **params: str) -> Any:
        response = httpx.get(self.url + path, params=params, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
