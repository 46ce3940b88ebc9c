"""Reproducible figures on a real broker and PostgreSQL: `likvard report` over the live
worker's read models, more events, `likvard report --reproduce`; and `--as-known-on`.

Events go through the intake event store and the outbox relay, so the records carry the
chain headers of production; the live read models come from `likvard project`."""

from __future__ import annotations

import dataclasses
import html as html_lib
import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest

from likvard.config import Settings
from likvard.eventstore import EventStore, NewEvent
from services.projections import provenance, readmodels
from services.projections.api import create_app
from tests.identity import bearer
from tests.support import closed, live_worker, registered, reopened, serving, wait_for
from tests.test_replay import env_for, likvard, processed, relay_all

pytestmark = pytest.mark.integration

DISTRICTS = ("nordost", "centrum", "sydvast", "hisingen")


def add_cases(store: EventStore, n: int, at: datetime | None = None) -> int:
    """`n` cases of one person each, spread over the districts; returns the events added."""
    events = 0
    for i in range(n):
        district = DISTRICTS[i % len(DISTRICTS)]
        history: list[NewEvent] = [registered(district, person=uuid.uuid4().hex * 2)]
        if i % 3 == 0:
            history += [closed(district), reopened(district)]
        if at is not None:
            history = [dataclasses.replace(e, occurred_at=at) for e in history]
        store.append(str(uuid.uuid4()), 0, history)
        events += len(history)
    return events


def record_in(html: str) -> dict[str, object]:
    found = re.search(r'<pre id="likvard-record">(.*?)</pre>', html, re.DOTALL)
    assert found is not None, "the report embeds no record"
    record: dict[str, object] = json.loads(html_lib.unescape(found.group(1)))
    return record


def test_report_reproduces_after_more_events_and_an_edited_figure_is_named(
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
    tmp_path: Path,
) -> None:
    first = add_cases(store, 40)
    relay_all(store, database_url, kafka_bootstrap)
    env = env_for(database_url, kafka_bootstrap, topic_prefix)
    live = new_schema("live")
    report = tmp_path / "report.html"
    with live_worker(env, live, tmp_path / "worker.log"):
        wait_for(lambda: processed(database_url, live) == first, 120, "the live projection")
        made = likvard(env, "report", "--out", str(report), "--schema", live, "--period", "month")
        assert made.returncode == 0, made.stdout + made.stderr
        # 500 more events arrive after the report was made, in the same period
        more = 0
        while more < 500:
            more += add_cases(store, 10)
        relay_all(store, database_url, kafka_bootstrap)
        wait_for(lambda: processed(database_url, live) == first + more, 120, "500 more events")

    html = report.read_text(encoding="utf-8")
    assert '<section id="provenance">' in html and "<script" not in html
    record = record_in(html)
    prov = record["provenance"]
    assert isinstance(prov, dict)
    intake_topic = topic_prefix + "likvard.intake.v1"
    offsets = prov["offsets"]
    assert {o["topic"] for o in offsets} == {intake_topic}  # nothing else was published
    assert sum(o["offset"] + 1 for o in offsets) == first  # every record, up to the report
    assert prov["chain"]["streams"] == 40
    assert prov["reference"] == {"version": provenance.reference_version()}
    assert prov["code"]["version"]
    assert prov["parameters"]["structure"] == "current"
    figures = record["figures"]
    assert isinstance(figures, dict)
    month = datetime.now(ZoneInfo("Europe/Stockholm")).strftime("%Y-%m")
    persons = f"followup/{month}/city/persons"
    assert figures[persons] == 40
    with psycopg.connect(database_url) as conn:  # the live figures have moved on meanwhile
        moved = provenance.applied(conn, live).offsets
    assert sum(o + 1 for o in moved.values()) == first + more

    same = likvard(env, "report", "--reproduce", str(report))
    assert same.returncode == 0, same.stdout + same.stderr
    assert f"identical: all {len(figures)} figures" in same.stdout

    edited = tmp_path / "edited.html"
    line = html_lib.escape(f'"{persons}": 40,')
    assert html.count(line) == 1
    edited.write_text(html.replace(line, line.replace("40", "41")), encoding="utf-8")
    changed = likvard(env, "report", "--reproduce", str(edited))
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert f"differs {persons}: in the file 41, replayed 40" in changed.stdout
    assert "1 of" in changed.stdout and "figures differ" in changed.stdout

    with psycopg.connect(database_url) as conn:  # the scratch schemas are dropped
        left = conn.execute(
            "SELECT count(*) FROM information_schema.schemata"
            " WHERE schema_name LIKE 'projections_reproduce_%%'"
        ).fetchone()
    assert left is not None and left[0] == 0


def test_as_known_on_leaves_out_events_recorded_later_though_they_occurred_before(
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
    tmp_path: Path,
) -> None:
    # occurred in March 2024, recorded today: late-recorded events
    added = add_cases(store, 12, at=datetime(2024, 3, 5, 10, 0, tzinfo=UTC))
    relay_all(store, database_url, kafka_bootstrap)
    env = env_for(database_url, kafka_bootstrap, topic_prefix)
    live = new_schema("live")
    with live_worker(env, live, tmp_path / "worker.log"):
        wait_for(lambda: processed(database_url, live) == added, 120, "the live projection")
    yesterday = (datetime.now(ZoneInfo("Europe/Stockholm")).date() - timedelta(days=1)).isoformat()
    period = ["--from", "2024-01-01", "--to", "2024-12-31"]

    known = tmp_path / "known.json"
    as_known = likvard(
        env, "report", *period, "--as-known-on", yesterday, "--schema", live, "--out", str(known)
    )
    assert as_known.returncode == 0, as_known.stdout + as_known.stderr
    occurred = tmp_path / "occurred.json"
    as_of = likvard(env, "report", *period, "--as-of", yesterday, "--out", str(occurred))
    assert as_of.returncode == 0, as_of.stdout + as_of.stderr

    known_record, occurred_record = json.loads(known.read_text()), json.loads(occurred.read_text())
    assert known_record["figures"].get("followup/2024/city/persons") is None  # nothing known
    assert occurred_record["figures"]["followup/2024/city/persons"] == 12  # all occurred by then
    assert known_record["provenance"]["parameters"]["replay"] == {
        "as_of": None,
        "as_known_on": yesterday,
    }
    assert known_record["provenance"]["parameters"]["as_of"].startswith(
        (date.fromisoformat(yesterday) + timedelta(days=1)).isoformat()
    )
    # versus as of now (the live read models, late-recorded events included)
    persons = "followup/2024/city/persons"
    assert f"as known on {yesterday} versus as of now ({live}):" in as_known.stdout
    assert f"{persons}: known on {yesterday} (absent), now 12" in as_known.stdout
    # a report as of a date reproduces: the same cutoff, replayed up to the same offsets
    for made in (occurred, known):
        again = likvard(env, "report", "--reproduce", str(made))
        assert again.returncode == 0, again.stdout + again.stderr
        assert "identical" in again.stdout


def test_report_answers_carry_their_provenance_in_a_header_or_an_envelope(
    database_url: str, schema: str, new_schema: Callable[[str], str]
) -> None:
    from services.projections.tests.test_reports import EVENTS

    marks = provenance.Marks()
    marks.add(
        "likvard.intake.v1", 0, 41, {"stream_id": b"s", "stream_version": b"3", "hash": b"ab"}
    )
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, schema)
        assert provenance.migrate(conn, schema)
        readmodels.apply(conn, schema, EVENTS)
        provenance.record(conn, schema, marks)
    app = create_app(
        Settings(database_url=database_url), schema=schema, access_log_schema=new_schema("al")
    )
    period = {"from": "2024-01-01", "to": "2024-12-31"}
    with (
        serving(app) as base_url,
        httpx.Client(base_url=base_url, timeout=30, headers=bearer("analyst")) as api,
    ):
        plain = api.get("/reports/followup", params=period)
        wrapped = api.get("/reports/followup", params=period | {"provenance": "true"})
        as_csv = api.get("/reports/equal-access", params={"format": "csv"})
    assert plain.status_code == wrapped.status_code == as_csv.status_code == 200
    assert isinstance(plain.json(), list) and plain.json()  # the list shape is kept
    header = json.loads(plain.headers["Likvard-Provenance"])
    offsets = [{"topic": "likvard.intake.v1", "partition": 0, "offset": 41}]
    assert header["offsets"] == offsets
    assert header["chain"] == {
        "streams": 1,
        "heads_sha256": provenance.heads_digest([("likvard.intake.v1", "s", 3, "ab")]),
    }
    assert header["parameters"]["report"] == "followup"
    assert header["parameters"]["from"] == "2024-01-01"
    body = wrapped.json()
    assert body["rows"] == plain.json()
    assert body["provenance"]["offsets"] == offsets
    assert as_csv.text.startswith("district,metric,")  # CSV stays CSV
    csv_header = json.loads(as_csv.headers["Likvard-Provenance"])
    assert csv_header["parameters"]["report"] == "equal-access"
