"""`likvard report --out report.html` as an auditor runs it, over projected read models."""

from __future__ import annotations

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
