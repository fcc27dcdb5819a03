"""The vgate extension's probes for Chaos Toolkit drill files.

`slos_hold` is the steady-state probe every vgate drill's hypothesis uses: it lets the
drill's load run for a while, records that span as the "before" phase (ahead of the
method) or the "after" phase (behind it), and answers whether the config's SLOs held there::

    steady-state-hypothesis:
      title: the SLOs hold
      probes:
        - type: probe
          name: slos-hold
          tolerance: true
          provider: {type: python, module: chaos.drill.probes, func: slos_hold,
                     arguments: {observe_s: 10}}

`expect_status` checks one request's answer; in a method it fails the drill when the
gateway answers otherwise (a budget key refused with 429, a fail-closed 503).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from chaoslib.exceptions import ActivityFailed

from chaos.drill.actions import ADMIN_TIMEOUT_S
from chaos.drill.session import session_of

__all__ = ["expect_status", "slos_hold"]


def slos_hold(
    observe_s: float, settle_s: float = 0.0, configuration: dict[str, Any] | None = None
) -> bool:
    """Observes `observe_s` seconds of load (after `settle_s` unjudged, to recover in);
    whether every SLO and `requests_lost` held in them."""
    return session_of(configuration).observe(observe_s, settle_s)


def expect_status(
    status: int,
    model: str = "default",
    key_env: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> int:
    """Sends one small chat request (with the key in `key_env`, else the load's key); fails
    unless the gateway answers `status`."""
    session = session_of(configuration)
    key = os.environ.get(key_env, "") if key_env else session.target.key
    if not key:
        raise ActivityFailed(f"key_env: the environment variable {key_env} is not set")
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    try:
        response = httpx.post(
            session.target.url.rstrip("/") + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=ADMIN_TIMEOUT_S,
        )
    except httpx.HTTPError as error:
        raise ActivityFailed(f"no answer: {type(error).__name__}: {error}") from None
    if response.status_code != status:
        raise ActivityFailed(
            f"expected {status}, the gateway answered {response.status_code}: {response.text[:300]}"
        )
    return response.status_code
