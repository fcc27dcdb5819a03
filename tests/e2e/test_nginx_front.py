"""deploy/nginx/nginx.conf in front of two real gateway replicas: a real nginx (Debian's),
TLS with a certificate made here, the official OpenAI SDK as the client.

The config is used as shipped, only its ports and files moved (`render`): a line the template
expects and no longer finds fails the test, naming it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.conftest import new_request_id, wait_for_line
from tests.servers import (
    DEMO_KEY,
    REPO,
    Gateway,
    Process,
    backend,
    free_port,
    gateway_config,
    poll_until,
    sim_gauge,
    spawn,
    start_gateway,
    start_sim,
)

CONF = REPO / "deploy" / "nginx" / "nginx.conf"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about the sea"}]
SLOW_TOKENS_PER_S = 20  # the slow worker's pace: a 40-token stream takes 2 s


def nginx_binary() -> str:
    """nginx's path; installed from Debian's package where it is missing and we may (root
    with apt-get, as `make redis-server` does for Redis), else the tests skip, saying why."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("nginx is not installed and cannot be here (needs root and apt-get)")
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "nginx"]):
        done = subprocess.run(command, capture_output=True, timeout=600, check=False)
        if done.returncode != 0:
            pytest.skip(f"nginx cannot be installed: {' '.join(command)}: {done.stderr[-500:]!r}")
    found = shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/bin")
    if not found:
        pytest.skip("apt-get installed nginx, but no nginx binary is on the path")
    return found


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key: the TLS the test trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "vgate.crt", folder / "vgate.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def render(conf: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        count = conf.count(old)
        assert count == 1, f"{CONF} has {old!r} {count} times, the test's template expects once"
        conf = conf.replace(old, new)
    return conf


@dataclass
class Front:
    https_url: str
    http_url: str
    cert: Path
    replicas: list[Gateway]
    slow: Process  # the slow worker, serving slow-llama
    nginx: subprocess.Popen[bytes]
    folder: Path

    def client(self, **options: object) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.https_url + "/v1",
            api_key=DEMO_KEY,
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=self.tls(), timeout=30),
            **options,  # type: ignore[arg-type]
        )

    def tls(self) -> ssl.SSLContext:
        return trust(self.cert)

    def log(self) -> str:
        return (self.folder / "error.log").read_text(errors="replace")


def trust(cert: Path) -> ssl.SSLContext:
    """A client's TLS that trusts the test's certificate (and only it)."""
    return ssl.create_default_context(cafile=str(cert))


def start_nginx(
    binary: str, folder: Path, replica_ports: list[int], cert: Path, key: Path
) -> tuple[subprocess.Popen[bytes], str, str]:
    """nginx on deploy/nginx/nginx.conf, its ports free ones, its files in `folder`, in
    front of the replicas: the process, its https and http URLs."""
    https_port, http_port = free_port(), free_port()
    d = folder
    temp_paths = " ".join(
        f"{kind}_temp_path {d}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = render(
        CONF.read_text(),
        [
            # As root, nginx's workers run as nobody; as anyone else, as themselves.
            ("user www-data;\n", ""),
            ("pid /run/nginx.pid;", f"pid {d}/nginx.pid;"),
            ("error_log /var/log/nginx/error.log warn;", f"error_log {d}/error.log info;"),
            (
                "access_log /var/log/nginx/vgate.access.log;",
                f"access_log {d}/access.log; {temp_paths}",
            ),
            (
                "server 127.0.0.1:8000 max_fails=1 fail_timeout=5s;",
                f"server 127.0.0.1:{replica_ports[0]} max_fails=1 fail_timeout=5s;",
            ),
            (
                "server 127.0.0.1:8001 max_fails=1 fail_timeout=5s;",
                f"server 127.0.0.1:{replica_ports[1]} max_fails=1 fail_timeout=5s;",
            ),
            ("listen 80;", f"listen 127.0.0.1:{http_port};"),
            ("listen [::]:80;", ""),
            ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
            ("listen [::]:443 ssl http2;", ""),
            ("ssl_certificate /etc/nginx/tls/vgate.crt;", f"ssl_certificate {cert};"),
            ("ssl_certificate_key /etc/nginx/tls/vgate.key;", f"ssl_certificate_key {key};"),
        ],
    )
    conf_path = folder / "nginx.conf"
    conf_path.write_text(conf)
    command = [binary, "-p", str(folder), "-c", str(conf_path)]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    with (folder / "nginx.out").open("wb") as out:
        popen = subprocess.Popen(
            [*command, "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT
        )
    return popen, f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}"


@contextmanager
def running_front(logs: Path, folder: Path, **server: object) -> Iterator[Front]:
    """Two workers (fast, and slow: slow-llama), two gateway replicas with `server` settings,
    nginx on the shipped config in front of them; all stopped after."""
    binary = nginx_binary()
    folder.chmod(0o755)  # nobody (the workers, under root) reads nothing here but may pass
    cert, key = self_signed(folder)
    fast = start_sim(logs)
    slow = start_sim(logs, models=["slow-llama"], tokens_per_s=SLOW_TOKENS_PER_S)
    started: list[Process] = [fast, slow]
    nginx: subprocess.Popen[bytes] | None = None
    front: Front | None = None
    try:
        models = [
            {"name": "tiny-llama", "backends": [backend("fast", fast.url)]},
            {"name": "tiny-embed", "backends": [backend("fast-embed", fast.url)]},
            {"name": "slow-llama", "backends": [backend("slow", slow.url)]},
        ]
        replicas = [start_gateway(logs, gateway_config(models, **server)) for _ in range(2)]
        started += replicas
        ports = [int(r.url.rsplit(":", 1)[1]) for r in replicas]
        nginx, https_url, http_url = start_nginx(binary, folder, ports, cert, key)
        front = Front(https_url, http_url, cert, replicas, slow, nginx, folder)

        def serving() -> bool:
            assert nginx is not None and nginx.poll() is None, (folder / "nginx.out").read_text()
            try:
                return httpx.get(https_url + "/health", verify=trust(cert), timeout=2).is_success
            except httpx.TransportError:
                return False

        poll_until(serving, timeout_s=30)
        yield front
    finally:
        if nginx is not None and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait(5)
        for process in reversed(started):
            process.stop()
        if front is not None:  # the replicas in place now (a test may have replaced them)
            for replica in front.replicas:
                replica.stop()


@pytest.fixture(scope="module")
def front(logs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    with running_front(logs, tmp_path_factory.mktemp("nginx"), drain_delay_s=0) as front:
        yield front


def test_sdk_stream_through_nginx_arrives_in_pieces(front: Front) -> None:
    client = front.client()
    stream = client.chat.completions.create(
        model="slow-llama",
        messages=MESSAGES,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    # The worker is still generating (40 tokens at 20/s): nginx passed the first chunk on
    # before the last was made, rather than buffering the answer.
    assert first.choices[0].delta.role == "assistant"
    assert sim_gauge(front.slow.url, "vllm:num_requests_running") == 1
    rest = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
    assert len(text.split()) == 40
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in rest)
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 40
    assert sim_gauge(front.slow.url, "vllm:num_requests_running") == 0


def test_sdk_through_nginx_models_chat_and_embeddings(front: Front) -> None:
    client = front.client()
    assert {m.id for m in client.models.list()} >= {"tiny-llama", "tiny-embed", "slow-llama"}
    request_id = new_request_id()
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama",
        messages=MESSAGES,
        max_tokens=5,
        extra_headers={"X-Request-ID": request_id},
    )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    # The request id passes through both ways; the gateway's headers reach the client.
    assert raw.headers["x-request-id"] == request_id
    assert raw.headers["x-vgate-backend"] == "fast"
    answered_by = [
        r
        for r in front.replicas
        if any(line.get("request_id") == request_id for line in r.access_log())
    ]
    assert len(answered_by) == 1
    entry = wait_for_line(answered_by[0], request_id)
    assert entry["status"] == 200 and entry["completion_tokens"] == 5
    vectors = client.embeddings.create(model="tiny-embed", input=["a cat", "a dog"])
    assert len(vectors.data) == 2


def test_both_replicas_serve(front: Front) -> None:
    """least_conn over the two replicas: concurrent streams land on both."""
    client = front.client()
    streams = [
        client.chat.completions.create(
            model="slow-llama",
            messages=MESSAGES,
            max_tokens=10,
            stream=True,
            extra_headers={"X-Request-ID": new_request_id()},
        )
        for _ in range(4)
    ]
    for stream in streams:
        assert len(list(stream)) > 1
    served = [
        sum(1 for line in r.access_log() if line.get("model") == "slow-llama")
        for r in front.replicas
    ]
    assert all(count >= 1 for count in served), served


def test_sdk_errors_through_nginx_are_the_gateways(front: Front) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(
            base_url=front.https_url + "/v1",
            api_key="vg-wrong",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=front.tls()),
        ).models.list()
    assert refused.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as missing:
        front.client().chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.code == "model_not_found"


def test_nginx_own_refusals_are_openai_errors(front: Front) -> None:
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    with httpx.Client(base_url=front.https_url, verify=front.tls(), headers=headers) as http:
        # A body over client_max_body_size (the gateway's max_body_bytes, 4 MiB).
        too_large = http.post(
            "/v1/chat/completions",
            content=b"x" * (4 * 1024 * 1024 + 1),
            headers={"Content-Type": "application/json"},
        )
        assert too_large.status_code == 413
        assert too_large.headers["content-type"] == "application/json"
        assert too_large.json()["error"]["code"] == "request_too_large"
        # A header line over large_client_header_buffers (the gateway's whole head: 32 KiB).
        long_header = http.get("/v1/models", headers={"X-Padding": "a" * 40_000})
        assert long_header.status_code == 431
        assert long_header.json()["error"]["code"] == "request_header_fields_too_large"


def test_gateway_head_limit_holds_behind_nginx(front: Front) -> None:
    """Lines each within nginx's limit, 40 KiB in all: the gateway's own 431 (its head limit
    is for the request line and headers together), on nginx's kept-alive connections too."""
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    many = {f"X-Pad-{n}": "b" * 8000 for n in range(5)}
    with httpx.Client(base_url=front.https_url, verify=front.tls(), headers=headers) as http:
        for _ in range(4):  # whichever replica, over a new or a kept upstream connection
            refused = http.get("/v1/models", headers=many)
            assert refused.status_code == 431
            assert refused.json()["error"]["code"] == "request_header_fields_too_large"


def test_plain_http_is_redirected_to_https(front: Front) -> None:
    response = httpx.get(front.http_url + "/v1/models?x=1", follow_redirects=False)
    assert response.status_code == 308
    assert response.headers["location"].startswith("https://")
    assert response.headers["location"].endswith("/v1/models?x=1")


def test_rolling_update_behind_nginx_loses_nothing(logs: Path, tmp_path: Path) -> None:
    """A rolling update under 16 clients through nginx: each replica in turn gets
    SIGTERM, drains (serving on while nginx, which cannot see /ready, keeps sending), refuses
    connections and exits 0, and a new one takes its place. Its listener closing resets the
    connections in its accept queue; nginx sends those requests to the other replica. Not
    one request fails."""
    with running_front(logs, tmp_path, drain_delay_s=2, graceful_shutdown_s=30) as front:
        load = Load(front)
        load.start()
        poll_until(lambda: all(chat_lines(r) for r in front.replicas), timeout_s=60)
        for turn in range(2):  # each replica once: a whole rolling update
            slot = turn % 2
            leaving = front.replicas[slot]
            leaving.popen.send_signal(signal.SIGTERM)
            try:
                assert leaving.popen.wait(timeout=60) == 0, leaving.log()
            except subprocess.TimeoutExpired:
                pytest.fail(f"the replica did not exit after its drain:\n{leaving.log()}")
            assert "drain delay over" in leaving.log()
            gone_at = time.monotonic()
            staying = front.replicas[1 - slot]
            # Traffic goes on meanwhile, all of it on the replica that stays.
            poll_until(lambda since=gone_at: load.completed_after(since) >= CLIENTS, timeout_s=60)
            back_at = time.monotonic()
            front.replicas[slot] = new = successor(logs, leaving, turn)
            # Back in rotation once nginx tries it again (after fail_timeout).
            poll_until(lambda replica=new: chat_lines(replica), timeout_s=60)
            answered = {line["request_id"] for line in chat_lines(staying)}
            alone = [s for s in load.sent if gone_at < s.sent_at < back_at and s.error is None]
            assert alone and all(s.request_id in answered for s in alone)
        load.stop()
    failed = [s for s in load.sent if s.error is not None]
    assert not failed, f"{len(failed)} of {len(load.sent)} failed: {failed[:5]}\n{front.log()}"


def successor(logs: Path, replica: Gateway, turn: int) -> Gateway:
    """A new gateway process where `replica` was: its config, its port."""
    port = int(replica.url.rsplit(":", 1)[1])
    access_log = logs / f"gateway-{port}-{turn}.access.jsonl"
    config = ["--config", str(logs / f"gateway-{port}.yaml")]
    process = spawn(
        f"gateway-{port}-{turn}",
        ["serve", *config],
        port=port,
        log_dir=logs,
        stdout_path=access_log,
    )
    return Gateway(process.name, process.popen, process.log_path, process.url, access_log)


def chat_lines(replica: Gateway) -> list[dict[str, Any]]:
    """The replica's access-log lines of chat requests."""
    return [line for line in replica.access_log() if line["path"] == "/v1/chat/completions"]


CLIENTS = 16
STREAMING_CLIENTS = 2


@dataclass
class Sent:
    stream: bool
    sent_at: float
    done_at: float = 0.0
    error: str | None = None
    # Sent as X-Request-ID: the access log of the replica that answered has it.
    request_id: str = field(default_factory=new_request_id)


class Load:
    """CLIENTS threads through nginx, back to back: slow streams from STREAMING_CLIENTS of
    them (in flight when a listener closes), fast answers from the others (many new upstream
    connections to a draining replica, whose answers say Connection: close); each answer
    checked whole, a stream to its [DONE]. Without nginx resending the requests caught in a
    closing replica's accept queue, this fails about a dozen of 20,000 requests here."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
            assert not thread.is_alive(), "a client still waits after 60 s"

    def completed_after(self, moment: float) -> int:
        with self._lock:
            return sum(1 for s in self.sent if s.sent_at > moment and s.done_at and not s.error)

    def _client(self, n: int) -> None:
        headers = {"Authorization": f"Bearer {DEMO_KEY}"}
        with httpx.Client(
            base_url=self.front.https_url, headers=headers, verify=self.front.tls(), timeout=30
        ) as http:
            while not self._stop.is_set():
                sent = Sent(stream=n < STREAMING_CLIENTS, sent_at=time.monotonic())
                with self._lock:
                    self.sent.append(sent)
                self._send(http, sent)

    def _send(self, http: httpx.Client, sent: Sent) -> None:
        body = {
            "model": "slow-llama" if sent.stream else "tiny-llama",
            "messages": MESSAGES,
            "max_tokens": 20 if sent.stream else 4,
            "stream": sent.stream,
        }
        try:
            headers = {"X-Request-ID": sent.request_id}
            with http.stream(
                "POST", "/v1/chat/completions", json=body, headers=headers
            ) as response:
                raw = response.read()
            if response.status_code != 200:
                sent.error = f"{response.status_code}: {raw[:200]!r}"
            elif sent.stream and not raw.rstrip().endswith(b"data: [DONE]"):
                sent.error = f"stream ended badly: {raw[-200:]!r}"
        except httpx.HTTPError as error:
            sent.error = repr(error)
        sent.done_at = time.monotonic()
