"""The HTTP APIs' limits on a real server and a real PostgreSQL: the request-size limit
(413, declared and chunked bodies), bounded If-Match versions (400) and dates (422), `Allow`
on 405, and 503 with Retry-After while the database is down."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from conftest import TEST_SECRET
from likvard import http
from likvard.cli.devstack import EmbeddedPostgres
from likvard.config import ConfigError, Settings, load_settings
from services.intake.api import create_app as intake_app
from tests.identity import bearer
from tests.support import made_schemas, serving

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
NEW_CASE: dict[str, Any] = {
    "personal_identity_number": "19121212-1212",
    "district": "nordost",
    "substances": ["ALCOHOL"],
    "referral_source": "HEALTHCARE",
    "children_in_household": "NO",
}


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(http.PROBLEM_JSON)
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["type"].endswith("/" + code), body
    return body


@pytest.fixture
def schemas(database_url: str) -> Iterator[Callable[[str], str]]:
    yield from made_schemas(database_url)


def _intake(database_url: str, schema: str, **settings: Any) -> Iterator[httpx.Client]:
    app = intake_app(
        Settings(database_url=database_url, pseudonym_secret=TEST_SECRET, **settings),
        schema=schema,
    )
    with serving(app) as base_url, signed_in(base_url) as client:
        yield client


def signed_in(base_url: str) -> httpx.Client:
    """A client of a case worker of Nordost, where these tests register their cases."""
    return httpx.Client(base_url=base_url, timeout=30, headers=worker())


def worker() -> dict[str, str]:
    return bearer("case-worker", districts=("nordost",))


@pytest.fixture
def intake(database_url: str, schemas: Callable[[str], str]) -> Iterator[httpx.Client]:
    yield from _intake(database_url, schemas("i"))


def _raw(base_url: str, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request's head and the given body parts on a plain socket (without ending a
    chunked body), then read the answer until the server closes or stops sending."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer or not _complete(answer):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _authorization() -> bytes:
    """The signed-in worker's Authorization header line: a body over the limit is refused
    whoever sends it, before anything else is looked at."""
    return b"Authorization: " + worker()["Authorization"].encode() + b"\r\n"


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _status_and_body(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


# --- 413 -------------------------------------------------------------------------------


def test_a_2_mib_body_is_413_problem_and_nothing_is_stored(intake: httpx.Client) -> None:
    body = json.dumps({**NEW_CASE, "padding": "x" * (2 * MIB)}).encode()
    r = intake.post("/cases", content=body, headers={"content-type": "application/json"})
    problem = assert_problem(r, 413, "request-too-large")
    assert str(MIB) in problem["detail"]
    assert intake.post("/cases", json=NEW_CASE).status_code == 201  # the limit, not a fault


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    intake: httpx.Client,
) -> None:
    head = (
        b"POST /cases HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + _authorization()
        + b"Content-Length: %d\r\n\r\n" % (50 * MIB)
    )
    status, problem = _status_and_body(_raw(str(intake.base_url), head, []))
    assert status == 413 and problem["type"].endswith("/request-too-large")


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(intake: httpx.Client) -> None:
    head = (
        b"POST /cases HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + _authorization()
        + b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 65536
    # Just over 1 MiB, and the body never ends: the answer can only come from counting.
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 17
    status, problem = _status_and_body(_raw(str(intake.base_url), head, parts))
    assert status == 413 and problem["type"].endswith("/request-too-large")


def test_the_limit_is_a_setting(database_url: str, schemas: Callable[[str], str]) -> None:
    settings = load_settings({"LIKVARD_MAX_REQUEST_BYTES": "2000"})
    assert settings.max_request_bytes == 2000
    assert load_settings({}).max_request_bytes == http.DEFAULT_MAX_REQUEST_BYTES == MIB
    for bad in ("0", "-1", "1k", "²", "9" * 13):
        with pytest.raises(ConfigError, match="LIKVARD_MAX_REQUEST_BYTES"):
            load_settings({"LIKVARD_MAX_REQUEST_BYTES": bad})
    for client in _intake(database_url, schemas("l"), max_request_bytes=2000):
        small = json.dumps({**NEW_CASE, "padding": "x" * 1500}).encode()
        large = json.dumps({**NEW_CASE, "padding": "x" * 2000}).encode()
        headers = {"content-type": "application/json"}
        assert client.post("/cases", content=small, headers=headers).status_code == 201
        assert_problem(
            client.post("/cases", content=large, headers=headers), 413, "request-too-large"
        )


# --- If-Match ---------------------------------------------------------------------------


def test_if_match_forms_and_bounds() -> None:
    assert http.parse_if_match(None) is None
    assert http.parse_if_match('"3"') == http.parse_if_match('W/"3"') == 3
    assert http.parse_if_match("3") == 3
    assert http.parse_if_match('"' + "9" * 18 + '"') == 10**18 - 1 < 2**63
    for bad in ('"' + "9" * 19 + '"', '"' + "9" * 5000 + '"', '"²"', '"3', '""', "*", 'W/""'):
        with pytest.raises(http.ProblemError) as caught:
            http.parse_if_match(bad)
        assert caught.value.status == 400 and "1-18 digits" in caught.value.detail


def test_a_5000_digit_if_match_is_400(intake: httpx.Client) -> None:
    case = intake.post("/cases", json=NEW_CASE).json()["case_id"]
    r = intake.post(
        f"/cases/{case}/close",
        json={"reason": "OTHER"},
        headers={"If-Match": '"' + "7" * 5000 + '"'},
    )
    assert_problem(r, 400, "bad-if-match")
    stale = intake.post(
        f"/cases/{case}/close", json={"reason": "OTHER"}, headers={"If-Match": '"' + "7" * 18 + '"'}
    )
    assert_problem(stale, 409, "version-conflict")


# --- dates -------------------------------------------------------------------------------


def test_occurred_at_in_year_1_is_422_saying_why(intake: httpx.Client) -> None:
    for when in ("0001-01-01T00:00:00+01:00", "1899-12-31T23:59:59Z", "9999-12-31T23:59:59-05:00"):
        r = intake.post("/cases", json={**NEW_CASE, "occurred_at": when})
        problem = assert_problem(r, 422, "validation-error")
        [error] = problem["errors"]
        assert error["location"] == ["body", "occurred_at"]
        assert "1900-2099" in error["message"]
    case = intake.post("/cases", json=NEW_CASE).json()["case_id"]
    r = intake.post(
        f"/cases/{case}/close", json={"reason": "OTHER", "occurred_at": "0001-01-01T00:00:00Z"}
    )
    assert_problem(r, 422, "validation-error")
    ok = intake.post(
        f"/cases/{case}/close", json={"reason": "OTHER", "occurred_at": "1900-01-01T00:00:00+14:00"}
    )
    assert ok.status_code == 200, ok.text


def test_a_time_in_the_future_is_422_occurred_in_future(intake: httpx.Client) -> None:
    r = intake.post("/cases", json={**NEW_CASE, "occurred_at": "2099-01-01T00:00:00Z"})
    assert_problem(r, 422, "occurred-in-future")


def test_dates_in_bodies_are_bounded(intake: httpx.Client) -> None:
    case = intake.post("/cases", json=NEW_CASE).json()["case_id"]
    for review_on in ("0001-01-01", "2100-01-01", 0, "2024-01-01T00:00:00"):
        plan = {"goals": ["work"], "person_participated": True, "review_on": review_on}
        problem = assert_problem(
            intake.post(f"/cases/{case}/care-plan", json=plan), 422, "validation-error"
        )
        assert problem["errors"][0]["location"] == ["body", "review_on"]


@pytest.mark.parametrize("before", ["0", "0001-01-01", "2100-01-01", "2024-13-01", "tomorrow"])
def test_followups_due_before_must_be_a_date_in_range(
    database_url: str, schemas: Callable[[str], str], before: str
) -> None:
    from services.followup.api import create_app

    app = create_app(Settings(database_url=database_url), schema=schemas("f"), case_wait=0)
    with serving(app) as base_url, signed_in(base_url) as client:
        problem = assert_problem(
            client.get("/followups/due", params={"before": before}), 422, "validation-error"
        )
        assert problem["errors"][0]["location"] == ["query", "before"]
        assert client.get("/followups/due", params={"before": "2024-01-01"}).json() == []


# --- 405 ---------------------------------------------------------------------------------


def test_405_names_the_allowed_methods(intake: httpx.Client) -> None:
    r = intake.request("TRACE", "/cases")
    assert_problem(r, 405, "http-error")
    assert r.headers["allow"] == "POST"
    r = intake.request("DELETE", f"/cases/{uuid.uuid4()}")
    assert_problem(r, 405, "http-error")
    assert r.headers["allow"] == "GET"


# --- 503 ---------------------------------------------------------------------------------


def test_503_with_retry_after_while_the_database_is_down(tmp_path: Any) -> None:
    pg = EmbeddedPostgres(tmp_path)
    try:
        url = pg.start()
        app = intake_app(Settings(database_url=url, pseudonym_secret=TEST_SECRET))
        with serving(app) as base_url, signed_in(base_url) as client:
            case = client.post("/cases", json=NEW_CASE)
            assert case.status_code == 201, case.text
            pool = app.state.service.store.pool
            pool.timeout = 2  # how long a request waits for a connection; 30 s by default
            pg.stop()
            # First the pooled connection breaks (OperationalError), then no new one can
            # be had (PoolTimeout): both are 503, never 500.
            for _ in range(2):
                r = client.get(f"/cases/{case.json()['case_id']}")
                problem = assert_problem(r, 503, "database-unavailable")
                assert r.headers["retry-after"] == str(http.RETRY_AFTER_SECONDS)
                assert "postgres" not in json.dumps(problem).lower()
            r = client.post("/cases", json=NEW_CASE)
            assert_problem(r, 503, "database-unavailable")
            assert "19121212" not in r.text
    finally:
        pg.stop()
