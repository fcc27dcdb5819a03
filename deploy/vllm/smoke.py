"""End-to-end smoke test: real CPU vLLM workers behind vgate, driven by the official openai SDK.

    .venv/bin/python deploy/vllm/smoke.py [--vllm-venv .venv-vllm] [--json FILE] [--keep]

Needs the gateway's venv (`make test` or `make run` makes it: openai, httpx, vgate) to run this
file, and the vLLM venv (deploy/vllm/install.sh) for the workers. It:

1. builds the tiny random Llama into a temporary folder (build_tiny_model.py);
2. starts two chat workers and one embeddings worker (run_worker.sh) on free loopback ports,
   each in its own process group, and waits for GET /health;
3. starts `vgate serve` on a generated config (routes tiny-llama -> both chat workers,
   tiny-embed -> the embeddings worker, ghost -> a chat worker under a name it doesn't serve);
4. checks, through the gateway: chat (plain, and streamed with usage), completions (plain and
   streamed), embeddings, a too-long prompt and a too-large max_tokens (400 from vLLM, passed
   through), an unknown model at the worker (404 from vLLM, passed through) and at the gateway
   (404), both chat workers used, and that a client disconnecting mid-stream aborts the request
   in vLLM (`vllm:num_requests_running` back to 0, fewer tokens generated than asked, no
   completion counted);
5. measures start-up, RSS and one 32-token request direct vs through the gateway;
6. stops everything it started (SIGTERM to each top process, SIGKILL to its process group after
   a grace period; also on SIGTERM or Ctrl-C), checks that no process of those groups is left,
   and exits 0 only if every check passed (1: a check failed, 2: something needed is missing).
   On failure it prints each process's log tail and keeps its temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KEY = "vg-demo-0123456789abcdef"
# The chat workers run with the model's whole context rather than run_worker.sh's 512, so that
# the disconnect check has seconds of decoding to interrupt even on a busy machine (at 512 a
# stalled client could not close before the ~1 s generation had finished).
MAX_MODEL_LEN = 2048
START_TIMEOUT_S = 300.0


class Failed(Exception):
    pass


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open while choosing, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def rss_of_group(pgid: int) -> int:
    """Bytes of resident memory of every process in a process group (shared pages counted
    once per process, as `ps` does)."""
    total = 0
    for pid in pids_of_group(pgid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def pids_of_group(pgid: int, zombies: bool = False) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and (zombies or fields[0] != "Z"):
            pids.append(int(entry.name))
    return pids


class Proc:
    """One process started in its own process group, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,
                # A new process group (for killpg) in the same session: a new session would
                # also be a new scheduler autogroup: see README.md, "1-second stalls".
                process_group=0,
            )
        self.pgid = self.popen.pid
        self.started = time.monotonic()
        self.ready_s: float | None = None
        self.stop_s: float | None = None
        self.term_at = 0.0

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGTERM the process: vLLM's API server then stops its engine, which stops its
        workers, in order (the whole group at once would orphan the workers for a moment)."""
        self.term_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGTERM)

    def running(self) -> bool:
        if self.stop_s is None and not pids_of_group(self.pgid):
            self.stop_s = time.monotonic() - self.term_at
        return self.stop_s is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)


def stop_all(procs: list[Proc], grace_s: float = 20.0) -> list[str]:
    """SIGTERM every process, SIGKILL the groups of those still running after grace_s; one line
    for each process group with anything left in it (zombies included) after that."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    while any(p.running() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in procs:
        if proc.running():
            proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)
    # A child whose parent exited first is a zombie until init reaps it: give it a moment.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pids_of_group(p.pgid, True) for p in procs):
        time.sleep(0.2)
    return [
        f"{p.name}: pids {left} still there after SIGKILL"
        for p in procs
        if (left := pids_of_group(p.pgid, zombies=True))
    ]


def wait_all_ok(
    urls: dict[Proc, str],
    timeout_s: float = START_TIMEOUT_S,
    ok: Callable[[Any], bool] | None = None,
) -> None:
    """Poll each process's URL until it answers 200 (and `ok`), recording its ready time."""
    import httpx

    pending = dict(urls)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for proc, url in list(pending.items()):
            if proc.popen.poll() is not None:
                raise Failed(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            try:
                r = httpx.get(url, timeout=2.0)
            except httpx.HTTPError:
                continue
            if r.status_code == 200 and (ok is None or ok(r)):
                proc.ready_s = time.monotonic() - proc.started
                del pending[proc]
        time.sleep(0.25)
    if pending:
        proc, url = next(iter(pending.items()))
        raise Failed(f"{proc.name}: {url} not ready after {timeout_s:.0f}s:\n{proc.tail()}")


def server_timing(header: str, name: str) -> list[float]:
    """The `dur` of the `name` metric in a Server-Timing header, as a 0- or 1-item list."""
    for metric in header.split(","):
        parts = [p.strip() for p in metric.split(";")]
        if parts[0] == name:
            for p in parts[1:]:
                if p.startswith("dur="):
                    return [float(p[4:])]
    return []


def scrape(base: str) -> dict[str, float]:
    """vLLM's /metrics, summed by metric name and (for request_success_total) finished_reason."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=5.0).text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name == "vllm:request_success_total":
            reason = name_labels.split('finished_reason="', 1)[1].split('"', 1)[0]
            name = f"{name}:{reason}"
        out[name] = out.get(name, 0.0) + float(value)
    return out


class Smoke:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.vllm_py = Path(args.vllm_venv) / "bin" / "python"
        self.vgate = Path(sys.executable).parent / "vgate"
        self.procs: list[Proc] = []
        self.passed: list[str] = []
        self.failed: list[str] = []
        self.figures: dict[str, Any] = {}

    # -- set-up ---------------------------------------------------------------------------

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        env = {**os.environ, **(extra_env or {})}
        env.pop("VIRTUAL_ENV", None)
        proc = Proc(name, argv, self.tmp, env)
        self.procs.append(proc)
        return proc

    def setup(self) -> None:
        t = time.monotonic()
        model = self.tmp / "tiny-llama"
        subprocess.run(
            [str(self.vllm_py), str(HERE / "build_tiny_model.py"), str(model)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.figures["model_build_s"] = round(time.monotonic() - t, 1)

        self.ports = dict(zip(("w1", "w2", "e1", "gw"), free_ports(4), strict=True))
        worker_env = {"VLLM_VENV": str(Path(self.args.vllm_venv).resolve())}
        run = str(HERE / "run_worker.sh")
        chat = [str(model), "--", "--max-model-len", str(MAX_MODEL_LEN)]
        workers = [
            self.start("w1", [run, "chat", str(self.ports["w1"]), *chat], worker_env),
            self.start("w2", [run, "chat", str(self.ports["w2"]), *chat], worker_env),
            self.start("e1", [run, "embed", str(self.ports["e1"])], worker_env),
        ]
        wait_all_ok({w: f"http://127.0.0.1:{self.ports[w.name]}/health" for w in workers})
        for w in workers:
            print(f"  {w.name} ready in {w.ready_s:.1f}s (port {self.ports[w.name]})")
        self.figures["worker_ready_s"] = {w.name: round(w.ready_s or 0, 1) for w in workers}
        self.figures["worker_rss_mb"] = {w.name: rss_of_group(w.pgid) >> 20 for w in workers}

        config = self.tmp / "gateway.yaml"
        url = "http://127.0.0.1:{}".format
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "server": {"host": "127.0.0.1", "port": self.ports["gw"]},
                    "keys": {"file": str(ROOT / "config" / "keys.yaml")},
                    "models": [
                        {
                            "name": "tiny-llama",
                            "aliases": ["default"],
                            "timeouts": {"first_token_s": 60, "idle_s": 30, "total_s": 120},
                            "backends": [
                                {"name": "w1", "provider": "vllm", "url": url(self.ports["w1"])},
                                {"name": "w2", "provider": "vllm", "url": url(self.ports["w2"])},
                            ],
                        },
                        {
                            "name": "tiny-embed",
                            "backends": [
                                {"name": "e1", "provider": "vllm", "url": url(self.ports["e1"])}
                            ],
                        },
                        {
                            "name": "ghost",
                            "backends": [
                                {
                                    "name": "w1-ghost",
                                    "provider": "vllm",
                                    "url": url(self.ports["w1"]),
                                    "model": "no-such-model",
                                }
                            ],
                        },
                    ],
                },
                indent=1,
            )
        )
        gw = self.start("gateway", [str(self.vgate), "serve", "--config", str(config)])
        wait_all_ok(
            {gw: f"http://127.0.0.1:{self.ports['gw']}/ready"},
            30,
            ok=lambda r: all(not m["down"] for m in r.json().get("models", {}).values()),
        )
        self.figures["gateway_ready_s"] = round(gw.ready_s or 0, 2)
        self.figures["gateway_rss_mb"] = rss_of_group(gw.pgid) >> 20

    # -- checks ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        except Exception as e:  # a failed check is reported, and the others still run
            self.failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}")
        else:
            self.passed.append(name)
            print(f"ok   {name} ({time.monotonic() - t:.2f}s)")

    def run_checks(self) -> None:
        import openai

        gw = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.ports['gw']}/v1", api_key=KEY, max_retries=0
        )
        msgs: Any = [{"role": "user", "content": "def fib(n): return"}]
        n = 32
        # The random model may draw <|im_end|> at any step: ignore_eos makes counts exact.
        exact = {"ignore_eos": True}

        with self.check("chat, not streamed, usage counted"):
            raw = gw.chat.completions.with_raw_response.create(
                model="tiny-llama", messages=msgs, max_tokens=n, extra_body=exact
            )
            r = raw.parse()
            assert r.usage is not None and r.usage.prompt_tokens > 0, r.usage
            assert r.usage.completion_tokens == n, r.usage
            assert r.choices[0].finish_reason == "length", r.choices[0].finish_reason
            assert isinstance(r.choices[0].message.content, str)
            assert raw.headers.get("x-request-id"), dict(raw.headers)

        with self.check("chat, streamed, usage in the last chunk"):
            chunks = list(
                gw.chat.completions.create(
                    model="default",
                    messages=msgs,
                    max_tokens=n,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=exact,
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            last = chunks[-1]
            assert last.usage is not None and last.usage.completion_tokens == n, last.usage
            assert not last.choices, last
            assert all(c.usage is None for c in chunks[:-1])
            assert text, "no text streamed"
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
            assert reasons[-1] == "length", reasons
            self.figures["stream_chunks_for_32_tokens"] = len(chunks)

        with self.check("completions, plain and streamed"):
            c = gw.completions.create(
                model="tiny-llama", prompt="import os\n", max_tokens=8, extra_body=exact
            )
            assert c.usage is not None and c.usage.completion_tokens == 8, c.usage
            assert isinstance(c.choices[0].text, str)
            parts = list(
                gw.completions.create(
                    model="tiny-llama",
                    prompt="import os\n",
                    max_tokens=8,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=exact,
                )
            )
            assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 8

        with self.check("embeddings, 384 dims, normalised"):
            e = gw.embeddings.create(model="tiny-embed", input=["hello world", "bonjour"])
            assert len(e.data) == 2, len(e.data)
            vec = e.data[0].embedding
            assert len(vec) == 384, len(vec)
            norm = sum(x * x for x in vec) ** 0.5
            assert abs(norm - 1.0) < 1e-3, norm
            assert e.usage.prompt_tokens > 0, e.usage

        with self.check("too-long prompt: 400 from vLLM passed through"):
            try:
                prompt = "x " * (2 * MAX_MODEL_LEN)  # " x" is one token
                gw.completions.create(model="tiny-llama", prompt=prompt, max_tokens=4)
            except openai.BadRequestError as err:
                assert err.status_code == 400
                assert "maximum context length" in str(err.message), err.message
            else:
                raise Failed(f"a {2 * MAX_MODEL_LEN}-token prompt was accepted")

        with self.check("max_tokens over the model length: 400 passed through"):
            try:
                gw.chat.completions.create(
                    model="tiny-llama", messages=msgs, max_tokens=MAX_MODEL_LEN + 1
                )
            except openai.BadRequestError as err:
                assert err.status_code == 400
            else:
                raise Failed("max_tokens > max-model-len was accepted")

        with self.check("unknown model at the worker: 404 passed through"):
            try:
                gw.chat.completions.create(model="ghost", messages=msgs, max_tokens=4)
            except openai.NotFoundError as err:
                assert "no-such-model" in str(err.message), err.message
            else:
                raise Failed("a model the worker does not serve answered")

        with self.check("unknown model at the gateway: 404"):
            try:
                gw.chat.completions.create(model="no-such-route", messages=msgs, max_tokens=4)
            except openai.NotFoundError:
                pass
            else:
                raise Failed("an unconfigured model answered")

        with self.check("client disconnect mid-stream aborts the vLLM request"):
            self.disconnect(gw, msgs)

        with self.check("latency: 32 tokens direct vs through the gateway; both workers used"):
            self.latency(gw, msgs, n)

    def disconnect(self, gw: Any, msgs: Any) -> None:
        """Close a stream after its first token; vLLM must abort the request.

        Timing-proof evidence, read from the workers' /metrics (on a busy 2-core machine a
        scrape can take longer than the whole generation, so "running == 1 mid-stream" is not
        something to assert): afterwards no request is running, fewer tokens were generated
        than asked for, and no request finished by length (ignore_eos: the only other way to end).
        """
        bases = [f"http://127.0.0.1:{self.ports[w]}" for w in ("w1", "w2")]

        def total(prefix: str) -> float:
            return sum(v for b in bases for k, v in scrape(b).items() if k.startswith(prefix))

        asked = MAX_MODEL_LEN - 64  # about 5 s of decoding here: far longer than the check needs
        generated_before = total("vllm:generation_tokens_total")
        # With ignore_eos the only way for it to finish is by length.
        finished_before = total("vllm:request_success_total:length")
        stream = gw.chat.completions.create(
            model="tiny-llama",
            messages=msgs,
            max_tokens=asked,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # decoding has started
        t = time.monotonic()
        stream.close()
        while time.monotonic() - t < 10 and total("vllm:num_requests_running") > 0:
            time.sleep(0.05)
        back_to_zero_s = time.monotonic() - t
        assert total("vllm:num_requests_running") == 0, "a request still runs 10 s later"
        # Had it not been aborted it would still be running (checked above) or have finished.
        time.sleep(0.5)
        generated = total("vllm:generation_tokens_total") - generated_before
        finished = total("vllm:request_success_total:length") - finished_before
        assert finished == 0, "the request ran to completion: it was not aborted"
        assert 0 < generated < asked, f"{generated} tokens generated of {asked} asked"
        self.figures["disconnect"] = {
            "running_to_zero_s": round(back_to_zero_s, 2),
            "tokens_generated": int(generated),
            "tokens_asked": asked,
        }

    def latency(self, gw: Any, msgs: Any, n: int) -> None:
        import openai

        direct = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.ports['w1']}/v1", api_key="none", max_retries=0
        )
        body: dict[str, Any] = {
            "model": "tiny-llama",
            "messages": msgs,
            "max_tokens": n,
            "extra_body": {"ignore_eos": True},
        }
        times: dict[str, list[float]] = {"direct_w1": [], "gateway": []}
        backends: set[str] = set()
        own: list[float] = []  # the gateway's own time, from its Server-Timing header
        for _ in range(2):  # warm both paths
            direct.chat.completions.create(**body)
            gw.chat.completions.create(**body)
        for _ in range(self.args.latency_rounds):
            t = time.perf_counter()
            direct.chat.completions.create(**body)
            times["direct_w1"].append(time.perf_counter() - t)
            t = time.perf_counter()
            raw = gw.chat.completions.with_raw_response.create(**body)
            times["gateway"].append(time.perf_counter() - t)
            backends.add(raw.headers.get("x-vgate-backend", "?"))
            own.extend(server_timing(raw.headers.get("server-timing", ""), "gateway"))
        self.figures["latency_32_tokens_ms"] = {
            k: {
                "median": round(statistics.median(v) * 1000, 1),
                "min": round(min(v) * 1000, 1),
                "max": round(max(v) * 1000, 1),
                "n": len(v),
                "samples": [round(x * 1000) for x in v],
            }
            for k, v in times.items()
        }
        if own:
            self.figures["gateway_own_ms_median"] = round(statistics.median(own), 2)
        assert backends == {"w1", "w2"}, f"backends used: {backends}"

    # -- teardown -------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        leftovers = stop_all(self.procs)
        self.figures["stop_s"] = {p.name: round(p.stop_s or -1, 1) for p in self.procs}
        return leftovers

    def main(self) -> int:
        if not self.vllm_py.is_file():
            print(f"smoke: no vLLM venv at {self.args.vllm_venv}: run deploy/vllm/install.sh")
            return 2
        if not self.vgate.is_file():
            print(f"smoke: no vgate beside {sys.executable}: run this with .venv/bin/python")
            return 2
        self.tmp = Path(tempfile.mkdtemp(prefix="vgate-vllm-smoke-"))
        t0 = time.monotonic()
        try:
            self.setup()
            self.run_checks()
        except (Failed, subprocess.CalledProcessError) as e:
            self.failed.append(f"setup: {e}")
            print(f"FAIL setup: {e}")
        except (KeyboardInterrupt, SystemExit):
            self.failed.append("interrupted")
            print("FAIL interrupted: stopping everything", flush=True)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the teardown is not interrupted
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if self.failed:
                for proc in self.procs:
                    print(f"--- {proc.name} log tail ({proc.log}) ---\n{proc.tail(15)}")
            leftovers = self.teardown()
            for line in leftovers:
                print(f"FAIL teardown: {line}")
            self.failed.extend(leftovers)
            if not self.args.keep and not self.failed:
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                print(f"logs and config kept in {self.tmp}")
        self.figures["total_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps(self.figures))
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.figures, indent=1) + "\n")
        print(f"{len(self.passed)} passed, {len(self.failed)} failed")
        return 1 if self.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"))
    parser.add_argument("--json", help="write the measured figures to this file")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (logs) on success too"
    )
    parser.add_argument("--latency-rounds", type=int, default=20)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    smoke = Smoke(args)
    # SIGTERM (like Ctrl-C) interrupts: everything started is stopped, and the exit code is 1.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return smoke.main()


if __name__ == "__main__":
    sys.exit(main())
