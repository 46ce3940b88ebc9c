"""The README's walk-through, run as written against `likvard up`: the shell block of "Try it"
with only the ports (free ones here) and the path of the `likvard` command changed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from likvard.cli.devstack import free_port
from tests.identity import token_from
from tests.support import env_without_stack, likvard_up, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
PORTS = {"8001": "INTAKE", "8002": "REFERRAL", "8003": "FOLLOWUP", "8004": "PROJECTIONS"}


def walk_through() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Try it: the care chain") :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "the README's walk-through has no sh block"
    return match.group(1)


def with_status(script: str) -> str:
    """Every `curl` that starts a line also prints its status as ` [NNN]` on its own line
    (the ones inside $(...) feed JSON to the next step and are checked by it)."""
    return re.sub(r"(?m)^curl -s ", "curl -s -w '\\n[%{http_code}]\\n' ", script)


def expected_statuses(script: str) -> list[str]:
    """The status each line-starting curl should answer: the comment's `# 403`, else 2xx."""
    wanted = []
    for line in script.splitlines():
        if line.startswith("curl "):
            m = re.search(r"#\s*(\d{3})\b", line)
            wanted.append(m.group(1) if m else "2xx")
    return wanted


def consumers_joined(ports: dict[str, str], issuer: str) -> None:
    """A person reading the README takes longer between steps than the consumers of a stack
    that has just started take to join their groups (the README says so): wait as long, by
    registering a case and waiting until referral and follow-up know it."""
    auth = {"Authorization": f"Bearer {token_from(issuer, 'case-worker', districts=['nordost'])}"}
    case = httpx.post(
        f"http://127.0.0.1:{ports['8001']}/cases",
        headers=auth,
        json={
            "personal_identity_number": "19121212-1212",
            "district": "nordost",
            "substances": ["ALCOHOL"],
            "referral_source": "SELF",
            "children_in_household": "NO",
        },
        timeout=30,
    ).json()["case_id"]
    followups = f"http://127.0.0.1:{ports['8003']}/cases/{case}/followups"
    wait_for(
        lambda: httpx.get(followups, headers=auth, timeout=30).status_code == 200,
        90,
        "the follow-up service to learn a case from intake",
    )
    referral = {
        "case_id": case,
        "unit_id": "centrum-beroendeteam",
        "intervention_code": "relapse-prevention-alcohol",
    }

    def referral_knows_it() -> bool:
        r = httpx.post(
            f"http://127.0.0.1:{ports['8002']}/referrals", headers=auth, json=referral, timeout=30
        )
        return not r.json().get("type", "").endswith("/case-not-found")

    wait_for(referral_knows_it, 90, "the referral service to learn a case from intake")


@pytest.mark.skipif(shutil.which("curl") is None, reason="the walk-through uses curl")
def test_the_readme_walk_through_works_as_written(tmp_path: Path) -> None:
    env = env_without_stack()
    ports = {p: str(free_port()) for p in PORTS}
    for standard, name in PORTS.items():
        env[f"LIKVARD_{name}_PORT"] = ports[standard]
    env["LIKVARD_DEV_IDP_PORT"] = idp = str(free_port())
    env.pop("LIKVARD_OIDC_ISSUER", None)  # `likvard up` starts its own provider, as for a user
    env.pop("LIKVARD_OIDC_AUDIENCE", None)
    script = walk_through()
    assert "likvard token" in script and "Authorization: Bearer" in script
    runnable = with_status(script)
    for standard, port in ports.items():
        runnable = runnable.replace(f"localhost:{standard}", f"localhost:{port}")
    runnable = runnable.replace(".venv/bin/likvard", str(Path(sys.executable).parent / "likvard"))
    with likvard_up(["--broker-port", str(free_port())], env, tmp_path / "up.log", 90):
        env["LIKVARD_OIDC_ISSUER"] = f"http://127.0.0.1:{idp}"  # what `likvard token` finds
        consumers_joined(ports, env["LIKVARD_OIDC_ISSUER"])
        run = subprocess.run(
            ["bash", "-c", "set -eo pipefail\n" + runnable],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        got = re.findall(r"^\[(\d{3})\]$", run.stdout, re.M)
        wanted = expected_statuses(script)
        assert len(got) == len(wanted), run.stdout
        for status, want in zip(got, wanted, strict=True):
            assert status == want or (want == "2xx" and status.startswith("2")), run.stdout
