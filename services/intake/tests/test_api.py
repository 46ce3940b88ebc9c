"""The intake HTTP API on a real server and a real PostgreSQL."""

from __future__ import annotations

import itertools
import threading
import uuid
from typing import Any

import httpx
import pytest

from likvard.guard import ACTION_KEY
from likvard.identity import Role
from tests.identity import bearer
from tests.support import RunningService

pytestmark = pytest.mark.integration

PNR = "19121212-1212"
NEW_CASE: dict[str, Any] = {
    "personal_identity_number": PNR,
    "district": "nordost",
    "substances": ["ALCOHOL", "GAMBLING"],
    "referral_source": "HEALTHCARE",
    "children_in_household": "YES",
    "birth_year": 1975,
}


def register(client: httpx.Client, **overrides: Any) -> str:
    r = client.post("/cases", json={**NEW_CASE, **overrides})
    assert r.status_code == 201, r.text
    return str(r.json()["case_id"])


# A case worker of both districts these tests move cases between (the transfer rules are
# in test_authorization.py); the actor in event metadata is the token's subject.
def worker() -> dict[str, str]:
    return bearer(Role.CASE_WORKER, districts=("nordost", "hisingen"), subject="cw-17")


@pytest.fixture
def client(intake: RunningService) -> httpx.Client:
    return httpx.Client(base_url=intake.base_url, timeout=30, headers=worker())


def assert_problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    if code:
        assert body["type"].endswith("/" + code), body
    return body


def test_register_returns_201_location_version_and_stores_no_identity_number(
    client: httpx.Client, intake: RunningService
) -> None:
    r = client.post("/cases", json=NEW_CASE)
    assert r.status_code == 201, r.text
    body = r.json()
    case_id = body["case_id"]
    assert body["version"] == 1
    assert r.headers["location"] == f"/cases/{case_id}"
    assert r.headers["etag"] == '"1"'
    assert [e["event_type"] for e in body["events"]] == ["IntakeRegistered"]

    stored = intake.store.read_stream(case_id)
    assert len(stored) == 1
    raw = stored[0].data + repr(stored[0].payload).encode() + repr(stored[0].metadata).encode()
    for form in (b"19121212-1212", b"191212121212", b"121212-1212", b"1212121212"):
        assert form not in raw
    assert stored[0].metadata["actor"] == "cw-17"
    assert len(stored[0].payload["person"]) == 64

    view = client.get(f"/cases/{case_id}")
    assert view.status_code == 200
    assert view.headers["etag"] == '"1"'
    v = view.json()
    assert v["status"] == "open" and v["district"] == "nordost" and v["version"] == 1
    assert v["person"] == stored[0].payload["person"]


def test_same_person_gets_the_same_pseudonym_in_any_format(
    client: httpx.Client, intake: RunningService
) -> None:
    a = register(client)
    b = register(client, personal_identity_number="191212121212", district="hisingen")
    pa = intake.store.read_stream(a)[0].payload["person"]
    pb = intake.store.read_stream(b)[0].payload["person"]
    assert pa == pb


def test_the_whole_life_of_a_case(client: httpx.Client, intake: RunningService) -> None:
    case = register(client)
    steps: list[tuple[str, dict[str, Any], str]] = [
        (
            "assessments",
            {
                "instrument": "AUDIT",
                "scores": [{"scale": "total", "value": 23}],
                "need_level": "HIGH",
            },
            "AssessmentCompleted",
        ),
        (
            "care-plan",
            {
                "goals": ["Sluta dricka på vardagar", "Behålla jobbet"],
                "person_participated": True,
                "review_on": "2099-01-01",
            },
            "CarePlanAgreed",
        ),
        ("consents", {"recipients": ["HEALTHCARE", "NON_PROFIT"]}, "ConsentRecorded"),
        ("transfer", {"to_district": "hisingen", "reason": "PERSON_MOVED"}, "CaseTransferred"),
        ("close", {"reason": "GOALS_REACHED"}, "CaseClosed"),
        ("reopen", {"reason": "RELAPSE"}, "CaseReopened"),
    ]
    version = 1
    for path, body, event_type in steps:
        r = client.post(f"/cases/{case}/{path}", json=body, headers={"If-Match": f'"{version}"'})
        assert r.status_code == 200, (path, r.text)
        version += 1
        assert r.json()["version"] == version
        assert r.json()["events"][0]["event_type"] == event_type
        assert r.headers["etag"] == f'"{version}"'
    consent_id = intake.store.read_stream(case)[3].payload["consent_id"]
    r = client.post(f"/cases/{case}/consents/{consent_id}/withdraw", json={})
    assert r.status_code == 200, r.text

    view = client.get(f"/cases/{case}").json()
    assert view["status"] == "open"
    assert view["district"] == "hisingen"
    assert view["need_level"] == "HIGH"
    assert view["active_consents"] == {}
    events = client.get(f"/cases/{case}/events").json()
    assert [e["stream_version"] for e in events] == list(range(1, 9))
    assert events[4]["metadata"]["district"] == "hisingen"  # the transfer event's district
    assert all(e["hash"] == f["prev_hash"] for e, f in itertools.pairwise(events))
    assert intake.store.verify(case) == []


def counts(intake: RunningService) -> tuple[int, int]:
    return intake.store.count(), intake.store.outbox_depth()


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("close", {"reason": "GOALS_REACHED"}, None),  # second close: already closed
        (
            "assessments",
            {
                "instrument": "AUDIT",
                "scores": [{"scale": "total", "value": 41}],
                "need_level": "HIGH",
            },
            None,
        ),
        ("transfer", {"to_district": "nordost", "reason": "PERSON_MOVED"}, None),
        ("transfer", {"to_district": "atlantis", "reason": "PERSON_MOVED"}, None),
        ("transfer", {"to_district": "angered", "reason": "PERSON_MOVED"}, None),  # 2011-2020 only
    ],
)
def test_domain_rules_give_422_and_change_nothing(
    client: httpx.Client,
    intake: RunningService,
    path: str,
    body: dict[str, Any],
    code: str | None,
) -> None:
    case = register(client)
    if path == "close":
        assert client.post(f"/cases/{case}/close", json=body).status_code == 200
    before = counts(intake)
    r = client.post(f"/cases/{case}/{path}", json=body)
    assert_problem(r, 422, code)
    assert counts(intake) == before


def test_register_in_unknown_or_expired_district_is_422(
    client: httpx.Client, intake: RunningService
) -> None:
    # A worker whose token names them: the district rule of the domain answers, not the policy.
    odd = bearer(Role.CASE_WORKER, districts=("atlantis", "angered"), subject="cw-17")
    for district in ("atlantis", "angered"):
        r = client.post("/cases", json={**NEW_CASE, "district": district}, headers=odd)
        assert_problem(r, 422)
    assert counts(intake) == (0, 0)


def test_invalid_input_is_422_problem_without_echoing_personal_data(
    client: httpx.Client, intake: RunningService
) -> None:
    bad_pnr = client.post("/cases", json={**NEW_CASE, "personal_identity_number": "19121212-1213"})
    assert PNR[:8] not in bad_pnr.text
    assert_problem(bad_pnr, 422, "invalid-identity-number")
    wrong_type = client.post("/cases", json={**NEW_CASE, "substances": ["COFFEE"]})
    body = assert_problem(wrong_type, 422, "validation-error")
    assert PNR not in wrong_type.text and "COFFEE" not in wrong_type.text
    assert body["errors"]
    assert_problem(
        client.post("/cases", content=b"{not json", headers={"content-type": "application/json"}),
        422,
    )
    future = client.post("/cases", json={**NEW_CASE, "occurred_at": "2999-01-01T00:00:00+00:00"})
    assert_problem(future, 422)
    assert counts(intake) == (0, 0)


def test_unknown_case_is_404_and_bad_if_match_is_400(client: httpx.Client) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    assert_problem(client.get(f"/cases/{missing}"), 404)
    assert_problem(client.get(f"/cases/{missing}/events"), 404)
    assert_problem(client.post(f"/cases/{missing}/close", json={"reason": "OTHER"}), 404)
    assert_problem(client.get("/cases/not-a-uuid"), 422)
    case = register(client)
    r = client.post(f"/cases/{case}/close", json={"reason": "OTHER"}, headers={"If-Match": "x"})
    assert_problem(r, 400, "bad-if-match")


def test_stale_if_match_is_409(client: httpx.Client, intake: RunningService) -> None:
    case = register(client)
    ok = client.post(f"/cases/{case}/close", json={"reason": "OTHER"}, headers={"If-Match": '"1"'})
    assert ok.status_code == 200
    before = counts(intake)
    stale = client.post(
        f"/cases/{case}/reopen", json={"reason": "RELAPSE"}, headers={"If-Match": '"1"'}
    )
    assert_problem(stale, 409, "version-conflict")
    assert stale.headers["etag"] == '"2"'
    assert counts(intake) == before


def test_two_concurrent_writers_with_one_version_one_wins_one_409(
    intake: RunningService, client: httpx.Client
) -> None:
    case = register(client)
    barrier = threading.Barrier(8)
    statuses: list[int] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        with httpx.Client(base_url=intake.base_url, timeout=30, headers=worker()) as c:
            barrier.wait()
            r = c.post(
                f"/cases/{case}/assessments",
                headers={"If-Match": '"1"'},
                json={
                    "instrument": "DUDIT",
                    "scores": [{"scale": "total", "value": i}],
                    "need_level": "MODERATE",
                },
            )
            with lock:
                statuses.append(r.status_code)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [200] + [409] * 7
    assert intake.store.stream_version(case) == 2


def test_openapi_documents_every_route_and_problem_responses(client: httpx.Client) -> None:
    assert_problem(client.get("/openapi.json"), 403)  # a case worker is not ops
    spec = client.get("/openapi.json", headers=bearer(Role.OPS)).json()
    paths = spec["paths"]
    for path in [
        "/cases",
        "/cases/{case_id}",
        "/cases/{case_id}/events",
        "/cases/{case_id}/assessments",
        "/cases/{case_id}/care-plan",
        "/cases/{case_id}/consents",
        "/cases/{case_id}/consents/{consent_id}/withdraw",
        "/cases/{case_id}/transfer",
        "/cases/{case_id}/close",
        "/cases/{case_id}/reopen",
        "/cases/{case_id}/investigations",
        "/cases/{case_id}/investigations/{investigation_id}/decision",
        "/cases/{case_id}/first-visit",
        "/cases/{case_id}/coordinated-plans",
        "/cases/{case_id}/coordinated-plans/{plan_id}/follow-up",
        "/healthz",
        "/readyz",
    ]:
        assert path in paths, path
    post = paths["/cases/{case_id}/close"]["post"]
    assert {"200", "404", "409", "422"} <= set(post["responses"])
    assert "application/problem+json" in post["responses"]["409"]["content"]
    assert any(p["name"] == "if-match" for p in post["parameters"])
    assert "201" in paths["/cases"]["post"]["responses"]
    assert {"401", "403"} <= set(post["responses"])
    actions = {(m, p): op.get(ACTION_KEY) for p, item in paths.items() for m, op in item.items()}
    assert actions[("post", "/cases")] == "case.register"
    assert actions[("post", "/cases/{case_id}/close")] == "case.change"
    for path in paths:
        if "investigations" in path or "coordinated-plans" in path or "first-visit" in path:
            assert actions[("post", path)] == "case.change", path
    assert actions[("get", "/cases/{case_id}")] == "case.read"
    assert actions[("get", "/cases/{case_id}/events")] == "case.history"
    assert actions[("get", "/healthz")] == "open"
    assert None not in actions.values()


def test_health_and_readiness(intake: RunningService) -> None:
    with httpx.Client(base_url=intake.base_url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").json() == {"status": "ready"}
        assert_problem(anonymous.get("/cases/00000000-0000-4000-8000-000000000000"), 401)


def test_a_broken_database_gives_503_readiness_and_500_problem(
    client: httpx.Client, intake: RunningService, database_url: str
) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(intake.schema)))
    assert_problem(client.get("/readyz"), 503, "not-ready")
    r = client.post("/cases", json=NEW_CASE)
    body = assert_problem(r, 500, "internal-error")
    assert "19121212" not in r.text and "schema" not in body["detail"]
    assert client.get("/healthz").status_code == 200  # alive, just not ready


# --- the care chain: gender, investigation, first visit, coordinated plan ---------------
SIP: dict[str, Any] = {
    "parties": ["SOCIAL_SERVICES", "PSYCHIATRY"],
    "lead": "PSYCHIATRY",
    "follow_up_on": "2099-01-01",
}


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json=body)
    assert r.status_code == 200, (path, r.text)
    result: dict[str, Any] = r.json()
    return result


def test_the_care_chain_of_a_case(client: httpx.Client, intake: RunningService) -> None:
    case = register(client, gender="WOMAN")
    opened = post(client, f"/cases/{case}/investigations", {"basis": "APPLICATION"})
    investigation = opened["investigation_id"]
    assert uuid.UUID(investigation) and opened["events"][0]["event_type"] == "InvestigationOpened"
    decided = post(
        client,
        f"/cases/{case}/investigations/{investigation}/decision",
        {"decision": "PARTLY_GRANTED", "intervention_kinds": ["OUTPATIENT", "HOUSING"]},
    )
    assert decided["events"][0]["event_type"] == "InvestigationDecided"
    visit = post(client, f"/cases/{case}/first-visit", {})
    assert visit["events"][0]["event_type"] == "FirstVisitHeld"
    post(client, f"/cases/{case}/consents", {"recipients": ["HEALTHCARE"]})
    consent_id = intake.store.read_stream(case)[-1].payload["consent_id"]
    agreed = post(client, f"/cases/{case}/coordinated-plans", {**SIP, "consent_id": consent_id})
    plan = agreed["plan_id"]
    followed = post(client, f"/cases/{case}/coordinated-plans/{plan}/follow-up", {})
    assert followed["version"] == 7 and followed["events"][0]["event_type"] == (
        "CoordinatedPlanFollowedUp"
    )

    stored = intake.store.read_stream(case)
    assert stored[0].payload["gender"] == "WOMAN"
    assert stored[2].payload == {
        "investigation_id": investigation,
        "decision": "PARTLY_GRANTED",
        "intervention_kinds": ["OUTPATIENT", "HOUSING"],
    }
    assert stored[5].payload["lead"] == "PSYCHIATRY"
    assert str(stored[5].payload["follow_up_on"]) == "2099-01-01"
    view = client.get(f"/cases/{case}").json()
    assert view["gender"] == "WOMAN"
    assert view["investigations"] == {investigation: "PARTLY_GRANTED"}
    assert view["first_visit_at"] is not None
    assert view["coordinated_plans"] == {plan: True}
    assert intake.store.verify(case) == []


def test_a_case_registered_without_a_gender_is_not_stated(
    client: httpx.Client, intake: RunningService
) -> None:
    case = register(client)
    assert intake.store.read_stream(case)[0].payload["gender"] == "NOT_STATED"
    assert_problem(client.post("/cases", json={**NEW_CASE, "gender": "F"}), 422, "validation-error")


def test_care_chain_rules_give_422_or_404_and_change_nothing(
    client: httpx.Client, intake: RunningService
) -> None:
    case = register(client)
    opened = post(client, f"/cases/{case}/investigations", {"basis": "REPORT_OF_CONCERN"})
    investigation = opened["investigation_id"]
    post(client, f"/cases/{case}/first-visit", {})
    post(client, f"/cases/{case}/consents", {"recipients": ["NON_PROFIT"]})
    consent_id = intake.store.read_stream(case)[-1].payload["consent_id"]
    missing = "00000000-0000-4000-8000-000000000000"
    before = counts(intake)
    for path, body, status, code in [
        (
            f"investigations/{missing}/decision",
            {"decision": "REFUSED"},
            404,
            "investigation-not-found",
        ),
        (
            f"investigations/{investigation}/decision",
            {"decision": "REFUSED", "intervention_kinds": ["HOUSING"]},
            422,
            "refused-with-interventions",
        ),
        (
            f"investigations/{investigation}/decision",
            {"decision": "GRANTED"},
            422,
            "intervention-kinds-empty",
        ),
        ("investigations", {"basis": "APPLICATION"}, 422, "investigation-already-open"),
        ("first-visit", {}, 422, "first-visit-already-held"),
        ("coordinated-plans", {**SIP, "consent_id": consent_id}, 422, "consent-not-covering"),
        ("coordinated-plans", {**SIP, "consent_id": missing}, 422, "consent-not-in-force"),
        (
            "coordinated-plans",
            {**SIP, "lead": "PRIMARY_CARE", "consent_id": consent_id},
            422,
            "lead-not-a-party",
        ),
        (
            "coordinated-plans",
            {**SIP, "parties": ["SOCIAL_SERVICES", "POLICE"], "consent_id": consent_id},
            422,
            "validation-error",
        ),
        (f"coordinated-plans/{missing}/follow-up", {}, 404, "coordinated-plan-not-found"),
        ("investigations", {"basis": "GOSSIP"}, 422, "validation-error"),
    ]:
        assert_problem(client.post(f"/cases/{case}/{path}", json=body), status, code)
    assert counts(intake) == before
    unknown = client.post(f"/cases/{missing}/first-visit", json={})
    assert_problem(unknown, 404, "case-not-found")


def test_another_districts_worker_may_not_change_the_care_chain(
    client: httpx.Client, intake: RunningService
) -> None:
    case = register(client)
    other = bearer(Role.CASE_WORKER, districts=("sydvast",), subject="cw-99")
    before = counts(intake)
    for path, body in [
        ("investigations", {"basis": "APPLICATION"}),
        ("first-visit", {}),
        ("coordinated-plans", {**SIP, "consent_id": "00000000-0000-4000-8000-000000000000"}),
    ]:
        assert_problem(client.post(f"/cases/{case}/{path}", json=body, headers=other), 403)
    assert counts(intake) == before
