"""Avro single-object encoding: header, fingerprint, round trips and hostile bytes."""

from __future__ import annotations

import contextlib
import io
import uuid
from datetime import UTC, date, datetime
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from likvard.codec import (
    SINGLE_OBJECT_MARKER,
    Catalogue,
    CodecError,
    CorruptRecord,
    EncodeError,
    NotSingleObjectEncoded,
    UnknownFingerprint,
)

CATALOGUE = Catalogue.load()


def metadata(event_type: str) -> dict[str, Any]:
    now = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "case_id": str(uuid.uuid4()),
        "stream_version": 3,
        "occurred_at": now,
        "recorded_at": now,
        "producer": "likvard-intake",
        "district": "nordost",
        "actor": "cw-17",
        "correlation_id": "corr-1",
        "causation_id": None,
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    }


PAYLOADS: dict[str, dict[str, Any]] = {
    "IntakeRegistered": {
        "person": "ab" * 32,
        "district": "nordost",
        "substances": ["ALCOHOL", "GAMBLING"],
        "referral_source": "HEALTHCARE",
        "children_in_household": "YES",
        "birth_year": 1971,
    },
    "AssessmentCompleted": {
        "assessment_id": str(uuid.uuid4()),
        "instrument": "ASI_GRUND",
        "scores": [{"scale": "alcohol", "value": 7}, {"scale": "family_social", "value": 4}],
        "need_level": "HIGH",
    },
    "CarePlanAgreed": {
        "plan_id": str(uuid.uuid4()),
        "goals": ["Få behålla lägenheten"],
        "person_participated": True,
        "review_on": date(2027, 3, 1),
    },
    "ConsentRecorded": {
        "consent_id": str(uuid.uuid4()),
        "recipients": ["HEALTHCARE"],
        "valid_until": None,
    },
    "ConsentWithdrawn": {"consent_id": str(uuid.uuid4())},
    "CaseTransferred": {
        "from_district": "nordost",
        "to_district": "hisingen",
        "reason": "PERSON_MOVED",
    },
    "CaseClosed": {"reason": "GOALS_REACHED"},
    "CaseReopened": {"reason": "RELAPSE"},
}


def test_every_intake_event_type_has_a_sample() -> None:
    assert set(CATALOGUE.event_types()) == set(PAYLOADS)


@pytest.mark.parametrize("event_type", sorted(PAYLOADS))
def test_round_trip(event_type: str) -> None:
    record = {"metadata": metadata(event_type), **PAYLOADS[event_type]}
    data = CATALOGUE.encode(event_type, record)
    decoded = CATALOGUE.decode(data)
    assert decoded.event_type == event_type
    assert decoded.version == CATALOGUE.newest_version(event_type)
    assert decoded.record == record


def test_header_is_marker_and_crc64_fingerprint_of_canonical_form() -> None:
    data = CATALOGUE.encode("CaseClosed", {"metadata": metadata("CaseClosed"), "reason": "OTHER"})
    assert data[:2] == SINGLE_OBJECT_MARKER == b"\xc3\x01"
    schema = CATALOGUE.schema("CaseClosed")
    canonical = to_parsing_canonical_form(fastavro.parse_schema(schema.schema))
    expected = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    assert data[2:10] == expected == CATALOGUE.fingerprint("CaseClosed")
    # The body is plain Avro binary of the writer schema.
    body = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema.parsed, None)
    assert isinstance(body, dict) and body["reason"] == "OTHER"


def test_fingerprints_are_distinct_per_event_type() -> None:
    fps = {CATALOGUE.fingerprint(t) for t in CATALOGUE.event_types()}
    assert len(fps) == len(CATALOGUE.event_types())


def test_unknown_fingerprint() -> None:
    with pytest.raises(UnknownFingerprint):
        CATALOGUE.decode(SINGLE_OBJECT_MARKER + b"\x00" * 8 + b"\x00")


@pytest.mark.parametrize("data", [b"", b"\xc3", b"\xc3\x01\x00", b'{"json": true}', b"\x00" * 20])
def test_not_single_object(data: bytes) -> None:
    with pytest.raises(NotSingleObjectEncoded):
        CATALOGUE.decode(data)


def test_truncated_and_trailing_bytes_are_corrupt() -> None:
    data = CATALOGUE.encode(
        "CaseTransferred", {"metadata": metadata("CaseTransferred"), **PAYLOADS["CaseTransferred"]}
    )
    with pytest.raises(CorruptRecord):
        CATALOGUE.decode(data[:-3])
    with pytest.raises(CorruptRecord):
        CATALOGUE.decode(data + b"\x00")


def test_invalid_record_is_refused_with_the_field_and_without_the_value() -> None:
    record = {"metadata": metadata("IntakeRegistered"), **PAYLOADS["IntakeRegistered"]}
    record["substances"] = ["COFFEE-19121212-1212"]
    with pytest.raises(EncodeError) as info:
        CATALOGUE.encode("IntakeRegistered", record)
    assert "substances" in str(info.value)
    assert "19121212" not in str(info.value)
    with pytest.raises(EncodeError):
        CATALOGUE.encode("NoSuchEvent", record)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_codec_errors(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        CATALOGUE.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(PAYLOADS)), st.binary(max_size=300))
def test_valid_header_with_random_body_only_raises_codec_errors(
    event_type: str, body: bytes
) -> None:
    with contextlib.suppress(CodecError):
        CATALOGUE.decode(SINGLE_OBJECT_MARKER + CATALOGUE.fingerprint(event_type) + body)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(PAYLOADS)), st.data())
def test_mutated_valid_records_decode_or_raise_codec_errors(
    event_type: str, data: st.DataObject
) -> None:
    encoded = bytearray(
        CATALOGUE.encode(event_type, {"metadata": metadata(event_type), **PAYLOADS[event_type]})
    )
    position = data.draw(st.integers(10, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(CodecError):
        CATALOGUE.decode(bytes(encoded))
