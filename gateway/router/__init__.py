"""The router: the core every request flows through (see gateway/router/router.py)."""

from gateway.router.core import AnswerBounds, Backend, Route, Router
from gateway.router.hooks import RouterHooks

__all__ = ["AnswerBounds", "Backend", "Route", "Router", "RouterHooks"]
