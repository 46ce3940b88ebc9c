"""Read your writes: a read with the position tokens of its writes waits until the read
models hold them, then answers; past the bound it says so (503, Retry-After)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest

from likvard.http import ProblemError
from services.projections import caught_up, readmodels
from services.projections.tests.reporting_app import reporting_app
from services.projections.tests.test_reports import EVENTS
from tests.identity import bearer

CASE = "case-centrum-01-00"


def test_tokens_are_event_ids_and_a_bad_one_is_refused() -> None:
    one, two = uuid.uuid4(), uuid.uuid4()
    assert caught_up.parse_tokens(f"{one}, {two}", None) == [one, two]
    assert caught_up.parse_tokens(None, str(one)) == [one]
    assert caught_up.parse_tokens(None, None) == []
    with pytest.raises(ProblemError) as bad:
        caught_up.parse_tokens("19121212-1212", None)
    assert bad.value.status == 400 and "1912" not in bad.value.detail
    with pytest.raises(ProblemError):
        caught_up.parse_tokens(",".join(str(uuid.uuid4()) for _ in range(21)), None)


@pytest.fixture
def api(
    database_url: str,
    schema: str,
    new_schema: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    monkeypatch.setenv(caught_up.WAIT_ENV, "30")
    # all but the last event: the test writes it while a read waits for it
    with reporting_app(database_url, schema, new_schema("al"), EVENTS[:-1]) as base:
        yield base


@pytest.mark.integration
def test_a_read_waits_for_its_write_then_answers(api: str, database_url: str, schema: str) -> None:
    last = EVENTS[-1]
    auditor = bearer("auditor")
    done = api + "/reports/equal-access"
    seen = httpx.get(done, params={"after": str(EVENTS[0].event_id)}, headers=auditor, timeout=30)
    assert seen.status_code == 200  # already projected: no wait
    answers: list[httpx.Response] = []
    reader = threading.Thread(
        target=lambda: answers.append(
            httpx.get(
                f"{api}/cases/{last.case_id}/timeline",
                headers=auditor | {"Likvard-After": str(last.event_id)},
                timeout=60,
            )
        )
    )
    reader.start()
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.apply(conn, schema, [last])  # the write reaches the read models
    reader.join(60)
    assert answers and answers[0].status_code == 200, answers
    assert str(last.event_id) in {row["event_id"] for row in answers[0].json()}


@pytest.mark.integration
def test_past_the_bound_the_answer_is_503_with_retry_after(
    api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(caught_up.WAIT_ENV, "0.2")
    never = str(uuid.uuid4())
    late = httpx.get(
        api + "/reports/waits", params={"after": never}, headers=bearer("analyst"), timeout=30
    )
    assert late.status_code == 503 and late.headers["retry-after"] == "1"
    assert late.json()["type"].endswith("/not-yet-projected")
    bad = httpx.get(api + "/reports/waits", params={"after": "x"}, headers=bearer("analyst"))
    assert bad.status_code == 400
    # the access log's `after` is its page cursor: the header is the way to wait there
    page = httpx.get(api + "/access-log", params={"after": never}, headers=bearer("auditor"))
    assert page.status_code == 422 and page.json()["type"].endswith("/unknown-cursor")
