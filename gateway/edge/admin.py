"""The admin API under /admin/: the keys in force, one key's usage, reloading the keys file,
chaos experiments.

Protected by its own key (config `admin.key_sha256` or `admin.key_sha256_env`), never by an
API key; without one configured these routes do not exist (404). Off the hot path: plain
Starlette routes. Never answers with a secret or a hash. With several worker processes
(`server.workers`), gateway/edge/admin_relay.py wraps these routes so that a call reaches
every worker.

    GET  /admin/keys           every key: id, name, tier, models, limits, guardrails, disabled
    GET  /admin/keys/{id}      the same for one key, with its usage: `process_usage` (what
                               this process served) and `limits_usage` (the limit store's
                               figures: shared by every process with Redis)
    POST /admin/keys/reload    read the keys file now: 200 with counts, or 400 and the old
                               keys stay in force
    GET    /admin/chaos         chaos's master switch and every experiment, running or not
    PUT    /admin/chaos/{name}  start an experiment, the body a `chaos:` config entry (its name
                               from the path): 200 with it, 400 naming the field, or 409 where
                               the config has chaos disabled
    DELETE /admin/chaos/{name}  stop an experiment: 200, or 404 where none has that name
    POST   /admin/config/reload read the config file now and serve it: 200 with what changed
                               (backends added, removed, kept; fields that need a restart,
                               kept as they were), or 400 `invalid_config` naming the file,
                               field and reason (503 `config_not_applied` where a new
                               backend's adapter cannot start), and the config in force stays
    GET    /admin/cache         the response cache: entries, bytes, this process's hits,
                               misses, hit ratio, bypasses by reason, evictions
    DELETE /admin/cache         drop every cached answer, or those of one route
                               (?route=<route name>) or one scope (?scope=<key name>, or
                               ?scope=global): 200 with how many
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from chaos.inject import Chaos
from gateway.asgi import header, read_body
from gateway.config import AdminConfig, ChaosExperiment, field_path
from gateway.edge.auth import KeyRing
from gateway.errors import (
    AuthenticationError,
    BodyTooLarge,
    ConfigError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    clip,
)
from gateway.wire.cachekey import GLOBAL_SCOPE, tag
from gateway.wire.headers import bearer_token
from policies.cache import CacheUnavailable, ResponseCache
from policies.limits import LimitStore, is_unlimited

logger = logging.getLogger("vgate.keys")
chaos_logger = logging.getLogger("vgate.chaos")
MAX_EXPERIMENT_BYTES = 64 * 1024  # an experiment is a few hundred bytes of JSON


class UsageSource(Protocol):
    """This process's own count of a key's requests and tokens (`gateway.edge.usage.KeyUsage`)."""

    async def usage(self, key_id: str) -> dict[str, Any]: ...


def admin_key_hash(config: AdminConfig, source: str) -> str | None:
    """The admin key's SHA-256 from the config, or None: no admin API. Checked at start-up."""
    if config.key_sha256_env is None:
        return config.key_sha256
    value = os.environ.get(config.key_sha256_env, "").strip().lower()
    field = "admin.key_sha256_env"
    if not value:
        raise ConfigError(source, field, f"environment variable {config.key_sha256_env} is not set")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ConfigError(
            source,
            field,
            f"environment variable {config.key_sha256_env} is not a SHA-256 hex digest",
        )
    return value


def admin_routes(
    keys: KeyRing,
    usage: UsageSource,
    key_sha256: str,
    limits: LimitStore | None = None,
    chaos: Chaos | None = None,
    reload_config: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    cache: ResponseCache | None = None,
) -> list[Route]:
    """`usage`: this process's counters; `limits`: the limit store, whose figures (shared
    through Redis when there is one) are each key's `limits_usage`; `chaos`: the gateway's
    experiments (without it, no /admin/chaos routes); `reload_config`: reloads the config,
    answering what changed or raising its `ConfigError` (without it, no /admin/config/reload)."""
    expected = key_sha256.encode("ascii")

    def authorize(request: Request) -> None:
        request.scope["vgate.record"].endpoint = "admin"
        authorization = header(request.scope, b"authorization")
        if authorization is None:
            raise AuthenticationError(
                "Missing admin key: send it as 'Authorization: Bearer <admin key>'.",
                code="missing_api_key",
            )
        secret = bearer_token(authorization)
        digest = hashlib.sha256(secret or b"").hexdigest().encode("ascii")
        # One configured hash: compare_digest keeps the comparison's time independent of it.
        if secret is None or not hmac.compare_digest(digest, expected):
            raise AuthenticationError("Incorrect admin key provided.", code="invalid_api_key")
        request.scope["vgate.record"].caller = "admin"

    async def list_keys(request: Request) -> Response:
        authorize(request)
        return _json({"object": "list", "source": keys.source, "data": keys.describe()})

    async def get_key(request: Request) -> Response:
        authorize(request)
        key_id = request.path_params["key_id"]
        described = keys.describe_key(key_id)
        if described is None:
            raise NotFound(f"No key has the id '{clip(key_id)}'.", code="key_not_found")
        described["process_usage"] = await usage.usage(key_id)
        key_limits = keys.limits_of(key_id)
        described["limits_usage"] = (
            None
            if limits is None or key_limits is None or is_unlimited(key_limits)
            else await limits.usage(key_id, key_limits)
        )
        return _json(described)

    async def reload(request: Request) -> Response:
        authorize(request)
        try:
            counts = await keys.reload()
        except ConfigError as error:
            in_force = keys.counts()["keys"]
            logger.error(
                "admin reload: the keys file is invalid; the %d keys loaded before stay in "
                "force: %s",
                in_force,
                error,
            )
            raise InvalidRequest(
                f"The keys file is invalid, nothing changed ({in_force} keys stay in force): "
                f"{error}",
                code="invalid_keys_file",
            ) from None
        logger.info(
            "admin reload: keys file %s reloaded: %d keys (%d enabled, %d disabled)",
            keys.source,
            counts["keys"],
            counts["enabled"],
            counts["disabled"],
        )
        return _json({"object": "keys.reload", "source": keys.source, **counts})

    routes = [
        Route("/admin/keys", list_keys, methods=["GET"]),
        Route("/admin/keys/reload", reload, methods=["POST"]),
        Route("/admin/keys/{key_id}", get_key, methods=["GET"]),
    ]
    if chaos is not None:
        routes += _chaos_routes(chaos, authorize)
    if reload_config is not None:
        routes.append(_config_reload_route(reload_config, authorize))
    return routes + _cache_routes(cache, authorize)


def _cache_routes(cache: ResponseCache | None, authorize: Callable[[Request], None]) -> list[Route]:
    async def describe(request: Request) -> Response:
        authorize(request)
        if cache is None:
            return _json({"object": "cache", "enabled": False})
        return _json(await cache.describe())

    async def clear(request: Request) -> Response:
        authorize(request)
        route = request.query_params.get("route")
        scope = request.query_params.get("scope")
        deleted = 0
        if cache is not None:
            owner = None
            if scope is not None:
                owner = tag(GLOBAL_SCOPE if scope == GLOBAL_SCOPE else f"key:{scope}")
            try:
                deleted = await cache.store.clear(None if route is None else tag(route), owner)
            except CacheUnavailable:
                raise ServiceUnavailable(
                    "The response cache's store (Redis) did not answer; nothing was deleted.",
                    code="cache_unavailable",
                ) from None
            logger.warning(
                "admin: response cache cleared (route %r, scope %r): %d entries",
                route,
                scope,
                deleted,
            )
        return _json(
            {"object": "cache.deleted", "route": route, "scope": scope, "deleted": deleted}
        )

    return [
        Route("/admin/cache", describe, methods=["GET"]),
        Route("/admin/cache", clear, methods=["DELETE"]),
    ]


def _config_reload_route(
    reload_config: Callable[[], Awaitable[dict[str, Any]]],
    authorize: Callable[[Request], None],
) -> Route:
    async def reload(request: Request) -> Response:
        authorize(request)
        try:
            report = await reload_config()  # logged and counted there, either way
        except ConfigError as error:
            raise InvalidRequest(
                f"The config is invalid, nothing changed (the config in force stays): "
                f"{error.source}: {error.field or '(the file)'}: {error.reason}",
                param=error.field or None,
                code="invalid_config",
            ) from None
        except Exception as error:  # a new backend's adapter could not start
            raise ServiceUnavailable(
                f"The config could not be applied, nothing changed (the config in force "
                f"stays): {clip(str(error))}",
                code="config_not_applied",
            ) from None
        return _json(report)

    return Route("/admin/config/reload", reload, methods=["POST"])


def _chaos_routes(chaos: Chaos, authorize: Callable[[Request], None]) -> list[Route]:
    def described(name: str) -> dict[str, Any]:
        return next(e for e in chaos.experiments() if e["name"] == name)

    async def list_experiments(request: Request) -> Response:
        authorize(request)
        return _json({"object": "list", "enabled": chaos.enabled, "data": chaos.experiments()})

    async def start(request: Request) -> Response:
        authorize(request)
        name = request.path_params["name"]
        experiment = _experiment(name, await _body(request))
        chaos.start(experiment)  # ChaosDisabled (409) where the config has chaos disabled
        chaos_logger.warning(
            "admin: chaos experiment %r started: %s",
            name,
            experiment.model_dump_json(exclude_defaults=True),
        )
        return _json(described(name))

    async def stop(request: Request) -> Response:
        authorize(request)
        name = request.path_params["name"]
        if not chaos.stop(name):
            raise NotFound(
                f"No chaos experiment is named '{clip(name)}'.", code="experiment_not_found"
            )
        chaos_logger.warning("admin: chaos experiment %r stopped", name)
        return _json({"object": "chaos.experiment.deleted", "name": name, "deleted": True})

    return [
        Route("/admin/chaos", list_experiments, methods=["GET"]),
        Route("/admin/chaos/{name}", start, methods=["PUT"]),
        Route("/admin/chaos/{name}", stop, methods=["DELETE"]),
    ]


async def _body(request: Request) -> object:
    """The request's JSON body, within MAX_EXPERIMENT_BYTES."""
    try:
        body = await read_body(request.scope, request.receive, MAX_EXPERIMENT_BYTES)
    except BodyTooLarge:
        raise PayloadTooLarge(
            f"A chaos experiment is at most {MAX_EXPERIMENT_BYTES} bytes of JSON."
        ) from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "The body is not valid JSON: send a chaos experiment as a JSON object.",
            code="invalid_json",
        ) from None


def _experiment(name: str, raw: object) -> ChaosExperiment:
    """`raw` as the experiment `name`, as the config's `chaos.experiments` entries are
    checked; the first thing wrong names its field."""
    if not isinstance(raw, dict):
        raise InvalidRequest(
            "The body must be a JSON object: a chaos experiment.", code="invalid_json"
        )
    if raw.setdefault("name", name) != name:
        raise InvalidRequest(
            f"The body names experiment '{clip(str(raw['name']))}', the path '{clip(name)}': "
            "leave the name out, or make them the same.",
            param="name",
            code="invalid_value",
        )
    try:
        return ChaosExperiment.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = field_path(error["loc"]) or "body"
        reason = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        raise InvalidRequest(
            f"Invalid chaos experiment: '{field}': {reason}.", param=field, code="invalid_value"
        ) from None


def _json(content: dict[str, Any]) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")
