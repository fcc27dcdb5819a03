"""`make run` as a user runs it: two simulated workers and the gateway on the ports asked for,
the demo key printed, the OpenAI SDK served, and Ctrl-C (SIGINT to the terminal's process
group) stopping everything it started."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.servers import DEMO_KEY, REPO, free_port, poll_until

pytestmark = [
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc"),
]

READY_S = 60.0  # the workers (at most 20 s, by the Makefile) and then the gateway
EXIT_S = 15.0  # Ctrl-C to make's exit


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (index 0 is field 3), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the name, in (), may hold spaces


def _session(sid: int) -> dict[int, str]:
    """The processes of session `sid` (field 6): pid -> start time (field 22, against reuse)."""
    members: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[3]) == sid:
            members[int(entry.name)] = fields[19]
    return members


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def _alive(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] not in ("Z", "X")


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def _served(worker_ports: list[int], model: str) -> float:
    """Requests the workers on `worker_ports` finished for `model`, by their own /metrics."""
    total = 0.0
    for port in worker_ports:
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text.splitlines():
            if line.startswith("vllm:request_success_total{") and f'model_name="{model}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_make_run_serves_on_the_ports_asked_for_and_ctrl_c_stops_everything(
    tmp_path: Path,
) -> None:
    port, *worker_ports = _distinct_free_ports(3)
    stdout_path, stderr_path = tmp_path / "make-run.out", tmp_path / "make-run.err"
    # A make above this one (make test) or a VGATE_* override in the environment must not
    # change what `make run` does here.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("VGATE_") and name not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    }
    env["PYTHONUNBUFFERED"] = "1"
    command = ["make", "run", f"PORT={port}", f"WORKER_PORTS={worker_ports[0]} {worker_ports[1]}"]
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        # Its own session, hence its own process group: a terminal's foreground job.
        make = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=err, env=env, start_new_session=True
        )
    members: dict[int, str] = {}

    def output() -> str:
        return (
            f"--- stdout\n{stdout_path.read_text(errors='replace')[-4000:]}"
            f"\n--- stderr\n{stderr_path.read_text(errors='replace')[-4000:]}"
        )

    try:
        url = f"http://127.0.0.1:{port}"
        last: list[object] = ["no answer"]

        def ready() -> dict[str, Any] | None:
            if make.poll() is not None:
                pytest.fail(f"make run exited with {make.returncode}\n{output()}")
            try:
                response = httpx.get(url + "/ready", timeout=1.0)
            except httpx.TransportError as exc:
                last[0] = exc
                return None
            body: dict[str, Any] = response.json()
            last[0] = body
            down = [m["down"] for m in body.get("models", {}).values()]
            return body if response.status_code == 200 and not any(down) else None

        try:
            body = poll_until(ready, timeout_s=READY_S, interval_s=0.1)
        except AssertionError:
            raise AssertionError(f"not ready in {READY_S}s: {last[0]!r}\n{output()}") from None
        assert body["status"] == "ready"
        assert body["models"]["tiny-llama"]["live"] == ["w1", "w2"]
        assert body["models"]["tiny-embed"]["live"] == ["w1-embed", "w2-embed"]

        printed = stdout_path.read_text()
        assert f"vgate on http://127.0.0.1:{port}  (demo key: {DEMO_KEY})" in printed, output()
        assert f"curl -s localhost:{port}/v1/chat/completions" in printed, output()
        assert f"Bearer {DEMO_KEY}" in printed, output()

        client = openai.OpenAI(base_url=url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=10)
        messages: Any = [{"role": "user", "content": "hi"}]
        reply = client.chat.completions.create(model="default", messages=messages)
        assert reply.choices[0].message.content
        stream = client.chat.completions.create(model="default", messages=messages, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text
        embeddings = client.embeddings.create(model="tiny-embed", input="hi")
        assert embeddings.data[0].embedding
        # Served by the workers on the ports asked for, not by whatever listens on the defaults.
        assert _served(worker_ports, "tiny-llama") >= 2
        assert _served(worker_ports, "tiny-embed") >= 1

        members = _session(make.pid)
        # `vgate` runs as `python .venv/bin/vgate VERB ...`: two workers, one gateway.
        argvs = [_argv(pid) for pid in members]
        verbs = [argv[2:] for argv in argvs if len(argv) > 2 and argv[1].endswith("/vgate")]
        sims = sorted(int(verb[2]) for verb in verbs if verb[:2] == ["sim", "--port"])
        assert sims == sorted(worker_ports), argvs
        assert verbs.count(["serve"]) == 1, argvs
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C does: to the whole foreground group
        try:
            make.wait(EXIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"make run still running {EXIT_S}s after Ctrl-C\n{output()}"
            ) from None
        left = {pid: _argv(pid) for pid, started in members.items() if _alive(pid, started)}
        assert not left, f"still running after make exited: {left}\n{output()}"
        assert not _session(make.pid), output()
        for each in (port, *worker_ports):
            assert _refused(each), f"port {each} still accepts connections\n{output()}"
    finally:
        _kill_session(make)


def _kill_session(make: subprocess.Popen[bytes]) -> None:
    """Whatever of `make run` is left, after a failure: its process group, then anything of
    its session that left the group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(make.pid, signal.SIGKILL)
    for pid in _session(make.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if make.poll() is None:
        make.wait(5)
