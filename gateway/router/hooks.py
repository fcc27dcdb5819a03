"""What the router tells the rest of the process as it works: typed callbacks, set once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _ignore(*_: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class RouterHooks:
    """Called synchronously on the request's path, so each must be cheap (a counter)."""

    on_retry: Callable[[str, float], None] = _ignore  # route name, backoff delay in seconds
    on_fallback: Callable[[str, str], None] = _ignore  # the route given up, the one tried next
    on_resume: Callable[[str, str, str], None] = _ignore  # route, mode, outcome
