"""Schemathesis conformance of every HTTP API: each OpenAPI document, tested with all of
schemathesis' checks (not only "no 5xx") against the app on a real server and a real
PostgreSQL, with a fixed seed and a bounded number of examples per operation.

What the checks hold each API to: valid requests (by its OpenAPI) are accepted or answered
with a documented status, invalid ones are refused with 4xx, every status, content type,
header and body is the documented one, and methods the API does not have answer 405 with
`Allow`.

The engine runs every phase (examples, coverage, fuzzing, stateful), as `schemathesis run`
does; its pytest plugin is not used (it reaches into pytest's node internals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis import CheckContext
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES
from schemathesis.core.transport import Response
from schemathesis.engine import StopReason, events
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.schemas import OpenApiSchema

from conftest import TEST_SECRET
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.districts import DistrictRegistry
from likvard.identity import Role
from services.projections import readmodels
from services.projections.tests.test_reports import EVENTS
from tests.identity import bearer
from tests.support import made_schemas, serving

pytestmark = pytest.mark.integration

SEED = 20261122
MAX_EXAMPLES = 25


def _config(base_url: str, token: dict[str, str]) -> SchemathesisConfig:
    """Every built-in check (the default), a fixed seed, few examples, every phase.

    One setting differs from the defaults: valid data may also be answered 422 when the
    problem is a rule of the domain, not of form. Those rules depend on the stored history
    and the clock (a case already closed, a district not valid on the day, a time in the
    future, an identity number's check digit), which no OpenAPI document can state. The
    check below keeps it strict: valid data answered 422 `validation-error` (a rule of form
    that the document does not state) is a failure."""
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "base-url": base_url,
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "headers": token,
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": [*POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES, "422"]
                }
            },
        }
    )


@schemathesis.check
def valid_data_passes_validation(ctx: CheckContext, response: Response, case: Case[Any]) -> None:
    """Data valid by the document is never refused as invalid by it: every rule of form
    that the API enforces is stated in its OpenAPI document."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return
    problem = response.json()
    if str(problem.get("type", "")).endswith("/validation-error"):
        raise AssertionError(f"Schema-valid request refused as invalid: {problem.get('errors')}")


@pytest.fixture(scope="module")
def schemas(database_url: str) -> Iterator[Callable[[str], str]]:
    """A fresh database schema per API, all dropped after the module."""
    yield from made_schemas(database_url, "st")


def case_worker() -> dict[str, str]:
    """A case worker of every district: the generated cases, referrals and follow-ups are
    theirs, so the checks run past the access policy (unit-staff operations answer 403,
    a documented status)."""
    districts = sorted(d.code for d in DistrictRegistry.load())
    return bearer(Role.CASE_WORKER, districts=districts, subject="schemathesis")


def _served(app: FastAPI, token: dict[str, str]) -> Iterator[OpenApiSchema]:
    with serving(app) as base_url:
        yield schemathesis.openapi.from_dict(app.openapi(), config=_config(base_url, token))


@pytest.fixture(scope="module")
def intake_api(database_url: str, schemas: Callable[[str], str]) -> Iterator[OpenApiSchema]:
    from services.intake.api import create_app

    settings = Settings(database_url=database_url, pseudonym_secret=TEST_SECRET)
    app = create_app(settings, schema=schemas("i"), catalogue=Catalogue.load())
    yield from _served(app, case_worker())


@pytest.fixture(scope="module")
def referral_api(database_url: str, schemas: Callable[[str], str]) -> Iterator[OpenApiSchema]:
    from services.referral.api import create_app

    settings = Settings(database_url=database_url)
    yield from _served(create_app(settings, schema=schemas("r"), case_wait=0), case_worker())


@pytest.fixture(scope="module")
def followup_api(database_url: str, schemas: Callable[[str], str]) -> Iterator[OpenApiSchema]:
    from services.followup.api import create_app

    settings = Settings(database_url=database_url)
    yield from _served(create_app(settings, schema=schemas("f"), case_wait=0), case_worker())


@pytest.fixture(scope="module")
def projections_api(database_url: str, schemas: Callable[[str], str]) -> Iterator[OpenApiSchema]:
    from services.projections.api import create_app

    schema = schemas("p")
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, schema)
        readmodels.apply(conn, schema, EVENTS)  # rows to check the answers' schemas against
    # An auditor: the reports, the timelines of every case and the access log.
    app = create_app(Settings(database_url=database_url), schema=schema)
    yield from _served(app, bearer(Role.AUDITOR, subject="schemathesis-auditor"))


# Every built-in check must have run, so a newer schemathesis that turns one off by
# default, or a config mistake, cannot make this test pass by checking less.
BUILT_IN_CHECKS = {
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "positive_data_acceptance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
    valid_data_passes_validation.__name__,
}


def _failures(schema: OpenApiSchema) -> list[str]:
    """Run every phase (examples, coverage, fuzzing, stateful) and say what failed."""
    found: list[str] = []
    ran: set[str] = set()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for checks in event.recorder.checks.values():
                for check in checks:
                    ran.add(check.name)
                    if check.failure_info is not None:
                        f = check.failure_info.failure
                        found.append(
                            f"{event.recorder.label} [{check.name}] {f.title}: {f.message}\n"
                            f"{check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            found.append(f"error: {event!r}")
        elif isinstance(event, events.EngineFinished):
            found.extend(f"after run: {f.title}: {f.message}" for f in event.failures)
            if event.stop_reason is not StopReason.COMPLETED:
                found.append(f"the run stopped early: {event.stop_reason}")
    if missing := BUILT_IN_CHECKS - ran:
        found.append(f"checks that never ran: {sorted(missing)}")
    return sorted(set(found))


@pytest.mark.parametrize("api", ["intake_api", "referral_api", "followup_api", "projections_api"])
def test_api_conforms_to_its_openapi(api: str, request: pytest.FixtureRequest) -> None:
    failures = _failures(request.getfixturevalue(api))
    assert not failures, "\n\n".join(failures)
