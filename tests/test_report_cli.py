"""`likvard report --out report.html` as an auditor runs it, over projected read models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from services.projections import readmodels
from services.projections.tests.test_reports import EVENTS

pytestmark = pytest.mark.integration


def likvard(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LIKVARD_DATABASE_URL=database_url)
    return subprocess.run(
        [sys.executable, "-m", "likvard.cli", "report", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_writes_a_self_contained_html_file(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, schema)
        readmodels.apply(conn, schema, EVENTS)
    out = tmp_path / "report.html"
    args = ["--out", str(out), "--from", "2024-01-01", "--to", "2024-12-31"]
    result = likvard(database_url, *args, "--schema", schema)
    assert result.returncode == 0, result.stderr
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    for name in ("Centrum", "Nordost", "Hisingen"):
        assert name in html
    assert "<svg" in html
    for external in ("http://", "https://", "<script", "<link"):
        assert external not in html
    assert not any(e.data.get("person", "\0") in html for e in EVENTS)  # no pseudonyms


def test_report_errors_are_clear(database_url: str, schema: str, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    missing = likvard(database_url, "--out", str(out), "--from", "2024-01-01", "--schema", schema)
    assert missing.returncode == 2
    assert "no read models in schema" in missing.stderr
    bad = likvard(database_url, "--out", str(out), "--from", "2024-01-01", "--structure", "oldest")
    assert bad.returncode == 2
    assert "structure" in bad.stderr
    assert not out.exists()


def test_report_without_kafka_provenance_says_it_cannot_be_replayed(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, schema)
        readmodels.apply(conn, schema, EVENTS)  # straight from events: no offsets recorded
    out = tmp_path / "report.json"
    args = ["--out", str(out), "--from", "2024-01-01", "--to", "2024-12-31", "--schema", schema]
    made = likvard(database_url, *args)
    assert made.returncode == 0, made.stderr
    record = json.loads(out.read_text(encoding="utf-8"))  # a .json --out: the record alone
    assert record["provenance"]["offsets"] == []
    assert record["provenance"]["parameters"]["from"] == "2024-01-01"
    assert record["figures"]["followup/2024/city/persons"] > 0
    assert record["provenance"]["parameters"]["flag_rule"] == "holm"  # the published rule
    assert record["figures"]["audit/flag_rule"] == "holm"
    assert record["figures"]["audit/comparisons"] >= 1
    assert "waits/referral_to_start/city/median_days" in record["figures"]
    band = tmp_path / "band.json"
    made = likvard(database_url, *args[:1], str(band), *args[2:], "--flag-rule", "band")
    assert made.returncode == 0, made.stderr
    assert json.loads(band.read_text(encoding="utf-8"))["figures"]["audit/flag_rule"] == "band"
    wrong = likvard(database_url, *args[:1], str(band), *args[2:], "--flag-rule", "bonferroni")
    assert wrong.returncode == 2 and "flag rule must be 'holm' or 'band'" in wrong.stderr
    refused = likvard(database_url, "--reproduce", str(out))
    assert refused.returncode == 2
    assert "names no Kafka offsets" in refused.stderr


def test_reproduce_refuses_a_file_that_is_no_report(database_url: str, tmp_path: Path) -> None:
    other = tmp_path / "other.html"
    other.write_text("<!DOCTYPE html><p>42</p>", encoding="utf-8")
    refused = likvard(database_url, "--reproduce", str(other))
    assert refused.returncode == 2
    assert "not a readable Likvärd report" in refused.stderr
    missing = likvard(database_url, "--reproduce", str(tmp_path / "absent.html"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    both = likvard(database_url, "--reproduce", str(other), "--out", str(tmp_path / "x.html"))
    assert both.returncode == 2 and "--reproduce takes only the report file" in both.stderr
    neither = likvard(database_url, "--from", "2024-01-01")
    assert neither.returncode == 2 and "--out FILE" in neither.stderr
