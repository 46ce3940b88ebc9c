"""Sign-in and authorisation at the HTTP edge: the bearer token becomes a `Principal`, the
pure policy decides, and every case-level read and every refusal goes to the access log
before the answer leaves.

- `Caller` (a FastAPI dependency): 401 problem+json with `WWW-Authenticate: Bearer` for a
  missing or bad token; the reason never echoes the token.
- `policy(action)`: what each route declares (`x-likvard-action` in the OpenAPI
  document). `unlisted(document)` names the operations without one; an app with one does
  not start, and the generated authorisation matrix test fails.
- `authorize(...)`: the policy's decision, recorded, 403 on a refusal.
- The access log is written through an `AccessRecorder`, whose `record` returns only once
  the entries are committed (group commit, `likvard.access_log`): an answer is never sent
  for a read that is not in the log, and a process that dies after answering has lost no
  entry. If the log cannot be written the request fails (503), it never answers unlogged.
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Header, Request
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from likvard import telemetry
from likvard.config import Settings
from likvard.http import ProblemError, RequestContext, problem, request_context
from likvard.identity import Principal, looks_like_identity_number
from likvard.policy import (
    CASE_LEVEL,
    EMERGENCY_REASONS,
    Action,
    CaseScope,
    Decision,
    DistrictScope,
    ReferralScope,
    Resource,
    SystemScope,
    UnitScope,
    allowed,
)

log = logging.getLogger("likvard.guard")

ACTION_KEY = "x-likvard-action"
OPEN = "open"  # the probes (/healthz, /readyz): no token, no personal data
EMERGENCY_HEADER = "Likvard-Emergency-Reason"


class AuthenticationError(Exception):
    """A token that cannot be trusted. `code` names why (expired, wrong-audience,
    unknown-key, bad-signature, algorithm-not-allowed, malformed, invalid-subject, ...); it
    never holds the token or a claim's value."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class Authenticator(Protocol):
    def authenticate(self, token: str) -> Principal:
        """The principal of a verified token; AuthenticationError otherwise."""
        ...


@dataclass(frozen=True)
class AccessEntry:
    """One read or refusal, as the `CaseAccessed` event records it: who, as which role,
    did what to which case or resource, with which outcome; never personal data."""

    actor: str
    roles: str
    action: str
    resource: str
    case_id: str | None
    allowed: bool
    reason: str
    emergency_reason: str | None
    service: str
    occurred_at: datetime
    trace_id: str | None


class AccessRecorder(Protocol):
    def record(self, entries: Sequence[AccessEntry]) -> None:
        """Return once the entries are committed; raise if they cannot be."""
        ...


def policy(action: Action | str) -> dict[str, Any]:
    """The `openapi_extra` of a route: the action the policy is asked about."""
    return {ACTION_KEY: str(action)}


def unlisted(document: dict[str, Any]) -> list[str]:
    """The operations of an OpenAPI document that declare no policy entry."""
    missing = []
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if isinstance(operation, dict) and ACTION_KEY not in operation:
                missing.append(f"{method.upper()} {path}")
    return missing


def _unauthorized(code: str, detail: str) -> ProblemError:
    error = "invalid_request" if code == "missing-token" else "invalid_token"
    return ProblemError(
        401,
        code,
        "Not signed in",
        detail,
        headers={"WWW-Authenticate": f'Bearer realm="likvard", error="{error}"'},
    )


def signed_in(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer <JWT>` verified by the app's authenticator
    (or found in `_verified`: verified lately, by the same authenticator, not expired)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized(
            "missing-token", "Send an OpenID Connect access token as Authorization: Bearer."
        )
    try:
        principal = verified_principal(request.app.state.authenticator, token)
    except IdentityNumberSubject as exc:
        raise ProblemError(422, "identity-number-in-actor", "Actor refused", str(exc)) from exc
    except AuthenticationError as exc:
        raise _unauthorized(exc.code, exc.detail) from exc
    request.state.principal = principal
    return principal


class IdentityNumberSubject(AuthenticationError):
    """A token whose subject is shaped like a personal identity number: the subject becomes
    the actor of events and access-log entries, so it must never be one."""

    def __init__(self) -> None:
        super().__init__(
            "identity-number-in-actor",
            "The token's subject is shaped like a personal identity number; the identity"
            " provider must give an opaque subject.",
        )


def verified_principal(authenticator: Authenticator, token: str) -> Principal:
    """The principal of a bearer token, as every API and the console take it: verified by
    `authenticator` (or found in `_verified`: verified lately by it, not expired), its
    subject no identity number; AuthenticationError (IdentityNumberSubject) otherwise."""
    principal = _verified.get(authenticator, token)
    if principal is None:
        principal = authenticator.authenticate(token)
        if looks_like_identity_number(principal.subject):
            raise IdentityNumberSubject()
        _verified.put(authenticator, token, principal)
    return principal


def _expiry(token: str) -> float | None:
    """The `exp` of a token that was just verified (read again from its payload: the
    `Authenticator` protocol gives the principal only); None if it has none."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


class VerifiedTokens:
    """Tokens verified lately and their principals, so that a client's next requests with
    the same token cost a dictionary lookup rather than a signature check (the check took
    a fifth of `POST /cases`'s CPU on the event loop, issue 16). An entry is used only by
    the authenticator that verified it, only before the token's own `exp` by that
    authenticator's clock (no leeway), and for at most `max_seconds` (so a token is checked
    against the issuer's keys again at least that often); at most `max_entries` are kept.
    Only successes are kept: a bad token is checked, and refused, every time."""

    def __init__(self, *, max_entries: int = 10_000, max_seconds: float = 60.0) -> None:
        self.max_entries, self.max_seconds = max_entries, max_seconds
        self._entries: dict[str, tuple[Authenticator, Principal, float]] = {}

    @staticmethod
    def _now(authenticator: Authenticator) -> float:
        clock = getattr(authenticator, "clock", None)
        return float(clock()) if callable(clock) else time.time()

    def get(self, authenticator: Authenticator, token: str) -> Principal | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        by, principal, until = entry
        if by is not authenticator or self._now(authenticator) >= until:
            self._entries.pop(token, None)
            return None
        return principal

    def put(self, authenticator: Authenticator, token: str, principal: Principal) -> None:
        exp = _expiry(token)
        if exp is None:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries), ""), None)  # the oldest
        until = min(exp, self._now(authenticator) + self.max_seconds)
        self._entries[token] = (authenticator, principal, until)

    def clear(self) -> None:
        self._entries.clear()


_verified = VerifiedTokens()


async def _caller(request: Request) -> Principal:
    """`signed_in` as a dependency. A coroutine, so FastAPI calls it on the event loop: a
    plain function would be sent to the thread pool and back, a hop per dependency per
    request (with `_verified`, the work is a lookup, cheaper than the hop)."""
    return signed_in(request)


Caller = Annotated[Principal, Depends(_caller)]


async def _context(request: Request, principal: Caller) -> RequestContext:
    return request_context(request, principal.subject)


Ctx = Annotated[RequestContext, Depends(_context)]
"""The request context of a signed-in caller: the actor in event metadata is the token's
subject (FastAPI verifies the token once per request, however many dependencies ask)."""


EmergencyReason = Annotated[
    str | None,
    Header(
        alias=EMERGENCY_HEADER,
        description="Emergency access to a case outside your district: a reason code ("
        + ", ".join(EMERGENCY_REASONS)
        + "). Always allowed to a case worker, always logged and flagged.",
        json_schema_extra={"enum": list(EMERGENCY_REASONS)},
    ),
]


_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
NOT_AN_ID = "(not-an-id)"


def _safe(value: str | None) -> str | None:
    """An id or code as the access log may keep it. The caller wrote it (a path, a query, a
    body): anything that is not an id's alphabet, or holds an identity number, is replaced,
    so no free text or personal data reaches the log (nor a NUL that PostgreSQL refuses)."""
    if value is None:
        return None
    if not _ID.fullmatch(value) or looks_like_identity_number(value):
        return NOT_AN_ID
    return value


def _label(resource: Resource) -> tuple[str, str | None]:
    """The resource's label in the access log, and the case it is of, if one."""
    match resource:
        case CaseScope(case_id=case_id):
            return f"case:{_safe(case_id)}", _safe(case_id)
        case ReferralScope(referral_id=rid, case=case):
            return f"referral:{_safe(rid)}", _safe(case.case_id)
        case UnitScope(unit=unit):
            return f"unit:{_safe(unit)}", None
        case DistrictScope(district=district):
            return f"district:{_safe(district)}", None
        case SystemScope(name=name):
            return name, None
    raise TypeError(type(resource).__name__)


def _entry(
    request: Request,
    principal: Principal,
    action: Action,
    resource: str,
    case_id: str | None,
    decision: Decision,
    emergency: str | None,
    now: datetime,
) -> AccessEntry:
    trace = telemetry.current_traceparent()
    return AccessEntry(
        actor=principal.subject,
        roles=principal.role_names,
        action=str(action),
        resource=resource,
        case_id=case_id,
        allowed=decision.allow,
        reason=decision.reason,
        emergency_reason=emergency if decision.emergency else None,
        service=request.app.state.service_name,
        occurred_at=now,
        trace_id=trace.split("-")[1] if trace and trace.count("-") >= 2 else None,
    )


def authorize(
    request: Request,
    principal: Principal,
    action: Action,
    resource: Resource,
    *,
    emergency: str | None = None,
) -> Decision:
    """Ask the policy; record a case-level action or any refusal; 403 if refused."""
    now = datetime.now(UTC)
    decision = allowed(principal, action, resource, now=now, emergency=emergency)
    if action in CASE_LEVEL or not decision:
        label, case_id = _label(resource)
        _record(
            request, [_entry(request, principal, action, label, case_id, decision, emergency, now)]
        )
    if not decision:
        raise ProblemError(
            403,
            "forbidden",
            "Not allowed",
            f"Your roles do not allow {action} here ({decision.reason}).",
        )
    return decision


def record_reads(
    request: Request,
    principal: Principal,
    action: Action,
    decision: Decision,
    resource: Resource,
    case_ids: Iterable[str],
    emergency: str | None = None,
) -> None:
    """Record that a list answer (a unit's inbox, the follow-ups due) showed these cases:
    one entry per case, in one commit, before the answer is sent."""
    label, _ = _label(resource)
    now = datetime.now(UTC)
    entries = [
        _entry(request, principal, action, label, _safe(c), decision, emergency, now)
        for c in dict.fromkeys(case_ids)
    ]
    if entries:
        _record(request, entries)


def _record(request: Request, entries: list[AccessEntry]) -> None:
    """Write to the access log, or fail the request with 503: never answer unlogged."""
    recorder: AccessRecorder = request.app.state.access_log
    try:
        recorder.record(entries)
    except Exception as exc:
        log.error("access log not written (%s): the request is refused", type(exc).__name__)
        raise ProblemError(
            503,
            "access-log-unavailable",
            "Access log unavailable",
            "The access log could not be written, so nothing is shown. Retry in a few seconds.",
            headers={"Retry-After": "5"},
        ) from exc


class AccessLogWriter(AccessRecorder, Protocol):
    def close(self) -> None: ...


# FastAPI's own pages: not operations of the document, so gated here rather than declared.
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
METRICS_PATH = "/metrics"


class UnlistedOperations(RuntimeError):
    """The app has operations that declare no policy entry: it does not start."""


def _import(module: str, name: str) -> Any:
    """Late import: likvard.oidc and likvard.access_log import this module's protocols."""
    return getattr(importlib.import_module(module), name)


BEARER_SCHEME = "bearer"


def _document_bearer(app: FastAPI) -> None:
    """State in the OpenAPI document that every operation but the open probes takes an
    OpenID Connect access token (a client, or schemathesis, then knows to send one)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()  # cached by FastAPI: changed once, in place
        components = document.setdefault("components", {})
        components.setdefault("securitySchemes", {})[BEARER_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An access token of the city's OpenID Connect provider.",
        }
        for item in document.get("paths", {}).values():
            for operation in item.values():
                if isinstance(operation, dict) and operation.get(ACTION_KEY, OPEN) != OPEN:
                    operation.setdefault("security", [{BEARER_SCHEME: []}])
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def install(
    app: FastAPI, settings: Settings, service: str, *, access_log_schema: str | None = None
) -> None:
    """Sign-in, the access log and the ops gate for a service's app.

    - `app.state.authenticator`: the OIDC verifier of the settings' issuer (no I/O until the
      first token); `app.state.service_name`: the service, as the access log names it.
    - `app.state.access_log`: opened when the app starts (after the check below), before the
      app's own lifespan, and closed after it.
    - The app refuses to start while `unlisted(app.openapi())` names an operation.
    - `/metrics` needs an ops token, and so do `/docs`, `/redoc` and `/openapi.json` unless
      `settings.public_docs`: 401 without a good token, 403 (logged) for another role."""
    app.state.service_name = service
    app.state.authenticator = _import("likvard.oidc", "verifier_from_settings")(settings)
    public_docs = settings.public_docs
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        missing = unlisted(a.openapi())
        if missing:
            raise UnlistedOperations(
                f"{service}: operations without a policy entry (declare"
                f" openapi_extra=guard.policy(Action...)): {', '.join(missing)}"
            )
        open_access_log = _import("likvard.access_log", "open_access_log")
        writer: AccessLogWriter = await run_in_threadpool(
            open_access_log, settings, service, schema=access_log_schema
        )
        a.state.access_log = writer
        try:
            async with inner(a) as state:
                yield state
        finally:
            await run_in_threadpool(writer.close)

    app.router.lifespan_context = lifespan
    _document_bearer(app)

    app.add_middleware(_OpsGate, public_docs=public_docs)


def _ops_only(request: Request) -> None:
    principal = signed_in(request)
    authorize(request, principal, Action.OPS_READ, SystemScope(request.url.path.lstrip("/")))


class _OpsGate:
    """Pure ASGI middleware: `/metrics` (and the documents unless public) need an ops
    token; any other path passes untouched, at the cost of one comparison."""

    def __init__(self, app: ASGIApp, public_docs: bool) -> None:
        self.app, self.public_docs = app, public_docs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == METRICS_PATH or (path in DOC_PATHS and not self.public_docs):
                try:
                    await run_in_threadpool(_ops_only, Request(scope, receive))
                except ProblemError as exc:  # raised outside the routes: answered here
                    refusal = problem(
                        exc.status, exc.code, exc.title, exc.detail, path, headers=exc.headers
                    )
                    await refusal(scope, receive, send)
                    return
        await self.app(scope, receive, send)
