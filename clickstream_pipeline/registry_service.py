"""The registry API, ``clickstream registry serve``: one source of truth over HTTP.

A Starlette application (the ASGI stack dagster-webserver already runs) over any registry backend
(``CLICKSTREAM_REGISTRY_BACKEND``: a PostgreSQL URL in production, a YAML file on a laptop):

- ``GET /customers`` -> ``{"customers": {"acme": {"events": [...]}}}`` with an ``ETag``;
  ``If-None-Match`` answers 304 while the registry is unchanged.
- ``PUT /customers/<c>/events/<e>`` adds (201, or 200 if it was there);
  ``DELETE /customers/<c>/events/<e>`` and ``DELETE /customers/<c>`` remove (404 if absent).
- ``PUT /customers`` replaces the whole registry and requires ``If-Match``.
- Every write takes ``If-Match``: a write based on a stale read gets 412, and nothing changes.
- ``GET /history`` (a backend with a history), ``GET /openapi.json`` and ``GET /healthz``.

Bearer tokens come from ``CLICKSTREAM_REGISTRY_READ_TOKEN`` and
``CLICKSTREAM_REGISTRY_WRITE_TOKEN`` (or their ``_FILE`` forms naming a mounted Secret, read
again at each request so a rotated Secret takes effect; several tokens per variable, separated
by commas, let old and new overlap). No or a wrong token gets 401; a read token writing, 403; a
name outside the rule, 400 with a one-line reason. Every error body is ``{"error": "..."}``.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import anyio
import anyio.to_thread
import orjson
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    SimpleUser,
)
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from clickstream_pipeline.config import secret_from_env
from clickstream_pipeline.errors import ClickstreamError, first_line
from clickstream_pipeline.names import NAME_RULE, Stream, is_valid_name
from clickstream_pipeline.registry import (
    Registry,
    RegistryBackend,
    RegistryEdit,
    RegistryNotFound,
    registry_etag,
)
from clickstream_pipeline.registry_http import (
    ACTOR_HEADER,
    ORIGIN_HEADER,
    registry_from_json,
    registry_to_json,
)

READ_TOKEN = "CLICKSTREAM_REGISTRY_READ_TOKEN"
WRITE_TOKEN = "CLICKSTREAM_REGISTRY_WRITE_TOKEN"
READ, WRITE = "read", "write"
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
DEFAULT_HISTORY, MAX_HISTORY = 50, 1000
# Reads answer from the registry the backend gave at most this long ago, or after this server's
# own last write: a change made elsewhere (another replica, the database directly) is seen
# within it, and a thousand reads a second cost ten questions to the backend.
FRESH_SECONDS = 0.1
# Worker threads for reads, and as many for writes: one pooled PostgreSQL connection each
# (registry_postgres.POOL_SIZE).
WORKERS = 8
_HEADER_VALUE = re.compile(r"[\x20-\x7e]{1,200}")  # an actor or origin as recorded


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Tokens:
    """The accepted bearer tokens and their scopes, read from the environment at each call."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.environ = environ

    def _values(self, name: str) -> list[str]:
        value = secret_from_env(name, self.environ)
        return [t for t in re.split(r"[\s,]+", value or "") if t]

    def configured(self) -> bool:
        return bool(self._values(READ_TOKEN) or self._values(WRITE_TOKEN))

    def scopes(self, token: str) -> list[str]:
        """WRITE and READ for a write token, READ for a read token, nothing for another."""
        given = token.encode()

        def matches(name: str) -> bool:
            # Every candidate is compared, in constant time, whatever matched first.
            return any([hmac.compare_digest(given, t.encode()) for t in self._values(name)])

        if matches(WRITE_TOKEN):
            return [READ, WRITE]
        return [READ] if matches(READ_TOKEN) else []


class BearerTokens(AuthenticationBackend):
    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if conn.url.path in PUBLIC_PATHS:
            return None
        scheme, _, token = conn.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("a bearer token is required (Authorization: Bearer ...)")
        scopes = self.tokens.scopes(token.strip())
        if not scopes:
            raise AuthenticationError("the bearer token is not valid")
        return AuthCredentials(scopes), SimpleUser(WRITE if WRITE in scopes else READ)


def _unauthorized(conn: HTTPConnection, exc: Exception) -> Response:
    return error(401, str(exc), {"WWW-Authenticate": 'Bearer realm="clickstream-registry"'})


def _require(request: Request, scope: str) -> None:
    if scope not in request.auth.scopes:
        raise HTTPException(403, "this token may read the registry, not change it")


def _name(request: Request, kind: str) -> str:
    value = request.path_params[kind]
    if not is_valid_name(value):
        raise HTTPException(400, f"invalid {kind} {value!r}: names must match {NAME_RULE}")
    return str(value)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


class RegistryAPI:
    """The endpoints, over one backend."""

    def __init__(self, backend: RegistryBackend) -> None:
        self.backend = backend
        self._rendered: tuple[Registry, bytes, str] | None = None  # the last GET's answer
        self._checked: tuple[float, Registry] | None = None  # when the backend last said so
        # Bumped by every write: a read of the backend begun before a write's commit must not
        # be kept as fresh after it.
        self._writes = itertools.count()
        self._generation = next(self._writes)
        # Reads and writes have worker threads of their own, so writers waiting for the
        # registry's lock never hold up a read. (Made at the first request: they belong to
        # the event loop.)
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._refreshing: anyio.Lock | None = None

    def readers(self) -> anyio.CapacityLimiter:
        return self._limiters.setdefault("read", anyio.CapacityLimiter(WORKERS))

    def writers(self) -> anyio.CapacityLimiter:
        return self._limiters.setdefault("write", anyio.CapacityLimiter(WORKERS))

    async def _current(self) -> Registry:
        """The registry, as the backend said at most FRESH_SECONDS ago or after this server's
        last write; asked again (by one request, the others waiting for it) when older."""
        checked = self._checked
        if checked is not None and time.monotonic() - checked[0] < FRESH_SECONDS:
            return checked[1]
        self._refreshing = self._refreshing or anyio.Lock()
        async with self._refreshing:
            checked = self._checked
            if checked is None or time.monotonic() - checked[0] >= FRESH_SECONDS:
                generation, asked = self._generation, time.monotonic()
                registry = await anyio.to_thread.run_sync(self._load, limiter=self.readers())
                checked = (asked, registry)
                if generation == self._generation:
                    self._checked = checked
        return checked[1]

    def _load(self) -> Registry:
        try:
            return self.backend.load()
        except RegistryNotFound:  # a file not written yet: nothing is registered
            return Registry()

    def _rendering(self, registry: Registry) -> tuple[bytes, str]:
        rendered = self._rendered
        if rendered is None or rendered[0] is not registry:
            rendered = (registry, orjson.dumps(registry_to_json(registry)), registry_etag(registry))
            self._rendered = rendered
        return rendered[1], rendered[2]

    @contextlib.contextmanager
    def _edit(self, request: Request) -> Iterator[RegistryEdit]:
        """The backend's locked edit, refused with 412 if ``If-Match`` names another registry."""
        _require(request, WRITE)
        if_match = request.headers.get("If-Match")
        actor = request.headers.get(ACTOR_HEADER, "")
        origin = request.headers.get(ORIGIN_HEADER, "")
        client = request.client.host if request.client else "unknown"
        with self.backend.edit(
            actor=f"{actor if _HEADER_VALUE.fullmatch(actor) else 'anonymous'} (api)",
            origin=origin if _HEADER_VALUE.fullmatch(origin) else client,
        ) as edit:
            if if_match and if_match.strip() != "*":
                current = registry_etag(edit.registry)
                if current not in _etags(if_match):
                    raise HTTPException(
                        412,
                        f"the registry changed since it was read (ETag now {current}): read it "
                        "again and retry",
                    )
            yield edit
        self._generation = next(self._writes)  # committed: the next read asks the backend
        self._checked = None

    async def list_customers(self, request: Request) -> Response:
        """
        summary: Every customer and its events
        description: Answers 304 to If-None-Match while the registry is unchanged.
        responses:
          200:
            description: The registry, with its ETag.
            content:
              application/json:
                schema: {$ref: "#/components/schemas/Registry"}
          304: {description: Unchanged since the ETag given.}
          401: {$ref: "#/components/responses/Unauthorized"}
        """
        _require(request, READ)
        body, etag = self._rendering(await self._current())
        if etag in _etags(request.headers.get("If-None-Match", "")):
            return Response(status_code=304, headers={"ETag": etag})
        return JSONResponse(body, headers={"ETag": etag})

    async def get_customer(self, request: Request) -> Response:
        """
        summary: One customer's events
        responses:
          200:
            description: The customer's events.
            content:
              application/json:
                schema: {$ref: "#/components/schemas/Customer"}
          400: {$ref: "#/components/responses/BadName"}
          404: {$ref: "#/components/responses/NotFound"}
        """
        _require(request, READ)
        customer = _name(request, "customer")
        registry = await self._current()
        events = registry.as_mapping().get(customer)
        if events is None:
            raise HTTPException(404, f"customer {customer!r} is not in the registry")
        return JSONResponse({"events": events}, headers={"ETag": registry_etag(registry)})

    def replace_customers(self, request: Request, body: bytes) -> Response:
        """
        summary: Replace the whole registry (import)
        description: Requires If-Match with the ETag of the registry being replaced.
        requestBody:
          content:
            application/json:
              schema: {$ref: "#/components/schemas/Registry"}
        responses:
          200: {description: Replaced; the new ETag in the ETag header.}
          400: {$ref: "#/components/responses/BadName"}
          403: {$ref: "#/components/responses/Forbidden"}
          412: {$ref: "#/components/responses/Stale"}
          428: {description: No If-Match header.}
        """
        _require(request, WRITE)
        if not request.headers.get("If-Match"):
            raise HTTPException(
                428, "replacing the registry needs If-Match: the ETag of the registry it changes"
            )
        try:
            replacement = registry_from_json(orjson.loads(body), "the request body")
        except (orjson.JSONDecodeError, ClickstreamError) as bad:
            raise HTTPException(400, first_line(bad)) from None
        with self._edit(request) as edit:
            edit.registry = replacement
        return JSONResponse({"streams": len(replacement.streams)}, headers=self._tag(replacement))

    def put_event(self, request: Request) -> Response:
        """
        summary: Register an event of a customer (the customer is created if new)
        responses:
          200: {description: It was registered already.}
          201: {description: Registered; it loads from the next sensor tick.}
          400: {$ref: "#/components/responses/BadName"}
          403: {$ref: "#/components/responses/Forbidden"}
          412: {$ref: "#/components/responses/Stale"}
        """
        stream = Stream(_name(request, "customer"), _name(request, "event"))
        with self._edit(request) as edit:
            created = stream not in edit.registry
            if created:
                edit.registry = edit.registry.with_added(stream.customer, [stream.event])
        return JSONResponse(
            {"customer": stream.customer, "event": stream.event, "created": created},
            status_code=201 if created else 200,
            headers=self._tag(edit.registry),
        )

    def delete_event(self, request: Request) -> Response:
        """
        summary: Stop loading an event of a customer (its files and table are kept)
        responses:
          200: {description: Removed.}
          400: {$ref: "#/components/responses/BadName"}
          403: {$ref: "#/components/responses/Forbidden"}
          404: {$ref: "#/components/responses/NotFound"}
          412: {$ref: "#/components/responses/Stale"}
        """
        stream = Stream(_name(request, "customer"), _name(request, "event"))
        with self._edit(request) as edit:
            if stream not in edit.registry:
                raise HTTPException(404, f"{stream.key} is not in the registry")
            edit.registry = edit.registry.with_removed(stream.customer, [stream.event])
        return JSONResponse({"removed": [stream.key]}, headers=self._tag(edit.registry))

    def delete_customer(self, request: Request) -> Response:
        """
        summary: Stop loading every event of a customer (files and tables are kept)
        responses:
          200: {description: Removed.}
          400: {$ref: "#/components/responses/BadName"}
          403: {$ref: "#/components/responses/Forbidden"}
          404: {$ref: "#/components/responses/NotFound"}
          412: {$ref: "#/components/responses/Stale"}
        """
        customer = _name(request, "customer")
        with self._edit(request) as edit:
            events = edit.registry.as_mapping().get(customer)
            if events is None:
                raise HTTPException(404, f"customer {customer!r} is not in the registry")
            edit.registry = edit.registry.with_removed(customer)
        removed = [f"{customer}.{event}" for event in events]
        return JSONResponse({"removed": removed}, headers=self._tag(edit.registry))

    def history(self, request: Request) -> Response:
        """
        summary: The registry's changes, newest first
        parameters:
          - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 1000}}
        responses:
          200:
            description: Changes, newest first.
            content:
              application/json:
                schema: {$ref: "#/components/schemas/History"}
          501: {description: The backend keeps no history (a YAML file).}
        """
        _require(request, READ)
        raw = request.query_params.get("limit", str(DEFAULT_HISTORY))
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_HISTORY:
            raise HTTPException(400, f"limit must be a whole number from 1 to {MAX_HISTORY}")
        history = getattr(self.backend, "history", None)
        if history is None:
            raise HTTPException(
                501,
                f"the registry in {self.backend.location} keeps no history: serve a "
                "postgresql:// registry",
            )
        changes = [
            {
                "id": c.id,
                "changed_at": c.changed_at.isoformat(),
                "actor": c.actor,
                "origin": c.origin,
                "action": c.action,
                "customer": c.customer,
                "event": c.event,
            }
            for c in history(int(raw))
        ]
        return JSONResponse({"changes": changes})

    def healthz(self, request: Request) -> Response:
        """
        summary: Whether the backend answers (no token needed; a readiness probe)
        responses:
          200: {description: The backend answered.}
          503: {description: The backend did not answer.}
        """
        streams = len(self._load().streams)
        return JSONResponse({"status": "ok", "streams": streams})

    def invalid_path(self, request: Request) -> Response:
        raise HTTPException(
            400,
            f"no such resource: {request.method} {request.url.path!r} (the API's paths are "
            f"/customers/<customer>[/events/<event>], names matching {NAME_RULE})",
        )

    def _tag(self, registry: Registry) -> dict[str, str]:
        return {"ETag": registry_etag(registry)}


def _threaded(
    endpoint: Any, limiter: Callable[[], anyio.CapacityLimiter], body: bool = False
) -> Any:
    """``endpoint`` (blocking: the backends are) run in a worker thread of ``limiter``'s pool,
    after the request's body is read if it needs it (only async code can read it)."""

    async def run(request: Request) -> Response:
        args = (request, await request.body()) if body else (request,)
        return await anyio.to_thread.run_sync(endpoint, *args, limiter=limiter())

    run.__doc__ = endpoint.__doc__  # the OpenAPI document is built from the docstrings
    return run


OPENAPI = SchemaGenerator(
    {
        "openapi": "3.0.3",
        "info": {"title": "clickstream registry", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Customer": {
                    "type": "object",
                    "required": ["events"],
                    "properties": {
                        "events": {
                            "type": "array",
                            "items": {"type": "string", "pattern": NAME_RULE},
                        }
                    },
                },
                "Registry": {
                    "type": "object",
                    "required": ["customers"],
                    "properties": {
                        "customers": {
                            "type": "object",
                            "additionalProperties": {"$ref": "#/components/schemas/Customer"},
                        }
                    },
                },
                "History": {
                    "type": "object",
                    "properties": {
                        "changes": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "integer"},
                                    "changed_at": {"type": "string", "format": "date-time"},
                                    "actor": {"type": "string"},
                                    "origin": {"type": "string"},
                                    "action": {"type": "string", "enum": ["add", "remove"]},
                                    "customer": {"type": "string"},
                                    "event": {"type": "string"},
                                },
                            },
                        }
                    },
                },
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                },
            },
            "responses": {
                name: {
                    "description": description,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
                for name, description in {
                    "Unauthorized": "No bearer token, or one that is not valid.",
                    "Forbidden": "A read token writing.",
                    "BadName": f"A name outside the rule {NAME_RULE}.",
                    "NotFound": "Not in the registry.",
                    "Stale": "If-Match names a registry other than the current one.",
                }.items()
            },
        },
        "security": [{"bearer": []}],
    }
)


def create_app(backend: RegistryBackend, tokens: Tokens | None = None) -> Starlette:
    """The registry API over ``backend``, accepting ``tokens`` (default: the environment's)."""
    api = RegistryAPI(backend)

    schema: list[bytes] = []

    def openapi(request: Request) -> Response:
        if not schema:  # status codes parse as integers from the docstrings' YAML
            schema.append(
                orjson.dumps(OPENAPI.get_schema(routes=app.routes), option=orjson.OPT_NON_STR_KEYS)
            )
        return JSONResponse(schema[0])

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = str(exc.detail)
        if exc.status_code in (404, 405) and detail in ("Not Found", "Method Not Allowed"):
            detail = f"no such resource: {request.method} {request.url.path} (see /openapi.json)"
        return error(exc.status_code, detail, exc.headers)

    async def backend_error(request: Request, exc: Exception) -> Response:
        return error(503, f"registry backend unavailable: {first_line(exc)}")

    readers, writers = api.readers, api.writers
    event = "/customers/{customer}/events/{event}"
    app = Starlette(
        routes=[
            Route("/customers", api.list_customers, methods=["GET"]),
            Route(
                "/customers", _threaded(api.replace_customers, writers, body=True), methods=["PUT"]
            ),
            Route("/customers/{customer}", api.get_customer, methods=["GET"]),
            Route(
                "/customers/{customer}",
                _threaded(api.delete_customer, writers),
                methods=["DELETE"],
            ),
            Route(event, _threaded(api.put_event, writers), methods=["PUT"]),
            Route(event, _threaded(api.delete_event, writers), methods=["DELETE"]),
            Route(
                "/customers/{rest:path}",
                api.invalid_path,
                methods=["GET", "PUT", "POST", "PATCH", "DELETE"],
                include_in_schema=False,
            ),
            Route("/history", _threaded(api.history, readers), methods=["GET"]),
            Route("/healthz", _threaded(api.healthz, readers), methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
        ],
        middleware=[
            Middleware(
                AuthenticationMiddleware,
                backend=BearerTokens(tokens or Tokens()),
                on_error=_unauthorized,
            )
        ],
        exception_handlers={HTTPException: http_error, ClickstreamError: backend_error},
    )
    return app
