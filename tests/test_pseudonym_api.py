"""`POST /pseudonyms` end to end: tokens from the development OpenID provider (a real
process; a district system signs in with the client credentials of its own client), the
access log in a real PostgreSQL, the route on a real uvicorn server.

Most cases run the route in an app composed here exactly as the intake app installs it
(`http.install`, `guard.install`, the router), so the access log can have a schema of the
test's own; the first test runs it in the intake app itself, against the pseudonym intake
stores when a case worker registers the person."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from psycopg import sql

from conftest import TEST_SECRET
from likvard import guard, http
from likvard.access_log import stream_id
from likvard.access_log_audit import AccessRecord, search
from likvard.config import Settings
from likvard.pseudonym import MAX_BATCH, VERSION, normalise, pseudonymise
from services.intake.pseudonyms_api import pseudonyms_router
from tests.identity import bearer, system_bearer, system_token
from tests.support import RunningService, serving

pytestmark = pytest.mark.integration

NUMBERS = ["19121212-1212", "191212121213", "701072-1236"]  # the second: wrong check digit
SYSTEM_SUBJECT = "dev-system-nordost"  # the subject of district-system-nordost's tokens


@dataclass(frozen=True)
class Composed:
    base_url: str
    settings: Settings
    access_log_schema: str

    def log(self, since: datetime, actor: str) -> list[AccessRecord]:
        return [
            r
            for r in search(self.settings, actor=actor, start=since, schema=self.access_log_schema)
            if r.action == "pseudonyms.compute"
        ]


@pytest.fixture
def composed(database_url: str, schema: str) -> Iterator[Composed]:
    """The route as the intake app installs it, its access log in the test's schema."""
    settings = Settings(database_url=database_url, pseudonym_secret=TEST_SECRET)
    app = FastAPI()
    http.install(app, "intake")
    guard.install(app, settings, "intake", access_log_schema=schema)
    app.include_router(pseudonyms_router(settings.require_pseudonym_secret()))
    with serving(app) as base_url:
        yield Composed(base_url, settings, schema)


def ask(base_url: str, numbers: list[str], headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{base_url}/pseudonyms", json={"identity_numbers": numbers}, headers=headers, timeout=30
    )


def test_a_district_system_gets_the_pseudonym_intake_stores_for_the_person(
    intake: RunningService,
) -> None:
    """The acceptance test, on the intake app itself (its create_app includes the router)."""
    registration = {
        "personal_identity_number": "19121212-1212",
        "district": "nordost",
        "substances": ["ALCOHOL"],
        "referral_source": "SELF",
        "children_in_household": "NO",
    }
    worker = bearer("case-worker", districts=["nordost"])
    created = httpx.post(f"{intake.base_url}/cases", json=registration, headers=worker)
    assert created.status_code == 201, created.text
    case = httpx.get(f"{intake.base_url}{created.headers['Location']}", headers=worker).json()
    answer = ask(intake.base_url, ["191212121212"], system_bearer("nordost"))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"version": VERSION, "pseudonyms": [case["person"]], "errors": []}
    assert ask(intake.base_url, ["191212121212"], {}).status_code == 401


def test_a_district_system_gets_what_pseudonymise_computes(composed: Composed) -> None:
    answer = ask(composed.base_url, NUMBERS, system_bearer("nordost"))
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    assert answer.json() == {
        "version": VERSION,
        "pseudonyms": [
            pseudonymise(NUMBERS[0], TEST_SECRET),
            None,
            pseudonymise(NUMBERS[2], TEST_SECRET),
        ],
        "errors": [{"index": 1, "error": "wrong-check-digit"}],
    }


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": "Basic ZGV2OmRldg=="}],
)
def test_without_a_good_token_the_answer_is_401(
    composed: Composed, headers: dict[str, str]
) -> None:
    since = datetime.now(UTC)
    answer = ask(composed.base_url, NUMBERS, headers)
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert all(n not in answer.text for n in NUMBERS)
    assert not [r for r in composed.log(since, SYSTEM_SUBJECT) if r.accessed_at >= since]


def test_any_other_role_is_refused_403_and_the_refusal_is_logged(composed: Composed) -> None:
    since = datetime.now(UTC)
    subject = "dev-cw-pseudonym-test"
    worker = bearer("case-worker", districts=["nordost"], subject=subject)
    for headers in (worker, bearer("auditor"), bearer("ops")):
        answer = ask(composed.base_url, NUMBERS, headers)
        assert answer.status_code == 403, answer.text
        assert answer.json()["type"].endswith("/forbidden")
        assert all(n not in answer.text for n in NUMBERS)
    # Refused before the body is read: an invalid body gets 403 too, not its validation.
    assert ask(composed.base_url, ["x"] * (MAX_BATCH + 1), worker).status_code == 403
    (first, second) = composed.log(since, subject)
    assert (first.outcome, first.reason, first.resource) == (
        "refused",
        "role-not-allowed",
        "pseudonyms",
    )
    assert second.outcome == "refused"


def test_invalid_numbers_get_a_code_at_their_index_and_are_never_echoed(
    composed: Composed,
) -> None:
    numbers = ["19121312-1211", "12345", "19121212-1213", "19121212-1212", " 191212121212 "]
    answer = ask(composed.base_url, numbers, system_bearer("nordost"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["errors"] == [
        {"index": 0, "error": "invalid-date"},
        {"index": 1, "error": "malformed"},
        {"index": 2, "error": "wrong-check-digit"},
    ]
    expected = pseudonymise("19121212-1212", TEST_SECRET)
    assert body["pseudonyms"] == [None, None, None, expected, expected]
    assert all(n.strip() not in answer.text for n in numbers)


@pytest.mark.parametrize(
    "numbers",
    [[], ["19121212-1212"] * (MAX_BATCH + 1), ["1" * 33]],
    ids=["empty", "too-many", "too-long"],
)
def test_a_batch_out_of_bounds_is_422_without_echo(composed: Composed, numbers: list[str]) -> None:
    answer = ask(composed.base_url, numbers, system_bearer("nordost"))
    assert answer.status_code == 422, answer.text
    assert answer.json()["type"].endswith("/validation-error")
    assert "19121212" not in answer.text and "1" * 33 not in answer.text


def test_every_call_is_in_the_access_log_with_counts_never_numbers(
    composed: Composed, database_url: str
) -> None:
    since = datetime.now(UTC)
    assert ask(composed.base_url, NUMBERS, system_bearer("nordost")).status_code == 200
    assert ask(composed.base_url, NUMBERS[:1], system_bearer("nordost")).status_code == 200
    first, second = composed.log(since, SYSTEM_SUBJECT)
    assert (first.outcome, first.reason, first.roles, first.service, first.case_id) == (
        "allowed",
        "role",
        "district-system",
        "intake",
        None,
    )
    assert first.resource == "pseudonyms:requested=3,computed=2,invalid=1"
    assert second.resource == "pseudonyms:requested=1,computed=1,invalid=0"
    # Nothing of a number anywhere in the access log's tables: the chained bytes, their
    # queryable copy, the outbox.
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT e.data, e.payload::text, e.metadata::text, o.value"
                " FROM {s}.events e LEFT JOIN {s}.outbox o USING (event_id)"
                " WHERE e.stream_id = %s"
            ).format(s=sql.Identifier(composed.access_log_schema)),
            [stream_id("intake")],
        ).fetchall()
    assert len(rows) >= 2
    forms = [n.encode() for n in NUMBERS]
    forms += [
        f.encode() for n in (NUMBERS[0], NUMBERS[2]) for f in (normalise(n), normalise(n)[2:])
    ]
    for row in rows:
        stored = b"".join(v if isinstance(v, bytes) else (v or "").encode() for v in row)
        assert not [f for f in forms if f in stored]


# --- how a district system signs in (development provider) --------------------------------
def _claims(access: str) -> dict[str, object]:
    payload = access.split(".")[1]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return decoded


def test_a_district_system_signs_in_with_its_own_client_credentials() -> None:
    issuer = os.environ["LIKVARD_OIDC_ISSUER"]
    claims = _claims(system_token("hisingen"))
    assert claims["sub"] == "dev-system-hisingen" and claims["azp"] == "district-system-hisingen"
    assert claims["realm_access"] == {"roles": ["district-system"]}
    assert claims["likvard_districts"] == ["hisingen"]
    clients = httpx.get(f"{issuer}/clients", timeout=10).json()
    assert "district-system-nordost" in {c["client_id"] for c in clients}
    assert "district-system" not in {u["username"] for u in httpx.get(f"{issuer}/users").json()}
    for client_id, secret in (("district-system-nordost", "wrong"), ("district-system-x", "dev")):
        form = {"grant_type": "client_credentials", "client_id": client_id}
        refused = httpx.post(f"{issuer}/token", data=form | {"client_secret": secret})
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"


def test_likvard_token_prints_a_district_systems_token() -> None:
    def likvard_token(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "likvard.cli", "token", "--role", "district-system"]
        return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)

    printed = likvard_token("--district", "nordost")
    assert printed.returncode == 0, printed.stderr
    claims = _claims(printed.stdout.strip())
    assert (claims["sub"], claims["likvard_districts"]) == ("dev-system-nordost", ["nordost"])
    nowhere = likvard_token("--district", "atlantis")
    assert nowhere.returncode == 1 and nowhere.stdout == ""
    assert "no client 'district-system-atlantis'" in " ".join(nowhere.stderr.split())
    missing = likvard_token()
    assert missing.returncode == 2 and "--district" in missing.stderr
