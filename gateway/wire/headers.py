"""The header values the gateway reads and writes itself: Retry-After and Bearer credentials.

Each is said once, here: every Retry-After the gateway sends is `retry_after(seconds)`,
every one an upstream sends is read by `retry_after_seconds`, and every `Authorization:
Bearer` (an API key, a JWT, the admin key) is taken apart by `bearer_token`.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from datetime import UTC

# A longer wait told to a client is no longer a hint to retry; how long the gateway itself
# honours an upstream's is the route's retries.retry_after_max_s.
RETRY_AFTER_MAX_S = 3600
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _whole_seconds(seconds: float) -> int:
    """Rounded up, so that a wait is never told shorter than it is; a float's last-digit
    noise (1.0000000002) is not a second more."""
    return math.ceil(round(seconds, 6))


def retry_after(seconds: float) -> str:
    """Retry-After's value for a wait the gateway asks of a client: whole seconds, rounded
    up, at least 1 (a 0 invites the retry at once that the answer is there to prevent) and
    at most `RETRY_AFTER_MAX_S`."""
    if seconds >= RETRY_AFTER_MAX_S:
        return str(RETRY_AFTER_MAX_S)
    return str(max(1, _whole_seconds(seconds)))


def retry_after_seconds(
    value: str | None, *, cap: int = RETRY_AFTER_MAX_S, now: float | None = None
) -> int | None:
    """An upstream's Retry-After as whole seconds within [0, cap]; None unless it is
    delta-seconds or an HTTP-date (RFC 9110, 10.2.3). A fraction rounds up, a past date is 0.
    What reaches a client is this number, never the upstream's bytes."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)  # inf for a thousand digits, never an error
    elif len(value) <= 64:  # an HTTP-date is 29 characters
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:  # "-0000": UTC, says RFC 5322
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    else:
        return None
    if seconds >= cap:
        return cap
    return max(_whole_seconds(seconds), 0)


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The credential of an `Authorization: Bearer <credential>` header value (the scheme
    in any case, the credential stripped); None for no header, another scheme, or none."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None
