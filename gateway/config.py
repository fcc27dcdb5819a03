"""The gateway's configuration: typed, frozen value objects loaded from YAML.

Every value can be overridden by an environment variable `VGATE_<SECTION>__<KEY>` (nested
keys and list indexes joined by `__`, e.g. `VGATE_MODELS__0__BACKENDS__1__URL`). Values
are parsed as YAML scalars, so `VGATE_SERVER__PORT=9000` is an integer. Any problem is a
`ConfigError` naming the file, the field and the reason, raised at start-up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError

ENV_PREFIX = "VGATE_"


# Guardrails' deny patterns: how many, how long, and what each must be.
MAX_PATTERNS = 100
MAX_PATTERN_CHARS = 1000
# The global cap on `n` (and `best_of`) unless the config says otherwise: room for sampling
# several answers to pick from, not for one request to occupy a worker's every sequence slot.
DEFAULT_MAX_N = 16


class _HasName(Protocol):
    @property
    def name(self) -> str: ...


_Named = TypeVar("_Named", bound=_HasName)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Gateway processes serving this port (gateway/runtime/workers.py): each takes its share
    # of the connections; per-key limits and breakers are exact across them only through
    # `redis:` (without it, each process keeps its own).
    workers: int = Field(1, ge=1, le=64)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    access_log: bool = True
    # A quiet log writes a line at once and opens a window this long; the lines within it go
    # out together when it closes (one write under load). 0: every line at once.
    access_log_flush_s: float = Field(0.05, ge=0, le=5)
    # On SIGTERM, /ready answers 503 for drain_delay_s while the gateway serves and accepts on
    # (load balancers and Kubernetes' endpoints take it out of rotation meanwhile; responses
    # say `Connection: close`, moving keep-alive clients to fresh connections); then the
    # listener closes and requests in flight get graceful_shutdown_s to finish. SIGINT and a
    # second signal skip the delay. 5 s covers endpoint propagation (kube-proxy, ingress), and
    # with graceful_shutdown_s fits Kubernetes' default 30 s termination grace period.
    drain_delay_s: float = Field(5.0, ge=0, le=300)
    graceful_shutdown_s: float = Field(10.0, gt=0)
    max_in_flight: int = Field(1024, ge=1)  # requests worked on at once by this process
    queue_max_waiting: int = Field(256, ge=0)  # beyond max_in_flight, at most this many wait...
    queue_timeout_s: float = Field(1.0, gt=0)  # ...each at most this long, then 503
    # What one client connection may take before any key is checked (gateway.edge.connections).
    max_connections: int = Field(1024, ge=1)  # open at once; beyond it: 503 and close
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)  # request line + headers
    max_headers: int = Field(100, ge=8, le=10_000)  # header fields; beyond either cap: 431
    head_timeout_s: float = Field(10.0, gt=0)  # a request's head must arrive within this: 408
    body_timeout_s: float = Field(30.0, gt=0)  # the body may pause at most this long: 408
    send_timeout_s: float = Field(60.0, gt=0)  # a client reading nothing this long is dropped
    keep_alive_s: float = Field(5.0, gt=0)  # an idle keep-alive connection is closed after this
    # How often the config file's mtime/size is polled; a change reloads the config (SIGHUP
    # and POST /admin/config/reload do it at once). 0: no polling.
    config_reload_interval_s: float = Field(2.0, ge=0, le=3600)


class Timeouts(_Frozen):
    """Phase timeouts: a stalled backend is cut off by whichever phase it stalls in."""

    connect_s: float = Field(2.0, gt=0)
    first_token_s: float = Field(30.0, gt=0)
    idle_s: float = Field(30.0, gt=0)
    total_s: float = Field(300.0, gt=0)
    # Of total_s, what a route with fallbacks leaves them: its own attempts must have their
    # answer (a stream: its first token) by total_s minus this. None: the first fallback's
    # first_token_s, at most half of total_s.
    fallback_reserve_s: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _total_is_the_ceiling(self) -> Timeouts:
        for name in ("connect_s", "first_token_s", "idle_s", "fallback_reserve_s"):
            if (getattr(self, name) or 0.0) > self.total_s:
                raise ValueError(f"{name} ({getattr(self, name)}) exceeds total_s ({self.total_s})")
        return self


class RetryConfig(_Frozen):
    """Retries before the first byte reaches the client; never after."""

    max_retries: int = Field(1, ge=0, le=9)  # after the first attempt: 0 means no retry
    backoff_initial_s: float = Field(0.05, ge=0)
    backoff_max_s: float = Field(2.0, ge=0)
    retry_after_max_s: float = Field(5.0, ge=0)  # an upstream's Retry-After is honoured up to this
    budget_ratio: float = Field(0.2, ge=0, le=1)  # retries at most this share of requests...
    budget_window_s: float = Field(10.0, gt=0)  # ...over this window...
    budget_min_per_s: float = Field(1.0, ge=0)  # ...but always this many per second

    @model_validator(mode="before")
    @classmethod
    def _attempts_is_deprecated(cls, data: Any) -> Any:
        """`attempts` counted the first attempt too; it is still read, as max_retries + 1
        (parse_config's warning names each use)."""
        if not isinstance(data, dict) or "attempts" not in data:
            return data
        if "max_retries" in data:
            raise ValueError("give max_retries or attempts (deprecated), not both")
        data = dict(data)
        attempts = data.pop("attempts")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
            raise ValueError(
                f"attempts (deprecated: use max_retries) must be a whole number from 1 to 10,"
                f" not {attempts!r}"
            )
        return {**data, "max_retries": attempts - 1}


class BreakerConfig(_Frozen):
    """Per backend: opens on consecutive failures or a failure ratio, probes after open_s."""

    consecutive_failures: int = Field(5, ge=1)
    failure_ratio: float = Field(0.5, gt=0, le=1)
    window_s: float = Field(10.0, gt=0)
    min_requests: int = Field(20, ge=1)  # the ratio is judged only over at least this many
    open_s: float = Field(5.0, gt=0)
    half_open_probes: int = Field(1, ge=1)
    shared: bool = True  # with redis.url set: every gateway process sees the same state


class HealthConfig(_Frozen):
    """Active health checks of each backend of a route."""

    enabled: bool = True
    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)
    unhealthy_after: int = Field(2, ge=1)  # failed probes in a row before ejection
    healthy_after: int = Field(2, ge=1)  # good probes in a row before readmission


class AdaptiveConcurrencyConfig(_Frozen):
    """A per-backend concurrency limit that follows observed latency (policies.adaptive)."""

    enabled: bool = False
    min_limit: int = Field(1, ge=1)
    initial_limit: int | None = Field(None, ge=1)  # default: min(20, the static limit)
    tolerance: float = Field(1.5, ge=1)  # latency this many times its baseline is congestion
    long_window: int = Field(600, ge=10)  # samples in the long-term baseline


class BackendConfig(_Frozen):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    provider: Literal["vllm", "openai"]
    url: str
    weight: int = Field(1, ge=1, le=1000)
    model: str | None = None  # the name the upstream serves; defaults to the route's name
    # The variable holding the upstream's key, sent as `Authorization: Bearer`; none: no
    # Authorization header (a local OpenAI-compatible server without keys).
    api_key_env: str | None = Field(None, min_length=1)
    max_connections: int = Field(256, ge=1, le=10_000)
    max_in_flight: int | None = Field(None, ge=1)  # requests at once; default max_connections
    # Whether it continues a final assistant message (vLLM's `continue_final_message`), so a
    # broken stream resumes on it from the text already sent. Default: yes for vllm.
    continue_final_message: bool | None = None
    # Scrape vLLM's /metrics for its running and waiting requests. Default: yes for vllm.
    scrape_metrics: bool | None = None
    adaptive_concurrency: AdaptiveConcurrencyConfig = AdaptiveConcurrencyConfig()

    @property
    def scrapes_metrics(self) -> bool:
        if self.scrape_metrics is None:
            return self.provider == "vllm"
        return self.scrape_metrics

    @property
    def can_prefill(self) -> bool:
        if self.continue_final_message is None:
            return self.provider == "vllm"
        return self.continue_final_message

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")) or len(url) < 10:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return url.rstrip("/")


class ResumeConfig(_Frozen):
    """Continuing a stream that broke after reaching the client on another backend."""

    enabled: bool = True
    attempts: int = Field(2, ge=1, le=10)  # resumptions of one stream, at most
    max_text_chars: int = Field(256 * 1024, ge=1)  # longer answers so far are not resumed


class AffinityConfig(_Frozen):
    """What `strategy: affinity` hashes: a conversation or a user, never the prompt."""

    key: str = Field("user", pattern=r"^(user|header:[A-Za-z0-9-]+)$")  # OpenAI's `user` field
    epsilon: float = Field(0.25, gt=0, le=10)  # a backend takes at most (1+ε) times its fair share

    @property
    def header(self) -> bytes | None:
        return None if self.key == "user" else self.key[7:].lower().encode("latin-1")


class LoadScrapeConfig(_Frozen):
    """Reading each vLLM worker's own running/waiting gauges as a load signal."""

    enabled: bool = True
    interval_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(0.5, gt=0)
    stale_after: int = Field(3, ge=1)  # intervals after which a report is ignored
    absent_retry_s: float = Field(300.0, gt=0)  # a backend without /metrics is asked again
    max_concurrency: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> LoadScrapeConfig:
        if self.timeout_s > self.interval_s:
            raise ValueError("timeout_s must not exceed interval_s")
        return self


class RouteCacheConfig(_Frozen):
    """A route's own cache settings; each one left out is the `cache:` section's."""

    enabled: bool | None = None
    ttl_s: float | None = Field(None, gt=0, le=30 * 86400)
    scope: Literal["key", "global"] | None = None  # global: every key shares the answers
    cache_all: bool | None = None  # also requests that did not ask for a deterministic answer


class ModelRoute(_Frozen):
    name: str = Field(min_length=1, max_length=128)
    aliases: tuple[str, ...] = ()
    strategy: Literal["weighted", "least_inflight", "p2c_latency", "affinity"] = "weighted"
    affinity: AffinityConfig = AffinityConfig()
    seed: int = 0  # for p2c_latency's draws: the same seed, the same choices
    timeouts: Timeouts = Timeouts()
    retries: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    health: HealthConfig = HealthConfig()
    resume: ResumeConfig = ResumeConfig()
    # Non-streaming chat and completions: `assemble` asks the upstream for a stream and
    # builds the JSON answer, so first_token_s and idle_s apply; `passthrough` forwards the
    # request as it is, bounded by total_s alone (vLLM sends nothing until it has finished).
    non_stream: Literal["assemble", "passthrough"] = "assemble"
    fallbacks: tuple[str, ...] = ()  # model names tried in order when this one cannot answer
    cache: RouteCacheConfig = RouteCacheConfig()  # overrides of the `cache:` section
    context_window: int | None = Field(
        None, ge=1
    )  # tokens; lets a too-long prompt go to a larger fallback
    # At least one, listed here or registered by `workers:` (checked once those are added).
    backends: tuple[BackendConfig, ...] = ()

    def fallback_reserve(self, first_fallback: ModelRoute | None) -> float:
        """Of `timeouts.total_s`, the seconds this route leaves its fallbacks: its own
        attempts must have their answer (a stream: its first token) by total_s minus this.

        `timeouts.fallback_reserve_s` where set, else the first fallback's first_token_s, at
        most half of total_s; 0 without a fallback (`first_fallback` None).
        """
        if first_fallback is None:
            return 0.0
        if self.timeouts.fallback_reserve_s is not None:
            return self.timeouts.fallback_reserve_s
        return min(first_fallback.timeouts.first_token_s, self.timeouts.total_s / 2)


class KeysConfig(_Frozen):
    file: Path
    # How often the file's mtime/size is polled; a change that validates takes over at once.
    reload_interval_s: float = Field(2.0, ge=0, le=3600)  # 0: only POST /admin/keys/reload


class AdminConfig(_Frozen):
    """The admin key protecting /admin/...: its SHA-256, given here or in a variable."""

    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    key_sha256_env: str | None = Field(None, min_length=1)  # the variable holding the hash

    @model_validator(mode="after")
    def _one_source(self) -> AdminConfig:
        if self.key_sha256 is not None and self.key_sha256_env is not None:
            raise ValueError("give key_sha256 or key_sha256_env, not both")
        return self


def check_pattern(pattern: str) -> str | None:
    """Why `pattern` cannot be a deny pattern, or None when it can."""
    if not pattern:
        return "must not be empty"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    if compiled.search("") is not None:
        return "matches the empty string, so it would refuse every request"
    return None


def _deny_pattern(pattern: str) -> str:
    reason = check_pattern(pattern)
    if reason is not None:
        raise ValueError(reason)
    return pattern


class GuardrailsConfig(_Frozen):
    """Global guardrails (per-key ones are in the keys file): see policies/guardrails.py."""

    # Regular expressions searched in the prompt's text; a match is 400 content_policy_violation.
    deny_patterns: tuple[Annotated[str, AfterValidator(_deny_pattern)], ...] = Field(
        (), max_length=MAX_PATTERNS
    )
    max_input_bytes: int | None = Field(None, ge=1)  # the prompt's text, UTF-8; per key overrides
    # Choices per request (`n`, a completion's `best_of`); a key's own overrides; null: no cap.
    max_n: int | None = Field(DEFAULT_MAX_N, ge=1)


class RedisSentinelConfig(_Frozen):
    """A primary found through Redis Sentinel, followed when it fails over (redis-py's
    `Sentinel(...).master_for(service_name)`)."""

    service_name: str = Field(min_length=1, max_length=128)  # the sentinels' `monitor` name
    sentinels: tuple[str, ...] = Field(min_length=1)  # "host:port", each; asked in turn
    db: int = Field(0, ge=0)
    password_env: str | None = Field(None, min_length=1)  # the primary's password, if any
    sentinel_password_env: str | None = Field(None, min_length=1)  # the sentinels' own
    ssl: bool = False  # TLS to the primary and replicas (not to the sentinels)

    @field_validator("sentinels")
    @classmethod
    def _host_ports(cls, sentinels: tuple[str, ...]) -> tuple[str, ...]:
        for address in sentinels:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port")
        if len(set(sentinels)) != len(sentinels):
            raise ValueError("a sentinel is listed twice")
        return sentinels

    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) each; an IPv6 host may be written in brackets."""
        pairs = [address.rpartition(":") for address in self.sentinels]
        return [(host.strip("[]"), int(port)) for host, _, port in pairs]


def _host_ports(addresses: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Each "host:port" (an IPv6 host may be in brackets), none twice."""
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r} is not host:port")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"a {what} is listed twice")
    return addresses


def _pairs(addresses: tuple[str, ...]) -> list[tuple[str, int]]:
    pairs = [address.rpartition(":") for address in addresses]
    return [(host.strip("[]"), int(port)) for host, _, port in pairs]


class RedisClusterConfig(_Frozen):
    """A Redis Cluster (redis-py's `RedisCluster`): the client learns every primary and
    which slots it holds from any of `nodes`, and follows the cluster as slots move or a
    replica takes over. Each component keeps what must stay atomic on one hash slot."""

    # "host:port" of some nodes, tried in turn to learn the others (one is enough; list a
    # few so that start-up does not depend on one node).
    nodes: tuple[str, ...] = Field(min_length=1)
    password_env: str | None = Field(None, min_length=1)  # the nodes' password, if any
    username: str | None = Field(None, min_length=1)  # an ACL user (with password_env)
    ssl: bool = False  # TLS to every node

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, nodes: tuple[str, ...]) -> tuple[str, ...]:
        return _host_ports(nodes, "node")

    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) each; an IPv6 host may be written in brackets."""
        return _pairs(self.nodes)


class RedisConfig(_Frozen):
    """State shared by every gateway process and replica: one server (`url`), a primary
    followed through Sentinel (`sentinel`), or a Redis Cluster (`cluster`); with none of
    them, in-process only."""

    url: str | None = None  # redis://[:password@]host:6379/0, rediss://..., unix:///path
    sentinel: RedisSentinelConfig | None = None  # instead of url
    cluster: RedisClusterConfig | None = None  # instead of url or sentinel
    key_prefix: str = Field("vgate", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    socket_timeout_s: float = Field(0.5, gt=0, le=30)  # bounds every Redis call, connect too
    # Pooled (with cluster: per node); a subscription holds one.
    max_connections: int = Field(16, ge=2, le=10_000)
    # The calls on a request's path (limits, cache lookups) with `url`: vgate's own
    # pipelined client (one connection, a loop turn's commands in one write), or redis-py's
    # pool as for everything else. Sentinel and cluster always use redis-py's.
    request_client: Literal["pipelined", "redis-py"] = "pipelined"

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{url!r} is not a redis://, rediss:// or unix:// URL")
        return url

    @model_validator(mode="after")
    def _one_way_in(self) -> RedisConfig:
        given = [
            name
            for name, value in (
                ("url", self.url),
                ("sentinel", self.sentinel),
                ("cluster", self.cluster),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one of url, sentinel or cluster, not {' and '.join(given)}")
        return self

    @property
    def enabled(self) -> bool:
        """Whether state is shared through Redis (a url, a sentinel or a cluster section)."""
        return self.url is not None or self.sentinel is not None or self.cluster is not None


class CacheConfig(_Frozen):
    """The response cache (policies/cache.py): off by default. Only complete successful
    answers are kept, by default only those asked for deterministically (temperature 0 or
    a seed); with backend redis, the `redis:` connection, shared by every process."""

    enabled: bool = False
    backend: Literal["memory", "redis"] = "memory"
    ttl_s: float = Field(300.0, gt=0, le=30 * 86400)
    max_entry_bytes: int = Field(1024 * 1024, ge=1024)  # larger answers are not kept
    maxsize: int = Field(10_000, ge=1)  # memory: entries at most
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024)  # memory: bytes of answers at most
    cache_all: bool = False  # every request, deterministic or not (per route: cache.cache_all)
    scope: Literal["key", "global"] = "key"  # key: each key's own answers (its name)
    coalesce: bool = True  # identical cacheable requests in flight share one upstream call
    # redis: a lookup slower than this is a bypass; while Redis is down, one lookup per
    # probe_interval_s tries it and the others bypass at once.
    redis_timeout_s: float = Field(0.05, gt=0, le=5)
    probe_interval_s: float = Field(1.0, gt=0)


class LimitsConfig(_Frozen):
    """Per-key rate limits and quotas (policies.limits); the limits themselves are the keys'.
    With redis.url they are shared by every process (one Redis round trip per request)."""

    # Redis unreachable: "open" serves with each process's own limits (logged, counted),
    # "closed" answers 503 with Retry-After. Either way it recovers when Redis answers.
    redis_failure: Literal["open", "closed"] = "open"
    default_max_tokens_estimate: int = Field(256, ge=0)  # a request without max_tokens
    local_max_keys: int = Field(100_000, ge=1)  # keys whose state one process keeps at most
    lease_s: float = Field(600.0, gt=0)  # a concurrency slot not given back is freed after
    probe_interval_s: float = Field(1.0, gt=0)  # while Redis is down, how often it is tried


class UpstreamConfig(_Frozen):
    """What the gateway takes from an upstream (providers/http1.py). Past a size cap the
    attempt fails as the upstream's fault (502, retried elsewhere if allowed); past the
    process-wide buffer, as the gateway's overload (503 with Retry-After)."""

    max_header_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)  # head; trailers too
    max_headers: int = Field(256, ge=8, le=10_000)  # header fields in one answer's head
    # One answer read whole (non-streamed). Chat and completions: 8k tokens with 20
    # top_logprobs each, or 16 choices of a 128k-token answer, fit in 16 MiB.
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024)
    # Embeddings are the largest legitimate answers: as JSON floats about 21 bytes each,
    # 64 MiB is ~1,000 inputs of 3,072 dimensions; base64 fits 2,048 of them in 34 MB.
    max_embeddings_body_bytes: int = Field(64 * 1024 * 1024, ge=64 * 1024)
    max_buffered_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)  # all reads at once

    @model_validator(mode="after")
    def _answers_fit_the_buffer(self) -> UpstreamConfig:
        for name in ("max_body_bytes", "max_embeddings_body_bytes"):
            if getattr(self, name) > self.max_buffered_bytes:
                raise ValueError(f"{name} is larger than max_buffered_bytes")
        return self


class TracingConfig(_Frozen):
    """OTLP/HTTP export of one span per request, routing decisions as its events."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "vgate"
    sample_ratio: float = Field(1.0, ge=0, le=1)  # for requests without a sampled traceparent
    max_queue_size: int = Field(2048, ge=1, le=1_000_000)  # spans beyond it are dropped
    schedule_delay_s: float = Field(1.0, gt=0)
    export_timeout_s: float = Field(5.0, gt=0)
    # A request not sampled is still exported when it took longer than this (None: never),
    # as one that failed always is: decided at its end, where its spans are built.
    keep_slow_s: float | None = Field(10.0, gt=0)


class MetricsConfig(_Frozen):
    """What /metrics serves besides the current metric names."""

    # The names issue 13 renamed (vgate_request_duration_seconds,
    # vgate_time_to_first_token_seconds, vgate_tokens_total) served as well, copied at scrape
    # time from the new ones: for one deprecation period, until rules and dashboards move.
    legacy_names: bool = True


# The signature algorithms a JWT may use: HMAC with a shared secret, or a public key from a
# JWKS. Never "none", and never both kinds at once (an HS check keyed with a public key's
# bytes is the classic algorithm-confusion forgery).
JWT_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
JWT_PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_TIME_CLAIMS = frozenset({"exp", "nbf", "iat"})


def _one_or_many(value: object) -> object:
    return (value,) if isinstance(value, str) else value


class JwtConfig(_Frozen):
    """JWT bearer tokens beside API keys (gateway/edge/jwt_auth.py): off unless enabled.

    A token is verified against one key source: `jwks_file`, `jwks_url` or the HMAC secret
    in the environment variable `secret_env`. Its `profile_claim` names the key (by id, or
    by a name only one key has) in the keys file whose models, limits and guardrails apply.
    """

    enabled: bool = False
    issuer: str | None = Field(None, min_length=1)  # `iss` must equal it; needed when enabled
    audience: Annotated[tuple[str, ...], BeforeValidator(_one_or_many)] = ()  # `aud`: one of
    algorithms: tuple[str, ...] = ()  # empty: RS256 with a JWKS, HS256 with a secret
    jwks_file: Path | None = None  # read at start-up
    jwks_url: str | None = None  # fetched at start-up, then every jwks_refresh_s
    secret_env: str | None = Field(None, min_length=1)  # the variable holding an HS secret
    profile_claim: str = Field("vgate_key", min_length=1, max_length=128)
    leeway_s: float = Field(30.0, ge=0, le=300)  # clock skew allowed on exp, nbf and iat
    jwks_refresh_s: float = Field(300.0, ge=10, le=86_400)
    jwks_min_refresh_s: float = Field(30.0, ge=1, le=3600)  # unknown `kid`s refetch this rarely
    jwks_timeout_s: float = Field(5.0, gt=0, le=60)  # one fetch; a request waits at most this
    max_token_bytes: int = Field(8192, ge=512, le=65_536)  # longer: 401 before any parsing
    verified_cache_size: int = Field(10_000, ge=0, le=1_000_000)  # tokens kept verified; 0: none

    @field_validator("jwks_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("https://", "http://")):
            raise ValueError(f"{url[:100]!r} is not an http:// or https:// URL")
        return url

    @field_validator("profile_claim")
    @classmethod
    def _not_a_time_claim(cls, claim: str) -> str:
        if claim in _TIME_CLAIMS:
            raise ValueError(f"{claim!r} is a time claim, not one that can name a key profile")
        return claim

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> JwtConfig:
        sources = [
            name
            for name in ("jwks_file", "jwks_url", "secret_env")
            if getattr(self, name) is not None
        ]
        if len(sources) > 1:
            raise ValueError(f"give one of jwks_file, jwks_url or secret_env, not {sources}")
        for name in self.algorithms:
            if name not in JWT_HMAC_ALGORITHMS | JWT_PUBLIC_KEY_ALGORITHMS:
                known = ", ".join(sorted(JWT_HMAC_ALGORITHMS | JWT_PUBLIC_KEY_ALGORITHMS))
                raise ValueError(f"algorithms: {name[:20]!r} is not one of {known}")
        if not self.enabled:
            return self
        if not sources:
            raise ValueError("enabled: needs a key source: jwks_file, jwks_url or secret_env")
        if self.issuer is None:
            raise ValueError("issuer: needed when enabled (the `iss` every token must carry)")
        if not self.audience:
            raise ValueError("audience: needed when enabled (the `aud` tokens are meant for)")
        allowed = JWT_HMAC_ALGORITHMS if self.secret_env else JWT_PUBLIC_KEY_ALGORITHMS
        for name in self.algorithms:
            if name not in allowed:
                kind = "an HS secret" if self.secret_env else "a JWKS"
                raise ValueError(f"algorithms: {name} cannot be verified with {kind}")
        return self

    @property
    def allowed_algorithms(self) -> tuple[str, ...]:
        if self.algorithms:
            return self.algorithms
        return ("HS256",) if self.secret_env else ("RS256",)


def _scalar_to_str(value: Any) -> Any:
    """YAML reads `512` and `1` as numbers; a command line and an environment want text."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


_Text = Annotated[str, BeforeValidator(_scalar_to_str)]
# What `command` and `args` may name, e.g. "--port", "{port}"; `{{` and `}}` are braces.
WORKER_PLACEHOLDERS = ("name", "model", "served_name", "host", "port")


class WorkerRestartConfig(_Frozen):
    """A worker that dies is restarted after a capped exponential backoff with jitter (from
    initial_s, doubling up to max_s; again from initial_s once a worker stayed up max_s), at
    most `max_restarts_per_window` times within `window_s`; then it is given up on (logged)."""

    initial_s: float = Field(1.0, gt=0)
    max_s: float = Field(30.0, gt=0)
    max_restarts_per_window: int = Field(5, ge=0)
    window_s: float = Field(600.0, gt=0)


class WorkerConfig(_Frozen):
    """A `vllm serve` process that `vgate up` runs and registers as a backend of its route
    (see gateway/runtime/supervisor.py)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")  # = backend name
    model: str = Field(min_length=1)  # a model folder (./ ../ / ~: a path) or a hub name
    served_name: str | None = Field(None, min_length=1)  # default: model, as in vllm serve
    route: str | None = Field(None, min_length=1)  # model route (or alias); default: served_name
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    weight: int = Field(1, ge=1, le=1000)
    # The command line before `args`, each item formatted with WORKER_PLACEHOLDERS. Default:
    # `vllm serve {model} --served-model-name {served_name} --host {host} --port {port}`, with
    # the checkout's CPU build (.venv-vllm, deploy/vllm/serve.py) where it is installed.
    command: tuple[_Text, ...] | None = Field(None, min_length=1)
    args: tuple[_Text, ...] = ()  # appended to the command, formatted the same way
    env: dict[str, _Text] = {}  # on top of the gateway's own environment
    log_dir: Path = Path(".run/logs")  # <log_dir>/<name>.log
    ready_timeout_s: float = Field(600.0, gt=0)  # from start to GET /health 200
    stop_timeout_s: float = Field(20.0, gt=0)  # SIGTERM, then this long, then SIGKILL
    restart: WorkerRestartConfig = WorkerRestartConfig()

    @property
    def model_name(self) -> str:
        """The name the worker serves, and the one requests to it carry."""
        return self.served_name or self.model

    @property
    def route_name(self) -> str:
        return self.route or self.model_name

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @field_validator("command", "args")
    @classmethod
    def _known_placeholders(cls, items: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for item in items or ():
            try:
                item.format(**dict.fromkeys(WORKER_PLACEHOLDERS, ""))
            except (KeyError, IndexError, ValueError) as exc:
                known = ", ".join(f"{{{name}}}" for name in WORKER_PLACEHOLDERS)
                raise ValueError(f"{item!r}: bad placeholder {exc} (known: {known})") from None
        return items


# Chaos: faults injected at the router's adapter seam (chaos/inject.py), off unless enabled.
MAX_CHAOS_EXPERIMENTS = 32
ChaosFaultKind = Literal[
    "latency",
    "error",
    "refuse",
    "reset",
    "hang",
    "slow_first_token",
    "slow_tokens",
    "cut",
    "stall",
    "malformed",
    "no_done",
]
# The fields each kind reads (besides `kind`); a field set that its kind does not read is
# an error, so a typo in a drill (`after_events` on a latency) is not a silent no-op.
_CHAOS_FAULT_FIELDS: dict[str, frozenset[str]] = {
    "latency": frozenset({"latency_ms", "jitter_ms"}),
    "error": frozenset({"status", "code", "message", "retry_after_s"}),
    "refuse": frozenset(),
    "reset": frozenset(),
    "hang": frozenset(),
    "slow_first_token": frozenset({"latency_ms", "jitter_ms"}),
    "slow_tokens": frozenset({"latency_ms", "jitter_ms"}),
    "cut": frozenset({"after_events"}),
    "stall": frozenset({"after_events"}),
    "malformed": frozenset({"after_events"}),
    "no_done": frozenset(),
}
_Delay = Annotated[float, Field(ge=0, le=3_600_000, allow_inf_nan=False)]  # milliseconds


class ChaosFault(_Frozen):
    """What goes wrong. Each kind reads only its own fields (see `_CHAOS_FAULT_FIELDS`)."""

    kind: ChaosFaultKind
    # latency: added before the upstream is asked; slow_first_token: before the first event;
    # slow_tokens: before each event. jitter_ms adds a seeded uniform [0, jitter_ms).
    latency_ms: _Delay = 0
    jitter_ms: _Delay = 0
    status: int | None = Field(None, ge=400, le=599)  # error: the status answered
    code: str | None = Field(None, min_length=1, max_length=64)  # error: OpenAI's code
    message: str | None = Field(None, min_length=1, max_length=500)  # error: default says injected
    retry_after_s: float | None = Field(None, ge=0, le=86_400, allow_inf_nan=False)  # error
    after_events: int = Field(0, ge=0, le=1_000_000)  # cut, stall, malformed: after this many

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> ChaosFault:
        reads = _CHAOS_FAULT_FIELDS[self.kind]
        for name in sorted(self.model_fields_set - reads - {"kind"}):
            if getattr(self, name) != ChaosFault.model_fields[name].default:
                used = ", ".join(sorted(reads)) or "no other field"
                raise ValueError(f"{name}: a {self.kind!r} fault does not use it (it uses {used})")
        if self.kind == "error" and self.status is None:
            raise ValueError("status: an 'error' fault needs the status to answer (400 to 599)")
        if self.kind in ("slow_first_token", "slow_tokens") and not self.latency_ms:
            raise ValueError(f"latency_ms: a {self.kind!r} fault needs a delay above 0")
        if self.kind == "latency" and not (self.latency_ms or self.jitter_ms):
            raise ValueError("latency_ms: a 'latency' fault needs latency_ms or jitter_ms above 0")
        return self


class ChaosExperiment(_Frozen):
    """A named fault, the requests it targets, the share of them it hits, and when."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    fault: ChaosFault
    # Targets, by name; an empty one means every route, backend or key.
    routes: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # key names (never the keys themselves)
    # The share of matching requests hit, deterministically: request n (from 0, counted per
    # experiment) is hit when floor((n + 1) * rate) > floor(n * rate), as the sim's faults.
    rate: float = Field(1.0, ge=0, le=1)
    seed: int = 0  # for the jitter's draws: the same seed, the same delays
    start_after_s: float = Field(0.0, ge=0, allow_inf_nan=False)  # from the experiment's start
    duration_s: float | None = Field(None, gt=0, allow_inf_nan=False)  # None: until stopped
    # Only requests that ask for it (`X-VGate-Chaos: <name>`, from keys allowed to ask).
    on_request: bool = False


class ChaosConfig(_Frozen):
    """Fault injection in front of real backends. `enabled` is the master switch: while it
    is false no experiment runs, and none can be started at run time."""

    enabled: bool = False
    experiments: tuple[ChaosExperiment, ...] = Field((), max_length=MAX_CHAOS_EXPERIMENTS)

    @field_validator("experiments")
    @classmethod
    def _names_are_unique(
        cls, experiments: tuple[ChaosExperiment, ...]
    ) -> tuple[ChaosExperiment, ...]:
        return _unique_names(experiments, "experiment")


# SLOs: objectives over the gateway's own metrics (gateway/edge/metrics.py), turned into
# Prometheus recording rules and burn-rate alerts by `vgate slo rules` (gateway/cli/slo.py).
# A latency threshold must be one of the latency histograms' bucket boundaries: the share of
# requests within it is then exact (a bucket's count), never interpolated.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300
)  # fmt: skip
# vgate_tpot_seconds' (a stream's time per output token after its first).
TPOT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5
)  # fmt: skip


class SloLatency(_Frozen):
    """The share of requests answered within `threshold_s`: by the whole request's duration
    (`request`), by the time to a stream's first token (`ttft`), or by a stream's time per
    output token after its first (`tpot`)."""

    of: Literal["request", "ttft", "tpot"] = "request"  # first: threshold_s's check reads it
    threshold_s: float
    target: float = Field(gt=0, lt=1)

    @field_validator("threshold_s")
    @classmethod
    def _a_bucket_boundary(cls, threshold: float, info: ValidationInfo) -> float:
        tpot = info.data.get("of") == "tpot"
        buckets = TPOT_BUCKETS if tpot else LATENCY_BUCKETS
        if threshold not in buckets:
            known = ", ".join(f"{bucket:g}" for bucket in buckets)
            histogram = "vgate_tpot_seconds" if tpot else "the latency histograms"
            raise ValueError(f"{threshold:g} is not a bucket boundary of {histogram} ({known})")
        return threshold


class SloObjective(_Frozen):
    """One objective, over `window_days`: availability (the share of requests not failed by
    the gateway or an upstream: 5xx fail, 4xx are the client's and not counted, a key's own
    429 included) or latency."""

    name: str = Field(pattern=r"^[a-z0-9_]{1,64}$")
    routes: tuple[str, ...] = ()  # model route names; empty: every request
    window_days: int = Field(28, ge=1, le=365)
    availability: float | None = Field(None, gt=0, lt=1)
    latency: SloLatency | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SloObjective:
        if (self.availability is None) == (self.latency is None):
            raise ValueError("give availability or latency (one objective each)")
        return self

    @property
    def target(self) -> float:
        return self.latency.target if self.latency is not None else self.availability or 0.0

    @property
    def error_budget(self) -> float:
        """The share of requests that may miss the objective over the window."""
        return 1.0 - self.target


def _slo_names_are_unique(slos: tuple[SloObjective, ...]) -> tuple[SloObjective, ...]:
    return _unique_names(slos, "slo")


def _unique_names(items: tuple[_Named, ...], what: str) -> tuple[_Named, ...]:
    """`items`, if no two share a name (ValueError naming the first repeated one)."""
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"{what} name {item.name!r} is used twice")
        seen.add(item.name)
    return items


class GatewayConfig(_Frozen):
    server: ServerConfig = ServerConfig()
    models: tuple[ModelRoute, ...] = ()  # at least one, counting the routes workers create
    workers: tuple[WorkerConfig, ...] = ()  # `vgate up` runs them; each is a backend of its route
    keys: KeysConfig
    redis: RedisConfig = RedisConfig()
    load_scrape: LoadScrapeConfig = LoadScrapeConfig()
    tracing: TracingConfig = TracingConfig()
    limits: LimitsConfig = LimitsConfig()
    cache: CacheConfig = CacheConfig()  # response cache and coalescing; off by default
    admin: AdminConfig = AdminConfig()  # no key: /admin/... does not exist (404)
    guardrails: GuardrailsConfig = GuardrailsConfig()
    upstream: UpstreamConfig = UpstreamConfig()  # caps on what upstreams send
    jwt: JwtConfig = JwtConfig()  # JWT bearer tokens beside API keys; off by default
    chaos: ChaosConfig = ChaosConfig()  # fault injection at the adapter seam; off by default
    slos: Annotated[tuple[SloObjective, ...], AfterValidator(_slo_names_are_unique)] = ()
    metrics: MetricsConfig = MetricsConfig()  # legacy metric names on /metrics; restart
    source: str = "<memory>"
    # Settings that load but may not do what they seem to: deprecated names, timeouts that
    # leave a fallback no time. Logged at start-up, printed by `vgate check-config`.
    warnings: tuple[str, ...] = ()

    @field_validator("models")
    @classmethod
    def _names_are_unique(cls, models: tuple[ModelRoute, ...]) -> tuple[ModelRoute, ...]:
        seen_models: set[str] = set()
        seen_backends: set[str] = set()
        for route in models:
            for name in (route.name, *route.aliases):
                if name in seen_models:
                    raise ValueError(f"model name or alias {name!r} is used twice")
                seen_models.add(name)
            for backend in route.backends:
                if backend.name in seen_backends:
                    raise ValueError(f"backend name {backend.name!r} is used twice")
                seen_backends.add(backend.name)
        names = {route.name for route in models}
        for index, route in enumerate(models):
            for fallback in route.fallbacks:
                if fallback not in names:
                    raise ValueError(f"models[{index}].fallbacks: {fallback!r} is not a model name")
                if fallback == route.name:
                    raise ValueError(f"models[{index}].fallbacks: {fallback!r} is the model itself")
        return models

    @model_validator(mode="after")
    def _register_workers(self) -> GatewayConfig:
        """Each worker becomes a vllm backend of its route: the route (or alias) of that name
        in `models`, else a new route of that name with default settings."""
        if not self.workers:
            _check_backends(self.models)
            return self
        backends = {b.name for route in self.models for b in route.backends}
        names = {name: i for i, route in enumerate(self.models) for name in route.aliases}
        names.update({route.name: i for i, route in enumerate(self.models)})
        routes = list(self.models)
        ports: dict[tuple[str, int], int] = {}
        for index, worker in enumerate(self.workers):
            where = f"workers[{index}]"
            if worker.name in backends:
                raise ValueError(f"{where}.name: backend name {worker.name!r} is used twice")
            backends.add(worker.name)
            other = ports.setdefault((worker.host, worker.port), index)
            if other != index:
                raise ValueError(f"{where}.port: {worker.port} is workers[{other}]'s port too")
            if worker.port == self.server.port and worker.host in (self.server.host, "0.0.0.0"):
                raise ValueError(f"{where}.port: {worker.port} is the gateway's own port")
            position = names.get(worker.route_name)
            if position is None:
                names[worker.route_name] = position = len(routes)
                routes.append(ModelRoute(name=worker.route_name))
            route = routes[position]
            backend = BackendConfig(
                name=worker.name,
                provider="vllm",
                url=worker.url,
                weight=worker.weight,
                model=None if worker.model_name == route.name else worker.model_name,
            )
            routes[position] = route.model_copy(update={"backends": (*route.backends, backend)})
        _check_backends(routes)
        object.__setattr__(self, "models", tuple(routes))  # frozen: set once, while validating
        return self

    @model_validator(mode="after")
    def _warn_of_unreachable_fallbacks(self) -> GatewayConfig:
        """After `_register_workers` (validators run in order): every route is in `models`."""
        routes = {route.name: route for route in self.models}
        found = [
            f"{self.source}: models[{index}].timeouts (route {route.name!r}): {warning}"
            for index, route in enumerate(self.models)
            if route.fallbacks
            for warning in _fallback_timing(route, routes[route.fallbacks[0]])
        ]
        if found:
            object.__setattr__(self, "warnings", (*self.warnings, *found))
        return self

    @model_validator(mode="after")
    def _chaos_targets_exist(self) -> GatewayConfig:
        """After `_register_workers`: a worker's backend and route can be targeted too."""
        routes = {route.name for route in self.models}
        aliases = {alias: route.name for route in self.models for alias in route.aliases}
        route_of = {backend.name: route.name for route in self.models for backend in route.backends}
        for index, experiment in enumerate(self.chaos.experiments):
            where = f"chaos.experiments[{index}]"
            for name in experiment.routes:
                if name in aliases:
                    raise ValueError(
                        f"{where}.routes: {name!r} is an alias; name its route {aliases[name]!r}"
                    )
                if name not in routes:
                    raise ValueError(f"{where}.routes: {name!r} is not a model route")
            for name in experiment.backends:
                if name not in route_of:
                    raise ValueError(f"{where}.backends: {name!r} is not a backend")
                if experiment.routes and route_of[name] not in experiment.routes:
                    raise ValueError(
                        f"{where}.backends: {name!r} is a backend of route {route_of[name]!r},"
                        " which the experiment's routes leave out: it would never be hit"
                    )
        return self

    @model_validator(mode="after")
    def _cache_backend_has_redis(self) -> GatewayConfig:
        if self.cache.enabled and self.cache.backend == "redis" and not self.redis.enabled:
            raise ValueError(
                "cache.backend: redis needs redis.url, redis.sentinel or redis.cluster"
            )
        return self

    @model_validator(mode="after")
    def _slo_routes_exist(self) -> GatewayConfig:
        """After `_register_workers`: a worker's route can be named too. Metrics carry the
        route's name, never an alias, so an alias is refused with the name to use."""
        routes = {route.name for route in self.models}
        aliases = {alias: route.name for route in self.models for alias in route.aliases}
        for index, slo in enumerate(self.slos):
            for name in slo.routes:
                if name in aliases:
                    raise ValueError(
                        f"slos[{index}].routes: {name!r} is an alias; name its route"
                        f" {aliases[name]!r}"
                    )
                if name not in routes:
                    raise ValueError(f"slos[{index}].routes: {name!r} is not a model route")
        return self


def _fallback_timing(route: ModelRoute, fallback: ModelRoute) -> list[str]:
    """What is wrong with how `route` shares total_s with its first fallback, if anything."""
    timeouts = route.timeouts
    total = timeouts.total_s
    reserve = route.fallback_reserve(fallback)
    needed = fallback.timeouts.first_token_s  # what the fallback may take to start
    own = total - reserve
    other = repr(fallback.name)
    found = []
    if timeouts.fallback_reserve_s == 0:
        found.append(
            f"fallback_reserve_s is 0: the route's own attempts may use all of total_s"
            f" ({total:g} s) and leave its fallback {other} no time; remove it (the default"
            f" keeps the fallback's first_token_s, at most half of total_s) or set it to"
            f" {min(needed, total):g}"
        )
    elif reserve < needed:
        if timeouts.fallback_reserve_s is None:
            kept = f"{reserve:g} s of total_s ({total:g} s; by default at most half)"
            fix = (
                f"set fallback_reserve_s: {needed:g}"
                if needed < total
                else f"raise total_s to at least {2 * needed:g}"
            )
        else:
            kept = f"fallback_reserve_s: {reserve:g} of total_s ({total:g} s)"
            fix = f"raise fallback_reserve_s to {needed:g}" if needed < total else "raise total_s"
        found.append(
            f"the route keeps {kept} for its fallback {other}, less than the fallback's"
            f" first_token_s ({needed:g} s): a fallback slow to start may not get its first"
            f" token in time; {fix}, or lower the fallback's first_token_s to {reserve:g}"
        )
    if own < timeouts.first_token_s:
        found.append(
            f"the route's own attempts must have their first token within {own:g} s (total_s"
            f" {total:g} less {reserve:g} kept for its fallback {other}), sooner than its"
            f" first_token_s ({timeouts.first_token_s:g} s); lower first_token_s to {own:g}"
            f" or raise total_s to {reserve + timeouts.first_token_s:g}"
        )
    return found


def _check_backends(routes: Sequence[ModelRoute]) -> None:
    if not routes:
        raise ValueError("models: at least one model route (or a worker) is needed")
    for index, route in enumerate(routes):
        if not route.backends:
            raise ValueError(
                f"models[{index}].backends: {route.name!r} has no backend"
                " (none listed, and no worker registers under it)"
            )


def default_config_path() -> Path:
    """The embedded default: packaged beside the code, or the checkout's config/."""
    packaged = Path(__file__).with_name("_config") / "gateway.yaml"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"


def read_yaml(file: Path, *, what: str = "") -> Any:
    """A YAML file's content; a file that cannot be read or parsed is a ConfigError."""
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        reason = f"cannot read{' ' + what if what else ''}: {exc.strerror or exc}"
        raise ConfigError(str(file), "", reason) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(file), "", f"not valid YAML: {exc}") from None


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Read, override from the environment, and validate a configuration file."""
    file = Path(path) if path is not None else default_config_path()
    source = str(file)
    raw = read_yaml(file)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "", "the top level must be a mapping")
    _apply_env_overrides(raw, os.environ if environ is None else environ, source)
    return parse_config(raw, source=source, base_dir=file.parent)


def parse_config(raw: dict[str, Any], *, source: str, base_dir: Path) -> GatewayConfig:
    raw = dict(raw)
    raw.pop("source", None)
    if "warnings" in raw:
        raise ConfigError(source, "warnings", "unknown field")  # the loader's, not a setting
    warnings = [f"{source}: {warning}" for warning in deprecated_fields(raw)]
    keys = raw.get("keys")
    if isinstance(keys, dict) and isinstance(keys.get("file"), str):
        raw["keys"] = {**keys, "file": base_dir / keys["file"]}
    if isinstance(raw.get("workers"), list):
        raw["workers"] = [_worker_paths(worker, base_dir) for worker in raw["workers"]]
    try:
        return GatewayConfig.model_validate({**raw, "source": source, "warnings": warnings})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = field_path(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if not field and (named := _NAMED_FIELD.match(message)):
            field, message = named.group(1), named.group(2)  # a check across sections
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "required field is missing"
        raise ConfigError(source, field, message) from None


def deprecated_fields(raw: Mapping[str, Any]) -> list[str]:
    """Each use of a field's old name in a raw config (the file, overridden from the
    environment): the field, and what to write instead."""
    found = []
    models = raw.get("models")
    for index, route in enumerate(models if isinstance(models, list) else ()):
        retries = route.get("retries") if isinstance(route, dict) else None
        if isinstance(retries, dict) and "attempts" in retries:
            attempts = retries["attempts"]
            value = attempts - 1 if isinstance(attempts, int) and attempts >= 1 else "N"
            found.append(
                f"models[{index}].retries.attempts: deprecated, use max_retries: {value}"
                " (retries after the first attempt)"
            )
    return found


_NAMED_FIELD = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*): (.+)$", re.S)


def _worker_paths(worker: Any, base_dir: Path) -> Any:
    """A worker's log_dir, and a model given as a relative path (./, ../), are relative to
    the config file; ~ is expanded. Anything else in `model` is a name (e.g. a hub id)."""
    if not isinstance(worker, dict):
        return worker
    worker = dict(worker)
    log_dir = worker.get("log_dir")
    if isinstance(log_dir, str) or log_dir is None:
        worker["log_dir"] = Path(
            os.path.abspath(base_dir / Path(log_dir or ".run/logs").expanduser())
        )
    model = worker.get("model")
    if isinstance(model, str):
        if model.startswith(("./", "../")):
            worker["model"] = os.path.abspath(base_dir / model)  # links left as they are
        elif model.startswith("~"):
            worker["model"] = str(Path(model).expanduser())
    return worker


def field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "tagged-union")):
            continue
        else:
            out += f".{part}" if out else part
    return out


def _apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str], source: str) -> None:
    for variable, text in environ.items():
        if not variable.startswith(ENV_PREFIX) or "__" not in variable:
            continue
        path = [part.lower() for part in variable[len(ENV_PREFIX) :].split("__")]
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        node: Any = raw
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(source, variable, f"no list item {part!r} to override")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(source, variable, f"{'.'.join(path[:depth])} is not a section")
