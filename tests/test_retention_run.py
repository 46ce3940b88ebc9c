"""`likvard retention run` on a real PostgreSQL with an ageing clock: cases registered in
2021 through the intake API, projected into read models, culled as of a later day; the
archive sample and the recent case stay; a second run does nothing more."""

from __future__ import annotations

import os

import httpx
import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from likvard.cli import app
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.inbox import decode_event
from likvard.keys import KeyStore, kek_from_settings
from likvard.pseudonym import luhn_check_digit
from services.projections import readmodels
from tests.identity import bearer
from tests.support import RunningService

pytestmark = pytest.mark.integration

TODAY = "2026-12-03"
LONG_AGO = "2021-03-01T10:00:00+01:00"


def number(day: int, serial: int) -> str:
    born, tail = f"198006{day:02d}", f"{serial:03d}"
    return f"{born}-{tail}{luhn_check_digit(born[2:] + tail)}"


# name -> (born on, whether a later entry keeps the person within the period)
PERSONS = {
    "old": (4, False),
    "old-closed": (7, False),
    "archive": (5, False),  # born on the 5th: the archive decision keeps them
    "recent": (6, True),
}


def run(database_url: str, schemas: dict[str, str], *args: str) -> str:
    env = {
        "LIKVARD_DATABASE_URL": database_url,
        "LIKVARD_KEK": os.environ["LIKVARD_KEK"],
        "LIKVARD_TOKEN": "",
        "COLUMNS": "200",
    }
    options = [
        "--intake-schema",
        schemas["intake"],
        "--projections-schema",
        schemas["projections"],
        "--today",
        TODAY,
    ]
    done = CliRunner().invoke(app, ["retention", "run", *options, *args], env=env)
    assert done.exit_code == 0, done.output
    return done.output


def test_culling_shreds_exactly_the_persons_past_the_period_once(
    intake: RunningService, database_url: str, new_schema: object, catalogue: Catalogue
) -> None:
    assert callable(new_schema)
    worker = httpx.Client(
        base_url=intake.base_url,
        timeout=30,
        headers=bearer("case-worker", districts=["nordost"], subject="ret-cw"),
    )
    cases: dict[str, str] = {}
    for i, (name, (day, recent)) in enumerate(PERSONS.items()):
        r = worker.post(
            "/cases",
            json={
                "personal_identity_number": number(day, 400 + i),
                "district": "nordost",
                "substances": ["NARCOTICS"],
                "referral_source": "SELF",
                "children_in_household": "NO",
                "birth_year": 1980,
                "occurred_at": LONG_AGO,
            },
        )
        assert r.status_code == 201, r.text
        case = cases[name] = r.json()["case_id"]
        plan = {"goals": [f"Mål för {name}"], "person_participated": True}
        r = worker.post(f"/cases/{case}/care-plan", json={**plan, "occurred_at": LONG_AGO})
        assert r.status_code == 200, r.text
        if name == "old-closed":
            long_ago_closed = {"reason": "PLANNED_END", "occurred_at": "2021-04-01T10:00:00+02:00"}
            r = worker.post(f"/cases/{case}/close", json=long_ago_closed)
            assert r.status_code == 200, r.text
        if recent:  # an entry today: within the period
            r = worker.post(f"/cases/{case}/close", json={"reason": "GOALS_REACHED"})
            assert r.status_code == 200, r.text
    views = {n: worker.get(f"/cases/{c}").json() for n, c in cases.items()}
    assert views["archive"]["archive_sample"] and not views["old"]["archive_sample"]

    schemas = {"intake": intake.schema, "projections": new_schema("ret")}

    def project() -> None:
        events = [
            decode_event(catalogue, intake.topic, 0, e.global_position, e.data)
            for c in cases.values()
            for e in intake.store.read_stream(c)
        ]
        with psycopg.connect(database_url) as conn, conn.transaction():
            readmodels.migrate(conn, schemas["projections"])
            readmodels.apply(conn, schemas["projections"], events)

    project()
    persons = {n: intake.store.read_stream(c)[0].payload["person"] for n, c in cases.items()}
    keys = KeyStore(
        intake.store.pool, kek_from_settings(Settings()), schema=f"{intake.schema}_keys"
    )

    dry = run(database_url, schemas, "--dry-run")
    assert "2 would be culled" in dry
    assert "kept by the archive decision: 1" in dry and "within the 5-year period: 1" in dry
    assert "nordost" in dry and "2021" in dry
    assert not any(p in dry for p in persons.values())  # counts, never persons
    assert all(
        any(k.destroyed_at is None for k in ks)
        for ks in keys.states(list(persons.values())).values()
    )

    real = run(database_url, schemas)
    assert "2 culled" in real and not any(p in real for p in persons.values())
    states = keys.states(list(persons.values()))
    live = {n for n, p in persons.items() if any(k.destroyed_at is None for k in states[p])}
    assert live == {"archive", "recent"}
    erased = intake.store.read_stream(cases["old"])[-1]
    assert erased.event_type == "PersonalDataErased"
    assert erased.payload["legal_basis"] == "RETENTION_PERIOD_ENDED"
    goals = worker.get(f"/cases/{cases['old']}/events").json()
    plan_event = next(e for e in goals if e["event_type"] == "CarePlanAgreed")
    assert plan_event["payload"]["goals"] == [] and plan_event["payload"]["personal"] == "erased"
    assert "Mål för archive" in worker.get(f"/cases/{cases['archive']}/events").text

    project()  # the erasure reaches the read models; it is not an entry
    again = run(database_url, schemas)
    assert "0 would be culled" in again and "culled before: 2" in again
    versions = {n: len(intake.store.read_stream(c)) for n, c in cases.items()}
    run(database_url, schemas)
    assert {n: len(intake.store.read_stream(c)) for n, c in cases.items()} == versions
    with psycopg.connect(database_url) as conn:
        count = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {}.events WHERE event_type = 'PersonalDataErased'"
            ).format(sql.Identifier(intake.schema))
        ).fetchone()
    assert count == (2,)
