"""`likvard up` for the browser tests, on free ports, seeded through the public APIs.

`running_stack(directory)` starts the whole stack as a user does (its own development
OpenID provider, whose login form the console signs in through), fills it with
`likvard demo --persons 60 --years 2`, then registers a few cases in one district and refers
each to one specialist unit (status requested), and returns once the projections show them.
It is a context manager so a test module can hold one stack in a module-scoped fixture:

    @pytest.fixture(scope="module")
    def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
        with running_stack(tmp_path_factory.mktemp("stack")) as running:
            yield running

Every token the seed uses comes from the stack's provider (tests.identity.token_from); every
wait has a deadline (tests.support.wait_for); the stack's output is in `<directory>/up.log`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from likvard.cli.devstack import free_port
from likvard.pseudonym import luhn_check_digit
from tests.identity import token_from
from tests.support import env_without_stack, likvard_up, wait_for

SERVICES = ("intake", "referral", "followup", "projections")
DISTRICT = "nordost"
OTHER_DISTRICT = "hisingen"
UNIT = "centrum-beroendeteam"
INTERVENTION = "relapse-prevention-alcohol"
REFERRALS = 3  # one each for the keyboard decline, the conflict and a spare
DEMO_PERSONS, DEMO_YEARS = 60, 2


@dataclass(frozen=True)
class Stack:
    """A running, seeded stack: where each part answers and what the seed made."""

    ports: dict[str, int]
    issuer: str
    bootstrap: str
    console: str
    log: Path
    cases: tuple[str, ...]
    referrals: tuple[str, ...]
    demo_case: str = ""
    district: str = DISTRICT
    other_district: str = OTHER_DISTRICT
    unit: str = UNIT

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def origins(self) -> set[str]:
        """The only origins a console page may make the browser ask: the console's and the
        provider's."""
        return {self.url("projections"), self.issuer}

    def headers(
        self, role: str, *, districts: tuple[str, ...] = (), unit: str | None = None
    ) -> dict[str, str]:
        token = token_from(self.issuer, role, districts=districts, unit=unit)
        return {"Authorization": f"Bearer {token}"}


def identity_number(i: int) -> str:
    """A valid synthetic personal identity number (born 1975, serial 500+i, Luhn digit)."""
    born, serial = f"197503{(i % 28) + 1:02d}", f"{500 + i:03d}"
    return f"{born}-{serial}{luhn_check_digit(born[2:] + serial)}"


def _found(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match is not None, f"`likvard up` did not print {pattern!r}:\n{text[-4000:]}"
    return match.group(1)


def run_demo(env: dict[str, str], log: Path, timeout: float = 180) -> None:
    """`likvard demo` against the stack (it finds the services by LIKVARD_<SERVICE>_PORT and
    the provider by LIKVARD_OIDC_ISSUER); fails with its output."""
    args = ["demo", "--persons", str(DEMO_PERSONS), "--years", str(DEMO_YEARS)]
    done = subprocess.run(
        [sys.executable, "-m", "likvard.cli", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"`likvard demo` failed:\n{(done.stdout + done.stderr)[-4000:]}"


def _post(url: str, headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, headers=headers, json=body, timeout=30)


def seed_referrals(stack: Stack, count: int = REFERRALS) -> tuple[list[str], list[str]]:
    """`count` cases in the stack's district, each referred to its unit: (cases, referrals).
    The referral service learns a case from Kafka, so a first `case-not-found` is retried."""
    worker = stack.headers("case-worker", districts=(stack.district,))
    cases: list[str] = []
    for i in range(count):
        made = _post(
            f"{stack.url('intake')}/cases",
            worker,
            {
                "personal_identity_number": identity_number(i),
                "district": stack.district,
                "substances": ["ALCOHOL"],
                "referral_source": "SELF",
                "children_in_household": "NO",
            },
        )
        assert made.status_code == 201, made.text
        cases.append(str(made.json()["case_id"]))
    referrals: list[str] = []
    for case in cases:
        answers: list[httpx.Response] = []

        def referred(case: str = case, answers: list[httpx.Response] = answers) -> bool:
            body = {"case_id": case, "unit_id": stack.unit, "intervention_code": INTERVENTION}
            answers.append(_post(f"{stack.url('referral')}/referrals", worker, body))
            return "case-not-found" not in answers[-1].text

        wait_for(referred, 90, "the referral service to learn a seeded case")
        assert answers[-1].status_code == 201, answers[-1].text
        referrals.append(str(answers[-1].json()["referral_id"]))
    return cases, referrals


def demo_case(stack: Stack, seeded: set[str]) -> str:
    """A case of the demo's with a longer story than the seed's (a referral to the unit that
    was accepted), for the timeline's screenshot; any demo case of the unit if none was."""
    staff = stack.headers("unit-staff", unit=stack.unit)
    url = f"{stack.url('referral')}/units/{stack.unit}/referrals"
    answer = httpx.get(url, headers=staff, timeout=30)
    assert answer.status_code == 200, answer.text
    entries = [e for e in answer.json() if e["case_id"] not in seeded]
    assert entries, "the demo referred no case to the unit"
    accepted = [e for e in entries if e["status"] == "accepted"] or entries
    return str(accepted[0]["case_id"])


def wait_until_projected(stack: Stack, timeout: float = 120) -> None:
    """The projections have every seeded case (its timeline, with the referral) and the
    demo's cases (the follow-up report has rows)."""
    auditor = stack.headers("auditor")
    analyst = stack.headers("analyst")
    base = stack.url("projections")

    def timelines() -> bool:
        for case in stack.cases:
            r = httpx.get(f"{base}/cases/{case}/timeline", headers=auditor, timeout=10)
            if r.status_code != 200:
                return False
            if "ReferralRequested" not in {e["event_type"] for e in r.json()}:
                return False
        demo = httpx.get(f"{base}/cases/{stack.demo_case}/timeline", headers=auditor, timeout=10)
        return demo.status_code == 200

    wait_for(timelines, timeout, "the seeded cases and referrals in the projections")
    today = time.strftime("%Y-%m-%d")
    report = f"{base}/reports/followup?from=2000-01-01&to={today}"

    def reported() -> bool:
        r = httpx.get(report, headers=analyst, timeout=30)
        return r.status_code == 200 and len(r.json()) > 0

    wait_for(reported, timeout, "the demo's cases in the follow-up report")


@contextmanager
def running_stack(directory: Path, timeout: float = 120) -> Iterator[Stack]:
    """`likvard up` on free ports (every service, the broker, the provider), seeded; stopped
    with Ctrl-C when the block ends."""
    env = env_without_stack()
    env.pop("LIKVARD_OIDC_ISSUER", None)  # `likvard up` starts its own provider
    env.pop("LIKVARD_OIDC_AUDIENCE", None)
    ports = {s: free_port() for s in SERVICES}
    for service, port in ports.items():
        env[f"LIKVARD_{service.upper()}_PORT"] = str(port)
    env["LIKVARD_DEV_IDP_PORT"] = str(free_port())
    log = directory / "up.log"
    with likvard_up(["--broker-port", str(free_port())], env, log, timeout):
        text = log.read_text()
        issuer = _found(r"export LIKVARD_OIDC_ISSUER=(\S+)", text)
        bootstrap = _found(r"KAFKA_BOOTSTRAP_SERVERS=(\S+)", text)
        console = _found(r"console\s+(http://\S+/console/)", text)
        env["LIKVARD_OIDC_ISSUER"] = issuer
        run_demo(env, directory / "demo.log")
        bare = Stack(ports, issuer, bootstrap, console, log, (), ())
        cases, referrals = seed_referrals(bare)
        demo = demo_case(bare, set(cases))
        stack = Stack(ports, issuer, bootstrap, console, log, tuple(cases), tuple(referrals), demo)
        wait_until_projected(stack)
        yield stack
