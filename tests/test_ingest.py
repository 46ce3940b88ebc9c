"""District systems produce straight to Kafka: valid events reach the owning service's event
store and topic exactly once; every bad record is in the dead-letter topic with its stage
and reason; the counts add up with nothing missing."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from typing import Any

import pytest

from likvard import dlq
from likvard.codec import Catalogue
from tests.district import (
    DistrictRecord,
    DistrictSystem,
    assessment,
    produce_all,
    referral_requested,
    registered,
)
from tests.support import IngestStack, Record, consume, wait_for

pytestmark = pytest.mark.integration


def unknown_schema(catalogue: Catalogue) -> dict[str, Any]:
    """AssessmentCompleted with a field the contract does not have: a fingerprint that is
    not in schemas/ (a district system that changed its copy of the schema)."""
    schema = catalogue.schema("AssessmentCompleted")
    schema["fields"].append({"name": "site_code", "type": "string"})
    return schema


def judged(stack: IngestStack) -> int:
    return sum(w.stats.judged for w in stack.workers.values())


def metric_points(stack: IngestStack) -> Counter[tuple[str, str, str]]:
    """(service, outcome, stage) -> count, from the in-memory metric reader."""
    counts: Counter[tuple[str, str, str]] = Counter()
    data = stack.metrics.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != "likvard.ingest.records":
                    continue
                for point in metric.data.data_points:
                    a = point.attributes or {}
                    key = (str(a["service"]), str(a["outcome"]), str(a.get("stage", "")))
                    counts[key] += int(point.value)  # type: ignore[union-attr]
    return counts


def test_district_records_are_stored_once_or_dead_lettered_with_their_reason(
    ingest_stack: IngestStack, catalogue: Catalogue
) -> None:
    stack = ingest_stack
    district = DistrictSystem(catalogue)
    case_a, case_b = str(uuid.uuid4()), str(uuid.uuid4())
    referral_id = str(uuid.uuid4())
    first_assessment = district.record("AssessmentCompleted", case_a, assessment())
    rng = random.Random(7)
    random_bytes = district.raw(case_a.encode(), bytes(rng.randrange(256) for _ in range(80)))
    unknown = district.record(
        "AssessmentCompleted",
        case_a,
        {**assessment(), "site_code": "N1"},
        schema=unknown_schema(catalogue),
    )
    on_closed = district.record("AssessmentCompleted", case_a, assessment())
    records = [
        district.record("IntakeRegistered", case_a, registered()),
        first_assessment,
        first_assessment,  # the district system sent it twice: a duplicate, not an error
        district.record("CaseClosed", case_a, {"reason": "GOALS_REACHED"}),
        on_closed,  # a rule violation: an assessment on a closed case
        unknown,
        random_bytes,
        district.record("IntakeRegistered", case_b, registered("cd")),
        district.record(
            "ReferralRequested",
            case_b,
            referral_requested(referral_id),
        ),
        district.record(
            "ChildrenInHouseholdRecorded", case_b, {"number_of_children": 2, "youngest_age": 7}
        ),
    ]
    where = produce_all(stack.settings.kafka_bootstrap or "", stack.ingest_topic, records)

    wait_for(lambda: judged(stack) >= len(records), 60, "every record to be judged")
    valid = [r for r in records if r not in (on_closed, unknown, random_bytes)]
    valid_ids = {r.event_id for r in valid}

    # Counts add up with nothing missing: each record judged by exactly one service.
    assert judged(stack) == len(records)
    stats = {s: w.stats for s, w in stack.workers.items()}
    assert sum(s.accepted for s in stats.values()) == len(valid_ids) == 6
    assert sum(s.duplicates for s in stats.values()) == 1
    dead = Counter[str]()
    for s in stats.values():
        dead.update(s.dead_lettered)
    assert dead == Counter({"decode": 1, "schema": 1, "rule": 1})
    for service, s in stats.items():
        assert s.skipped == len(records) - s.judged, service

    # The valid ones are in the owning service's event store exactly once ...
    stored = {service: [e for e in store.read_all()] for service, store in stack.stores.items()}
    by_id = Counter(str(e.event_id) for events in stored.values() for e in events)
    assert {i for i in valid_ids if by_id[i] == 1} == valid_ids
    assert [e.event_type for e in stored["intake"] if e.stream_id == case_a] == [
        "IntakeRegistered",
        "AssessmentCompleted",
        "CaseClosed",
    ]
    assert [e.event_type for e in stored["referral"]] == [
        "ReferralRequested",
        "ReferredAcrossDistrict",  # Likvärd's own conclusion, caused by the district's event
    ]
    assert stored["referral"][1].metadata["causation_id"] == records[8].event_id
    assert [e.event_type for e in stored["followup"]] == ["ChildrenInHouseholdRecorded"]
    assert stored["followup"][0].metadata["district"] == "nordost"  # the case's, as for HTTP
    ingested = stored["intake"][0].metadata
    assert ingested["producer"] == district.producer  # provenance kept
    assert ingested["actor"] == district.actor

    # ... and on its topic exactly once (the relay publishes what the store holds).
    expected = {"intake": 4, "referral": 2, "followup": 1}
    published: list[Record] = []
    for service, n in expected.items():
        records_on_topic = consume(
            stack.settings.kafka_bootstrap or "", stack.topics[service], at_least=n
        )
        assert len(records_on_topic) == n, service
        published += records_on_topic
    published_ids = Counter(r.headers["event_id"].decode() for r in published)
    assert set(published_ids) >= valid_ids
    assert all(n == 1 for n in published_ids.values())

    # Each bad one is in the dead-letter topic, unchanged, with the right stage and reason.
    letters = consume(stack.settings.kafka_bootstrap or "", stack.dead_letter_topic, at_least=3)
    assert len(letters) == 3
    got = {x.headers[dlq.STAGE].decode(): x for x in letters}
    assert set(got) == {"decode", "schema", "rule"}
    for stage, bad in (("decode", random_bytes), ("schema", unknown), ("rule", on_closed)):
        letter = got[stage]
        assert letter.value == bad.value and letter.key == bad.key
        index = records.index(bad)
        assert letter.headers[dlq.SOURCE_TOPIC].decode() == stack.ingest_topic
        assert int(letter.headers[dlq.SOURCE_PARTITION]) == where[index][0]
        assert int(letter.headers[dlq.SOURCE_OFFSET]) == where[index][1]
        assert letter.headers[dlq.REASON].decode().endswith(".")
    assert got["decode"].headers[dlq.CODE] == b"not-single-object"
    assert b"single-object marker" in got["decode"].headers[dlq.REASON]
    assert got["schema"].headers[dlq.CODE] == b"unknown-schema"
    assert b"fingerprint" in got["schema"].headers[dlq.REASON]
    assert got["rule"].headers[dlq.CODE] == b"case-closed"
    assert b"The case is closed" in got["rule"].headers[dlq.REASON]
    assert got["rule"].headers[dlq.SERVICE] == b"intake"
    assert got["rule"].headers["event_id"].decode() == on_closed.event_id  # own headers kept

    # The metrics say the same.
    points = metric_points(stack)
    assert points[("intake", "accepted", "")] == 4
    assert points[("referral", "accepted", "")] == 1
    assert points[("followup", "accepted", "")] == 1
    assert points[("intake", "duplicate", "")] == 1
    assert points[("intake", "dead_lettered", "decode")] == 1
    assert points[("intake", "dead_lettered", "schema")] == 1
    assert points[("intake", "dead_lettered", "rule")] == 1
    assert sum(points.values()) == len(records)


def test_a_concurrent_write_makes_the_batch_decide_again_on_the_new_state(
    database_url: str, new_schema: Any, catalogue: Catalogue
) -> None:
    """A case worker closes the case (HTTP) while an ingest batch decides an assessment on
    it: the batch's append fails on the stream version, it decides again on the closed
    case, and refuses the assessment. Never a lost update."""
    from likvard.config import Settings
    from likvard.ingest import INGEST_TOPIC, SourceRecord, StreamView
    from likvard.known_cases import KnownCase
    from services.intake import ingest as intake_ingest
    from tests.support import closed

    processor = intake_ingest.build(Settings(database_url=database_url), new_schema("i"))
    store = processor.store
    rules = processor.rules
    case = str(uuid.uuid4())
    district = DistrictSystem(catalogue)
    decided_on: list[int] = []

    class CaseWorkerMeanwhile:
        """The intake rules, while a case worker's close lands during the first decision."""

        service = "intake"
        stream_id = rules.stream_id
        needs_case = rules.needs_case
        district = rules.district

        def decide(self, event: Any, stream: StreamView, known: KnownCase | None) -> Any:
            decided_on.append(stream.version)
            if len(decided_on) == 1:
                store.append(case, stream.version, [closed()])
            return rules.decide(event, stream, known)

    try:
        first = district.record("IntakeRegistered", case, registered())
        processor.process([SourceRecord(INGEST_TOPIC, 0, 0, first.key, first.value, _h(first))])
        processor.rules = CaseWorkerMeanwhile()
        late = district.record("AssessmentCompleted", case, assessment())
        result = processor.process(
            [SourceRecord(INGEST_TOPIC, 0, 1, late.key, late.value, _h(late))]
        )
        assert decided_on == [1, 2]  # decided again on the version the close made
        (outcome,) = result.outcomes
        assert outcome.status == "dead-lettered" and outcome.rejection is not None
        assert outcome.rejection.code == "case-closed"
        assert [e.event_type for e in store.read_stream(case)] == ["IntakeRegistered", "CaseClosed"]
    finally:
        store.pool.close()


def _h(record: DistrictRecord) -> tuple[tuple[str, bytes | None], ...]:
    return tuple((k, v.encode() if isinstance(v, str) else v) for k, v in record.headers)
