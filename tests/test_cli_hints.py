"""A new user's first commands beside `likvard up`: without the settings they need, each
says what to set and where `likvard up` prints it; `report` needs no --from."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import psycopg
import pytest

from services.projections import readmodels

UNSET = ("LIKVARD_DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "LIKVARD_TEST_DATABASE_URL")


def likvard(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in UNSET}
    return subprocess.run(
        [sys.executable, "-m", "likvard.cli", *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def said(result: subprocess.CompletedProcess[str]) -> str:
    """stderr as one line (the console wraps at 80 columns when not a terminal)."""
    return " ".join(result.stderr.split())


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (("replay",), "LIKVARD_DATABASE_URL"),
        (("report", "--out", "report.html"), "LIKVARD_DATABASE_URL"),
        (("verify", "intake"), "LIKVARD_DATABASE_URL"),
        (("dlq", "list"), "KAFKA_BOOTSTRAP_SERVERS"),
        (("republish", "intake"), "KAFKA_BOOTSTRAP_SERVERS"),
    ],
)
def test_without_the_servers_a_command_says_what_to_set(
    args: tuple[str, ...], missing: str, tmp_path: Path
) -> None:
    result = likvard(*args, cwd=tmp_path)
    text = said(result)
    assert result.returncode == 2, text
    assert "Traceback" not in result.stderr
    assert f"{missing} is not set" in text
    assert f"export {missing}=" in text  # an example of what to set
    # ... and how to reach the stack `likvard up` runs: the line it prints to paste
    assert "`likvard up` runs on this machine" in text
    assert "export LIKVARD_DATABASE_URL=... KAFKA_BOOTSTRAP_SERVERS=..." in text
    assert "Missing option" not in text  # report's --from is optional
    assert not list(tmp_path.iterdir())  # nothing written


def test_report_help_says_what_from_defaults_to() -> None:
    result = likvard("report", "--help", COLUMNS="200")
    assert result.returncode == 0
    assert "default: 1 January of the --to year" in " ".join(result.stdout.split())


@pytest.mark.integration
def test_report_without_from_covers_the_year_so_far(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        readmodels.migrate(conn, schema)
    out = tmp_path / "report.html"
    today = date.today()
    result = likvard(
        "report", "--out", str(out), "--schema", schema, LIKVARD_DATABASE_URL=database_url
    )
    assert result.returncode == 0, result.stderr
    html = out.read_text(encoding="utf-8")
    assert f"{today.year}-01-01" in html
    assert today.isoformat() in html
    result = likvard(
        "report",
        "--out",
        str(out),
        "--schema",
        schema,
        "--to",
        "2023-06-30",
        LIKVARD_DATABASE_URL=database_url,
    )
    assert result.returncode == 0, result.stderr
    assert "2023-01-01" in out.read_text(encoding="utf-8")
