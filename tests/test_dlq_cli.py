"""Operations read dead letters and re-submit them after a fix: `likvard dlq list|show|retry`
as a user runs it, against dead letters the ingest workers wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from likvard import dlq
from likvard.access_log_audit import search
from likvard.codec import Catalogue
from likvard.config import Settings
from tests.district import (
    DistrictSystem,
    assessment,
    produce_all,
    registered,
)
from tests.identity import token
from tests.support import IngestStack, wait_for

pytestmark = pytest.mark.integration


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "likvard.cli", *args],
        env={**os.environ, "COLUMNS": "250", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def likvard(stack: IngestStack, *args: str, token: str = "") -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it; `token` is LIKVARD_TOKEN (none: the OS login)."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": stack.settings.kafka_bootstrap or "",
        "LIKVARD_TOPIC_PREFIX": stack.settings.topic_prefix,
        # `dlq show` records the operator's read in the access log (its own schema there)
        "LIKVARD_DATABASE_URL": stack.settings.database_url or "",
        "LIKVARD_TOKEN": token,
    }
    return run_cli(env, *args)


def listed(stack: IngestStack, *filters: str) -> list[dict[str, Any]]:
    r = likvard(stack, "dlq", "list", "--json", *filters)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def dead_letter_count(stack: IngestStack) -> int:
    """In-process, for waiting (the CLI is what is under test, not the wait)."""
    letters = dlq.read_all(
        stack.settings.kafka_bootstrap or "", stack.dead_letter_topic, settle=0.2
    )
    return len(letters)


def stored_types(stack: IngestStack, case_id: str) -> list[str]:
    return [e.event_type for e in stack.stores["intake"].read_stream(case_id)]


def test_dead_letters_are_listed_shown_and_retried_after_a_fix(
    ingest_stack: IngestStack, catalogue: Catalogue
) -> None:
    stack = ingest_stack
    bootstrap = stack.settings.kafka_bootstrap or ""
    district = DistrictSystem(catalogue)
    case = str(uuid.uuid4())
    late = district.record("AssessmentCompleted", case, assessment())
    garbage = district.raw(case.encode(), b"not an event at all")
    produce_all(
        bootstrap,
        stack.ingest_topic,
        [
            district.record("IntakeRegistered", case, registered()),
            district.record("CaseClosed", case, {"reason": "PLANNED_END"}),
            late,
            garbage,
        ],
    )
    wait_for(lambda: dead_letter_count(stack) == 2, 60, "two dead letters")

    letters = {x["code"]: x for x in listed(stack)}
    assert set(letters) == {"case-closed", "not-single-object"}
    closed = letters["case-closed"]
    assert closed["stage"] == "rule" and closed["event_type"] == "AssessmentCompleted"
    assert closed["event_id"] == late.event_id and closed["service"] == "intake"
    assert [x["id"] for x in listed(stack, "--stage", "decode")] == [
        letters["not-single-object"]["id"]
    ]
    assert listed(stack, "--code", "no-such-code") == []

    table = likvard(stack, "dlq", "list")
    assert table.returncode == 0, table.stderr
    assert closed["id"] in table.stdout and "case-closed" in table.stdout
    assert "2 dead letter(s): decode 1, rule 1" in table.stdout

    shown = likvard(stack, "dlq", "show", closed["id"])
    assert shown.returncode == 0, shown.stderr
    assert "The case is closed" in shown.stdout
    assert f"metadata.case_id: {case}" in shown.stdout
    assert "assessment_id, instrument, scores, need_level" in shown.stdout  # names only,
    assert "AUDIT" not in shown.stdout  # not values, unless asked for
    with_payload = likvard(stack, "dlq", "show", closed["id"], "--payload", token=token("auditor"))
    assert with_payload.returncode == 0, with_payload.stderr
    assert '"instrument": "AUDIT"' in with_payload.stdout

    # Mistakes get a message and exit code 2, and change nothing.
    assert likvard(stack, "dlq", "retry").returncode == 2
    wrong = likvard(stack, "dlq", "show", "seven")
    assert wrong.returncode == 2 and "<partition>:<offset>" in wrong.stderr
    missing = likvard(stack, "dlq", "retry", "5:99999")
    assert missing.returncode == 2 and "no dead letter has the id(s) 5:99999" in missing.stderr
    dry = likvard(stack, "dlq", "retry", "--all", "--dry-run")
    assert dry.returncode == 0 and "2 dead letter(s) would be re-submitted" in dry.stderr
    assert stored_types(stack, case) == ["IntakeRegistered", "CaseClosed"]

    # The fix: the case is reopened. Then both are retried: the assessment is stored, the
    # garbage is dead-lettered again and says which dead letter it retries.
    produce_all(
        bootstrap,
        stack.ingest_topic,
        [district.record("CaseReopened", case, {"reason": "RELAPSE"})],
    )
    wait_for(lambda: len(stored_types(stack, case)) == 3, 30, "the case to be reopened")
    retried = likvard(stack, "dlq", "retry", closed["id"], letters["not-single-object"]["id"])
    assert retried.returncode == 0, retried.stderr
    assert "re-submitted 2 dead letter(s)" in retried.stderr
    wait_for(
        lambda: stored_types(stack, case)[-1:] == ["AssessmentCompleted"],
        30,
        "the retried assessment to be stored",
    )
    stored = stack.stores["intake"].read_stream(case)[-1]
    assert str(stored.event_id) == late.event_id  # the district's id, kept through the retry
    wait_for(lambda: dead_letter_count(stack) == 3, 30, "the garbage's second dead letter")
    again = [x for x in listed(stack) if x["retry_of"]]
    assert len(again) == 1 and again[0]["retry_of"] == letters["not-single-object"]["id"]
    first = next(x for x in listed(stack) if x["id"] == letters["not-single-object"]["id"])
    assert first["retried_as"] == [again[0]["id"]]
    # --all skips dead letters whose retry failed again: only the newest copy is re-sent.
    dry = likvard(stack, "dlq", "retry", "--all", "--stage", "decode", "--dry-run")
    assert f"would re-submit {again[0]['id']}" in dry.stderr
    assert f"would re-submit {first['id']} " not in dry.stderr


def test_only_an_auditor_reads_a_dead_letters_payload_and_the_read_is_logged(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, schema: str, catalogue: Catalogue
) -> None:
    """`dlq show --payload` prints the refused record's values to a verified auditor token
    only; an ops token and an operating-system login (no token) are refused with exit 1
    and nothing of the record; `dlq show` without it stays operations' (codes, field
    names). The access log has the auditor's read, the ops token's refusal and its read."""
    from likvard.ingest import DEAD_LETTER_TOPIC, DeadLetterSink, Outcome, Rejected, SourceRecord

    case = str(uuid.uuid4())
    bad = DistrictSystem(catalogue).record("AssessmentCompleted", case, assessment())
    source = SourceRecord(topic_prefix + "likvard.district-ingest.v1", 0, 3, bad.key, bad.value, ())
    sink = DeadLetterSink(kafka_bootstrap, topic_prefix + DEAD_LETTER_TOPIC, "intake")
    try:
        rejected = Rejected("rule", "case-closed", "The case is closed; reopen it first.")
        sink.send(
            [Outcome(source, "dead-lettered", None, "AssessmentCompleted", rejection=rejected)]
        )
    finally:
        sink.close()
    (letter,) = dlq.read_all(kafka_bootstrap, topic_prefix + DEAD_LETTER_TOPIC, settle=0.2)
    env = {
        "LIKVARD_DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LIKVARD_TOPIC_PREFIX": topic_prefix,
        "LIKVARD_ACCESS_LOG_SCHEMA": schema,
    }
    auditor, ops = f"au-{uuid.uuid4().hex[:8]}", f"ops-{uuid.uuid4().hex[:8]}"
    show = ("dlq", "show", letter.id)

    read = run_cli({**env, "LIKVARD_TOKEN": token("auditor", subject=auditor)}, *show, "--payload")
    assert read.returncode == 0, read.stderr
    assert '"instrument": "AUDIT"' in read.stdout and '"need_level": "HIGH"' in read.stdout

    ops_token = token("ops", subject=ops)
    for who in (ops_token, ""):
        refused = run_cli({**env, "LIKVARD_TOKEN": who}, *show, "--payload")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "only an auditor may read it" in refused.stderr
        assert "LIKVARD_TOKEN" in refused.stderr
        assert refused.stdout == ""  # nothing of the record, not even its reason
        assert "AUDIT" not in refused.stderr and "HIGH" not in refused.stderr

    plain = run_cli({**env, "LIKVARD_TOKEN": ops_token}, *show)
    assert plain.returncode == 0, plain.stderr
    assert "rule/case-closed" in plain.stdout and "The case is closed" in plain.stdout
    assert "assessment_id, instrument, scores, need_level" in plain.stdout
    assert "AUDIT" not in plain.stdout and "HIGH" not in plain.stdout

    found = search(Settings(database_url=database_url), schema=schema)
    assert [(f.actor, f.action, f.resource, f.outcome) for f in found] == [
        (auditor, "history.replay", f"dead-letter:{letter.id}", "allowed"),
        (ops, "history.replay", f"dead-letter:{letter.id}", "refused"),
        (ops, "ops.read", f"dead-letter:{letter.id}", "allowed"),
    ]
    assert found[0].case_id == case and {f.service for f in found} == {"cli"}
