"""Dead letters never carry personal data in their headers: a district record with a name in
its free text and an identity number where an id belongs is refused at every stage of the
ingest path, and no header of its dead letter (nor what `likvard dlq show` prints to
operations without --payload) holds either. The value is the record, kept unchanged for the
auditor (and a retry)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from likvard import dlq
from likvard.codec import Catalogue
from likvard.identity import looks_like_identity_number
from tests.district import DistrictRecord, DistrictSystem, produce_all
from tests.support import IngestStack, wait_for

PNR = "19121212-1212"  # Skatteverket's test person (Tolvan Tolvansson): a valid number
FORMS = (PNR, PNR.replace("-", ""), PNR[2:], PNR[2:].replace("-", ""))
NAME = "Tolvan Tolvansson"
WORDS = ("Tolvan", "Tolvansson")
GOAL = f"{NAME} ({PNR}) vill sluta dricka före sommaren"


def personal(text: str) -> list[str]:
    """The personal strings found in `text`."""
    return [s for s in (*FORMS, *WORDS) if s in text]


# --- the guard where the headers are written (pure) ----------------------------------------
def test_the_test_data_is_what_it_says() -> None:
    assert all(looks_like_identity_number(f) for f in FORMS)


def test_a_reason_that_quoted_an_identity_number_loses_it_and_codes_keep_their_alphabet() -> None:
    headers = dlq.dead_letter_headers(
        [("event_type", b"CarePlanAgreed")],
        stage="schema",
        code=f"bad {PNR}",
        reason=f"metadata.actor {PNR} is not an id; offset 1234567890123 of 19121212-1213.",
        service="intake",
        source=("likvard.district-ingest.v1", 2, 19121212),
        failed_at=datetime(2026, 12, 1, tzinfo=UTC),
    )
    found = {name: dlq.shown_header(dlq.REASON, value) for name, value in headers}  # as text
    assert personal(" ".join(found.values())) == []
    assert found[dlq.CODE] == dlq.INVALID_CODE
    reason = found[dlq.REASON]
    assert reason.startswith(f"metadata.actor {dlq.REMOVED} is not an id")
    # digits that are not a valid number (a wrong check digit, 13 digits) are kept
    assert "1234567890123" in reason and "19121212-1213" in reason
    assert found[dlq.SOURCE_OFFSET] == "19121212"  # coordinates are Likvärd's
    long = dlq.safe_reason("x" * 5000 + "\n")
    assert len(long) == dlq.MAX_REASON_CHARS and long.endswith("…")
    assert dlq.safe_reason("one\nline\x00") == "one line "


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("event_type", b"CarePlanAgreed", True),
        ("event_id", str(uuid.uuid4()).encode(), True),
        ("likvard-signature", b"eyJhbGciOiJFUzI1NiJ9..c2lnbmF0dXJl", True),
        ("event_id", PNR.encode(), False),
        ("x-note", GOAL.encode(), False),
        ("key", NAME.encode(), False),
        (dlq.RETRY_OF, NAME.encode(), False),  # a district may send one: not Likvärd's
        (dlq.REASON, b"The case is closed; reopen it first.", True),
    ],
)
def test_dlq_show_prints_a_records_own_header_only_if_it_is_an_id(
    name: str, value: bytes, shown: bool
) -> None:
    text = dlq.shown_header(name, value)
    assert (text == value.decode()) is shown
    assert personal(text) == []


# --- the ingest path, end to end -----------------------------------------------------------
def refused_records(catalogue: Catalogue) -> list[DistrictRecord]:
    """One record per way of being refused, each with the name and the number in it."""
    district = DistrictSystem(catalogue)
    v1 = catalogue.schema("CarePlanAgreed", 1)

    def plan(case: str | None = None, **metadata: Any) -> DistrictRecord:
        payload = {
            "plan_id": str(uuid.uuid4()),
            "goals": [GOAL, f"Ring {NAME} på {PNR[2:]}"],
            "person_participated": True,
            "review_on": None,
        }
        return district.record(
            "CarePlanAgreed", case or str(uuid.uuid4()), payload, schema=v1, **metadata
        )

    unsigned = plan()
    return [
        plan(),  # rule: no such case
        plan(actor=PNR),  # schema: actor-is-identity-number
        plan(case=PNR),  # schema: case-id-not-uuid (and the key is the number)
        plan(district=PNR),  # rule: unknown-district
        plan(producer=NAME),  # schema: producer-invalid
        plan(correlation_id=GOAL * 4),  # schema: correlation-id-invalid
        district.raw(PNR.encode(), GOAL.encode()),  # decode: not-single-object
        DistrictRecord(unsigned.key, unsigned.value, unsigned.headers[:2]),  # signature
    ]


def likvard_show(stack: IngestStack, letter_id: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": stack.settings.kafka_bootstrap or "",
        "LIKVARD_TOPIC_PREFIX": stack.settings.topic_prefix,
        "LIKVARD_DATABASE_URL": stack.settings.database_url or "",
        "LIKVARD_TOKEN": "",
        "COLUMNS": "250",
    }
    return subprocess.run(
        [sys.executable, "-m", "likvard.cli", "dlq", "show", letter_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_no_dead_letter_header_holds_the_refused_records_personal_data(
    ingest_stack: IngestStack, catalogue: Catalogue
) -> None:
    stack = ingest_stack
    bootstrap = stack.settings.kafka_bootstrap or ""
    records = refused_records(catalogue)
    produce_all(bootstrap, stack.ingest_topic, records)

    def letters() -> list[dlq.DeadLetter]:
        return dlq.read_all(bootstrap, stack.dead_letter_topic, settle=0.2)

    wait_for(lambda: len(letters()) == len(records), 90, "every record dead-lettered")
    found = letters()
    assert {x.stage for x in found} == {"signature", "decode", "schema", "rule"}
    assert {"actor-is-identity-number", "case-id-not-uuid", "unknown-district"} <= {
        x.code for x in found
    }
    for x in found:
        headers = [(name, (value or b"").decode("utf-8", "replace")) for name, value in x.headers]
        assert [(n, v) for n, v in headers if personal(n) or personal(v)] == [], x.code
        assert personal(x.value.decode("utf-8", "replace") if x.value else "")  # the record

    for x in found:
        shown = likvard_show(stack, x.id)
        assert shown.returncode == 0, shown.stderr
        assert x.code in shown.stdout
        assert personal(shown.stdout + shown.stderr) == [], (x.code, shown.stdout)
