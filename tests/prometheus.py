"""Debian's `prometheus` package for tests: promtool (rules, PromQL) and the server itself."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


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
