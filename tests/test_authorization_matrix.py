"""The authorisation matrix, generated from the OpenAPI documents of all four APIs: every
operation x every role x a resource of the principal's own district or unit and of another,
requested for real (tokens from the development OpenID provider, the apps on PostgreSQL
with seeded cases, referrals, interventions and follow-ups) and checked against the
expectation table below, which is written by action, role and scope and does not read
likvard/policy.py.

A new operation fails this test until it declares its action (`x-likvard-action`), has a
request in REQUESTS and an expectation for its action; so does an app whose document has
an operation without a policy entry (shown at the end)."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard import guard
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.eventstore import EventStore
from likvard.identity import Role
from likvard.inbox import Incoming, decode_event
from likvard.known_cases import CaseDirectory
from likvard.topics import SERVICE_TOPICS
from tests.identity import bearer

pytestmark = pytest.mark.integration

SERVICES = ("intake", "referral", "followup", "projections")
SECRET = b"matrix-pseudonym-secret-0123456789"
OWN, OTHER = "own", "other"
SCOPES = (OWN, OTHER)
OWN_DISTRICT, OTHER_DISTRICT = "nordost", "hisingen"
OWN_UNIT, OTHER_UNIT = "nordost-alkoholmottagning", "hisingen-bostad-forst"
UNIT_CODES = {OWN_UNIT: "met", OTHER_UNIT: "housing-first"}

CW, US, AN, AU, RO, OPS = (
    Role.CASE_WORKER,
    Role.UNIT_STAFF,
    Role.ANALYST,
    Role.AUDITOR,
    Role.RECORDS_OFFICER,
    Role.OPS,
)
ROLES = tuple(Role)
BOTH = frozenset(SCOPES)
ONLY_OWN = frozenset({OWN})

# action -> role -> the scopes in which the role is let through. Everything else: 403.
EXPECTED: dict[str, dict[Role, frozenset[str]]] = {
    guard.OPEN: dict.fromkeys(ROLES, BOTH),
    "ops.read": {OPS: BOTH},
    "case.register": {CW: ONLY_OWN},
    "case.read": {CW: ONLY_OWN},
    "case.history": {CW: ONLY_OWN, AU: BOTH},
    "case.change": {CW: ONLY_OWN},
    "referral.read": {CW: ONLY_OWN, US: ONLY_OWN},
    "referral.answer": {US: ONLY_OWN},
    "unit.inbox": {US: ONLY_OWN},
    "followups.due": {CW: ONLY_OWN},
    "report.read": {AN: BOTH, AU: BOTH},
    "access-log.read": {AU: BOTH},
    "history.replay": {AU: BOTH},
    "history.verify": {AU: BOTH},
    "records.manage": {RO: BOTH},
    "pseudonyms.compute": {Role.DISTRICT_SYSTEM: BOTH},
}


def principal_headers(role: Role) -> dict[str, str]:
    """The principal of each role: a case worker of Nordost, staff of the Nordost unit."""
    if role is CW:
        return bearer(role, districts=(OWN_DISTRICT,), subject="matrix-cw")
    if role is US:
        return bearer(role, unit=OWN_UNIT, subject="matrix-us")
    return bearer(role, subject=f"matrix-{role}")


def district(scope: str) -> str:
    return OWN_DISTRICT if scope == OWN else OTHER_DISTRICT


@dataclass(frozen=True)
class Request:
    """What one operation is sent besides its path: a body and query, by scope."""

    body: Callable[[str, World], dict[str, Any]] | None = None
    query: Callable[[str], dict[str, str]] | None = None


def _const(body: dict[str, Any]) -> Callable[[str, World], dict[str, Any]]:
    return lambda scope, world: body


NEW_CASE: dict[str, Any] = {
    "personal_identity_number": "19121212-1212",
    "substances": ["ALCOHOL"],
    "referral_source": "HEALTHCARE",
    "children_in_household": "NO",
}

SIP: dict[str, Any] = {
    "parties": ["SOCIAL_SERVICES", "PRIMARY_CARE"],
    "lead": "SOCIAL_SERVICES",
    "follow_up_on": "2099-01-01",
}

# (service, METHOD, path) -> the request. A body leaves the resource where it is (e.g. a
# transfer to the district the case is in: refused by the domain, 422, after the policy).
REQUESTS: dict[tuple[str, str, str], Request] = {
    **{(s, "GET", p): Request() for s in SERVICES for p in ("/healthz", "/readyz", "/metrics")},
    ("intake", "POST", "/cases"): Request(
        lambda scope, w: {**NEW_CASE, "district": district(scope)}
    ),
    ("intake", "POST", "/cases/{case_id}/assessments"): Request(
        _const(
            {"instrument": "AUDIT", "scores": [{"scale": "total", "value": 9}], "need_level": "LOW"}
        )
    ),
    ("intake", "POST", "/cases/{case_id}/care-plan"): Request(
        _const({"goals": ["Sova bättre"], "person_participated": True})
    ),
    ("intake", "POST", "/cases/{case_id}/consents"): Request(
        _const({"recipients": ["HEALTHCARE"]})
    ),
    ("intake", "POST", "/cases/{case_id}/consents/{consent_id}/withdraw"): Request(_const({})),
    ("intake", "POST", "/cases/{case_id}/transfer"): Request(
        lambda scope, w: {"to_district": district(scope), "reason": "PERSON_MOVED"}
    ),
    ("intake", "POST", "/cases/{case_id}/close"): Request(_const({"reason": "GOALS_REACHED"})),
    ("intake", "POST", "/cases/{case_id}/reopen"): Request(_const({"reason": "RELAPSE"})),
    ("intake", "POST", "/cases/{case_id}/investigations"): Request(
        _const({"basis": "APPLICATION"})
    ),
    ("intake", "POST", "/cases/{case_id}/investigations/{investigation_id}/decision"): Request(
        _const({"decision": "REFUSED"})
    ),
    ("intake", "POST", "/cases/{case_id}/first-visit"): Request(_const({})),
    ("intake", "POST", "/cases/{case_id}/coordinated-plans"): Request(
        lambda scope, w: {**SIP, "consent_id": w.ids["consent_id"][scope]}
    ),
    ("intake", "POST", "/cases/{case_id}/coordinated-plans/{plan_id}/follow-up"): Request(
        _const({})
    ),
    ("intake", "GET", "/cases/{case_id}"): Request(),
    ("intake", "GET", "/cases/{case_id}/events"): Request(),
    ("intake", "POST", "/persons/{pseudonym}/erasure"): Request(
        _const({"legal_basis": "erasure-request"})
    ),
    ("intake", "POST", "/pseudonyms"): Request(_const({"identity_numbers": ["19121212-1212"]})),
    ("referral", "POST", "/referrals"): Request(
        lambda scope, w: {
            "case_id": w.ids["case_id"][scope],
            "unit_id": w.ids["unit_id"][scope],
            "intervention_code": UNIT_CODES[w.ids["unit_id"][scope]],
        }
    ),
    ("referral", "POST", "/referrals/{referral_id}/accept"): Request(_const({})),
    ("referral", "POST", "/referrals/{referral_id}/decline"): Request(
        _const({"reason": "LACK_OF_CAPACITY"})
    ),
    ("referral", "POST", "/referrals/{referral_id}/withdraw"): Request(
        _const({"reason": "NO_LONGER_NEEDED"})
    ),
    ("referral", "POST", "/referrals/{referral_id}/interventions"): Request(_const({})),
    ("referral", "POST", "/interventions/{intervention_id}/end"): Request(
        _const({"outcome": "COMPLETED_AS_PLANNED"})
    ),
    ("referral", "GET", "/referrals/{referral_id}"): Request(),
    ("referral", "GET", "/units/{unit_id}/referrals"): Request(),
    ("followup", "POST", "/cases/{case_id}/children"): Request(_const({"number_of_children": 1})),
    ("followup", "POST", "/cases/{case_id}/family"): Request(
        _const(
            {
                "relation": "PARTNER",
                "is_child": False,
                "support_offered": ["INFORMATION"],
                "accepted": True,
            }
        )
    ),
    ("followup", "POST", "/followups/{followup_id}/complete"): Request(
        _const(
            {
                "housing": "OWN_HOME",
                "occupation": "EMPLOYED",
                "goals_reached": "YES",
                "situation_improved": "BETTER",
            }
        )
    ),
    ("followup", "POST", "/followups/{followup_id}/missed"): Request(
        _const({"reason": "NO_CONTACT"})
    ),
    ("followup", "POST", "/cases/{case_id}/user-assessments"): Request(
        _const(
            {
                "contact_easy": "YES",
                "clear_information": "YES",
                "felt_understood": "PARTLY",
                "influence": "NO",
                "whole_situation": "NO_ANSWER",
                "situation_improved": "YES",
            }
        )
    ),
    ("followup", "GET", "/cases/{case_id}/followups"): Request(),
    ("followup", "GET", "/followups/due"): Request(
        query=lambda scope: {"before": "2099-01-01", "district": district(scope)}
    ),
    ("projections", "GET", "/reports/followup"): Request(
        query=lambda scope: {"from": "2026-01-01", "to": "2026-12-31"}
    ),
    ("projections", "GET", "/reports/equal-access"): Request(),
    ("projections", "GET", "/reports/waits"): Request(),
    ("projections", "GET", "/reports/overdue"): Request(query=lambda scope: {"day": "2026-06-30"}),
    ("projections", "GET", "/indicators"): Request(),
    ("projections", "GET", "/indicators/{indicator_id}"): Request(
        query=lambda scope: {"from": "2026-01-01", "to": "2026-12-31"}
    ),
    ("projections", "GET", "/cases/{case_id}/timeline"): Request(),
    ("projections", "GET", "/cases/{case_id}/chain"): Request(),
    ("projections", "POST", "/history/replays"): Request(_const({"as_of": None})),
    ("projections", "GET", "/history/replays"): Request(),
    ("projections", "GET", "/history/replays/{job_id}"): Request(),
    ("projections", "POST", "/history/verifications"): Request(),
    ("projections", "GET", "/history/verifications/latest"): Request(),
    ("projections", "GET", "/access-log"): Request(),
    ("referral", "GET", "/referrals/overdue"): Request(
        query=lambda scope: {"district": district(scope)}
    ),
}


@dataclass(frozen=True)
class Operation:
    service: str
    method: str
    path: str
    action: str | None
    has_body: bool

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.service, self.method, self.path)

    def __str__(self) -> str:
        return f"{self.service} {self.method} {self.path}"


def operations(service: str, app: FastAPI) -> list[Operation]:
    """Every operation of the app's OpenAPI document, with the action it declares."""
    return [
        Operation(
            service,
            method.upper(),
            path,
            op.get(guard.ACTION_KEY),
            "requestBody" in op,
        )
        for path, item in app.openapi()["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict)
    ]


def gaps(ops: list[Operation]) -> list[str]:
    """Why an operation cannot be put in the matrix: each one named."""
    found = []
    for op in ops:
        if op.action is None:
            found.append(f"{op}: no {guard.ACTION_KEY} (declare openapi_extra=guard.policy(...))")
        elif op.action not in EXPECTED:
            found.append(f"{op}: no expectation for action {op.action!r} in EXPECTED")
        if op.key not in REQUESTS:
            found.append(f"{op}: no request in REQUESTS")
        elif op.has_body and REQUESTS[op.key].body is None:
            found.append(f"{op}: takes a body, REQUESTS gives none")
    return found


def expected_allowed(action: str, role: Role, scope: str) -> bool:
    return scope in EXPECTED[action].get(role, frozenset())


# --- the apps and the world they serve -----------------------------------------------
@dataclass
class World:
    clients: dict[str, TestClient]
    apps: dict[str, FastAPI]
    ids: dict[str, dict[str, str]]  # path parameter -> scope -> value


def _incoming(catalogue: Catalogue, service: str, store: EventStore, stream: str) -> list[Incoming]:
    topic = SERVICE_TOPICS[service]
    return [
        decode_event(catalogue, topic, 0, e.global_position, e.data)
        for e in store.read_stream(stream)
    ]


def _ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def world(database_url: str, catalogue: Catalogue) -> Iterator[World]:
    """The four apps on schemas of their own, with for each scope a case (and its consent,
    an open investigation and a coordinated plan), a referral to a unit, a running
    intervention and a scheduled follow-up."""
    tag = uuid.uuid4().hex[:8]
    schemas = {s: f"m_{s[:4]}_{tag}" for s in SERVICES}
    settings = Settings(database_url=database_url, pseudonym_secret=SECRET, topic_prefix=tag)
    pool = ConnectionPool(database_url, min_size=1, max_size=4, open=False)
    pool.open(wait=True, timeout=30)
    stores = {
        s: EventStore(pool, schemas[s], catalogue, producer=f"likvard-{s}", topic="unused")
        for s in ("intake", "referral", "followup")
    }
    with ExitStack() as stack:
        keys_schema = f"{schemas['intake']}_keys"  # the intake app's key store
        stack.callback(_drop, database_url, [*schemas.values(), keys_schema])
        stack.callback(pool.close)
        apps = {
            "intake": _app("intake", settings, schema=schemas["intake"], catalogue=catalogue),
            "referral": _app(
                "referral", settings, schema=schemas["referral"], catalogue=catalogue, case_wait=0
            ),
            "followup": _app(
                "followup", settings, schema=schemas["followup"], catalogue=catalogue, case_wait=0
            ),
            "projections": _app("projections", settings, schema=schemas["projections"]),
        }
        clients = {s: stack.enter_context(TestClient(a)) for s, a in apps.items()}
        seed = bearer(CW, districts=(OWN_DISTRICT, OTHER_DISTRICT), subject="matrix-seed")
        ids: dict[str, dict[str, str]] = {
            "unit_id": {OWN: OWN_UNIT, OTHER: OTHER_UNIT},
            "case_id": {},
            "consent_id": {},
            "investigation_id": {},
            "plan_id": {},
            "referral_id": {},
            "intervention_id": {},
            "followup_id": {},
            "indicator_id": {OWN: "U35409", OTHER: "U35409"},
            "job_id": {OWN: str(uuid.uuid4()), OTHER: str(uuid.uuid4())},
            "pseudonym": {},
        }
        intake, referral, followup = clients["intake"], clients["referral"], clients["followup"]
        events: dict[str, list[Incoming]] = {"intake": [], "referral": [], "followup": []}
        for scope in SCOPES:
            case = _ok(
                intake.post("/cases", json={**NEW_CASE, "district": district(scope)}, headers=seed),
                201,
            )["case_id"]
            _ok(
                intake.post(
                    f"/cases/{case}/consents", json={"recipients": ["HEALTHCARE"]}, headers=seed
                )
            )
            ids["case_id"][scope] = case
            ids["pseudonym"][scope] = stores["intake"].read_stream(case)[0].payload["person"]
            ids["consent_id"][scope] = stores["intake"].read_stream(case)[-1].payload["consent_id"]
            ids["investigation_id"][scope] = _ok(
                intake.post(
                    f"/cases/{case}/investigations", json={"basis": "APPLICATION"}, headers=seed
                )
            )["investigation_id"]
            ids["plan_id"][scope] = _ok(
                intake.post(
                    f"/cases/{case}/coordinated-plans",
                    json={**SIP, "consent_id": ids["consent_id"][scope]},
                    headers=seed,
                )
            )["plan_id"]
            events["intake"] += _incoming(catalogue, "intake", stores["intake"], case)
        _learn(pool, CaseDirectory(schemas["referral"]), events["intake"])

        for scope in SCOPES:
            unit = ids["unit_id"][scope]
            staff = bearer(US, unit=unit, subject="matrix-seed-staff")
            rid = _ok(
                referral.post(
                    "/referrals",
                    json={
                        "case_id": ids["case_id"][scope],
                        "unit_id": unit,
                        "intervention_code": UNIT_CODES[unit],
                    },
                    headers=seed,
                ),
                201,
            )["referral_id"]
            _ok(referral.post(f"/referrals/{rid}/accept", json={}, headers=staff))
            ended = _ok(
                referral.post(f"/referrals/{rid}/interventions", json={}, headers=staff), 201
            )
            _ok(
                referral.post(
                    f"/interventions/{ended['intervention_id']}/end",
                    json={"outcome": "COMPLETED_AS_PLANNED"},
                    headers=staff,
                )
            )
            running = _ok(
                referral.post(f"/referrals/{rid}/interventions", json={}, headers=staff), 201
            )
            ids["referral_id"][scope] = rid
            ids["intervention_id"][scope] = running["intervention_id"]
            events["referral"] += _incoming(catalogue, "referral", stores["referral"], rid)

        from services.followup.process import make_handler
        from services.followup.service import make_service

        handler = make_handler(make_service(stores["followup"]), CaseDirectory(schemas["followup"]))
        with pool.connection() as conn:
            handler(conn, events["intake"] + events["referral"])
        for scope in SCOPES:
            case = ids["case_id"][scope]
            view = _ok(followup.get(f"/cases/{case}/followups", headers=seed))
            ids["followup_id"][scope] = view["followups"][0]["followup_id"]
            events["followup"] += _incoming(catalogue, "followup", stores["followup"], case)

        from services.projections import readmodels

        with pool.connection() as conn:
            readmodels.apply(
                conn, schemas["projections"], [e for es in events.values() for e in es]
            )
        yield World(clients, apps, ids)


def _app(service: str, settings: Settings, **options: Any) -> FastAPI:
    app: FastAPI = importlib.import_module(f"services.{service}.api").create_app(
        settings, **options
    )
    return app


def _learn(pool: ConnectionPool, directory: CaseDirectory, events: list[Incoming]) -> None:
    with pool.connection() as conn:
        directory.handle(conn, events)


def _drop(database_url: str, schemas: list[str]) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for name in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _url(op: Operation, scope: str, world: World) -> str:
    path = op.path
    for name, values in world.ids.items():
        path = path.replace("{" + name + "}", values[scope])
    assert "{" not in path, f"{op}: no id for a path parameter; add it to World.ids"
    return path


def _send(op: Operation, scope: str, world: World, headers: dict[str, str]) -> tuple[int, str]:
    request = REQUESTS[op.key]
    response = world.clients[op.service].request(
        op.method,
        _url(op, scope, world),
        json=request.body(scope, world) if request.body is not None else None,
        params=request.query(scope) if request.query is not None else None,
        headers=headers,
    )
    return response.status_code, response.text


def all_operations(world: World) -> list[Operation]:
    return [op for service in SERVICES for op in operations(service, world.apps[service])]


# --- the tests ------------------------------------------------------------------------
def test_every_operation_of_every_api_is_in_the_matrix(world: World) -> None:
    ops = all_operations(world)
    assert {op.service for op in ops} == set(SERVICES)
    assert gaps(ops) == []
    # The table names no operation the apps no longer have (a stale entry hides nothing,
    # but says the matrix is not what it claims).
    assert set(REQUESTS) == {op.key for op in ops}


def test_each_role_gets_exactly_its_rights_on_every_operation(world: World) -> None:
    ops = [op for op in all_operations(world) if op.action is not None and op.key in REQUESTS]
    assert len(ops) == len(all_operations(world))  # none left out
    headers = {role: principal_headers(role) for role in ROLES}
    wrong = []
    cells = 0
    for op in ops:
        assert op.action is not None
        for role in ROLES:
            for scope in SCOPES:
                cells += 1
                status, text = _send(op, scope, world, headers[role])
                allow = expected_allowed(op.action, role, scope)
                if allow and (status in (401, 403) or status >= 500):
                    wrong.append(f"{op} as {role} ({scope}): {status}, expected allowed: {text}")
                if not allow and status != 403:
                    wrong.append(f"{op} as {role} ({scope}): {status}, expected 403: {text}")
    assert cells == len(ops) * len(ROLES) * len(SCOPES)
    assert wrong == [], "\n".join(wrong)


def test_without_a_token_everything_but_the_probes_is_401(world: World) -> None:
    wrong = []
    for op in all_operations(world):
        status, text = _send(op, OWN, world, {})
        want = 200 if op.action == guard.OPEN else 401
        if status != want:
            wrong.append(f"{op}: {status}, expected {want}: {text}")
    assert wrong == [], "\n".join(wrong)


def test_the_api_documents_need_an_ops_token_on_every_api(world: World) -> None:
    """FastAPI's own pages are not operations of the document: checked here by name."""
    wrong = []
    for service, client in world.clients.items():
        for path in ("/openapi.json", "/docs", "/redoc"):
            for role, want in ((None, 401), (CW, 403), (AU, 403), (OPS, 200)):
                headers = principal_headers(role) if role is not None else {}
                status = client.get(path, headers=headers).status_code
                if status != want:
                    wrong.append(f"{service} GET {path} as {role}: {status}, expected {want}")
    assert wrong == [], "\n".join(wrong)


def test_a_route_without_a_policy_entry_fails_the_matrix_and_the_app_start(
    database_url: str,
) -> None:
    settings = Settings(database_url=database_url, pseudonym_secret=SECRET)
    app = _app("intake", settings)

    @app.get("/cases/{case_id}/secret")
    def secret(case_id: str) -> dict[str, str]:
        return {"case_id": case_id}

    assert gaps(operations("intake", app)) == [
        "intake GET /cases/{case_id}/secret: no x-likvard-action"
        " (declare openapi_extra=guard.policy(...))",
        "intake GET /cases/{case_id}/secret: no request in REQUESTS",
    ]
    with (
        pytest.raises(guard.UnlistedOperations, match=r"GET /cases/\{case_id\}/secret"),
        TestClient(app),
    ):
        pass
