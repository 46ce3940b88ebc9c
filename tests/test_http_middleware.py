"""The HTTP layer after issue 16: pure ASGI middleware (tracing, metrics, the ops gate), the
verified-token cache behind `guard.Caller`, and `POST /cases` answered without FastAPI's
second validation. Each keeps what the BaseHTTPMiddleware version did: spans named by the
route with the caller's trace as parent, a 500 problem for an unexpected exception, the
request metrics by route and status, and a token checked again once it expires."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.middleware.base import BaseHTTPMiddleware

from likvard import guard, http, telemetry
from likvard.config import Settings
from likvard.identity import Principal, Role
from likvard.policy import Action
from tests.identity import bearer
from tests.support import RunningService

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
WORKER = Principal("cw-1", frozenset({Role.CASE_WORKER}), frozenset({"nordost"}))


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("test", extra_processor=SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def jwt_shaped(exp: float, subject: str = "cw-1") -> str:
    """A token with the compact JWS's shape and an `exp` (the fake authenticator below, not
    a signature, decides whether it is good)."""

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'RS256'})}.{b64({'sub': subject, 'exp': exp})}.c2ln"


class Counting:
    """An authenticator that counts its checks, with a clock of the test's own."""

    def __init__(self, good: set[str], now: float = 1_000_000.0) -> None:
        self.good, self.now, self.checks = good, now, 0

    def clock(self) -> float:
        return self.now

    def authenticate(self, token: str) -> Principal:
        self.checks += 1
        if token not in self.good:
            raise guard.AuthenticationError("bad-signature", "The token's signature is wrong.")
        if json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"] <= self.now:
            raise guard.AuthenticationError("expired", "The token has expired: sign in again.")
        return WORKER


class Log:
    def record(self, entries: Sequence[guard.AccessEntry]) -> None:
        self.entries = list(entries)

    def close(self) -> None:
        pass


def small_app(monkeypatch: pytest.MonkeyPatch, authenticator: Counting) -> FastAPI:
    """http.install and guard.install on a few routes, with a fake authenticator."""
    fakes = {
        "verifier_from_settings": lambda settings: authenticator,
        "open_access_log": lambda settings, service, *, schema: Log(),
    }
    monkeypatch.setattr(guard, "_import", lambda module, name: fakes[name])
    guard._verified.clear()
    app = FastAPI()
    http.install(app, "mwtest")
    guard.install(app, Settings(), "mwtest")

    @app.get("/items/{item_id}", openapi_extra=guard.policy(Action.CASE_REGISTER))
    def item(item_id: int, caller: guard.Caller, ctx: guard.Ctx) -> dict[str, Any]:
        return {"item": item_id, "actor": ctx.actor, "traceparent": ctx.traceparent}

    http.add_health(app, lambda request: None)

    @app.get("/boom", openapi_extra=guard.policy(guard.OPEN))
    def boom() -> None:
        raise RuntimeError("a bug, whose text may quote a person")

    return app


def test_no_base_http_middleware_is_left_in_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    app = small_app(monkeypatch, Counting(set()))
    classes: list[object] = [m.cls for m in app.user_middleware]
    assert http.RequestTelemetry in classes and http.BodyLimit in classes
    assert all(not (isinstance(c, type) and issubclass(c, BaseHTTPMiddleware)) for c in classes)


def test_a_request_is_one_server_span_named_by_its_route_in_the_callers_trace(
    monkeypatch: pytest.MonkeyPatch, spans: InMemorySpanExporter
) -> None:
    token = jwt_shaped(exp=2_000_000)
    app = small_app(monkeypatch, Counting({token}))
    with TestClient(app) as client:
        r = client.get(
            "/items/42",
            headers={
                "Authorization": f"Bearer {token}",
                "traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01",
            },
        )
    assert r.status_code == 200, r.text
    # The context the handler stored in events is the request's span, in the caller's trace.
    assert r.json()["actor"] == "cw-1"
    assert r.json()["traceparent"].split("-")[1] == TRACE_ID
    # One span: FastAPI's own (a second SERVER span, and spans around the dependencies,
    # the endpoint and serialization) are off.
    (span,) = [
        s
        for s in spans.get_finished_spans()
        if s.context and s.context.trace_id == int(TRACE_ID, 16)
    ]
    assert span.name == "GET /items/{item_id}"
    assert span.kind == trace.SpanKind.SERVER
    assert span.parent is not None and span.parent.span_id == int(PARENT_SPAN, 16)
    assert span.attributes is not None
    assert span.attributes["http.route"] == "/items/{item_id}"
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["url.path"] == "/items/42"


def test_an_unexpected_exception_is_a_500_problem_an_error_span_and_a_metric(
    monkeypatch: pytest.MonkeyPatch, spans: InMemorySpanExporter
) -> None:
    app = small_app(monkeypatch, Counting(set()))
    with TestClient(app, raise_server_exceptions=True) as client:
        r = client.get("/boom")
        assert r.status_code == 500
        assert r.headers["content-type"] == http.PROBLEM_JSON
        assert r.json()["type"].endswith("/internal-error")
        assert "person" not in r.text
        again = client.get("/healthz")  # the connection is still usable
        assert again.status_code == 200
    (span,) = [s for s in spans.get_finished_spans() if s.name == "GET /boom"]
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 500
    body, _ = telemetry.prometheus_exposition()
    series = [
        line
        for line in body.decode().splitlines()
        if line.startswith("http_server_request_duration_seconds_count")
        and 'service="mwtest"' in line
        and 'http_route="/boom"' in line
        and 'http_response_status_code="500"' in line
    ]
    assert series and float(series[0].rsplit(" ", 1)[1]) >= 1


def test_the_ops_gate_still_guards_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    token = jwt_shaped(exp=2_000_000)
    app = small_app(monkeypatch, Counting({token}))
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 401
        refused = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 403  # a case worker is not ops
        assert refused.headers["content-type"] == http.PROBLEM_JSON


def test_a_token_is_verified_once_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    token = jwt_shaped(exp=1_000_100)
    authenticator = Counting({token})
    app = small_app(monkeypatch, authenticator)
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        assert client.get("/items/1", headers=headers).status_code == 200
        assert client.get("/items/2", headers=headers).status_code == 200
        assert authenticator.checks == 1
        authenticator.now = 1_000_100.0  # the token's exp: checked again, and refused
        r = client.get("/items/3", headers=headers)
        assert r.status_code == 401
        assert r.json()["type"].endswith("/expired")
        assert authenticator.checks == 2


def test_a_bad_token_is_checked_and_refused_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    authenticator = Counting(set())
    app = small_app(monkeypatch, authenticator)
    headers = {"Authorization": f"Bearer {jwt_shaped(exp=2_000_000)}"}
    with TestClient(app) as client:
        for _ in range(2):
            assert client.get("/items/1", headers=headers).status_code == 401
    assert authenticator.checks == 2


def test_a_cached_token_is_checked_again_after_max_seconds_or_by_another_authenticator() -> None:
    token = jwt_shaped(exp=9_000_000)
    first, second = Counting({token}), Counting({token})
    cache = guard.VerifiedTokens(max_seconds=60)
    cache.put(first, token, WORKER)
    assert cache.get(first, token) == WORKER
    assert cache.get(second, token) is None  # verified by another: not trusted here
    cache.put(first, token, WORKER)
    first.now += 60
    assert cache.get(first, token) is None


def test_the_cache_is_bounded_and_keeps_no_token_without_exp() -> None:
    authenticator = Counting(set())
    cache = guard.VerifiedTokens(max_entries=2)
    tokens = [jwt_shaped(exp=2_000_000, subject=f"cw-{i}") for i in range(3)]
    for t in tokens:
        cache.put(authenticator, t, WORKER)
    assert cache.get(authenticator, tokens[0]) is None  # the oldest went
    assert cache.get(authenticator, tokens[2]) == WORKER
    cache.put(authenticator, "opaque-token", WORKER)
    assert cache.get(authenticator, "opaque-token") is None


@pytest.mark.integration
def test_post_cases_answers_201_with_location_etag_and_position(intake: RunningService) -> None:
    """The answer built by the route itself is what `response_model` documents."""
    r = httpx.post(
        f"{intake.base_url}/cases",
        timeout=30,
        headers=bearer("case-worker", districts=("nordost",)),
        json={
            "personal_identity_number": "19121212-1212",
            "district": "nordost",
            "substances": ["ALCOHOL"],
            "referral_source": "SELF",
            "children_in_household": "NO",
        },
    )
    assert r.status_code == 201, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"case_id", "version", "events", "investigation_id", "plan_id"}
    case_id = uuid.UUID(body["case_id"])
    assert r.headers["Location"] == f"/cases/{case_id}"
    assert r.headers["ETag"] == '"1"' and body["version"] == 1
    assert [e["event_type"] for e in body["events"]] == ["IntakeRegistered"]
    assert r.headers[http.POSITION_HEADER] == body["events"][-1]["event_id"]
    assert int(r.headers["content-length"]) == len(r.content)
