"""The follow-up HTTP API and its process manager on a real server and a real PostgreSQL.

Known cases are seeded through `CaseDirectory.handle` with intake events, as the consumer
would; InterventionEnded is handed to the process manager's handler directly (no Kafka).
The caller signs in as case worker `cw-17` of Nordost, Hisingen and Sydväst (a token from
the development OpenID provider).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.eventstore import EventStore
from likvard.guard import ACTION_KEY
from likvard.inbox import InboxConsumer, Incoming
from likvard.known_cases import CaseDirectory
from likvard.topics import SERVICE_TOPICS
from services.followup.process import ACTOR, make_handler
from services.followup.scheduling import followup_id
from services.followup.service import FollowUpService, make_service
from tests.identity import bearer
from tests.support import serving

pytestmark = pytest.mark.integration

ENDED = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)  # due: interview 03-31, ASI 09-01, 2026-03-01


@dataclass
class Followup:
    base_url: str
    schema: str
    store: EventStore
    service: FollowUpService
    directory: CaseDirectory
    pool: ConnectionPool
    database_url: str
    catalogue: Catalogue


@pytest.fixture
def followup(
    database_url: str, schema: str, catalogue: Catalogue, pool: ConnectionPool
) -> Iterator[Followup]:
    """The follow-up service on a real uvicorn server in this process, on its own schema."""
    from services.followup.api import create_app

    prefix = f"t{uuid.uuid4().hex[:10]}."
    settings = Settings(database_url=database_url, topic_prefix=prefix)
    app = create_app(settings, schema=schema, catalogue=catalogue, case_wait=0.2)
    store = EventStore(
        pool,
        schema,
        catalogue,
        producer="likvard-followup",
        topic=prefix + SERVICE_TOPICS["followup"],
    )
    with serving(app) as base_url:
        yield Followup(
            base_url,
            schema,
            store,
            make_service(store),
            CaseDirectory(schema),
            pool,
            database_url,
            catalogue,
        )


DISTRICTS = ("nordost", "hisingen", "sydvast")


@pytest.fixture
def client(followup: Followup) -> Iterator[httpx.Client]:
    headers = bearer("case-worker", districts=DISTRICTS, subject="cw-17")
    with httpx.Client(base_url=followup.base_url, timeout=30, headers=headers) as c:
        yield c


def incoming(
    event_type: str,
    case_id: str,
    data: dict[str, Any],
    *,
    district: str = "nordost",
    version: int = 1,
    topic: str = SERVICE_TOPICS["intake"],
    occurred_at: datetime | None = None,
) -> Incoming:
    event_id = str(uuid.uuid4())
    metadata: dict[str, Any] = {
        "event_id": event_id,
        "event_type": event_type,
        "case_id": case_id,
        "stream_version": version,
        "occurred_at": occurred_at or datetime.now(UTC),
        "recorded_at": datetime.now(UTC),
        "producer": "likvard-test",
        "district": district,
        "actor": "cw-1",
        "correlation_id": str(uuid.uuid4()),
        "causation_id": None,
        "traceparent": None,
    }
    return Incoming(topic, 0, 0, event_id, event_type, case_id, metadata, data)


def known_case(followup: Followup, district: str = "nordost", closed: bool = False) -> str:
    """A case the service has learnt from intake (optionally closed since)."""
    case_id = str(uuid.uuid4())
    events = [
        incoming(
            "IntakeRegistered",
            case_id,
            {
                "person": "ab" * 32,
                "district": district,
                "substances": ["ALCOHOL"],
                "referral_source": "SELF",
                "children_in_household": "YES",
                "birth_year": 1980,
            },
            district=district,
        )
    ]
    if closed:
        events.append(
            incoming(
                "CaseClosed", case_id, {"reason": "GOALS_REACHED"}, district=district, version=2
            )
        )
    with followup.pool.connection() as conn:
        followup.directory.handle(conn, events)
    return case_id


def intervention_ended(
    case_id: str, *, days: int = 10, district: str = "nordost", ended: datetime = ENDED
) -> Incoming:
    return incoming(
        "InterventionEnded",
        case_id,
        {
            "intervention_id": str(uuid.uuid4()),
            "referral_id": str(uuid.uuid4()),
            "intervention_code": "CRA",
            "started_at": ended - timedelta(days=days),
            "outcome": "COMPLETED_AS_PLANNED",
        },
        district=district,
        topic=SERVICE_TOPICS["referral"],
        occurred_at=ended,
    )


def schedule(followup: Followup, event: Incoming) -> None:
    handler = make_handler(followup.service, followup.directory)
    with followup.pool.connection() as conn:
        handler(conn, [event])


def counts(followup: Followup) -> tuple[int, int]:
    return followup.store.count(), followup.store.outbox_depth()


def assert_problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    if code:
        assert body["type"].endswith("/" + code), body
    return body


FAMILY: dict[str, Any] = {
    "relation": "CHILD",
    "is_child": True,
    "support_offered": ["CHILD_SUPPORT_GROUP", "INFORMATION"],
    "accepted": True,
}
COMPLETE: dict[str, Any] = {
    "days_of_use_last_30": 2,
    "housing": "OWN_HOME",
    "occupation": "EMPLOYED",
    "self_rated_health": 4,
    "goals_reached": "PARTLY",
    "situation_improved": "BETTER",
}


def test_children_and_family_are_recorded_and_shown(
    client: httpx.Client, followup: Followup
) -> None:
    case = known_case(followup, district="hisingen")
    r = client.post(f"/cases/{case}/children", json={"number_of_children": 2, "youngest_age": 4})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1 and r.headers["etag"] == '"1"'
    assert [e["event_type"] for e in r.json()["events"]] == ["ChildrenInHouseholdRecorded"]

    r = client.post(f"/cases/{case}/family", json=FAMILY, headers={"If-Match": '"1"'})
    assert r.status_code == 200, r.text
    member = r.json()["member_id"]
    assert uuid.UUID(member) and r.json()["version"] == 2
    again = {**FAMILY, "member_id": member, "accepted": False}
    r = client.post(f"/cases/{case}/family", json=again, headers={"If-Match": '"2"'})
    assert r.status_code == 200, r.text
    assert r.json()["member_id"] == member

    stored = followup.store.read_stream(case)
    assert [e.metadata["district"] for e in stored] == ["hisingen"] * 3
    assert stored[0].metadata["actor"] == "cw-17"

    view = client.get(f"/cases/{case}/followups")
    assert view.status_code == 200 and view.headers["etag"] == '"3"'
    v = view.json()
    assert v["number_of_children"] == 2 and v["youngest_age"] == 4
    assert v["family_members"] == {member: "CHILD"} and v["child_engaged"] is True
    assert v["followups"] == []


def test_a_closed_case_still_takes_family_work(client: httpx.Client, followup: Followup) -> None:
    case = known_case(followup, closed=True)
    r = client.post(f"/cases/{case}/children", json={"number_of_children": 0})
    assert r.status_code == 200, r.text


def test_a_known_case_without_events_has_an_empty_view(
    client: httpx.Client, followup: Followup
) -> None:
    case = known_case(followup)
    v = client.get(f"/cases/{case}/followups")
    assert v.status_code == 200 and v.json()["version"] == 0 and v.json()["followups"] == []


def test_intervention_end_schedules_three_followups_exactly_once(
    client: httpx.Client, followup: Followup
) -> None:
    case = known_case(followup)
    ended = intervention_ended(case, days=10)
    schedule(followup, ended)
    stored = followup.store.read_stream(case)
    assert [e.event_type for e in stored] == ["FollowUpScheduled"] * 3
    intervention = ended.data["intervention_id"]
    assert {e.payload["kind"]: e.payload["due_on"] for e in stored} == {
        "POST_INTERVENTION_INTERVIEW": "2025-03-31",
        "ASI_6_MONTHS": "2025-09-01",
        "ASI_12_MONTHS": "2026-03-01",
    }
    for e in stored:
        assert e.payload["followup_id"] == followup_id(intervention, e.payload["kind"])
        assert e.metadata["actor"] == ACTOR
        assert e.metadata["district"] == "nordost"
        assert e.metadata["correlation_id"] == ended.metadata["correlation_id"]
        assert e.metadata["causation_id"] == ended.event_id
    before = counts(followup)
    assert before == (3, 3)

    # The same event again, through the inbox (which has not seen it: the first pass was
    # direct), then once more through the inbox (a duplicate), then directly again.
    consumer = InboxConsumer(
        followup.database_url,
        followup.schema,
        followup.catalogue,
        make_handler(followup.service, followup.directory),
    )
    with psycopg.connect(followup.database_url) as conn:
        assert consumer.handle(conn, [ended]) == 1
        assert consumer.handle(conn, [ended]) == 0
    schedule(followup, ended)
    assert counts(followup) == before

    v = client.get(f"/cases/{case}/followups").json()
    assert [f["kind"] for f in v["followups"]] == [
        "POST_INTERVENTION_INTERVIEW",
        "ASI_6_MONTHS",
        "ASI_12_MONTHS",
    ]
    assert all(f["status"] == "scheduled" for f in v["followups"])


def test_a_short_intervention_gets_only_the_asi_followups(followup: Followup) -> None:
    case = known_case(followup)
    schedule(followup, intervention_ended(case, days=7))
    kinds = sorted(e.payload["kind"] for e in followup.store.read_stream(case))
    assert kinds == ["ASI_12_MONTHS", "ASI_6_MONTHS"]


def test_due_filters_by_date_and_district_and_leaves_out_done_ones(
    client: httpx.Client, followup: Followup
) -> None:
    north = known_case(followup, district="nordost")
    south = known_case(followup, district="sydvast")
    schedule(followup, intervention_ended(north, district="nordost"))
    schedule(followup, intervention_ended(south, district="sydvast", ended=ENDED + timedelta(1)))

    def due(**params: str) -> list[tuple[str, str, str]]:
        r = client.get("/followups/due", params=params)
        assert r.status_code == 200, r.text
        return [(f["case_id"], f["kind"], f["due_on"]) for f in r.json()]

    assert due(before="2025-03-31") == []
    assert due(before="2025-04-01") == [(north, "POST_INTERVENTION_INTERVIEW", "2025-03-31")]
    assert due(before="2025-04-02") == [
        (north, "POST_INTERVENTION_INTERVIEW", "2025-03-31"),
        (south, "POST_INTERVENTION_INTERVIEW", "2025-04-01"),
    ]
    assert due(before="2025-09-03", district="sydvast") == [
        (south, "POST_INTERVENTION_INTERVIEW", "2025-04-01"),
        (south, "ASI_6_MONTHS", "2025-09-02"),
    ]
    assert due(before="2027-01-01", district="hisingen") == []
    assert len(due(before="2027-01-01")) == 6  # every district of the caller's
    other = client.get("/followups/due", params={"before": "2027-01-01", "district": "centrum"})
    assert_problem(other, 403, "forbidden")

    listed = client.get("/followups/due", params={"before": "2025-09-02", "district": "nordost"})
    ids = {f["kind"]: f["followup_id"] for f in listed.json()}
    r = client.post(f"/followups/{ids['POST_INTERVENTION_INTERVIEW']}/complete", json=COMPLETE)
    assert r.status_code == 200, r.text
    assert r.json()["case_id"] == north and r.json()["version"] == 4
    r = client.post(
        f"/followups/{ids['ASI_6_MONTHS']}/missed",
        json={"reason": "NO_CONTACT"},
        headers={"If-Match": '"4"'},
    )
    assert r.status_code == 200, r.text
    assert [e["event_type"] for e in r.json()["events"]] == ["FollowUpMissed"]
    assert due(before="2025-09-02", district="nordost") == []
    assert [k for _, k, _ in due(before="2027-01-01", district="nordost")] == ["ASI_12_MONTHS"]

    statuses = {
        f["kind"]: f["status"] for f in client.get(f"/cases/{north}/followups").json()["followups"]
    }
    assert statuses == {
        "POST_INTERVENTION_INTERVIEW": "completed",
        "ASI_6_MONTHS": "missed",
        "ASI_12_MONTHS": "scheduled",
    }
    done = followup.store.read_stream(north)[3]
    assert done.payload["housing"] == "OWN_HOME" and done.metadata["district"] == "nordost"


def test_bad_input_to_every_endpoint_is_a_problem_and_changes_nothing(
    client: httpx.Client, followup: Followup
) -> None:
    case = known_case(followup)
    schedule(followup, intervention_ended(case))
    ok = client.post(f"/cases/{case}/children", json={"number_of_children": 1})
    assert ok.status_code == 200, ok.text
    v = client.get(f"/cases/{case}/followups").json()
    interview = next(f for f in v["followups"] if f["kind"] == "POST_INTERVENTION_INTERVIEW")
    asi = next(f for f in v["followups"] if f["kind"] == "ASI_6_MONTHS")
    missed = client.post(f"/followups/{asi['followup_id']}/missed", json={"reason": "MOVED"})
    assert missed.status_code == 200, missed.text
    version = v["version"] + 1  # 5
    unknown_case = str(uuid.uuid4())
    unknown_followup = str(uuid.uuid4())
    stale = {"If-Match": '"1"'}
    cases: list[tuple[str, str, Any, dict[str, str], int, str]] = [
        # children
        (
            "post",
            f"/cases/{case}/children",
            {"number_of_children": -1},
            {},
            422,
            "validation-error",
        ),
        (
            "post",
            f"/cases/{case}/children",
            {"number_of_children": 21},
            {},
            422,
            "validation-error",
        ),
        ("post", f"/cases/{case}/children", {}, {}, 422, "validation-error"),
        (
            "post",
            f"/cases/{case}/children",
            {"number_of_children": 0, "youngest_age": 3},
            {},
            422,
            "youngest-age-without-children",
        ),
        (
            "post",
            f"/cases/{case}/children",
            {"number_of_children": 1, "occurred_at": "2999-01-01T00:00:00+00:00"},
            {},
            422,
            "validation-error",
        ),
        (
            "post",
            "/cases/not-a-uuid/children",
            {"number_of_children": 1},
            {},
            422,
            "validation-error",
        ),
        (
            "post",
            f"/cases/{unknown_case}/children",
            {"number_of_children": 1},
            {},
            404,
            "case-not-known",
        ),
        (
            "post",
            f"/cases/{case}/children",
            {"number_of_children": 1},
            stale,
            409,
            "version-conflict",
        ),
        (
            "post",
            f"/cases/{case}/children",
            {"number_of_children": 1},
            {"If-Match": "x"},
            400,
            "bad-if-match",
        ),
        # family
        (
            "post",
            f"/cases/{case}/family",
            {**FAMILY, "relation": "COUSIN"},
            {},
            422,
            "validation-error",
        ),
        (
            "post",
            f"/cases/{case}/family",
            {**FAMILY, "support_offered": []},
            {},
            422,
            "validation-error",
        ),
        (
            "post",
            f"/cases/{case}/family",
            {**FAMILY, "member_id": "x"},
            {},
            422,
            "validation-error",
        ),
        (
            "post",
            f"/cases/{case}/family",
            {**FAMILY, "relation": "PARTNER"},
            {},
            422,
            "relation-cannot-be-a-child",
        ),
        (
            "post",
            f"/cases/{case}/family",
            {**FAMILY, "support_offered": ["CRAFT", "CRAFT"]},
            {},
            422,
            "support-offered-duplicated",
        ),
        ("post", f"/cases/{unknown_case}/family", FAMILY, {}, 404, "case-not-known"),
        ("post", f"/cases/{case}/family", FAMILY, stale, 409, "version-conflict"),
        # complete
        (
            "post",
            f"/followups/{interview['followup_id']}/complete",
            {**COMPLETE, "self_rated_health": 6},
            {},
            422,
            "validation-error",
        ),
        (
            "post",
            f"/followups/{interview['followup_id']}/complete",
            {**COMPLETE, "housing": "CASTLE"},
            {},
            422,
            "validation-error",
        ),
        (
            "post",
            f"/followups/{asi['followup_id']}/complete",
            COMPLETE,
            {},
            422,
            "followup-already-missed",
        ),
        (
            "post",
            f"/followups/{unknown_followup}/complete",
            COMPLETE,
            {},
            404,
            "followup-not-found",
        ),
        ("post", "/followups/nope/complete", COMPLETE, {}, 422, "validation-error"),
        (
            "post",
            f"/followups/{interview['followup_id']}/complete",
            COMPLETE,
            stale,
            409,
            "version-conflict",
        ),
        # missed
        (
            "post",
            f"/followups/{interview['followup_id']}/missed",
            {"reason": "BORED"},
            {},
            422,
            "validation-error",
        ),
        (
            "post",
            f"/followups/{asi['followup_id']}/missed",
            {"reason": "MOVED"},
            {},
            422,
            "followup-already-missed",
        ),
        (
            "post",
            f"/followups/{unknown_followup}/missed",
            {"reason": "MOVED"},
            {},
            404,
            "followup-not-found",
        ),
        (
            "post",
            f"/followups/{interview['followup_id']}/missed",
            {"reason": "MOVED"},
            stale,
            409,
            "version-conflict",
        ),
        # reads
        ("get", f"/cases/{unknown_case}/followups", None, {}, 404, "case-not-known"),
        ("get", "/cases/not-a-uuid/followups", None, {}, 422, "validation-error"),
        ("get", "/followups/due", None, {}, 422, "validation-error"),
        ("get", "/followups/due?before=yesterday", None, {}, 422, "validation-error"),
    ]
    before = counts(followup)
    assert before == (5, 5)
    for method, path, body, headers, status, code in cases:
        if method == "post":
            r = client.post(path, json=body, headers=headers)
        else:
            r = client.get(path, headers=headers)
        try:
            assert_problem(r, status, code)
        except AssertionError as exc:
            raise AssertionError(f"{method} {path} {body} {headers}: {exc}") from exc
        assert counts(followup) == before, (method, path, body)
    conflict = client.post(f"/cases/{case}/children", json={"number_of_children": 1}, headers=stale)
    assert conflict.headers["etag"] == f'"{version}"'
    assert counts(followup) == before


def test_openapi_documents_every_route(client: httpx.Client) -> None:
    paths = client.get("/openapi.json", headers=bearer("ops")).json()["paths"]
    for path in [
        "/cases/{case_id}/children",
        "/cases/{case_id}/family",
        "/cases/{case_id}/followups",
        "/cases/{case_id}/user-assessments",
        "/followups/{followup_id}/complete",
        "/followups/{followup_id}/missed",
        "/followups/due",
        "/healthz",
        "/readyz",
    ]:
        assert path in paths, path
    post = paths["/followups/{followup_id}/complete"]["post"]
    assert {"200", "404", "409", "422"} <= set(post["responses"])


def test_health_and_readiness(client: httpx.Client) -> None:
    with httpx.Client(base_url=client.base_url, timeout=30) as anonymous:  # probes: no token
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").json() == {"status": "ready"}


# --- the person's own rating: POST /cases/{case_id}/user-assessments ------------------
USER_RATINGS: dict[str, Any] = {
    "contact_easy": "YES",
    "clear_information": "PARTLY",
    "felt_understood": "YES",
    "influence": "NO",
    "whole_situation": "NO_ANSWER",
    "situation_improved": "YES",
}


def test_a_user_assessment_is_recorded_with_the_ratings_as_given(
    client: httpx.Client, followup: Followup
) -> None:
    case = known_case(followup, district="hisingen")
    r = client.post(f"/cases/{case}/user-assessments", json=USER_RATINGS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1 and r.headers["etag"] == '"1"'
    assert [e["event_type"] for e in body["events"]] == ["UserAssessmentRecorded"]

    (stored,) = followup.store.read_stream(case)
    assert stored.payload == {"assessment_id": body["assessment_id"], **USER_RATINGS}
    assert stored.metadata["district"] == "hisingen" and stored.metadata["actor"] == "cw-17"

    again = client.post(
        f"/cases/{case}/user-assessments", json=USER_RATINGS, headers={"If-Match": '"1"'}
    )
    assert again.status_code == 200, again.text
    assert again.json()["assessment_id"] != body["assessment_id"]
    stale = client.post(
        f"/cases/{case}/user-assessments", json=USER_RATINGS, headers={"If-Match": '"1"'}
    )
    assert_problem(stale, 409, "version-conflict")


def test_a_closed_case_still_takes_a_user_assessment(
    client: httpx.Client, followup: Followup
) -> None:
    case = known_case(followup, closed=True)
    r = client.post(f"/cases/{case}/user-assessments", json=USER_RATINGS)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "change",
    [
        {"influence": "MOSTLY"},
        {"contact_easy": "yes"},
        {"felt_understood": None},
        {"situation_improved": "Mycket bättre, tack"},
    ],
)
def test_a_rating_off_the_scale_is_422_and_changes_nothing(
    client: httpx.Client, followup: Followup, change: dict[str, Any]
) -> None:
    case = known_case(followup)
    before = counts(followup)
    r = client.post(f"/cases/{case}/user-assessments", json={**USER_RATINGS, **change})
    assert_problem(r, 422, "validation-error")
    assert "Mycket" not in r.text
    assert counts(followup) == before


def test_a_missing_item_is_422(client: httpx.Client, followup: Followup) -> None:
    case = known_case(followup)
    partial = {k: v for k, v in USER_RATINGS.items() if k != "whole_situation"}
    assert_problem(client.post(f"/cases/{case}/user-assessments", json=partial), 422)


def test_an_unknown_case_is_404_and_another_districts_case_403(
    client: httpx.Client, followup: Followup
) -> None:
    r = client.post(f"/cases/{uuid.uuid4()}/user-assessments", json=USER_RATINGS)
    assert_problem(r, 404, "case-not-known")
    case = known_case(followup, district="centrum")  # not one of the caller's districts
    before = counts(followup)
    assert_problem(client.post(f"/cases/{case}/user-assessments", json=USER_RATINGS), 403)
    assert counts(followup) == before


def test_the_route_is_documented_as_a_case_change(client: httpx.Client) -> None:
    paths = client.get("/openapi.json", headers=bearer("ops")).json()["paths"]
    post = paths["/cases/{case_id}/user-assessments"]["post"]
    assert post[ACTION_KEY] == "case.change"
    assert {"200", "403", "404", "409", "422"} <= set(post["responses"])
