"""`SimWorker`, the ASGI app: one instance is one simulated `vllm serve` process.

It composes the parts (engine, parser, renderer, endpoints, metrics, fault injection) and does
what vLLM's app does before an endpoint runs: the lifespan protocol, the API key check under
`/v1`, routing with 404 and 405, plus the small endpoints (models, health) and the run-time
fault controls (`/sim/faults`, `/sim/stats`).
"""

from __future__ import annotations

import hmac
import time

import orjson

from chaos.faults import FaultInjector, Faults
from chaos.sim.completions import Completions
from chaos.sim.embeddings import Embeddings
from chaos.sim.engine import Engine
from chaos.sim.injection import FaultedEndpoints
from chaos.sim.metrics import Metrics
from chaos.sim.parsing import RequestParser
from chaos.sim.protocol import (
    MAX_BODY_BYTES,
    NOT_FOUND,
    UNAUTHORIZED,
    Handler,
    HTTPError,
    RequestIds,
    invalid,
    send_json,
)
from chaos.sim.render import Renderer, models_body
from chaos.sim.settings import SimSettings
from gateway.asgi import Receive, Scope, Send, header, read_body
from gateway.errors import BodyTooLarge, ClientDisconnected
from gateway.wire.headers import bearer_token

__all__ = ["SimWorker"]

_INFERENCE = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class SimWorker:
    """The ASGI app. One instance is one simulated `vllm serve` process."""

    def __init__(self, settings: SimSettings) -> None:
        if not settings.models:
            raise ValueError("SimSettings.models must name at least one model")
        if settings.max_num_seqs < 1 or settings.tokens_per_chunk < 1:
            raise ValueError("max_num_seqs and tokens_per_chunk must be at least 1")
        self.settings = settings
        self._engine = engine = Engine(settings)
        self._api_key = settings.api_key.encode() if settings.api_key is not None else None
        ids = RequestIds()
        parser = RequestParser(settings, engine.stats)
        self._completions = Completions(parser, engine, Renderer(ids), settings.tokens_per_chunk)
        self._embeddings = Embeddings(settings, parser, engine, ids)
        self._started = time.time()
        self._models_body = models_body(settings, int(self._started))
        self._metrics = Metrics(engine.stats, self._started)
        self._injector = FaultInjector()
        faulted = FaultedEndpoints(
            self._injector, engine, self._completions, self._embeddings, settings.models[0]
        )
        # A route's method "*" means its handler checks the method itself.
        self._routes: dict[str, tuple[str, Handler]] = {
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/completions": ("POST", self._text_completions),
            "/v1/embeddings": ("POST", self._embed),
            "/v1/models": ("GET", self._models),
            "/health": ("GET", self._health),
            "/metrics": ("GET", self._metrics.handle),
            "/sim/faults": ("*", self._faults_endpoint),
            "/sim/stats": ("GET", self._fault_stats),
        }
        # While faults are set, the inference routes go through `faulted` instead, so that a
        # worker without faults pays nothing for them.
        self._plain_routes = {path: self._routes[path] for path in _INFERENCE}
        self._faulted_routes: dict[str, tuple[str, Handler]] = {
            "/v1/chat/completions": ("POST", faulted.chat),
            "/v1/completions": ("POST", faulted.completions),
            "/v1/embeddings": ("POST", faulted.embeddings),
        }
        self.set_faults(settings.faults)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        # vLLM checks the key in a middleware, before routing, and only under /v1.
        if (
            self._api_key is not None
            and path.startswith("/v1")
            and method != "OPTIONS"
            and not self._authorized(scope)
        ):
            await UNAUTHORIZED.send(send)
            return
        route = self._routes.get(path)
        if route is None:
            await NOT_FOUND.send(send)
            return
        allowed, handler = route
        if method != allowed and allowed != "*":
            await HTTPError(
                405, {"detail": "Method Not Allowed"}, [(b"allow", allowed.encode())]
            ).send(send)
            return
        await handler(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorized(self, scope: Scope) -> bool:
        assert self._api_key is not None
        token = bearer_token(header(scope, b"authorization"))
        return token is not None and hmac.compare_digest(token, self._api_key)

    # ---- the plain routes (with faults set, `FaultedEndpoints` counts requests itself) ------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._injector.admit()  # counted; with no faults set, never picked
        await self._completions.handle(scope, receive, send, chat=True)

    async def _text_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._injector.admit()  # counted; with no faults set, never picked
        await self._completions.handle(scope, receive, send, chat=False)

    async def _embed(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._injector.admit()  # counted; with no faults set, never picked
        await self._embeddings.handle(scope, receive, send)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, self._models_body)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = self._injector.faults.health_status
        headers = [(b"content-length", b"0")]
        await send(
            {
                "type": "http.response.start",
                "status": 200 if status is None else status,
                "headers": headers,
            }
        )
        await send({"type": "http.response.body", "body": b""})

    def render_metrics(self) -> bytes:
        """vLLM's metric names and labels, rendered by prometheus_client as vLLM's are."""
        return self._metrics.render()

    # ---- fault injection -----------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._injector.faults

    def set_faults(self, faults: Faults) -> None:
        """Make `faults` the active ones, and count requests and faults afresh."""
        self._injector.set(faults)
        tps = self.settings.tokens_per_s if faults.tokens_per_s is None else faults.tokens_per_s
        self._engine.set_tokens_per_s(tps)
        self._routes.update(self._faulted_routes if faults.per_request else self._plain_routes)

    async def _faults_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method == "PUT":
            try:
                data = orjson.loads(await read_body(scope, receive, MAX_BODY_BYTES))
                faults = Faults.from_json(data)
            except (orjson.JSONDecodeError, ValueError, BodyTooLarge) as exc:
                await invalid(f"Invalid faults: {exc}").send(send)
                return
            except ClientDisconnected:
                return
            self.set_faults(faults)
        elif method == "DELETE":
            self.set_faults(Faults())
        elif method != "GET":
            allow = [(b"allow", b"GET, PUT, DELETE")]
            await HTTPError(405, {"detail": "Method Not Allowed"}, allow).send(send)
            return
        await send_json(send, 200, orjson.dumps(self._injector.faults.to_json()))

    async def _fault_stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, orjson.dumps(self._injector.stats()))
