"""A drill action for the tests: a call that takes its time, as a slow HTTP call would."""

from __future__ import annotations

import time


def slow_call(seconds: float) -> dict[str, float]:
    time.sleep(seconds)
    return {"slept_s": seconds}
