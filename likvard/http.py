"""HTTP conventions shared by every service: problem+json errors, If-Match versions,
bounded dates, the request-size limit, 503 while the database is down, request tracing,
and the request context that travels into event metadata. Nothing of sign-in is here:
`likvard.guard` (which imports this module) verifies the caller and names the actor."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any

import psycopg
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from opentelemetry import trace
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from likvard import telemetry
from likvard.eventstore import ConcurrencyError, StoredEvent

log = logging.getLogger("likvard.http")

PROBLEM_JSON = "application/problem+json"
# What the policy is asked about each route (`likvard.guard.ACTION_KEY`): written out here,
# since guard imports this module and not the other way round.
_ACTION_KEY = "x-likvard-action"


# Dates and times are bounded to years 1900-2099: before that no case can have happened,
# and near year 1 or 9999 converting a time to UTC or adding months overflows. The patterns
# are in the OpenAPI documents, and the same patterns are what the API accepts: the
# contract states the rule it enforces. (RFC 3339 text only: no Unix times, no bare dates.)
DATE_PATTERN = r"^(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"
DATE_TIME_PATTERN = (
    r"^(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
_DATE = re.compile(DATE_PATTERN)
_DATE_TIME = re.compile(DATE_TIME_PATTERN)


def _date_text(value: object) -> object:
    if isinstance(value, date) or (isinstance(value, str) and _DATE.fullmatch(value)):
        return value
    raise ValueError("must be a date as YYYY-MM-DD, from 1900-01-01 to 2099-12-31")


def _date_time_text(value: object) -> object:
    if isinstance(value, datetime) or (isinstance(value, str) and _DATE_TIME.fullmatch(value)):
        return value
    raise ValueError(
        "must be a time as YYYY-MM-DDThh:mm:ss with a time-zone offset (Z or +01:00),"
        " in the years 1900-2099"
    )


Day = Annotated[
    date,
    BeforeValidator(_date_text),
    WithJsonSchema({"type": "string", "format": "date", "pattern": DATE_PATTERN}),
]
"""A calendar date in 1900-2099 (body field or query parameter)."""

Instant = Annotated[
    datetime,
    BeforeValidator(_date_time_text),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": DATE_TIME_PATTERN}),
]
"""A point in time with its offset, in 1900-2099."""


class Timed(BaseModel):
    """A command body: when it happened, defaulting to now, never in the future."""

    occurred_at: Instant | None = Field(
        None,
        description="When it happened (RFC 3339 with offset, years 1900-2099); defaults to now."
        " A time in the future is refused with 422 `occurred-in-future`.",
    )

    def when(self) -> datetime:
        """The time in UTC. The future is checked here, not by the schema: it is a rule of
        the clock, which no OpenAPI document can state."""
        if self.occurred_at is None:
            return datetime.now(UTC)
        if self.occurred_at > datetime.now(UTC):
            raise ProblemError(
                422,
                "occurred-in-future",
                "Time in the future",
                "occurred_at may not be in the future.",
            )
        return self.occurred_at.astimezone(UTC)


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
RETRY_AFTER_SECONDS = 5

# By reference under application/problem+json (`install` adds the component): with
# `model`, FastAPI would put the schema under the operation's own media type
# (application/json, text/plain), which problems are not.
PROBLEM_CONTENT: dict[str, Any] = {
    PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}
}

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"content": PROBLEM_CONTENT, "description": text}
    for code, text in {
        400: "Malformed request: a malformed If-Match or X-Correlation-Id header, or a body"
        " that could not be read",
        401: "Not signed in: no bearer token, or one that cannot be trusted (expired, for"
        " another audience, an unknown key, a bad signature ...); `WWW-Authenticate` says"
        " so and `type` names why. The token is never echoed",
        403: "Signed in, but your roles, districts or unit do not allow this; the refusal is"
        " recorded in the access log",
        404: "No such resource",
        409: "Version conflict: the resource changed since the given If-Match version",
        413: "The request body is larger than the limit (LIKVARD_MAX_REQUEST_BYTES, 1 MiB by"
        " default); it was not read",
        422: "The request does not match this document (`validation-error`, with `errors`), or"
        " is well-formed but breaks a rule of the domain, stated in `type` and `detail`",
        503: "The database does not answer; nothing was changed. Retry after the seconds in"
        " Retry-After",
    }.items()
}
PROBLEM_RESPONSES[503] = {**PROBLEM_RESPONSES[503]}
PROBLEM_RESPONSES[503]["headers"] = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


class ProblemError(Exception):
    """Raise from a handler to answer with problem+json."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.title, self.detail = status, code, title, detail
        self.headers = headers


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        type=f"https://likvard.goteborg.se/problems/{code}",
        title=title,
        status=status,
        detail=detail,
        instance=instance,
        errors=errors,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


IF_MATCH_PATTERN = r'^(W/)?("[0-9]{1,18}"|[0-9]{1,18})$'
_IF_MATCH = re.compile(IF_MATCH_PATTERN)

IfMatch = Annotated[
    str | None,
    # A header is absent or a string, never null: the schema says only the string's form.
    WithJsonSchema({"type": "string", "pattern": IF_MATCH_PATTERN}),
    Header(
        description='Stream version the client last saw as an entity tag, e.g. "3" (1-18 digits;'
        ' W/"3" and 3 are taken too); a stale one gives 409, a malformed one 400.',
    ),
]
"""The If-Match parameter of every command on an existing stream. The pattern is stated in
the OpenAPI document but checked by `parse_if_match`, so a malformed one answers 400."""


def parse_if_match(value: str | None) -> int | None:
    """`If-Match: "3"` (or 3, or W/"3") -> 3; absent -> None (use the version just read).
    At most 18 digits: always below 2**63 (a PostgreSQL bigint), and never near Python's
    limit on converting long digit strings."""
    if value is None:
        return None
    m = _IF_MATCH.fullmatch(value.strip())
    if not m:
        raise ProblemError(
            400,
            "bad-if-match",
            "Malformed If-Match",
            'If-Match must be the stream version as an entity tag of 1-18 digits, e.g. "3".',
        )
    return int(m.group(2).strip('"'))


def etag(version: int) -> str:
    return f'"{version}"'


@dataclass(frozen=True)
class RequestContext:
    """Who asks and in which trace: goes into every event's metadata."""

    actor: str
    correlation_id: str
    traceparent: str | None


def request_context(request: Request, actor: str) -> RequestContext:
    """The context of a request by `actor`: the verified principal's subject (given by
    `likvard.guard.Ctx`), never a header the caller writes."""
    # Not uuid4(): its os.urandom releases the GIL on the event loop, which then waits up to
    # a switch interval for it (issue 16); a correlation id need not be unguessable.
    correlation = request.headers.get("x-correlation-id") or str(
        uuid.UUID(int=random.getrandbits(128), version=4)
    )
    if len(correlation) > 128:
        raise ProblemError(
            400,
            "bad-correlation-id",
            "Malformed X-Correlation-Id",
            "X-Correlation-Id must be at most 128 characters.",
        )
    return RequestContext(actor, correlation, telemetry.current_traceparent())


def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """500 problem for a bug or an outage. Logged with the exception's type and where it
    happened, not its text: that may quote submitted data."""
    log.error(
        "unexpected %s on %s %s; where:\n%s",
        type(exc).__name__,
        request.method,
        request.url.path,
        "".join(traceback.format_tb(exc.__traceback__)),
    )
    return problem(
        500,
        "internal-error",
        "Internal error",
        "The request could not be completed; it has been logged.",
        request.url.path,
    )


class EventRef(BaseModel):
    """An event a command stored, as its answer names it."""

    event_id: uuid.UUID
    event_type: str
    stream_version: int


POSITION_HEADER = "Likvard-Position"
"""Every write answers with the position of what it stored: a token that the reporting API
and the console accept (`?after=TOKEN` or the `Likvard-After` header) to read their own
writes; they wait until the projections hold it."""
AFTER_HEADER = "Likvard-After"


def set_position(response: Response, stored: Sequence[StoredEvent]) -> None:
    """The write's position token: the id of its last event (a command's events are of one
    stream, so they reach the read models in order: the last one there means all are)."""
    if stored:
        response.headers[POSITION_HEADER] = str(stored[-1].event_id)


def event_refs(stored: Sequence[StoredEvent]) -> list[EventRef]:
    return [
        EventRef(event_id=e.event_id, event_type=e.event_type, stream_version=e.stream_version)
        for e in stored
    ]


class Health(BaseModel):
    status: str


def add_health(app: FastAPI, ping: Callable[[Request], None]) -> None:
    """`/healthz` (the process answers) and `/readyz` (`ping` succeeds: the event store
    answers), as the compose file and Kubernetes probes call them."""

    @app.get(
        "/healthz",
        response_model=Health,
        tags=["operations"],
        summary="Liveness",
        openapi_extra={_ACTION_KEY: "open"},
    )
    def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        tags=["operations"],
        responses={
            503: {"content": PROBLEM_CONTENT, "description": "The event store does not answer"}
        },
        summary="Readiness: the event store answers",
        openapi_extra={_ACTION_KEY: "open"},
    )
    def readyz(request: Request) -> Any:
        try:
            ping(request)
        except Exception:
            return problem(503, "not-ready", "Not ready", "The event store does not answer.")
        return Health(status="ready")


_duration = telemetry.meter("likvard.http").create_histogram(
    "http.server.request.duration",
    unit="s",
    description="Duration of HTTP requests, by service, method, route and status.",
)


class BodyLimit:
    """Pure ASGI middleware: a request body over `max_bytes` is answered 413 and never read
    to its end, let alone parsed. A declared Content-Length over the limit is refused before
    the app runs; a body without one (chunked) is counted as the app reads it and refused
    as soon as the count passes the limit (whatever the app answers then is dropped)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _refusal(self, scope: Scope) -> JSONResponse:
        return problem(
            413,
            "request-too-large",
            "Request too large",
            f"The request body is over the limit of {self.max_bytes} bytes.",
            scope.get("path"),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refusal(scope)(scope, receive, send)
            return
        received = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    await self._refusal(scope)(scope, receive, send)
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)


class _BodyTooLarge(Exception):
    """Raised into the app when the body passes the limit; the 413 is already sent."""


_TRACE_HEADERS = (b"traceparent", b"tracestate")


def _trace_headers(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """The W3C trace headers of a request (the first of each), as the propagator reads them."""
    found: dict[str, str] = {}
    for key, value in headers:
        if key in _TRACE_HEADERS and key.decode() not in found:
            found[key.decode()] = value.decode("latin-1")
    return found


class RequestTelemetry:
    """Pure ASGI middleware: one SERVER span per request (its parent the caller's
    `traceparent`), renamed to the route template once the router has matched, and the
    `http.server.request.duration` histogram by service, method, route and status. An
    exception that escapes the app before its answer started is answered 500 problem here,
    so the connection stays usable. Pure ASGI rather than `BaseHTTPMiddleware`: that one
    runs the app in a task of its own and relays every message through a stream, which
    cost as much of the event loop's CPU as the route itself (issue 16)."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer, service: str) -> None:
        self.app, self.tracer, self.service = app, tracer, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        parent = telemetry.context_from_headers(_trace_headers(scope["headers"]))
        started = time.monotonic()
        status: int | None = None

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
            f"{method} {path}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        ) as span:
            try:
                await self.app(scope, receive, send_noting_status)
            except Exception as exc:  # answered here, so the connection stays usable
                span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
                if status is not None:  # the answer has begun: nothing else can be sent
                    raise
                await unexpected(Request(scope), exc)(scope, receive, send_noting_status)
            route = scope.get("route")
            # The route template, never the path: paths hold ids (many series otherwise).
            template = route.path if route is not None and hasattr(route, "path") else "other"
            if template != "other":
                span.update_name(f"{method} {template}")
                span.set_attribute("http.route", template)
            code = status if status is not None else 500
            span.set_attribute("http.response.status_code", code)
            _duration.record(
                time.monotonic() - started,
                {
                    "service": self.service,
                    "http.request.method": method,
                    "http.route": template,
                    "http.response.status_code": code,
                },
            )


def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 while the database cannot serve (down, restarting, out of connections): the
    client may retry, nothing was changed. Logged with the exception's type, not its text."""
    log.warning(
        "database unavailable (%s) on %s %s", type(exc).__name__, request.method, request.url.path
    )
    return problem(
        503,
        "database-unavailable",
        "Database unavailable",
        "The database does not answer; nothing was changed. Retry in a few seconds.",
        request.url.path,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def _document_problems(app: FastAPI) -> None:
    """Add the Problem schema that PROBLEM_CONTENT refers to to the app's OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()  # cached by FastAPI: the component is added once
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("Problem", Problem.model_json_schema())
        return document

    app.openapi = openapi  # type: ignore[method-assign]


NATIVE_TELEMETRY_OFF = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
"""`FastAPI(telemetry=...)` that turns FastAPI's own instrumentation off (see below)."""


def _without_native_telemetry(app: FastAPI) -> None:
    """FastAPI (0.16x) instruments every request itself once a tracer or meter provider is
    set: a second SERVER span, spans around dependency resolution, the endpoint and
    serialization, a second `http.server.request.duration` (other labels) and, with a log
    provider, exception messages in logs (which may quote submitted data). `RequestTelemetry`
    is the instrumentation this project's traces, tests and dashboards read; FastAPI's
    doubled the tracing cost of a request (issue 16). Its settings are read per request
    from the dict the app was built with, so they are turned off here, in place."""
    config = getattr(app, "_telemetry", None)
    if isinstance(config, dict):
        config.update(NATIVE_TELEMETRY_OFF)


def install(
    app: FastAPI, service: str, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
) -> None:
    """Error handlers, the request-size limit, tracing, request metrics and `/metrics` for a
    service's app."""
    tracer = telemetry.tracer(f"likvard.{service}.http")
    telemetry.setup_metrics(service)
    _without_native_telemetry(app)
    _document_problems(app)
    # Added before the tracing middleware, so it runs inside it: a 413 is traced and counted.
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    app.add_middleware(RequestTelemetry, tracer=tracer, service=service)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics of this process (ops role: `likvard.guard` checks it)",
        response_class=PlainTextResponse,
        responses=METRICS_RESPONSES,
        openapi_extra={_ACTION_KEY: "ops.read"},
    )
    def prometheus_metrics() -> Response:
        body, content_type = telemetry.prometheus_exposition()
        return Response(body, media_type=content_type)

    @app.exception_handler(ProblemError)
    async def on_problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem(
            exc.status, exc.code, exc.title, exc.detail, request.url.path, headers=exc.headers
        )

    @app.exception_handler(ConcurrencyError)
    async def on_conflict(request: Request, exc: ConcurrencyError) -> JSONResponse:
        return problem(
            409,
            "version-conflict",
            "Version conflict",
            f"The case is at version {exc.actual}, not {exc.expected}: read it again"
            " and retry with the new version.",
            request.url.path,
            headers={"ETag": etag(exc.actual)},
        )

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The submitted values are never echoed: they may hold personal data.
        errors = [
            {"location": list(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()
        ]
        return problem(
            422,
            "validation-error",
            "Invalid request",
            "The request body or parameters do not match the API contract.",
            request.url.path,
            errors=errors,
        )

    @app.exception_handler(psycopg.OperationalError)
    async def on_database_error(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        return _database_unavailable(request, exc)

    @app.exception_handler(PoolTimeout)
    async def on_pool_timeout(request: Request, exc: PoolTimeout) -> JSONResponse:
        return _database_unavailable(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Its headers are kept: a 405 carries the `Allow` that RFC 9110 requires.
        return problem(
            exc.status_code,
            "http-error",
            str(exc.detail),
            str(exc.detail),
            request.url.path,
            headers=dict(exc.headers) if exc.headers else None,
        )
