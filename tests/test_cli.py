"""The `likvard` command as a user runs it: `up` on a machine with nothing configured (its
own development OpenID provider, whose tokens `likvard token` prints), and clear errors."""

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
from tests.support import consume, env_without_stack, likvard_up, wait_for

OIDC = ("LIKVARD_OIDC_ISSUER", "LIKVARD_OIDC_AUDIENCE")


def likvard_token(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "likvard.cli", "token", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


pytestmark = pytest.mark.integration


def test_up_runs_the_stack_and_stops_cleanly(tmp_path: Path) -> None:
    port, broker_port, idp_port = free_port(), free_port(), free_port()
    # Nothing configured: not even the test session's provider.
    env = {k: v for k, v in env_without_stack().items() if k not in OIDC}
    env["LIKVARD_DEV_IDP_PORT"] = str(idp_port)
    env["LIKVARD_INTAKE_PORT"] = str(port)
    referral_port, followup_port = free_port(), free_port()
    env["LIKVARD_REFERRAL_PORT"] = str(referral_port)
    env["LIKVARD_FOLLOWUP_PORT"] = str(followup_port)
    projections_port = free_port()
    env["LIKVARD_PROJECTIONS_PORT"] = str(projections_port)
    log = tmp_path / "up.log"
    with likvard_up(["--broker-port", str(broker_port)], env, log) as proc:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 3  # broker, service, relay (and PostgreSQL)
        names = {" ".join(p.cmdline()[-2:]) for p in descendants if p.is_running()}
        assert {"ingest intake", "ingest referral", "ingest followup"} <= names
        assert "relay access-log" in names
        assert any(p.cmdline()[-5:-3] == ["dev-idp", "--port"] for p in descendants)
        text = log.read_text()
        assert "Development conveniences, never for production" in text
        assert "LIKVARD_PUBLIC_DOCS=1" in text

        # `likvard token` prints only a token of the stack's provider, which the stack takes.
        issuer = re.search(r"export LIKVARD_OIDC_ISSUER=(\S+)", text)
        assert issuer is not None, text
        assert issuer.group(1) == f"http://127.0.0.1:{idp_port}"
        user_env = {**env, "LIKVARD_OIDC_ISSUER": issuer.group(1)}
        printed = likvard_token(user_env, "--role", "case-worker", "--district", "centrum")
        assert printed.returncode == 0, printed.stderr
        centrum = {"Authorization": f"Bearer {printed.stdout.strip()}"}
        assert printed.stdout.count(".") == 2 and printed.stdout.endswith("\n")
        auditor = likvard_token(user_env, "--role", "auditor")
        assert auditor.returncode == 0, auditor.stderr
        audit = {"Authorization": f"Bearer {auditor.stdout.strip()}"}
        unknown = f"http://127.0.0.1:{port}/cases/{uuid.uuid4()}"
        assert httpx.get(unknown, timeout=10).status_code == 401
        assert httpx.get(unknown, headers=centrum, timeout=10).status_code == 404
        # The API documents are open under `up` (LIKVARD_PUBLIC_DOCS=1); the metrics are not.
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 401

        r = httpx.post(
            f"http://127.0.0.1:{port}/cases",
            headers=centrum,
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
            answers.append(httpx.post(url, json=referral, headers=centrum, timeout=30))
            return "case-not-found" not in answers[-1].text

        wait_for(referral_answered, 60, "the referral service to learn the case")
        # The case is known (the unit's code is wrong on purpose): a rule answer, not unknown.
        assert answers[-1].status_code == 422, answers[-1].text
        assert httpx.get(f"http://127.0.0.1:{followup_port}/readyz", timeout=5).status_code == 200
        # The projection worker folds the case into the read models the reporting API serves.
        timeline = f"http://127.0.0.1:{projections_port}/cases/{case}/timeline"
        wait_for(
            lambda: httpx.get(timeline, headers=centrum, timeout=5).status_code == 200,
            60,
            "the case in the reporting API's timeline",
        )
        events = httpx.get(timeline, headers=centrum, timeout=5).json()
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
            lambda: httpx.get(events_url, headers=audit, timeout=5).status_code == 200,
            60,
            "the district's event in the intake service",
        )
        answer = httpx.get(events_url, headers=audit, timeout=5)
        assert answer.json()[0]["event_id"] == record.event_id
        # The printed settings reach the same stack from another process.
        exported = re.search(
            r"export LIKVARD_DATABASE_URL='([^']+)' KAFKA_BOOTSTRAP_SERVERS=(\S+)", log.read_text()
        )
        assert exported is not None, log.read_text()
        assert exported.group(2) == f"127.0.0.1:{broker_port}"
        with psycopg.connect(exported.group(1)) as conn:
            assert readmodels.case_facts(conn, "projections", case) is not None
    assert proc.returncode == 0, log.read_text()
    assert "stopped" in log.read_text()
    wait_for(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in descendants),
        30,
        "every child process to exit",
    )


def test_up_with_an_issuer_set_trusts_it_and_starts_no_provider(tmp_path: Path) -> None:
    from tests.identity import bearer

    env = env_without_stack()  # keeps the test session's LIKVARD_OIDC_ISSUER
    issuer = env["LIKVARD_OIDC_ISSUER"]
    port, broker_port = free_port(), free_port()
    env["LIKVARD_INTAKE_PORT"] = str(port)
    env["LIKVARD_DEV_IDP_PORT"] = str(free_port())
    log = tmp_path / "up.log"
    with likvard_up(["--services=intake", f"--broker-port={broker_port}"], env, log) as proc:
        text = log.read_text()
        assert f"Sign-in      {issuer} (LIKVARD_OIDC_ISSUER)" in text
        assert "development OpenID provider on" not in text
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert not any("dev-idp" in p.cmdline() for p in descendants if p.is_running())
        unknown = f"http://127.0.0.1:{port}/cases/{uuid.uuid4()}"
        answer = httpx.get(unknown, headers=bearer("case-worker", districts=["nordost"]))
        assert answer.status_code == 404, answer.text
    assert proc.returncode == 0, log.read_text()


def test_token_says_what_is_wrong_when_it_cannot_get_one(tmp_path: Path) -> None:
    from tests.identity import running_idp

    with running_idp(tmp_path) as idp:
        env = {**os.environ, "LIKVARD_OIDC_ISSUER": idp.issuer}
        nobody = likvard_token(env, "--role", "case-worker", "--district", "atlantis")
        assert nobody.returncode == 1 and nobody.stdout == ""
        assert "no user 'case-worker-atlantis'" in nobody.stderr
        unit = likvard_token(env, "--role", "unit-staff", "--unit", "hisingen-bostad-forst")
        assert unit.returncode == 0 and unit.stdout.count(".") == 2
    # The provider stopped: a clear error, nothing on stdout.
    down = likvard_token(env, "--role", "ops")
    assert down.returncode == 1 and down.stdout == ""
    assert f"{idp.issuer} does not answer" in " ".join(down.stderr.split())
    missing = likvard_token(env, "--role", "case-worker")
    assert missing.returncode == 2 and "--district" in missing.stderr
    wrong = likvard_token(env, "--role", "admin")
    assert wrong.returncode == 2 and "unknown role 'admin'" in wrong.stderr


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
