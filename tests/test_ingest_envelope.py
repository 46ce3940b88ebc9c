"""The pure parts of the district ingest path: opening a record's envelope (the decode and
schema stages, and the envelope's own rule checks), which service judges a record, the
check that a decider made exactly the event sent, derived event ids, and the dead-letter
helpers. No database, no Kafka: records are built by hand as the ingest topic would hold
them, encoded with Likvärd's codec or as an outside system would (`tests.district`)."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from likvard import dlq
from likvard.codec import DEFAULT_SCHEMAS_DIR, HEADER_SIZE, SINGLE_OBJECT_MARKER, Catalogue
from likvard.districts import DistrictRegistry
from likvard.domain import DomainEvent
from likvard.inbox import Incoming
from likvard.ingest import (
    DEFAULT_OWNER,
    FUTURE_TOLERANCE,
    Rejected,
    SourceRecord,
    check_matches,
    derived_event_id,
    ingest_owners,
    open_envelope,
    owner_of,
)
from services.followup import domain as followup_domain
from services.intake import domain as intake_domain
from services.referral import domain as referral_domain
from tests.district import DistrictSystem, single_object

CATALOGUE = Catalogue.load()
OWNERS = ingest_owners(CATALOGUE)
DISTRICTS = DistrictRegistry.load()
SERVICES = frozenset({"intake", "referral", "followup"})

TOPIC = "likvard.district-ingest.v1"
CASE = "6f1c2a9e-4b7d-4c1e-9a3f-0d2b8e5c7a10"
OTHER_CASE = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
EVENT_ID = "0b7e4f6a-1c2d-4e3f-8a9b-0c1d2e3f4a5b"
OTHER_EVENT_ID = "1c8f5a7b-2d3e-4f40-9b1c-1d2e3f4a5b6c"
ASSESSMENT = "2d9a6b8c-3e4f-4051-8c2d-2e3f4a5b6c7d"
REFERRAL = "7a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"
FOLLOWUP = "6b3e0f2a-7283-4495-8a61-6c7d8e9f0a1b"
PERSON = hashlib.sha256(b"a keyed pseudonym").hexdigest()
PNR = "19121212-1212"  # the Swedish test personal identity number (valid check digit)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)


# --- building records -------------------------------------------------------------------
PAYLOADS: dict[str, dict[str, Any]] = {
    "IntakeRegistered": {
        "person": PERSON,
        "district": "nordost",
        "substances": ["ALCOHOL"],
        "referral_source": "SELF",
        "children_in_household": "YES",
        "birth_year": 1980,
        "age_band": None,  # v2: Likvärd derives it
        "archive_sample": False,
        "gender": "NOT_STATED",  # v3: the default of a record that names none
        "personal": None,  # sent in clear; the intake store seals
    },
    "AssessmentCompleted": {
        "assessment_id": ASSESSMENT,
        "instrument": "AUDIT",
        "scores": [{"scale": "total", "value": 21}],
        "need_level": "HIGH",
    },
    "CarePlanAgreed": {
        "plan_id": "3e0b7c9d-4f50-4162-9d3e-3f4a5b6c7d8e",
        "goals": ["Sleep through the night", "Back at work by summer"],
        "person_participated": True,
        "review_on": date(2026, 6, 1),
        "personal": None,
    },
    "CaseClosed": {"reason": "GOALS_REACHED"},
    "ReferralAccepted": {"referral_id": REFERRAL, "planned_start": date(2026, 3, 16)},
    "FollowUpMissed": {"followup_id": FOLLOWUP, "kind": "ASI_6_MONTHS", "reason": "NO_CONTACT"},
}


def metadata(of: str, **overrides: Any) -> dict[str, Any]:
    """An event's metadata as a district system sends it; `overrides` replace fields."""
    meta: dict[str, Any] = {
        "event_id": EVENT_ID,
        "event_type": of,
        "case_id": CASE,
        "stream_version": 0,
        "occurred_at": T0,
        "recorded_at": T0,
        "producer": "nordost-treserva",
        "district": "nordost",
        "actor": "cw-4711",
        "correlation_id": "corr-17",
        "causation_id": None,
        "traceparent": TRACEPARENT,
    }
    meta.update(overrides)
    return meta


def encode(
    schema: str = "AssessmentCompleted",
    payload: dict[str, Any] | None = None,
    **meta: Any,
) -> bytes:
    """An event of type `schema` by Likvärd's codec; `meta` overrides metadata fields
    (metadata.event_type among them)."""
    record = {
        "metadata": metadata(schema, **meta),
        **(PAYLOADS[schema] if payload is None else payload),
    }
    return CATALOGUE.encode(schema, record)


def source(
    value: bytes | None,
    *,
    key: bytes | None = CASE.encode(),
    event_type: str | None = "AssessmentCompleted",
    event_id: str | None = EVENT_ID,
    headers: Sequence[tuple[str, bytes | None]] | None = None,
    offset: int = 41,
) -> SourceRecord:
    """A record as on the ingest topic; by default with the headers the contract asks for."""
    if headers is None:
        headers = []
        if event_type is not None:
            headers.append(("event_type", event_type.encode()))
        if event_id is not None:
            headers.append(("event_id", event_id.encode()))
    return SourceRecord(TOPIC, 3, offset, key, value, tuple(headers))


def valid(event_type: str = "AssessmentCompleted", **meta: Any) -> SourceRecord:
    """A record that keeps the contract, but for the metadata overridden."""
    return source(encode(event_type, **meta), event_type=event_type)


def opened(record: SourceRecord, now: datetime = NOW) -> Incoming:
    return open_envelope(record, CATALOGUE, DISTRICTS.is_known, now)


def refused(
    record: SourceRecord, stage: str, code: str, *secrets: str, now: datetime = NOW
) -> Rejected:
    """The refusal of a record: its stage and code, and a reason that quotes none of the
    offending values (`secrets`): reasons are printed, events hold personal data."""
    with pytest.raises(Rejected) as info:
        opened(record, now)
    rejected = info.value
    assert (rejected.stage, rejected.code) == (stage, code), rejected
    assert rejected.stage in dlq.STAGES
    assert rejected.reason.strip()
    for secret in secrets:
        assert secret not in rejected.reason
        assert secret not in str(rejected)
    return rejected


def without_logical_type(event_type: str, field_name: str) -> dict[str, Any]:
    """A copy of an event schema whose uuid field is a plain string: the same parsing
    canonical form (so the same fingerprint), but fastavro writes any text into it."""
    schema = CATALOGUE.schema(event_type)
    for f in schema["fields"]:
        if f["name"] == field_name:
            assert f["type"] == {"type": "string", "logicalType": "uuid"}
            f["type"] = "string"
            return schema
    raise AssertionError(f"{event_type} has no field {field_name}")


# --- a record that keeps the contract ---------------------------------------------------
def test_a_record_that_keeps_the_contract_opens_to_its_event() -> None:
    event = opened(valid())

    assert (event.topic, event.partition, event.offset) == (TOPIC, 3, 41)
    assert (event.event_id, event.event_type, event.case_id) == (
        EVENT_ID,
        "AssessmentCompleted",
        CASE,
    )
    assert event.data == PAYLOADS["AssessmentCompleted"]
    assert event.metadata["occurred_at"] == T0
    assert event.metadata["occurred_at"].utcoffset() == timedelta(0)
    assert event.metadata["producer"] == "nordost-treserva"
    assert "metadata" not in event.data


@pytest.mark.parametrize("event_type", sorted(PAYLOADS))
def test_events_of_every_service_open_with_their_payload(event_type: str) -> None:
    event = opened(valid(event_type))

    assert event.event_type == event_type
    assert event.data == PAYLOADS[event_type]


def test_a_record_encoded_as_an_outside_system_does_opens() -> None:
    district = DistrictSystem(CATALOGUE)
    sent = district.record("IntakeRegistered", CASE, PAYLOADS["IntakeRegistered"], occurred_at=T0)
    headers = tuple((k, v.encode() if isinstance(v, str) else v) for k, v in sent.headers)

    event = opened(source(sent.value, key=sent.key, headers=headers))

    assert event.event_id == sent.event_id
    assert event.data == PAYLOADS["IntakeRegistered"]
    assert event.metadata["actor"] == district.actor


def test_optional_metadata_may_be_null_and_headers_may_repeat_the_same_value() -> None:
    record = source(
        encode(traceparent=None, causation_id=None),
        headers=[
            ("event_type", b"AssessmentCompleted"),
            ("event_id", EVENT_ID.encode()),
            ("event_type", b"AssessmentCompleted"),
            ("traceparent", b"anything: only metadata.traceparent is checked"),
        ],
    )

    assert opened(record).event_id == EVENT_ID


def test_a_staff_id_of_digits_that_is_no_identity_number_is_a_valid_actor() -> None:
    assert opened(valid(actor="4711")).metadata["actor"] == "4711"


# --- decode stage -----------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, b""], ids=["none", "empty"])
def test_a_record_without_a_value_is_refused(value: bytes | None) -> None:
    refused(source(value), "decode", "empty-record")


@pytest.mark.parametrize(
    "value",
    [
        b'{"event_type": "IntakeRegistered", "person": "19121212-1212"}',
        b"\xc3\x01\x00",  # the marker, but shorter than the header
        b"\xc3",
    ],
    ids=["json", "short-header", "one-byte"],
)
def test_bytes_that_are_not_single_object_encoded_are_refused(value: bytes) -> None:
    refused(source(value), "decode", "not-single-object", PNR)


def test_a_truncated_body_is_a_corrupt_body() -> None:
    value = encode()
    refused(source(value[: HEADER_SIZE + 20]), "decode", "corrupt-body")


def test_bytes_after_the_record_make_a_corrupt_body() -> None:
    refused(source(encode() + b"\x00\x01"), "decode", "corrupt-body")


def test_a_body_that_is_not_the_writer_schemas_record_is_a_corrupt_body() -> None:
    # An IntakeRegistered header in front of an AssessmentCompleted body.
    header = SINGLE_OBJECT_MARKER + CATALOGUE.fingerprint("IntakeRegistered")
    body = encode()[HEADER_SIZE:]
    refused(source(header + body), "decode", "corrupt-body")


# --- schema stage -----------------------------------------------------------------------
def test_a_fingerprint_not_in_the_catalogue_is_an_unknown_schema() -> None:
    value = SINGLE_OBJECT_MARKER + b"\x01\x02\x03\x04\x05\x06\x07\x08" + encode()[HEADER_SIZE:]
    rejected = refused(source(value), "schema", "unknown-schema")
    assert "fingerprint" in rejected.reason


def test_a_district_systems_own_variant_of_a_schema_is_an_unknown_schema() -> None:
    schema = CATALOGUE.schema("AssessmentCompleted")
    schema["fields"].append({"name": "site_code", "type": "string"})
    sent = DistrictSystem(CATALOGUE).record(
        "AssessmentCompleted",
        CASE,
        {**PAYLOADS["AssessmentCompleted"], "site_code": "N1"},
        event_id=EVENT_ID,
        schema=schema,
    )

    refused(source(sent.value), "schema", "unknown-schema")


def test_an_old_version_the_newest_schema_cannot_read_is_an_incompatible_schema(
    tmp_path: Path,
) -> None:
    # A v2 of CaseClosed with a new field and no default: v1 bytes cannot be resolved to it.
    root = tmp_path / "schemas"
    shutil.copytree(DEFAULT_SCHEMAS_DIR, root)
    v1 = json.loads((root / "intake" / "CaseClosed.v1.avsc").read_text(encoding="utf-8"))
    v1["fields"].append({"name": "closed_by_unit", "type": "string"})
    (root / "intake" / "CaseClosed.v2.avsc").write_text(json.dumps(v1), encoding="utf-8")
    catalogue = Catalogue.load(root)
    value = catalogue.encode(
        "CaseClosed", {"metadata": metadata("CaseClosed"), **PAYLOADS["CaseClosed"]}, version=1
    )

    with pytest.raises(Rejected) as info:
        open_envelope(source(value, event_type="CaseClosed"), catalogue, DISTRICTS.is_known, NOW)

    assert (info.value.stage, info.value.code) == ("schema", "incompatible-schema")
    assert "GOALS_REACHED" not in info.value.reason


def test_a_uuid_field_that_is_not_a_uuid_is_a_malformed_value() -> None:
    schema = without_logical_type("AssessmentCompleted", "assessment_id")
    record = {
        "metadata": metadata("AssessmentCompleted"),
        **PAYLOADS["AssessmentCompleted"],
        "assessment_id": PNR,  # personal data where an id belongs
    }
    value = single_object(schema, record)
    assert value[:HEADER_SIZE] == encode()[:HEADER_SIZE]  # the catalogue's fingerprint

    refused(source(value), "schema", "malformed-value", PNR)


def test_metadata_naming_another_event_type_than_its_schema_is_refused() -> None:
    record = source(encode(event_type="CaseClosed"), event_type="CaseClosed")
    rejected = refused(record, "schema", "event-type-mismatch", "CaseClosed")
    assert "AssessmentCompleted" in rejected.reason  # what the schema says it is


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ([("event_id", EVENT_ID.encode())], "header-missing"),
        ([("event_type", b"AssessmentCompleted")], "header-missing"),
        ([], "header-missing"),
        ([("event_type", b"CaseClosed"), ("event_id", EVENT_ID.encode())], "header-mismatch"),
        (
            [("event_type", b"AssessmentCompleted"), ("event_id", OTHER_EVENT_ID.encode())],
            "header-mismatch",
        ),
        ([("event_type", None), ("event_id", EVENT_ID.encode())], "header-mismatch"),
        (
            [
                ("event_type", b"AssessmentCompleted"),
                ("event_type", b"CaseClosed"),
                ("event_id", EVENT_ID.encode()),
            ],
            "header-mismatch",
        ),
        (
            [("event_type", b"AssessmentCompleted"), ("event_id", ("{" + EVENT_ID + "}").encode())],
            "header-mismatch",
        ),
    ],
    ids=[
        "no-event-type",
        "no-event-id",
        "no-headers",
        "other-type",
        "other-id",
        "null-type",
        "one-of-two-differs",
        "braced-id",
    ],
)
def test_headers_must_repeat_the_events_type_and_id(
    headers: list[tuple[str, bytes | None]], code: str
) -> None:
    refused(
        source(encode(), headers=headers),
        "schema",
        code,
        "CaseClosed",
        OTHER_EVENT_ID,
        EVENT_ID.upper(),
    )


def test_an_event_id_header_in_upper_case_names_the_same_event() -> None:
    headers: list[tuple[str, bytes | None]] = [
        ("event_type", b"AssessmentCompleted"),
        ("event_id", EVENT_ID.upper().encode()),
    ]
    assert opened(source(encode(), headers=headers)).event_id == EVENT_ID


@pytest.mark.parametrize(
    "case_id",
    [
        "case-42",
        CASE.upper(),
        "{" + CASE + "}",
        CASE.replace("-", ""),
        "urn:uuid:" + CASE,
        PNR,
    ],
    ids=["text", "uppercase", "braces", "no-hyphens", "urn", "identity-number"],
)
def test_the_case_id_must_be_a_canonical_uuid(case_id: str) -> None:
    record = source(encode(case_id=case_id), key=case_id.encode())
    rejected = refused(record, "schema", "case-id-not-uuid", PNR)
    assert case_id not in rejected.reason


def test_an_empty_case_id_is_not_a_uuid() -> None:
    refused(source(encode(case_id=""), key=b""), "schema", "case-id-not-uuid")


def test_a_record_without_a_key_is_refused() -> None:
    refused(source(encode(), key=None), "schema", "key-missing")


@pytest.mark.parametrize(
    "key",
    [OTHER_CASE.encode(), CASE.upper().encode(), b"", (CASE + " ").encode(), PNR.encode()],
    ids=["another-case", "uppercase", "empty", "trailing-space", "identity-number"],
)
def test_the_key_must_be_the_case_id(key: bytes) -> None:
    refused(source(encode(), key=key), "schema", "key-mismatch", OTHER_CASE, PNR)


@pytest.mark.parametrize(
    "producer",
    ["", "nordost treserva", "Anna Andersson", "x" * 65, "nordost/treserva", "likvärd"],
    ids=["empty", "space", "name", "too-long", "slash", "non-ascii"],
)
def test_the_producer_must_be_an_id(producer: str) -> None:
    rejected = refused(valid(producer=producer), "schema", "producer-invalid")
    if producer:
        assert producer not in rejected.reason


def test_a_producer_id_of_64_characters_is_allowed() -> None:
    assert opened(valid(producer="p" * 64)).metadata["producer"] == "p" * 64


@pytest.mark.parametrize("producer", ["likvard-intake", "likvard", "LIKVARD-referral"])
def test_a_district_system_may_not_pass_itself_off_as_likvard(producer: str) -> None:
    refused(valid(producer=producer), "schema", "producer-reserved", producer)


@pytest.mark.parametrize(
    "actor",
    ["", "Anna Andersson", "a" * 65, "anna@example.se"],
    ids=["empty", "name", "too-long", "email"],
)
def test_the_actor_must_be_a_pseudonymous_id(actor: str) -> None:
    rejected = refused(valid(actor=actor), "schema", "actor-invalid")
    if actor:
        assert actor not in rejected.reason


@pytest.mark.parametrize(
    "actor",
    [PNR, "191212121212", "121212-1212", "1212121212", "19121272-1219"],
    ids=["12-digits-hyphen", "12-digits", "10-digits-hyphen", "10-digits", "coordination"],
)
def test_the_actor_may_not_be_a_personal_identity_number(actor: str) -> None:
    refused(valid(actor=actor), "schema", "actor-is-identity-number", actor)


@pytest.mark.parametrize(
    ("field", "value"),
    [("correlation_id", ""), ("correlation_id", "c" * 129), ("causation_id", "")],
    ids=["empty-correlation", "long-correlation", "empty-causation"],
)
def test_correlation_and_causation_ids_must_be_1_to_128_characters(field: str, value: str) -> None:
    code = field.replace("_", "-") + "-invalid"
    rejected = refused(valid(**{field: value}), "schema", code)
    if value:
        assert value not in rejected.reason


def test_ids_of_128_characters_are_allowed() -> None:
    event = opened(valid(correlation_id="c" * 128, causation_id="k" * 128))
    assert (len(event.metadata["correlation_id"]), len(event.metadata["causation_id"])) == (
        128,
        128,
    )


@pytest.mark.parametrize(
    "traceparent",
    [
        "not-a-trace",
        TRACEPARENT.upper(),
        TRACEPARENT[:-1],
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    ],
    ids=["text", "uppercase", "short-flags", "empty", "no-flags"],
)
def test_the_traceparent_must_be_a_w3c_traceparent(traceparent: str) -> None:
    rejected = refused(valid(traceparent=traceparent), "schema", "traceparent-invalid")
    if traceparent:
        assert traceparent not in rejected.reason


@pytest.mark.parametrize(
    ("event_type", "payload", "meta"),
    [
        (
            "CarePlanAgreed",
            {**PAYLOADS["CarePlanAgreed"], "goals": ["Sleep\x00 well"]},
            {},
        ),
        (
            "AssessmentCompleted",
            {**PAYLOADS["AssessmentCompleted"], "scores": [{"scale": "to\x00tal", "value": 3}]},
            {},
        ),
        ("IntakeRegistered", {**PAYLOADS["IntakeRegistered"], "district": "nord\x00ost"}, {}),
        ("AssessmentCompleted", None, {"correlation_id": "corr\x00-17"}),
        ("AssessmentCompleted", None, {"causation_id": "\x00"}),
    ],
    ids=["in-a-list", "in-a-nested-record", "in-a-payload-field", "in-metadata", "nul-only"],
)
def test_no_text_may_hold_the_nul_character(
    event_type: str, payload: dict[str, Any] | None, meta: dict[str, Any]
) -> None:
    record = source(encode(event_type, payload, **meta), event_type=event_type)
    refused(record, "schema", "nul-character", "\x00")


def test_metadata_must_name_a_known_district() -> None:
    refused(valid(district="atlantis"), "rule", "unknown-district", "atlantis")


def test_a_district_of_the_old_structure_is_still_a_known_district() -> None:
    # Reorganised away in 2021, but a code the reference data knows (history is replayed).
    assert opened(valid(district="angered")).metadata["district"] == "angered"


@pytest.mark.parametrize(
    "ahead",
    [FUTURE_TOLERANCE + timedelta(microseconds=1), timedelta(days=1), timedelta(days=3650)],
    ids=["just-over-tolerance", "tomorrow", "in-ten-years"],
)
def test_an_event_may_not_have_occurred_in_the_future(ahead: timedelta) -> None:
    refused(valid(occurred_at=NOW + ahead), "rule", "occurred-in-future", now=NOW)


@pytest.mark.parametrize(
    "ahead",
    [FUTURE_TOLERANCE, timedelta(0), -timedelta(days=365)],
    ids=["at-tolerance", "now", "a-year-ago"],
)
def test_a_clock_running_a_little_fast_is_tolerated(ahead: timedelta) -> None:
    event = opened(valid(occurred_at=NOW + ahead), now=NOW)
    assert event.metadata["occurred_at"] == NOW + ahead


def test_a_record_breaking_several_rules_is_refused_at_the_first_stage() -> None:
    # An unknown district (rule) is not looked at when the key is missing (schema).
    record = source(encode(district="atlantis"), key=None)
    refused(record, "schema", "key-missing")


def test_a_producer_with_a_trailing_newline_is_refused() -> None:
    refused(valid(producer="nordost-treserva\n"), "schema", "producer-invalid")


def test_an_actor_with_a_trailing_newline_is_refused() -> None:
    refused(valid(actor="cw-4711\n"), "schema", "actor-invalid")


def test_a_traceparent_with_a_trailing_newline_is_refused() -> None:
    refused(valid(traceparent=TRACEPARENT + "\n"), "schema", "traceparent-invalid")


# --- which service judges a record ------------------------------------------------------
# The event types each service's decider folds: independent of the schema folders.
INTAKE_TYPES = set(intake_domain.EVENT_TYPES)
REFERRAL_TYPES = set(referral_domain.EVENT_TYPES)
FOLLOWUP_TYPES = set(followup_domain.EVENT_TYPES)


def test_every_event_type_is_owned_by_the_service_of_its_schema_folder() -> None:
    """... and one no district system may send (Likvärd's own access log) goes to the
    default owner, which refuses it."""
    district_types = INTAKE_TYPES | REFERRAL_TYPES | FOLLOWUP_TYPES
    expected = {
        **dict.fromkeys(set(CATALOGUE.event_types()) - district_types, DEFAULT_OWNER),
        **dict.fromkeys(INTAKE_TYPES, "intake"),
        **dict.fromkeys(REFERRAL_TYPES, "referral"),
        **dict.fromkeys(FOLLOWUP_TYPES, "followup"),
    }
    assert expected == OWNERS
    assert set(OWNERS.values()) <= SERVICES


@pytest.mark.parametrize(
    "event_type",
    sorted(set(CATALOGUE.event_types()) - (INTAKE_TYPES | REFERRAL_TYPES | FOLLOWUP_TYPES)),
)
def test_an_event_type_of_likvards_own_is_refused(event_type: str) -> None:
    value = SINGLE_OBJECT_MARKER + CATALOGUE.fingerprint(event_type) + b"any body"
    assert owner_of(source(value, headers=[]), CATALOGUE, OWNERS) == DEFAULT_OWNER
    assert CATALOGUE.owner(event_type) not in SERVICES


def test_a_district_system_cannot_write_the_access_log() -> None:
    payload = {
        "actor": "cw-4711",
        "roles": "case-worker",
        "action": "case:read",
        "resource": f"case:{CASE}",
        "case_id": CASE,
        "outcome": "allowed",
        "reason": "own-district",
        "emergency_reason": None,
        "service": "intake",
        "trace_id": None,
        "accessed_at": T0,
    }
    record = source(encode("CaseAccessed", payload), event_type="CaseAccessed")
    refused(record, "schema", "not-a-district-event")


@pytest.mark.parametrize("event_type", sorted(INTAKE_TYPES | REFERRAL_TYPES | FOLLOWUP_TYPES))
def test_the_fingerprint_tells_the_owner(event_type: str) -> None:
    value = SINGLE_OBJECT_MARKER + CATALOGUE.fingerprint(event_type) + b"any body"
    record = source(value, headers=[])
    assert owner_of(record, CATALOGUE, OWNERS) == OWNERS[event_type]


def test_the_fingerprint_wins_over_the_event_type_header() -> None:
    record = source(encode(), event_type="FollowUpMissed")
    assert owner_of(record, CATALOGUE, OWNERS) == "intake"
    record = source(encode("FollowUpMissed"), event_type="AssessmentCompleted")
    assert owner_of(record, CATALOGUE, OWNERS) == "followup"


def test_without_a_known_fingerprint_the_event_type_header_tells_the_owner() -> None:
    unknown = SINGLE_OBJECT_MARKER + b"\xff" * 8 + b"body"
    assert owner_of(source(unknown, event_type="ReferralAccepted"), CATALOGUE, OWNERS) == (
        "referral"
    )
    assert owner_of(source(b"not avro", event_type="FollowUpMissed"), CATALOGUE, OWNERS) == (
        "followup"
    )
    assert owner_of(source(None, event_type="ReferralDeclined"), CATALOGUE, OWNERS) == ("referral")


def test_the_first_event_type_header_naming_an_event_type_counts() -> None:
    record = source(
        b"not avro",
        headers=[
            ("event_type", None),
            ("event_type", b"\xff\xfe"),
            ("event_type", b"NoSuchEvent"),
            ("event_type", b"FollowUpCompleted"),
            ("event_type", b"ReferralAccepted"),
        ],
    )
    assert owner_of(record, CATALOGUE, OWNERS) == "followup"


@pytest.mark.parametrize(
    "record",
    [
        source(None, headers=[]),
        source(b"random bytes", headers=[("Event_Type", b"ReferralAccepted")]),
        source(b"random bytes", event_type="NoSuchEvent"),
        source(b"random bytes", event_type="referralaccepted"),
        source(SINGLE_OBJECT_MARKER + b"\x00" * 8, headers=[]),
    ],
    ids=["nothing", "header-name-case", "unknown-type", "type-case", "unknown-fingerprint"],
)
def test_a_record_whose_type_cannot_be_told_is_judged_by_intake(record: SourceRecord) -> None:
    assert DEFAULT_OWNER == "intake"
    assert owner_of(record, CATALOGUE, OWNERS) == "intake"


# --- the decider must make exactly the event sent ---------------------------------------
def incoming(event_type: str, data: dict[str, Any]) -> Incoming:
    return Incoming(
        TOPIC, 0, 7, EVENT_ID, event_type, CASE, metadata(event_type, occurred_at=T0), data
    )


TRANSFER = {"from_district": "nordost", "to_district": "centrum", "reason": "PERSON_MOVED"}


def test_nothing_decided_matches_anything() -> None:
    # A repeat the decider recognises (nothing new) is never a mismatch: no Rejected.
    check_matches(incoming("CaseTransferred", {**TRANSFER, "from_district": "sydvast"}), [])


def test_the_same_event_matches() -> None:
    decided = [DomainEvent("CaseTransferred", dict(TRANSFER), T0)]
    check_matches(incoming("CaseTransferred", TRANSFER), decided)  # no Rejected


def test_only_the_first_decided_event_is_compared() -> None:
    sent = {"referral_id": REFERRAL, "unit_id": "centrum-beroendeteam"}
    decided = [
        DomainEvent("ReferralRequested", dict(sent), T0),
        DomainEvent("ReferredAcrossDistrict", {"referral_id": REFERRAL, "x": 1}, T0),
    ]
    check_matches(incoming("ReferralRequested", sent), decided)  # no Rejected


def test_fields_that_differ_from_what_likvard_derives_are_named_not_quoted() -> None:
    sent = {**TRANSFER, "from_district": "sydvast", "reason": "OTHER"}
    decided = [DomainEvent("CaseTransferred", dict(TRANSFER), T0)]

    with pytest.raises(Rejected) as info:
        check_matches(incoming("CaseTransferred", sent), decided)

    rejected = info.value
    assert (rejected.stage, rejected.code) == ("rule", "derived-fields-differ")
    assert "from_district, reason" in rejected.reason
    assert "CaseTransferred" in rejected.reason
    for value in ("sydvast", "OTHER", "nordost", "PERSON_MOVED"):
        assert value not in rejected.reason


def test_a_field_only_one_side_has_differs() -> None:
    decided = [DomainEvent("CaseTransferred", {**TRANSFER, "extra": "derived"}, T0)]
    with pytest.raises(Rejected) as info:
        check_matches(incoming("CaseTransferred", {**TRANSFER, "other": PNR}), decided)
    assert info.value.code == "derived-fields-differ"
    assert "extra, other" in info.value.reason
    assert PNR not in info.value.reason
    assert "derived" not in info.value.reason


def test_a_decider_making_another_event_type_is_a_bug_not_a_refusal() -> None:
    decided = [DomainEvent("CaseClosed", {"reason": "OTHER"}, T0)]
    with pytest.raises(RuntimeError):
        check_matches(incoming("CaseTransferred", TRANSFER), decided)


# --- derived event ids ------------------------------------------------------------------
def test_derived_event_ids_never_change() -> None:
    # Pinned: a re-ingested event must derive the very same ids, in every release.
    assert derived_event_id(EVENT_ID, 1, "ReferredAcrossDistrict") == uuid.UUID(
        "04fd9eaf-99c9-5ac3-bf4a-7f45d247cf4d"
    )


def test_derived_event_ids_are_deterministic_and_distinct() -> None:
    first = derived_event_id(EVENT_ID, 1, "ReferredAcrossDistrict")
    assert derived_event_id(EVENT_ID, 1, "ReferredAcrossDistrict") == first
    assert first.version == 5
    others = {
        derived_event_id(EVENT_ID, 2, "ReferredAcrossDistrict"),
        derived_event_id(EVENT_ID, 1, "ReferralRequested"),
        derived_event_id(OTHER_EVENT_ID, 1, "ReferredAcrossDistrict"),
    }
    assert len(others) == 3
    assert first not in others
    assert str(first) != EVENT_ID


# --- dead letters -----------------------------------------------------------------------
FAILED_AT = datetime(2026, 3, 9, 12, 30, tzinfo=UTC)


def letter_headers(**kwargs: Any) -> list[tuple[str, str | bytes | None]]:
    args: dict[str, Any] = {
        "stage": "rule",
        "code": "case-closed",
        "reason": "The case is closed; reopen it first (Likvärd).",
        "service": "intake",
        "source": (TOPIC, 3, 41),
        "failed_at": FAILED_AT,
    }
    args.update(kwargs)
    own: list[tuple[str, str | bytes | None]] = [
        ("event_type", b"AssessmentCompleted"),
        ("event_id", EVENT_ID.encode()),
    ]
    return dlq.dead_letter_headers(own, **args)


def letter(
    partition: int = 0, offset: int = 17, headers: Sequence[tuple[str, Any]] | None = None
) -> dlq.DeadLetter:
    raw = letter_headers() if headers is None else headers
    as_bytes = tuple((k, v.encode() if isinstance(v, str) else v) for k, v in raw)
    return dlq.DeadLetter(partition, offset, CASE.encode(), b"value", as_bytes)


def test_dead_letter_headers_keep_the_records_own_then_say_why_and_where() -> None:
    headers = letter_headers()

    assert headers[:2] == [("event_type", b"AssessmentCompleted"), ("event_id", EVENT_ID.encode())]
    assert dict(headers[2:]) == {
        dlq.REASON: "The case is closed; reopen it first (Likvärd).".encode(),
        dlq.STAGE: b"rule",
        dlq.CODE: b"case-closed",
        dlq.SERVICE: b"intake",
        dlq.FAILED_AT: FAILED_AT.isoformat().encode(),
        dlq.SOURCE_TOPIC: TOPIC.encode(),
        dlq.SOURCE_PARTITION: b"3",
        dlq.SOURCE_OFFSET: b"41",
    }
    assert all(isinstance(v, bytes) for _k, v in headers[2:])


def test_a_dead_letter_reads_back_what_its_headers_say() -> None:
    x = letter(partition=2, offset=17)

    assert x.id == "2:17"
    assert (x.stage, x.code, x.service) == ("rule", "case-closed", "intake")
    assert x.reason == "The case is closed; reopen it first (Likvärd)."
    assert datetime.fromisoformat(x.failed_at) == FAILED_AT
    assert x.source == (TOPIC, 3, 41)
    assert (x.event_type, x.event_id) == ("AssessmentCompleted", EVENT_ID)
    assert x.retry_of == ""


def test_a_dead_letter_header_is_its_last_value_and_empty_when_absent() -> None:
    x = letter(headers=[(dlq.CODE, b"first"), (dlq.CODE, b"second"), ("event_id", None)])

    assert x.code == "second"
    assert x.event_id == ""
    assert x.stage == ""
    assert x.header("no-such-header") == ""
    assert x.header(dlq.CODE) == "second"


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(dlq.SOURCE_TOPIC, b"t"), (dlq.SOURCE_PARTITION, b"0")],
        [(dlq.SOURCE_TOPIC, b"t"), (dlq.SOURCE_PARTITION, b"-1"), (dlq.SOURCE_OFFSET, b"4")],
        [(dlq.SOURCE_TOPIC, b"t"), (dlq.SOURCE_PARTITION, b"0"), (dlq.SOURCE_OFFSET, b"x")],
    ],
    ids=["none", "no-offset", "negative-partition", "offset-not-a-number"],
)
def test_a_dead_letter_without_a_readable_source_has_none(
    headers: list[tuple[str, bytes]],
) -> None:
    assert letter(headers=headers).source is None


def test_own_headers_drop_dead_letter_headers_but_keep_the_retry_link() -> None:
    headers: list[tuple[str, str | bytes | None]] = [
        ("event_type", b"AssessmentCompleted"),
        (dlq.REASON, b"old reason"),
        (dlq.STAGE, "schema"),
        (dlq.RETRY_OF, b"0:17"),
        ("traceparent", None),
        ("dlq_anything_else", b"x"),
    ]

    assert dlq.own_headers(headers) == [
        ("event_type", b"AssessmentCompleted"),
        (dlq.RETRY_OF, b"0:17"),
        ("traceparent", None),
    ]


def test_a_retried_record_dead_lettered_again_carries_only_its_new_reason() -> None:
    first = letter_headers()
    retried = [*dlq.own_headers(first), (dlq.RETRY_OF, b"0:17")]

    again = dlq.dead_letter_headers(
        retried,
        stage="schema",
        code="key-mismatch",
        reason="The record's key is not its event's case id.",
        service="referral",
        source=(TOPIC, 1, 99),
        failed_at=FAILED_AT + timedelta(days=1),
    )
    x = letter(partition=0, offset=23, headers=again)

    assert [k for k, _v in again].count(dlq.STAGE) == 1
    assert (x.stage, x.code, x.service) == ("schema", "key-mismatch", "referral")
    assert x.source == (TOPIC, 1, 99)
    assert x.retry_of == "0:17"
    assert x.event_id == EVENT_ID


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0:17", (0, 17)), (" 12:0 ", (12, 0)), ("3:0041", (3, 41))],
)
def test_a_dead_letter_id_is_partition_colon_offset(text: str, expected: tuple[int, int]) -> None:
    assert dlq.parse_id(text) == expected


@pytest.mark.parametrize("text", ["", "17", "0-17", "a:b", "-1:2", "1:2:3", "0: 17", "0:17x"])
def test_anything_else_is_not_a_dead_letter_id(text: str) -> None:
    with pytest.raises(ValueError, match="<partition>:<offset>"):
        dlq.parse_id(text)


def _letters() -> list[dlq.DeadLetter]:
    return [
        letter(0, 1, letter_headers()),
        letter(0, 2, letter_headers(stage="schema", code="key-missing", service="referral")),
        letter(1, 1, letter_headers(stage="rule", code="case-not-found", service="referral")),
        letter(
            1,
            2,
            [
                *dlq.dead_letter_headers(
                    [("event_type", b"ReferralAccepted"), (dlq.RETRY_OF, b"1:1")],
                    stage="rule",
                    code="case-not-found",
                    reason="Not yet seen.",
                    service="referral",
                    source=(TOPIC, 0, 5),
                    failed_at=FAILED_AT,
                )
            ],
        ),
        letter(
            1,
            3,
            dlq.dead_letter_headers(
                [(dlq.RETRY_OF, b"1:1")],
                stage="decode",
                code="empty-record",
                reason="No value.",
                service="intake",
                source=(TOPIC, 0, 6),
                failed_at=FAILED_AT,
            ),
        ),
    ]


def ids(letters: Sequence[dlq.DeadLetter]) -> list[str]:
    return [x.id for x in letters]


def test_select_keeps_the_dead_letters_matching_every_filter() -> None:
    letters = _letters()

    assert ids(dlq.select(letters)) == ["0:1", "0:2", "1:1", "1:2", "1:3"]
    assert ids(dlq.select(letters, stage="rule")) == ["0:1", "1:1", "1:2"]
    assert ids(dlq.select(letters, stage="rule", service="referral")) == ["1:1", "1:2"]
    assert ids(dlq.select(letters, code="case-not-found", event_type="ReferralAccepted")) == ["1:2"]
    assert ids(dlq.select(letters, event_type="AssessmentCompleted", stage="rule")) == [
        "0:1",
        "1:1",
    ]
    assert dlq.select(letters, stage="internal") == []


def test_retried_by_links_each_dead_letter_to_the_ones_its_retries_became() -> None:
    assert dlq.retried_by(_letters()) == {"1:1": ["1:2", "1:3"]}
    assert dlq.retried_by([]) == {}


def test_find_gives_the_dead_letters_in_the_order_asked() -> None:
    letters = _letters()

    assert ids(dlq.find(letters, ["1:3", " 0:1 ", "1:1"])) == ["1:3", "0:1", "1:1"]
    assert dlq.find(letters, []) == []


def test_find_names_the_ids_no_dead_letter_has() -> None:
    with pytest.raises(ValueError, match="9:9, 0:3"):
        dlq.find(_letters(), ["0:1", "9:9", "0:3"])


def test_find_refuses_what_is_not_an_id() -> None:
    with pytest.raises(ValueError, match="<partition>:<offset>"):
        dlq.find(_letters(), ["0:1", "first"])


# --- properties -------------------------------------------------------------------------
HEADER_NAMES = st.sampled_from(["event_type", "event_id", "traceparent", "dlq_retry_of"]) | (
    st.text(max_size=12)
)
HEADER_VALUES = (
    st.none()
    | st.binary(max_size=40)
    | st.sampled_from([t.encode() for t in sorted(OWNERS)] + [EVENT_ID.encode()])
)
KNOWN_HEADERS = st.sampled_from(
    [SINGLE_OBJECT_MARKER + CATALOGUE.fingerprint(t) for t in CATALOGUE.event_types()]
)
VALUES = (
    st.none()
    | st.binary(max_size=200)
    | st.builds(lambda h, body: h + body, KNOWN_HEADERS, st.binary(max_size=200))
)
KEYS = st.none() | st.binary(max_size=40) | st.just(CASE.encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=VALUES,
    key=KEYS,
    headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5),
)
def test_any_record_is_opened_or_refused_with_a_known_stage(
    value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    record = source(value, key=key, headers=headers)

    assert owner_of(record, CATALOGUE, OWNERS) in SERVICES
    try:
        event = opened(record)
    except Rejected as rejected:
        assert rejected.stage in dlq.STAGES
        assert rejected.code
    else:  # only possible if the bytes happen to be a valid event
        assert event.event_type in OWNERS


VALID_VALUES = [encode(t) for t in sorted(PAYLOADS)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(min_value=0, max_value=len(VALID_VALUES) - 1),
    mutations=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=4,
    ),
)
def test_a_mutated_valid_record_is_an_event_or_refused(
    which: int, mutations: list[tuple[int, int]]
) -> None:
    value = bytearray(VALID_VALUES[which])
    for position, byte in mutations:
        value[position % len(value)] = byte
    event_type = sorted(PAYLOADS)[which]
    record = source(bytes(value), event_type=event_type)

    assert owner_of(record, CATALOGUE, OWNERS) in SERVICES
    try:
        event = opened(record)
    except Rejected as rejected:
        assert rejected.stage in dlq.STAGES
        assert rejected.stage != "internal"
    else:
        assert event.event_type in OWNERS
        assert event.case_id == CASE  # else the key check would have refused it


def test_the_mutation_property_can_see_both_outcomes() -> None:
    # The property above is not vacuous: an unchanged record opens, a changed marker not.
    value = VALID_VALUES[0]
    assert opened(source(value, event_type=sorted(PAYLOADS)[0])).event_id == EVENT_ID
    broken = bytes([0x00]) + value[1:]
    refused(source(broken, event_type=sorted(PAYLOADS)[0]), "decode", "not-single-object")


# --- the signature stage for a batch ---------------------------------------------------
def test_a_batch_of_signatures_gives_each_record_its_own_refusal() -> None:
    """`check_signatures` answers per record as `check_signature` does; a fault of Likvärd's
    in the batch path costs only the record it is about (internal), never the batch."""
    from likvard.district_keys import SIGNATURE_HEADER, DistrictKeys
    from likvard.ingest import check_signature, check_signatures

    keys = DistrictKeys(districts=DISTRICTS)
    system = DistrictSystem(CATALOGUE)
    raw = [system.raw(CASE.encode(), b"\xc3\x01" + bytes([n]) * 40) for n in range(3)]
    good = [
        SourceRecord(
            TOPIC,
            0,
            n,
            r.key,
            r.value,
            tuple((k, v.encode() if isinstance(v, str) else v) for k, v in r.headers),
        )
        for n, r in enumerate(raw)
    ]
    unsigned = SourceRecord(TOPIC, 0, 9, CASE.encode(), b"x", (("event_type", b"CaseClosed"),))
    tampered = SourceRecord(TOPIC, 0, 10, good[0].key, b"changed", good[0].headers)
    batch = [*good, unsigned, tampered]
    found = check_signatures(batch, keys)
    assert [getattr(x, "code", x) for x in found] == [
        *(keys.verify(r.key, r.value, r.headers) for r in good),
        "unsigned",
        "bad-signature",
    ]
    for r, x in zip(batch, found, strict=True):
        try:
            assert check_signature(r, keys) is x
        except Rejected as rejected:
            assert isinstance(x, Rejected) and (x.stage, x.code, x.reason) == (
                rejected.stage,
                rejected.code,
                rejected.reason,
            )

    class Faulty(DistrictKeys):
        def verify_many(self, records: Sequence[Any]) -> list[Any]:
            raise RuntimeError("a bug")

        def verify(self, key: bytes | None, value: bytes | None, headers: Any) -> Any:
            if value == b"x":
                raise RuntimeError("a bug")
            return super().verify(key, value, headers)

    faulty = check_signatures(batch, Faulty(districts=DISTRICTS))
    assert [getattr(x, "code", None) for x in faulty] == [
        None,
        None,
        None,
        "internal-error",
        "bad-signature",
    ]
    assert all(dict(r.headers).get(SIGNATURE_HEADER) for r in good)
