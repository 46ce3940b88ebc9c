"""Personal data end to end (issue 13's acceptance), on real PostgreSQL, a real broker and
the development identity provider: a marker and names planted in care-plan goals are
sealed everywhere they are stored or published; a records officer's erasure leaves no
reader, export, replay or timeline that shows them, while the hash chains verify and the
follow-up report and the equal-access audit give the same figures as before."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, date, datetime
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from psycopg import sql

from likvard.config import Settings
from likvard.pseudonym import luhn_check_digit
from services.projections import reports
from services.projections.replay import Replay
from tests.identity import bearer
from tests.support import CareStack, consume, serving

pytestmark = pytest.mark.integration

MARKER = "MARKÖR-" + uuid.uuid4().hex[:10]
NAMES = ("Agnes Lindqvist", "Birger Åkesson")
PERSONS = 6  # more than the report's smallest shown cell (5)


def identity_number(i: int) -> str:
    """A valid personal identity number of person i (Luhn digit computed)."""
    born, serial = f"1980{(i % 12) + 1:02d}{(i % 27) + 1:02d}", f"{300 + i:03d}"
    return f"{born}-{serial}{luhn_check_digit(born[2:] + serial)}"


def forms(number: str) -> set[str]:
    """Every way the number could be written: 12 and 10 digits, with and without '-'."""
    twelve = number.replace("-", "")
    return {number, twelve, twelve[2:], twelve[2:8] + "-" + twelve[8:]}


PLANTED = {MARKER, *NAMES, *(f for i in range(PERSONS) for f in forms(identity_number(i)))}


def found_in(text: str) -> set[str]:
    return {p for p in PLANTED if p in text}


def kafka_text(bootstrap: str, prefix: str) -> str:
    """Every record of every topic of this test (keys, values, headers), as text."""
    topics = [
        t
        for t in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
        if t.startswith(prefix)
    ]
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"grep-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    parts: list[str] = []
    try:
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            for p in meta.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high <= low:
                    continue
                consumer.assign([TopicPartition(topic, p, low)])
                got = low
                while got < high:
                    msg = consumer.poll(10)
                    assert msg is not None, f"{topic}[{p}] stopped at {got} of {high}"
                    if msg.error():
                        continue
                    got = int(msg.offset() or 0) + 1
                    for blob in (msg.key(), msg.value()):
                        parts.append(_text(blob))
                    for header in msg.headers() or []:
                        parts.append(f"{header[0]}={_text(header[1])}")
    finally:
        consumer.close()
    assert topics and parts
    return "\n".join(parts)


def _text(blob: str | bytes | None) -> str:
    if isinstance(blob, bytes):
        return blob.decode("utf-8", "replace")
    return blob or ""


def database_text(database_url: str, schemas: list[str]) -> str:
    """Every row of every table in these schemas, as PostgreSQL prints it (bytea as hex,
    so the Avro bytes are also searched decoded, below)."""
    out: list[str] = []
    with psycopg.connect(database_url) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema = ANY(%s) AND table_type = 'BASE TABLE'",
            (schemas,),
        ).fetchall()
        for schema, table in tables:
            t = sql.Identifier(schema, table)
            for (row,) in conn.execute(sql.SQL("SELECT t::text FROM {} t").format(t)):
                out.append(row)
            if table in ("events", "outbox"):
                column = "data" if table == "events" else "value"
                query = sql.SQL("SELECT {} FROM {}").format(sql.Identifier(column), t)
                for (blob,) in conn.execute(query):
                    out.append(bytes(blob).decode("utf-8", "replace"))
    assert tables
    return "\n".join(out)


class Reader:
    """The projections API over one read-model schema, opening sealed text with the intake's
    key store."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def timeline(self, case_id: str, role: str = "auditor", fmt: str = "json") -> httpx.Response:
        return httpx.get(
            f"{self.base_url}/cases/{case_id}/timeline",
            params={"format": fmt},
            headers=bearer(role, subject="pd-au"),
            timeout=30,
        )


def test_erasure_shows_no_text_anywhere_and_keeps_every_figure(
    care_stack: CareStack,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from services.projections.api import create_app

    caplog.set_level(logging.DEBUG)
    intake = care_stack.intake
    worker = httpx.Client(
        base_url=intake.base_url,
        timeout=30,
        headers=bearer("case-worker", districts=["nordost"], subject="pd-cw"),
    )
    cases: list[str] = []
    for i in range(PERSONS):
        r = worker.post(
            "/cases",
            json={
                "personal_identity_number": identity_number(i),
                "district": "nordost",
                "substances": ["ALCOHOL"],
                "referral_source": "SELF",
                "children_in_household": "NO",
                "birth_year": 1980,
            },
        )
        assert r.status_code == 201, r.text
        case = r.json()["case_id"]
        cases.append(case)
        r = worker.post(
            f"/cases/{case}/assessments",
            json={
                "instrument": "AUDIT",
                "scores": [{"scale": "total", "value": 21}],
                "need_level": "HIGH",
            },
        )
        assert r.status_code == 200, r.text
        goals = [f"{MARKER} träffa {NAMES[i % 2]} varje vecka", "Behålla jobbet"]
        r = worker.post(
            f"/cases/{case}/care-plan", json={"goals": goals, "person_participated": True}
        )
        assert r.status_code == 200, r.text
    # An identity number typed into a goal is refused, and not repeated in the answer.
    r = worker.post(
        f"/cases/{cases[1]}/care-plan",
        json={"goals": [f"Ring {identity_number(1)}"], "person_participated": True},
    )
    assert r.status_code == 422 and r.json()["type"].endswith("/identity-number-in-free-text")
    assert not found_in(r.text)

    target, other = cases[0], cases[1]
    person = intake.store.read_stream(target)[0].payload["person"]
    # The case worker sees the goals of their case: the marker is there to be found.
    events = worker.get(f"/cases/{target}/events")
    assert events.status_code == 200 and MARKER in events.text
    plan = next(e for e in events.json() if e["event_type"] == "CarePlanAgreed")
    assert plan["payload"]["personal"] == "open" and MARKER in plan["payload"]["goals"][0]

    consume(kafka_bootstrap, intake.topic, at_least=3 * PERSONS)
    settings = Settings(database_url=database_url, topic_prefix=topic_prefix)
    topics = [intake.topic, care_stack.referral.topic, care_stack.followup.topic]
    keys_schema = f"{intake.schema}_keys"
    made: list[str] = []
    try:
        before_schema = f"pd_before_{uuid.uuid4().hex[:8]}"
        made.append(before_schema)
        replayed = Replay(database_url, kafka_bootstrap, topics, before_schema).run()
        assert replayed.breaks == [] and replayed.projected >= 3 * PERSONS
        before = figures(database_url, before_schema)
        app = create_app(settings, schema=before_schema, keys_schema=keys_schema)
        with serving(app) as base_url:
            shown = Reader(base_url).timeline(target)
            assert shown.status_code == 200 and MARKER in shown.text  # the auditor sees it

        # --- the erasure ---------------------------------------------------------------
        officer = bearer("records-officer", subject="pd-ro")
        url = f"/persons/{person}/erasure"
        body = {"legal_basis": "erasure-request"}
        assert httpx.post(intake.base_url + url, json=body, timeout=30).status_code == 401
        refused = worker.post(url, json=body)
        assert refused.status_code == 403
        r = httpx.post(intake.base_url + url, json=body, headers=officer, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"cases": [target], "recorded": [target], "keys_destroyed": 1}
        again = httpx.post(intake.base_url + url, json=body, headers=officer, timeout=30)
        assert again.json() == {"cases": [target], "recorded": [], "keys_destroyed": 0}
        bad = httpx.post(
            intake.base_url + url, json={"legal_basis": "boredom"}, headers=officer, timeout=30
        )
        assert bad.status_code == 422

        # Every reader of the intake shows the sealed fields as erased; the rest is there.
        events = worker.get(f"/cases/{target}/events")
        assert events.status_code == 200 and not found_in(events.text)
        by_type = {e["event_type"]: e["payload"] for e in events.json()}
        assert by_type["CarePlanAgreed"]["goals"] == []
        assert by_type["CarePlanAgreed"]["personal"] == "erased"
        assert by_type["IntakeRegistered"]["birth_year"] is None
        assert by_type["IntakeRegistered"]["age_band"] == "45-54"
        assert by_type["PersonalDataErased"]["legal_basis"] == "ERASURE_REQUEST"
        view = worker.get(f"/cases/{target}").json()
        assert view["personal_data_erased"] is True and view["care_plans"] == 1
        assert MARKER in worker.get(f"/cases/{other}/events").text  # only that person's
        assert intake.store.verify() == []

        # A full replay: no chain break, the same figures, and the text erased.
        consume(kafka_bootstrap, intake.topic, at_least=3 * PERSONS + 1)
        after_schema = f"pd_after_{uuid.uuid4().hex[:8]}"
        made.append(after_schema)
        replayed = Replay(database_url, kafka_bootstrap, topics, after_schema).run()
        assert replayed.breaks == []
        assert figures(database_url, after_schema) == before
        app = create_app(settings, schema=after_schema, keys_schema=keys_schema)
        with serving(app) as base_url:
            reader = Reader(base_url)
            for fmt in ("json", "csv"):
                shown = reader.timeline(target, fmt=fmt)
                assert shown.status_code == 200 and not found_in(shown.text), fmt
            assert "erased" in reader.timeline(target).text
            assert MARKER in reader.timeline(other).text

        # --- nothing planted in clear anywhere -----------------------------------------
        assert not found_in(kafka_text(kafka_bootstrap, topic_prefix))
        schemas = [
            intake.schema,
            care_stack.referral.schema,
            care_stack.followup.schema,
            keys_schema,
            *made,
        ]
        assert not found_in(database_text(database_url, schemas))
        assert not found_in(access_log_text(database_url))
        logged = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
        assert caplog.records and not found_in(logged)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for schema in made:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )


def figures(database_url: str, schema: str) -> tuple[Any, Any]:
    """The follow-up report (monthly, this year) and the equal-access audit's rows."""
    today = datetime.now(UTC).date()
    with psycopg.connect(database_url) as conn:
        report = reports.followup_report(
            conn, schema, start=date(today.year, 1, 1), end=today, period="month"
        )
        audit = reports.audit_rows(conn, schema)
    assert audit, "the audit has rows to compare"
    return report, audit


def access_log_text(database_url: str) -> str:
    """The access log's rows of this test's actors."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT e::text FROM access_log.events e"
            " WHERE e.payload->>'actor' IN ('pd-cw', 'pd-au', 'pd-ro')"
        ).fetchall()
    assert rows, "the reads were logged"
    return "\n".join(r[0] for r in rows)
