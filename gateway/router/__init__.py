"""The router: the core every request flows through.

`Router` (router.py) runs a request's attempts, retries and fallbacks under one deadline;
one attempt is one upstream exchange (exchange.py) with one backend (backend.py) chosen by
its route (route.py); streams (streams.py) resume on another backend when they break. The
edge hands in a `Plan` (plan.py) and reads back what happened from the `Outcome`.
"""

from gateway.router.backend import Backend
from gateway.router.exchange import AnswerBounds
from gateway.router.hooks import RouterHooks
from gateway.router.outcome import Completion, Outcome
from gateway.router.plan import Call, Plan
from gateway.router.route import Decision, Route
from gateway.router.router import Router
from gateway.router.streams import ClientStream

__all__ = [
    "AnswerBounds",
    "Backend",
    "Call",
    "ClientStream",
    "Completion",
    "Decision",
    "Outcome",
    "Plan",
    "Route",
    "Router",
    "RouterHooks",
]
