"""Property: whatever bytes district systems send, the ingest path never crashes, and every
record ends stored (or a skipped duplicate of a stored event) or dead-lettered, judged by
exactly one service; the dead-letter topic holds exactly the records dead-lettered."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from likvard import dlq
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.ingest import (
    DEAD_LETTER_TOPIC,
    INGEST_TOPIC,
    DeadLetterSink,
    IngestWorker,
    SourceRecord,
)
from likvard.known_cases import CaseDirectory
from services.followup import ingest as followup_ingest
from services.intake import ingest as intake_ingest
from services.referral import ingest as referral_ingest
from tests.district import (
    DistrictRecord,
    DistrictSystem,
    Signature,
    assessment,
    referral_requested,
    registered,
    signed,
)
from tests.support import consume, intake_event

pytestmark = pytest.mark.integration

CASES = [str(uuid.UUID(int=n + 1)) for n in range(4)]
"""A small pool, so that generated events of one case meet each other's rules."""


@dataclass
class Judges:
    """The three services' ingest workers, driven batch by batch without a consumer."""

    workers: dict[str, IngestWorker]
    dead_letter_topic: str
    bootstrap: str
    offset: int = 0
    dead_lettered: int = 0
    accepted_ids: set[str] = field(default_factory=set)


@pytest.fixture
def judges(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, new_schema: Any
) -> Iterator[Judges]:
    config = Settings(
        database_url=database_url,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        case_wait_seconds=0,  # no consumer runs here: unknown cases are refused at once
    )
    builds = {
        "intake": intake_ingest.build,
        "referral": referral_ingest.build,
        "followup": followup_ingest.build,
    }
    workers = {
        service: IngestWorker(
            build(config, new_schema(service[0])),
            DeadLetterSink(kafka_bootstrap, config.topic(DEAD_LETTER_TOPIC), service),
        )
        for service, build in builds.items()
    }
    judges = Judges(workers, config.topic(DEAD_LETTER_TOPIC), kafka_bootstrap)
    try:
        # The pool's cases exist: registered with intake, and known to the other services
        # as if their consumers had read the registrations.
        judge(judges, [_DISTRICT.record("IntakeRegistered", c, registered()) for c in CASES])
        for service in ("referral", "followup"):
            store = workers[service].processor.store
            with store.pool.connection() as conn:
                CaseDirectory(store.schema).handle(
                    conn,
                    [
                        intake_event(c, "IntakeRegistered", {"district": "nordost"}, 1)
                        for c in CASES
                    ],
                )
        yield judges
    finally:
        for w in workers.values():
            w.sink.close()
            w.processor.store.pool.close()


# --- strategies -------------------------------------------------------------------------
_CATALOGUE = Catalogue.load()
_DISTRICT = DistrictSystem(_CATALOGUE)
_WHEN = st.datetimes(
    min_value=datetime(2021, 1, 1), max_value=datetime(2026, 11, 1), timezones=st.just(UTC)
)


@st.composite
def valid_records(draw: st.DrawFn) -> DistrictRecord:
    """Well-formed district events of the three services, with values that may or may not
    keep the rules (so every stage of judgement is reached)."""
    case = draw(st.sampled_from(CASES))
    when = draw(_WHEN)
    kind = draw(
        st.sampled_from(
            ["register", "assess", "close", "reopen", "transfer", "children", "family", "refer"]
        )
    )
    payload: dict[str, Any]
    if kind == "register":
        event_type, payload = "IntakeRegistered", registered(draw(st.sampled_from(["ab", "12"])))
        payload["birth_year"] = draw(st.integers(1890, 2030))
    elif kind == "assess":
        event_type, payload = "AssessmentCompleted", assessment()
        payload["scores"] = [{"scale": "total", "value": draw(st.integers(-5, 60))}]
    elif kind == "close":
        event_type, payload = "CaseClosed", {"reason": "GOALS_REACHED"}
    elif kind == "reopen":
        event_type, payload = "CaseReopened", {"reason": "RELAPSE"}
    elif kind == "transfer":
        event_type = "CaseTransferred"
        payload = {
            "from_district": draw(st.sampled_from(["nordost", "centrum"])),
            "to_district": draw(st.sampled_from(["centrum", "hisingen", "lundby"])),
            "reason": "PERSON_MOVED",
        }
    elif kind == "children":
        event_type = "ChildrenInHouseholdRecorded"
        payload = {"number_of_children": draw(st.integers(-1, 25)), "youngest_age": None}
    elif kind == "family":
        event_type = "FamilyMemberEngaged"
        payload = {
            "member_id": str(uuid.uuid4()),
            "relation": draw(st.sampled_from(["CHILD", "PARTNER"])),
            "is_child": draw(st.booleans()),
            "support_offered": ["INFORMATION"],
            "accepted": True,
        }
    else:
        event_type = "ReferralRequested"
        unit = draw(st.sampled_from(["centrum-beroendeteam", "region-beroendevard"]))
        payload = referral_requested(str(uuid.uuid4()), unit)
    return _DISTRICT.record(event_type, case, payload, occurred_at=when)


_SIGNING = st.sampled_from(["sign", "sign", "sign", "keep", "none", "broken"])
"""After a change: signed again (a system that signs its broken bytes: the later stages are
reached), the old signature kept (now wrong), none, or a spoilt one."""


def resign(record: DistrictRecord, how: str) -> DistrictRecord:
    if how == "keep":
        return record
    signature: Signature = "valid" if how == "sign" else "none" if how == "none" else "broken"
    headers = signed(record.key, record.value, record.headers, _DISTRICT.sign_as, signature)
    return replace(record, headers=headers)


@st.composite
def mutated(draw: st.DrawFn, record: DistrictRecord) -> DistrictRecord:
    """A valid record with bytes flipped, cut or added, or its key or headers changed."""
    value = bytearray(record.value or b"")
    how = draw(st.sampled_from(["none", "flip", "cut", "extend", "key", "headers"]))
    if how == "flip" and value:
        for _ in range(draw(st.integers(1, 4))):
            value[draw(st.integers(0, len(value) - 1))] = draw(st.integers(0, 255))
    elif how == "cut":
        del value[draw(st.integers(0, len(value))) :]
    elif how == "extend":
        value += draw(st.binary(min_size=1, max_size=8))
    elif how == "key":
        changed = replace(record, key=draw(st.none() | st.binary(max_size=40)))
        return resign(changed, draw(_SIGNING))
    elif how == "headers":
        changed = replace(record, headers=draw(st.lists(_header(), max_size=3)))
        return resign(changed, draw(_SIGNING))
    return resign(replace(record, value=bytes(value)), "keep" if how == "none" else draw(_SIGNING))


def _header() -> st.SearchStrategy[tuple[str, str | bytes | None]]:
    names = st.sampled_from(
        ["event_type", "event_id", "traceparent", "dlq_stage", "likvard-signature", "x"]
    )
    return st.tuples(names, st.none() | st.binary(max_size=40))


def arbitrary_records() -> st.SearchStrategy[DistrictRecord]:
    known_header = st.sampled_from([w.fingerprint for w in _CATALOGUE.writers()]).map(
        lambda fp: b"\xc3\x01" + fp
    )
    value = (
        st.none()
        | st.binary(max_size=120)
        | st.builds(lambda head, body: head + body, known_header, st.binary(max_size=120))
    )
    return st.builds(
        resign,
        st.builds(
            DistrictRecord,
            key=st.none() | st.binary(max_size=40),
            value=value,
            headers=st.lists(_header(), max_size=3),
        ),
        _SIGNING,
    )


records = st.one_of(
    valid_records(), valid_records(), valid_records().flatmap(mutated), arbitrary_records()
)


@st.composite
def batches_of_records(draw: st.DrawFn) -> list[DistrictRecord]:
    """A batch, some of whose records a district system sent twice."""
    batch = draw(st.lists(records, min_size=1, max_size=8))
    repeats = draw(st.lists(st.integers(0, len(batch) - 1), max_size=2))
    return batch + [batch[i] for i in repeats]


# --- the property -----------------------------------------------------------------------
def judge(judges: Judges, batch: list[DistrictRecord]) -> None:
    """One batch through every service's ingest worker, as their consumers would pass it."""
    source = [
        SourceRecord(
            INGEST_TOPIC,
            0,
            judges.offset + n,
            r.key,
            r.value,
            tuple((k, v.encode() if isinstance(v, str) else v) for k, v in r.headers),
        )
        for n, r in enumerate(batch)
    ]
    judges.offset += len(batch)
    judged: dict[int, str] = {}
    for service, worker in judges.workers.items():
        result = worker.handle(source)  # raises only on an outage, never on bad input
        assert result.skipped + len(result.outcomes) == len(batch)
        for outcome in result.outcomes:
            assert outcome.record.offset not in judged, "judged by two services"
            judged[outcome.record.offset] = service
            if outcome.status == "dead-lettered":
                assert outcome.rejection is not None
                assert outcome.rejection.stage in dlq.STAGES
                assert outcome.rejection.stage != "internal", outcome.rejection.reason
                judges.dead_lettered += 1
                continue
            assert outcome.event_id is not None
            stored = worker.processor.store.find_events([uuid.UUID(outcome.event_id)])
            assert len(stored) == 1  # accepted now, or a duplicate of one stored before
            if outcome.status == "accepted":
                assert outcome.event_id not in judges.accepted_ids
                judges.accepted_ids.add(outcome.event_id)
    assert sorted(judged) == [r.offset for r in source]  # every record judged exactly once


def test_every_record_is_stored_or_dead_lettered_and_nothing_crashes(judges: Judges) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(batch=batches_of_records())
    def batches(batch: list[DistrictRecord]) -> None:
        judge(judges, batch)

    batches()
    # The strategies reach every end of the path (acceptance in every service).
    stats = [w.stats for w in judges.workers.values()]
    assert all(s.accepted > 0 for s in stats)
    assert sum(s.duplicates for s in stats) > 0
    stages = {stage for s in stats for stage in s.dead_lettered}
    assert stages == {"signature", "decode", "schema", "rule"}
    # The dead-letter topic holds one dead letter per record dead-lettered, no more.
    letters = consume(judges.bootstrap, judges.dead_letter_topic, at_least=judges.dead_lettered)
    assert len(letters) == judges.dead_lettered
    assert {x.headers[dlq.STAGE].decode() for x in letters} <= set(dlq.STAGES)
