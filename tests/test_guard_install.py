"""guard.install on a small app, with an authenticator and an access log of this test's own
(the real ones, OIDC and the PostgreSQL access log, are tested with the apps): what needs
an ops token, what starts, what the actor is."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from likvard import guard, http
from likvard.config import Settings
from likvard.identity import Principal, Role
from likvard.policy import Action

TOKENS = {
    "ops-token": Principal("ops-1", frozenset({Role.OPS})),
    "cw-token": Principal("cw-1", frozenset({Role.CASE_WORKER}), frozenset({"nordost"})),
}


class Tokens:
    def authenticate(self, token: str) -> Principal:
        if token not in TOKENS:
            raise guard.AuthenticationError("bad-signature", "The token's signature is wrong.")
        return TOKENS[token]


class Log:
    def __init__(self) -> None:
        self.entries: list[guard.AccessEntry] = []
        self.opened = self.closed = 0

    def record(self, entries: Sequence[guard.AccessEntry]) -> None:
        self.entries.extend(entries)

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> Log:
    the_log = Log()

    def open_access_log(settings: Settings, service: str, *, schema: str) -> Log:
        the_log.opened += 1
        return the_log

    fakes = {
        "verifier_from_settings": lambda settings: Tokens(),
        "open_access_log": open_access_log,
    }
    monkeypatch.setattr(guard, "_import", lambda module, name: fakes[name])
    return the_log


def make_app(public_docs: bool = False, unlisted_route: bool = False) -> FastAPI:
    app = FastAPI(responses=http.PROBLEM_RESPONSES)
    http.install(app, "intake")
    guard.install(app, Settings(public_docs=public_docs), "intake")

    @app.get("/who", openapi_extra=guard.policy(Action.CASE_READ))
    def who(ctx: guard.Ctx) -> dict[str, Any]:
        return {"actor": ctx.actor, "correlation_id": ctx.correlation_id}

    if unlisted_route:

        @app.get("/forgotten")
        def forgotten() -> dict[str, str]:
            return {}

    http.add_health(app, lambda request: None)
    return app


@pytest.fixture
def client(log: Log) -> Iterator[TestClient]:
    with TestClient(make_app()) as c:
        yield c


def test_the_log_opens_when_the_app_starts_and_closes_after(log: Log) -> None:
    app = make_app()
    assert log.opened == 0
    with TestClient(app):
        assert log.opened == 1 and app.state.access_log is log
        assert app.state.service_name == "intake"
    assert log.closed == 1


def test_an_app_with_an_operation_without_a_policy_entry_does_not_start(log: Log) -> None:
    app = make_app(unlisted_route=True)
    with pytest.raises(guard.UnlistedOperations, match="GET /forgotten"), TestClient(app):
        pass
    assert log.opened == 0


def test_the_actor_is_the_token_subject_never_a_header(client: TestClient) -> None:
    r = client.get("/who", headers={"Authorization": "Bearer cw-token", "X-Actor": "someone"})
    assert r.status_code == 200
    assert r.json()["actor"] == "cw-1"


def test_no_or_a_bad_token_is_401_with_www_authenticate_and_no_echo(client: TestClient) -> None:
    missing = client.get("/who")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert missing.json()["type"].endswith("/missing-token")
    bad = client.get("/who", headers={"Authorization": "Bearer secret-looking-token"})
    assert bad.status_code == 401 and "invalid_token" in bad.headers["WWW-Authenticate"]
    assert "secret-looking-token" not in bad.text


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json"])
def test_metrics_and_documents_need_an_ops_token(client: TestClient, log: Log, path: str) -> None:
    assert client.get(path).status_code == 401
    refused = client.get(path, headers={"Authorization": "Bearer cw-token"})
    assert refused.status_code == 403
    assert refused.headers["content-type"].startswith(http.PROBLEM_JSON)
    assert [(e.actor, e.action, e.allowed) for e in log.entries] == [("cw-1", "ops.read", False)]
    assert client.get(path, headers={"Authorization": "Bearer ops-token"}).status_code == 200


def test_public_docs_opens_the_documents_but_never_the_metrics(log: Log) -> None:
    with TestClient(make_app(public_docs=True)) as c:
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/docs").status_code == 200
        assert c.get("/metrics").status_code == 401


def test_the_probes_are_open_and_declared_so(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    document = client.get("/openapi.json", headers={"Authorization": "Bearer ops-token"}).json()
    actions = {
        path: op[guard.ACTION_KEY]
        for path, item in document["paths"].items()
        for op in item.values()
    }
    assert actions == {
        "/healthz": "open",
        "/readyz": "open",
        "/metrics": "ops.read",
        "/who": "case.read",
    }
    assert {"401", "403"} <= set(document["paths"]["/who"]["get"]["responses"])
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/who"]["get"]["security"] == [{"bearer": []}]
    assert document["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in document["paths"]["/healthz"]["get"]


def test_an_access_log_that_cannot_be_written_refuses_the_request(
    client: TestClient, log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(entries: Sequence[guard.AccessEntry]) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(log, "record", broken)
    r = client.get("/metrics", headers={"Authorization": "Bearer cw-token"})
    assert r.status_code == 503
    assert r.json()["type"].endswith("/access-log-unavailable")


def test_what_a_caller_wrote_reaches_the_access_log_only_as_an_id() -> None:
    from likvard.guard import NOT_AN_ID, _label
    from likvard.policy import CaseScope, DistrictScope, UnitScope

    assert _label(DistrictScope("nordost")) == ("district:nordost", None)
    assert _label(DistrictScope("a\x00b")) == (f"district:{NOT_AN_ID}", None)
    assert _label(DistrictScope("19121212-1212")) == (f"district:{NOT_AN_ID}", None)
    assert _label(UnitScope("Anna Andersson")) == (f"unit:{NOT_AN_ID}", None)
    case = "4f6b1f1e-5a3c-4d1e-9a57-2f3b8c1d0e9a"
    assert _label(CaseScope(case, "nordost")) == (f"case:{case}", case)
