"""Per-key rate limits and quotas: the decision's value objects, arithmetic and wire format.

Four limits per API key, each optional (`KeyLimits`):

- `rpm`, requests per minute, and `tpm`, tokens per minute: each a GCRA in its
  continuous-state form (a bucket that holds at most one minute's allowance and drains at
  the limit's rate). A key that was idle may spend its whole minute at once, and from then
  on gets the limit's rate, smoothly: over any interval of t seconds at most
  `limit * (1 + t / 60)` pass, never the `2 * limit` in an instant that fixed windows allow at
  their edges. Refused requests are not counted.
- `tokens_per_day`: a quota for the UTC day, refused with 403 `insufficient_quota` (rate
  limits are 429 `rate_limit_exceeded`).
- `max_concurrent`: requests of the key in flight at once (429).

A request is charged before it is routed: one request, and `estimate_tokens` tokens (its
prompt's size and its completion budget) to both `tpm` and the day's quota, all or nothing:
a refusal charges nothing. When the response ends, `settle` gives back the concurrency slot
and reconciles the tokens with the real `usage` (the difference given back or taken); a
request that failed upstream gets back everything it was charged.

Arithmetic is in integers, so that every store decides alike and exactly: time in
microseconds, and a bucket counted in units where one request or token is `PERIOD_US` units
and the bucket drains `limit` units per microsecond. A bucket holds `limit * PERIOD_US`
units; usage beyond the estimate may push it past that (a debt, paid off at the limit's rate)
up to twice that. With limits up to `MAX_LIMIT` every number stays below 2**53, exact in
Redis's Lua (doubles) as in Python.

The stores: `policies.limits_local.LocalLimits` (one process) and
`policies.limits_redis.FailoverLimits` (every process through Redis, one round trip per
request, local or 503 when Redis fails).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    LimitExceeded,
    LimitsUnavailable,
    QuotaExceeded,
    TokenLimitExceeded,
)
from gateway.wire.headers import retry_after
from gateway.wire.validation import Endpoint, Prompt, measure_prompt

PERIOD_US = 60_000_000  # the rate limits' period: one minute
DAY_US = 86_400_000_000
MAX_LIMIT = 50_000_000  # per minute; a higher limit is enforced as this (exactness bound)
MAX_TOKENS = 1 << 40  # an estimate or usage beyond this is taken as this

# Which limit refused a request: bounded, so it may be a metric label.
REQUESTS = "requests"
TOKENS = "tokens"
TOKENS_PER_DAY = "tokens_per_day"
CONCURRENCY = "concurrency"
UNAVAILABLE = "unavailable"  # fail-closed: the shared store cannot be reached

# The stores' decision, as the Redis script returns it (a list of integers, in this order).
R_REFUSED, R_WAIT_US, R_REQ_LEFT, R_REQ_RESET_US, R_TOK_LEFT, R_TOK_RESET_US = range(6)
R_DAY_LEFT, R_DAY = 6, 7  # then the Redis script's clock, which nothing reads
# R_REFUSED values: which limit refused (0: none).
NOT_REFUSED, BY_CONCURRENCY, BY_REQUESTS, BY_TOKENS, BY_DAY, BY_SIZE = range(6)

FailureMode = Literal["open", "closed"]


class LimitSpec(Protocol):
    """A key's limits: anything with these four attributes (`KeyLimits`, or the keys file's)."""

    @property
    def rpm(self) -> int | None: ...
    @property
    def tpm(self) -> int | None: ...
    @property
    def tokens_per_day(self) -> int | None: ...
    @property
    def max_concurrent(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's rate limits and quotas (None: not limited that way)."""

    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + completion) per minute
    tokens_per_day: int | None = None  # per UTC day; exhausted is 403 insufficient_quota
    max_concurrent: int | None = None  # requests in flight at once

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "tokens_per_day", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")

    def to_json(self) -> dict[str, int | None]:
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "tokens_per_day": self.tokens_per_day,
            "max_concurrent": self.max_concurrent,
        }


NO_LIMITS = KeyLimits()


def is_unlimited(limits: LimitSpec) -> bool:
    return (
        limits.rpm is None
        and limits.tpm is None
        and limits.tokens_per_day is None
        and limits.max_concurrent is None
    )


def rate(limit: int | None) -> int:
    """A per-minute limit as the stores use it: 0 for none, at most `MAX_LIMIT`."""
    return 0 if limit is None else min(limit, MAX_LIMIT)


def clamp_tokens(tokens: int) -> int:
    return max(0, min(int(tokens), MAX_TOKENS))


@dataclass(slots=True, eq=False)
class Ticket:
    """What one admitted request was charged, to be settled once when it ends.

    `store` is the store that admitted it (settling goes back there, even when a failover
    store has switched since); `handle` is that store's own business.
    """

    key_id: str
    id: str
    limits: LimitSpec
    tokens: int  # charged up front, to tpm and the day's quota
    day: int  # the UTC day (days since the epoch) the quota was charged in
    store: Any = None
    handle: Any = None
    settled: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """May this request go on; if not, the error to answer with. `headers` are the
    x-ratelimit-* headers (and Retry-After on a refusal), for the response either way
    (read them, do not change them: `ALLOWED`'s are shared)."""

    allowed: bool
    status: int | None = None  # 429, 403 or 503 when refused
    code: str = ""
    message: str = ""
    retry_after_s: float | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ticket: Ticket | None = None  # allowed: settle it when the response ends
    limit: str | None = None  # refused: which limit (REQUESTS, TOKENS, ...); bounded

    def error(self) -> GatewayError:
        """The refusal as the gateway's error, headers included (raise it at the edge)."""
        refusal = _REFUSALS[self.limit or REQUESTS]
        return refusal(
            self.message,
            code=self.code,
            headers={name.decode(): value.decode() for name, value in self.headers},
        )


ALLOWED = Verdict(True)  # for a key without limits: nothing charged, nothing to settle
# Which error tells a client about each limit's refusal (the class says status and type).
_REFUSALS: dict[str, type[GatewayError]] = {
    REQUESTS: LimitExceeded,
    CONCURRENCY: LimitExceeded,
    TOKENS: TokenLimitExceeded,
    TOKENS_PER_DAY: QuotaExceeded,
    UNAVAILABLE: LimitsUnavailable,
}


class LimitStore(Protocol):
    """Where limits are kept. The hot path is one `await admit(...)` before routing and one
    `settle_nowait(...)` when the response has ended (never waits)."""

    async def admit(
        self, key_id: str, limits: LimitSpec, tokens_estimate: int, *, ticket_id: str | None = None
    ) -> Verdict:
        """Check every limit of the key and, only if all allow, charge one request and
        `tokens_estimate` tokens and take a concurrency slot, atomically."""
        ...

    async def settle(self, ticket: Ticket, actual_tokens: int | None, *, failed: bool) -> None:
        """Give back the concurrency slot and reconcile: `actual_tokens` (usage's total;
        None: unknown, the estimate stands) replaces the estimate in tpm and the day's quota;
        `failed` gives back the request too (and the tokens, less `actual_tokens` if some
        reached the client). A ticket is settled once; again is a no-op."""
        ...

    def settle_nowait(self, ticket: Ticket, actual_tokens: int | None, *, failed: bool) -> None:
        """`settle` without waiting: done now (in process) or in a bounded background task."""
        ...

    async def usage(self, key_id: str, limits: LimitSpec) -> dict[str, Any]:
        """The key's figures now, charging nothing (`usage_report`'s fields): what is left
        of this minute's buckets, the day's tokens (after reconciliation) and the slots in
        flight, each None where the key has no such limit."""
        ...

    async def aclose(self) -> None: ...


def usage_report(
    limits: LimitSpec,
    source: str,
    req_level: int,
    tok_level: int,
    tokens_today: int,
    in_flight: int,
) -> dict[str, Any]:
    """A store's usage of a key from its state now: the buckets' levels (units, drained to
    now), the day's tokens and the tickets in flight. Remaining as the x-ratelimit headers
    compute it; None where the key has no such limit."""
    rpm, tpm, quota = rate(limits.rpm), rate(limits.tpm), limits.tokens_per_day
    return {
        "source": source,  # "redis": shared by every process; "local": this process's own
        "requests_remaining": (
            max(0, (rpm * PERIOD_US - req_level) // PERIOD_US) if limits.rpm is not None else None
        ),
        "tokens_remaining": (
            max(0, (tpm * PERIOD_US - tok_level) // PERIOD_US) if limits.tpm is not None else None
        ),
        "tokens_today": tokens_today if quota is not None else None,
        "tokens_per_day_remaining": max(0, quota - tokens_today) if quota is not None else None,
        "in_flight": in_flight if limits.max_concurrent is not None else None,
    }


# Estimating a request's tokens before it runs.

_CHARS_PER_TOKEN = 4
_MESSAGE_OVERHEAD_TOKENS = 4  # role and separators, per chat message
_IMAGE_TOKENS = 85  # an image part, at OpenAI's "low detail" price


def estimate_tokens(
    payload: dict[str, Any],
    endpoint: str,
    default_max_tokens: int = 256,
    prompt: Prompt | None = None,
) -> int:
    """A cheap upper-ish estimate of the tokens a request will use, without a tokenizer.

    The prompt, as `gateway.wire.validation.measure_prompt` measures it for the guardrails too:
    its text's characters divided by 4, rounded up (every shape rendered into the prompt:
    message contents, names, tool calls, tool definitions, a completion's prompt and suffix,
    an embedding's input), plus 4 tokens per chat message, 85 per media part and one per
    token id given as such. Pass the request's `prompt` where it was measured already (by
    `parse_request`), to spare a second walk. The completion: `max_completion_tokens`, else
    `max_tokens`, else `default_max_tokens`, times the completions generated (`n`, or a
    completion's `best_of` where larger); embeddings have none. `endpoint` is the request's
    path (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`) or the short name.
    The estimate is reconciled with the response's `usage` when it ends.
    """
    embeddings = endpoint.endswith("embeddings")
    if prompt is None:
        if endpoint.endswith("chat/completions") or endpoint == "chat":
            kind = Endpoint.CHAT
        else:
            kind = Endpoint.EMBEDDINGS if embeddings else Endpoint.COMPLETIONS
        try:
            prompt = measure_prompt(kind, payload)
        except InvalidRequest:
            prompt = Prompt()  # not a valid request: its completion budget alone
    tokens = (
        prompt.token_ids
        + _MESSAGE_OVERHEAD_TOKENS * prompt.messages
        + _IMAGE_TOKENS * prompt.media
        - (-sum(map(len, prompt.all_texts())) // _CHARS_PER_TOKEN)
    )
    if not embeddings:
        budget = _count(payload.get("max_completion_tokens"))
        if budget is None:
            budget = _count(payload.get("max_tokens"))
        if budget is None:
            budget = default_max_tokens
        choices = max(1, _count(payload.get("n")) or 1, _count(payload.get("best_of")) or 1)
        tokens += budget * choices
    return clamp_tokens(tokens)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


# The wire format: OpenAI's x-ratelimit-* headers, and Retry-After on a refusal.


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes its resets: "20ms", "1s", "8.64s", "6m0s", "1h2m3s".

    Rounded up to the millisecond, so a wait is never shown shorter than it is."""
    ms = math.ceil(round(seconds * 1000, 6)) if seconds > 0 else 0
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    text = f"{secs}.{ms:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


_LIMIT_REQUESTS = b"x-ratelimit-limit-requests"
_REMAINING_REQUESTS = b"x-ratelimit-remaining-requests"
_RESET_REQUESTS = b"x-ratelimit-reset-requests"
_LIMIT_TOKENS = b"x-ratelimit-limit-tokens"
_REMAINING_TOKENS = b"x-ratelimit-remaining-tokens"
_RESET_TOKENS = b"x-ratelimit-reset-tokens"
_RETRY_AFTER = b"retry-after"


def ratelimit_headers(
    limits: LimitSpec,
    requests_remaining: int,
    requests_reset_s: float,
    tokens_remaining: int,
    tokens_reset_s: float,
    retry_after_s: float | None = None,
) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} for the limits the key
    has (none for a limit it has not), and Retry-After when `retry_after_s` is given.
    Reset is when the limit is back to its full allowance."""
    headers: list[tuple[bytes, bytes]] = []
    if limits.rpm is not None:
        headers += [
            (_LIMIT_REQUESTS, str(limits.rpm).encode()),
            (_REMAINING_REQUESTS, str(max(0, requests_remaining)).encode()),
            (_RESET_REQUESTS, format_duration(requests_reset_s).encode()),
        ]
    if limits.tpm is not None:
        headers += [
            (_LIMIT_TOKENS, str(limits.tpm).encode()),
            (_REMAINING_TOKENS, str(max(0, tokens_remaining)).encode()),
            (_RESET_TOKENS, format_duration(tokens_reset_s).encode()),
        ]
    if retry_after_s is not None:
        headers.append((_RETRY_AFTER, retry_after(retry_after_s).encode()))
    return headers


def unavailable(retry_after_s: float) -> Verdict:
    """Fail-closed: the limits cannot be checked, so the request is not served."""
    return Verdict(
        False,
        503,
        "rate_limits_unavailable",
        "Rate limits cannot be checked right now; please retry shortly.",
        retry_after_s,
        [(_RETRY_AFTER, retry_after(retry_after_s).encode())],
        None,
        UNAVAILABLE,
    )


def verdict_from(
    limits: LimitSpec, tokens: int, result: Sequence[int], ticket: Ticket | None
) -> Verdict:
    """A store's decision (the R_* integers) as a Verdict; `ticket` goes with an allowance."""
    refused = int(result[R_REFUSED])
    wait_s = int(result[R_WAIT_US]) / 1e6

    def headers_with(retry_after_s: float | None = None) -> list[tuple[bytes, bytes]]:
        return ratelimit_headers(
            limits,
            int(result[R_REQ_LEFT]),
            int(result[R_REQ_RESET_US]) / 1e6,
            int(result[R_TOK_LEFT]),
            int(result[R_TOK_RESET_US]) / 1e6,
            retry_after_s,
        )

    if refused == NOT_REFUSED:
        headers = headers_with()
        return Verdict(True, headers=headers, ticket=ticket)
    if refused == BY_DAY:
        headers = headers_with()
        left = max(0, int(result[R_DAY_LEFT]))
        message = (
            f"You exceeded your daily token quota ({limits.tokens_per_day} tokens per day; "
            f"{left} left, this request needs about {tokens}). The quota resets at 00:00 UTC, "
            f"in {format_duration(wait_s)}."
        )
        return Verdict(
            False, 403, "insufficient_quota", message, wait_s, headers, None, TOKENS_PER_DAY
        )
    retry_after_s = max(wait_s, 0.001)
    headers = headers_with(retry_after_s)
    if refused == BY_CONCURRENCY:
        message = (
            f"Too many requests in flight for this key (limit {limits.max_concurrent}). "
            "Please retry when one of them has finished."
        )
        return Verdict(
            False,
            429,
            "concurrency_limit_exceeded",
            message,
            retry_after_s,
            headers,
            None,
            CONCURRENCY,
        )
    if refused == BY_SIZE:
        message = (
            f"Request too large for tokens per min (TPM): limit {limits.tpm}, requested about "
            f"{tokens}. Reduce the prompt or max_tokens."
        )
        return Verdict(
            False, 429, "rate_limit_exceeded", message, retry_after_s, headers, None, TOKENS
        )
    if refused == BY_TOKENS:
        message = (
            f"Rate limit reached for tokens per min (TPM): limit {limits.tpm}, requested "
            f"about {tokens}. Please try again in {format_duration(wait_s)}."
        )
        return Verdict(
            False, 429, "rate_limit_exceeded", message, retry_after_s, headers, None, TOKENS
        )
    message = (
        f"Rate limit reached for requests per min (RPM): limit {limits.rpm}. "
        f"Please try again in {format_duration(wait_s)}."
    )
    return Verdict(
        False, 429, "rate_limit_exceeded", message, retry_after_s, headers, None, REQUESTS
    )
