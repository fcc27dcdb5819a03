"""wrk as the non-streaming load generator: a Lua script for the POST, a `done()` hook for numbers.

The request is set once through `wrk.method/body/headers` (no per-request Lua, so wrk stays
on its fast path) and `done()` prints one JSON line with the counts, the errors and the
latency percentiles. Any error (connect, read, write, timeout, or a status of 400 and up)
is reported by the caller as a failed phase: a benchmark of 401s is worthless.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import BenchError, Processes, pinned

MARKER = "VGATE_WRK "

_DONE_HOOK = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,' ..
    '"mean_us":%.1f,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"max_us":%.0f}\\n',
    "MARKER", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
""".replace("MARKER", MARKER)


@dataclass(frozen=True)
class WrkResult:
    concurrency: int
    requests: int
    duration_s: float
    rps: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ensure_wrk() -> str:
    """The wrk binary; installed with apt-get when missing and this user can, else a clear error."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print("bench: wrk not found; installing it with apt-get", flush=True)
        for argv in (
            ["apt-get", "install", "-y", "wrk"],
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "wrk"],
        ):
            done = subprocess.run(argv, env=env, capture_output=True, timeout=300, check=False)
            if argv[1] == "install" and done.returncode == 0:
                break
        found = shutil.which("wrk")
        if found:
            return found
    raise BenchError(
        "wrk is not installed and could not be installed here; install it "
        "(Debian/Ubuntu: `sudo apt-get install -y wrk`, macOS: `brew install wrk`) and run again"
    )


def lua_script(body: bytes, headers: Mapping[str, str]) -> str:
    text = body.decode()
    if "]==]" in text:
        raise ValueError("request body cannot be quoted in Lua")
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{text}]==]"]
    for name, value in headers.items():
        lines.append(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}")
    return "\n".join(lines) + "\n" + _DONE_HOOK


def parse_output(stdout: str, concurrency: int) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            data = json.loads(line[len(MARKER) :])
            break
    else:
        raise BenchError(f"wrk printed no result line:\n{stdout[-2000:]}")
    duration_s = data["duration_us"] / 1e6
    requests = int(data["requests"])
    return WrkResult(
        concurrency=concurrency,
        requests=requests,
        duration_s=round(duration_s, 3),
        rps=round(requests / duration_s, 1) if duration_s > 0 else 0.0,
        mean_ms=round(data["mean_us"] / 1000, 3),
        p50_ms=round(data["p50_us"] / 1000, 3),
        p90_ms=round(data["p90_us"] / 1000, 3),
        p99_ms=round(data["p99_us"] / 1000, 3),
        max_ms=round(data["max_us"] / 1000, 3),
        errors={k: int(data[k]) for k in ("connect", "read", "write", "timeout", "status")},
    )


@dataclass
class Wrk:
    binary: str
    procs: Processes
    script_dir: Path
    core: int | None

    def run(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        concurrency: int,
        duration_s: float,
    ) -> WrkResult:
        script = self.script_dir / f"wrk-{abs(hash((url, body, tuple(headers.items()))))}.lua"
        script.write_text(lua_script(body, headers))
        argv = pinned(
            self.core,
            [
                self.binary,
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(duration_s))}s",
                "--timeout",
                "10s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
        )
        done = self.procs.run(argv, timeout_s=duration_s + 30)
        stdout = done.stdout.decode(errors="replace")
        if done.returncode != 0:
            raise BenchError(
                f"wrk failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}"
            )
        return parse_output(stdout, concurrency)
