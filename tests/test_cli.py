"""The `likvard` command as a user runs it: `up` on a machine with nothing configured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from likvard.cli.devstack import free_port
from likvard.codec import Catalogue
from services.projections import readmodels
from tests.district import DistrictSystem, produce_all, registered
from tests.support import consume, env_without_stack, stop_process, wait_for

pytestmark = pytest.mark.integration


def test_up_runs_the_stack_and_stops_cleanly(tmp_path: Path) -> None:
    port, broker_port = free_port(), free_port()
    env = env_without_stack()
    env["LIKVARD_INTAKE_PORT"] = str(port)
    referral_port, followup_port = free_port(), free_port()
    env["LIKVARD_REFERRAL_PORT"] = str(referral_port)
    env["LIKVARD_FOLLOWUP_PORT"] = str(followup_port)
    projections_port = free_port()
    env["LIKVARD_PROJECTIONS_PORT"] = str(projections_port)
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "likvard.cli", "up", "--broker-port", str(broker_port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: "Likvärd is up" in log.read_text() or proc.poll() is not None,
            60,
            "`likvard up` to report the stack up",
        )
        assert proc.poll() is None, log.read_text()
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 3  # broker, service, relay (and PostgreSQL)
        names = {" ".join(p.cmdline()[-2:]) for p in descendants if p.is_running()}
        assert {"ingest intake", "ingest referral", "ingest followup"} <= names

        r = httpx.post(
            f"http://127.0.0.1:{port}/cases",
            timeout=30,
            json={
                "personal_identity_number": "19121212-1212",
                "district": "centrum",
                "substances": ["PHARMACEUTICALS"],
                "referral_source": "RELATIVE",
                "children_in_household": "NO",
            },
        )
        assert r.status_code == 201, r.text
        records = consume(f"127.0.0.1:{broker_port}", "likvard.intake.v1", at_least=1)
        assert [x.headers["event_type"] for x in records] == [b"IntakeRegistered"]
        case = r.json()["case_id"]
        # The referral service learns the case from Kafka, then takes a referral for it.
        referral: dict[str, str] = {
            "case_id": case,
            "unit_id": "region-beroendevard",
            "intervention_code": "x",
        }
        answers: list[httpx.Response] = []

        def referral_answered() -> bool:
            url = f"http://127.0.0.1:{referral_port}/referrals"
            answers.append(httpx.post(url, json=referral, timeout=30))
            return "case-not-found" not in answers[-1].text

        wait_for(referral_answered, 60, "the referral service to learn the case")
        # The case is known (the unit's code is wrong on purpose): a rule answer, not unknown.
        assert answers[-1].status_code == 422, answers[-1].text
        assert httpx.get(f"http://127.0.0.1:{followup_port}/readyz", timeout=5).status_code == 200
        # The projection worker folds the case into the read models the reporting API serves.
        timeline = f"http://127.0.0.1:{projections_port}/cases/{case}/timeline"
        wait_for(
            lambda: httpx.get(timeline, timeout=5).status_code == 200,
            60,
            "the case in the reporting API's timeline",
        )
        events = httpx.get(timeline, timeout=5).json()
        assert [e["event_type"] for e in events] == ["IntakeRegistered"]
        # A district system's event on the ingest topic reaches the intake service's store
        # through its ingest worker (`likvard ingest intake`, started by `up`).
        district_case = str(uuid.uuid4())
        record = DistrictSystem(Catalogue.load()).record(
            "IntakeRegistered", district_case, registered()
        )
        produce_all(f"127.0.0.1:{broker_port}", "likvard.district-ingest.v1", [record])
        events_url = f"http://127.0.0.1:{port}/cases/{district_case}/events"
        wait_for(
            lambda: httpx.get(events_url, timeout=5).status_code == 200,
            60,
            "the district's event in the intake service",
        )
        assert httpx.get(events_url, timeout=5).json()[0]["event_id"] == record.event_id
        # The printed settings reach the same stack from another process.
        exported = re.search(
            r"export LIKVARD_DATABASE_URL='([^']+)' KAFKA_BOOTSTRAP_SERVERS=(\S+)", log.read_text()
        )
        assert exported is not None, log.read_text()
        assert exported.group(2) == f"127.0.0.1:{broker_port}"
        with psycopg.connect(exported.group(1)) as conn:
            assert readmodels.case_facts(conn, "projections", case) is not None
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()
    assert "stopped" in log.read_text()
    wait_for(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in descendants),
        30,
        "every child process to exit",
    )


def test_unknown_service_is_a_clear_error() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "likvard.cli", "serve", "nosuch"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "unknown service 'nosuch'" in r.stderr


def test_serve_without_database_says_what_to_set() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LIKVARD_DATABASE_URL"}
    r = subprocess.run(
        [sys.executable, "-m", "likvard.cli", "serve", "intake"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "LIKVARD_DATABASE_URL" in r.stderr


def test_demo_with_a_bad_bias_says_what_is_wrong() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "likvard.cli", "demo", "--bias", "nordost:happiness:0.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "happiness" in result.stderr
    assert "specialist_access" in result.stderr  # the metrics that can be biased are listed
