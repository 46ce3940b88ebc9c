"""HTTP conventions shared by every service: problem+json errors, If-Match versions,
request tracing, and the request context that travels into event metadata."""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from likvard import telemetry
from likvard.eventstore import ConcurrencyError, StoredEvent

log = logging.getLogger("likvard.http")

PROBLEM_JSON = "application/problem+json"
_ACTOR = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class Timed(BaseModel):
    """A command body: when it happened, defaulting to now, never in the future."""

    occurred_at: datetime | None = Field(
        None,
        description="When it happened (ISO 8601 with offset); defaults to now. Not in the future.",
    )

    @field_validator("occurred_at")
    @classmethod
    def _not_future_and_aware(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return v
        if v.tzinfo is None:
            raise ValueError("occurred_at needs a time-zone offset, e.g. 2026-11-22T10:00:00+01:00")
        if v > datetime.now(UTC):
            raise ValueError("occurred_at may not be in the future")
        return v

    def when(self) -> datetime:
        return (self.occurred_at or datetime.now(UTC)).astimezone(UTC)


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": text}
    for code, text in {
        400: "Malformed request (for example a malformed If-Match header)",
        404: "No such resource",
        409: "Version conflict: the resource changed since the given If-Match version",
        422: "The request is well-formed but breaks a validation or domain rule",
    }.items()
}


class ProblemError(Exception):
    """Raise from a handler to answer with problem+json."""

    def __init__(self, status: int, code: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.title, self.detail = status, code, title, detail


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


def parse_if_match(value: str | None) -> int | None:
    """`If-Match: "3"` (or 3, or W/"3") -> 3; absent -> None (use the version just read)."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit():
        raise ProblemError(
            400,
            "bad-if-match",
            "Malformed If-Match",
            'If-Match must be the stream version as an entity tag, e.g. "3".',
        )
    return int(text)


def etag(version: int) -> str:
    return f'"{version}"'


@dataclass(frozen=True)
class RequestContext:
    """Who asks and in which trace: goes into every event's metadata."""

    actor: str
    correlation_id: str
    traceparent: str | None


def request_context(request: Request) -> RequestContext:
    actor = request.headers.get("x-actor", "unknown")
    if not _ACTOR.match(actor):
        raise ProblemError(
            400,
            "bad-actor",
            "Malformed X-Actor",
            "X-Actor must be a pseudonymous staff id of 1-64 letters, digits or ._:-",
        )
    correlation = request.headers.get("x-correlation-id") or str(uuid.uuid4())
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

    @app.get("/healthz", response_model=Health, tags=["operations"], summary="Liveness")
    def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        tags=["operations"],
        responses={503: {"model": Problem, "content": {PROBLEM_JSON: {}}}},
        summary="Readiness: the event store answers",
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


def install(app: FastAPI, service: str) -> None:
    """Error handlers, tracing, request metrics and `/metrics` for a service's app."""
    tracer = telemetry.tracer(f"likvard.{service}.http")
    telemetry.setup_metrics(service)

    @app.middleware("http")
    async def trace_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        parent = telemetry.context_from_headers(dict(request.headers))
        started = time.monotonic()
        with tracer.start_as_current_span(
            f"{request.method} {request.url.path}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.url.path},
        ) as span:
            try:
                response = await call_next(request)
            except Exception as exc:  # answered here, so the connection stays usable
                span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
                response = unexpected(request, exc)
            route = request.scope.get("route")
            # The route template, never the path: paths hold ids (many series otherwise).
            template = route.path if route is not None and hasattr(route, "path") else "other"
            if template != "other":
                span.update_name(f"{request.method} {template}")
                span.set_attribute("http.route", template)
            span.set_attribute("http.response.status_code", response.status_code)
            _duration.record(
                time.monotonic() - started,
                {
                    "service": service,
                    "http.request.method": request.method,
                    "http.route": template,
                    "http.response.status_code": response.status_code,
                },
            )
            return response

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics of this process")
    def prometheus_metrics() -> Response:
        body, content_type = telemetry.prometheus_exposition()
        return Response(body, media_type=content_type)

    @app.exception_handler(ProblemError)
    async def on_problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.title, exc.detail, request.url.path)

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

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(
            exc.status_code, "http-error", str(exc.detail), str(exc.detail), request.url.path
        )
