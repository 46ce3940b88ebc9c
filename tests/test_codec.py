"""Avro single-object encoding: header, fingerprint, round trips, hostile bytes, and the
mistakes a schemas directory can contain."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given, settings, strategies as st

from likvard.codec import (
    SCHEMAS_DIR_ENV,
    SINGLE_OBJECT_MARKER,
    Catalogue,
    CodecError,
    CorruptRecord,
    EncodeError,
    NotSingleObjectEncoded,
    SchemaDirectoryError,
    UnknownEventType,
    UnknownFingerprint,
    crc64_avro,
)

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
CATALOGUE = Catalogue.load(SCHEMAS)
PNR = "19121212-1212"  # the Swedish test personal identity number; must never leak


def metadata(event_type: str) -> dict[str, Any]:
    now = datetime(2026, 11, 22, 10, 30, 15, 123456, tzinfo=UTC)
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "case_id": str(uuid.uuid4()),
        "stream_version": 3,
        "occurred_at": now,
        "recorded_at": now,
        "producer": "likvard-intake",
        "district": "nordost",
        "actor": "cw-7f3a",
        "correlation_id": str(uuid.uuid4()),
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
        "birth_year": None,
        "age_band": "45-54",
        "archive_sample": False,
        "gender": "WOMAN",
        "personal": {
            "key_id": str(uuid.uuid4()),
            "algorithm": "AES_256_GCM",
            "nonce": bytes(12),
            "ciphertext": b"\x01" * 30,
        },
    },
    "AssessmentCompleted": {
        "assessment_id": str(uuid.uuid4()),
        "instrument": "ASI_GRUND",
        "scores": [{"scale": "alcohol", "value": 7}, {"scale": "family_social", "value": 4}],
        "need_level": "HIGH",
    },
    "CarePlanAgreed": {
        "plan_id": str(uuid.uuid4()),
        "goals": [],
        "person_participated": True,
        "review_on": date(2027, 3, 1),
        "personal": None,
    },
    "ConsentRecorded": {
        "consent_id": str(uuid.uuid4()),
        "recipients": ["HEALTHCARE", "NON_PROFIT"],
        "valid_until": None,
    },
    "ConsentWithdrawn": {"consent_id": str(uuid.uuid4())},
    "CaseTransferred": {
        "from_district": "lundby",
        "to_district": "hisingen",
        "reason": "REORGANISATION",
    },
    "CaseClosed": {"reason": "GOALS_REACHED"},
    "CaseReopened": {"reason": "RELAPSE"},
    "PersonalDataErased": {"legal_basis": "ERASURE_REQUEST", "key_ids": [str(uuid.uuid4())]},
    "InvestigationOpened": {"investigation_id": str(uuid.uuid4()), "basis": "APPLICATION"},
    "InvestigationDecided": {
        "investigation_id": str(uuid.uuid4()),
        "decision": "PARTLY_GRANTED",
        "intervention_kinds": ["OUTPATIENT", "SUPPORT_CONTACT"],
    },
    "FirstVisitHeld": {"visit_id": str(uuid.uuid4())},
    "CoordinatedPlanAgreed": {
        "plan_id": str(uuid.uuid4()),
        "parties": ["SOCIAL_SERVICES", "PSYCHIATRY", "ADDICTION_CARE"],
        "lead": "PSYCHIATRY",
        "follow_up_on": date(2027, 1, 15),
        "consent_id": str(uuid.uuid4()),
    },
    "CoordinatedPlanFollowedUp": {"plan_id": str(uuid.uuid4())},
}
# Version 2 sealed the personal details (docs/personal-data.md), version 3 of the intake
# added the gender; the rest are at version 1.
VERSIONS = {"IntakeRegistered": [1, 2, 3], "CarePlanAgreed": [1, 2]}


def event(event_type: str, **changes: Any) -> dict[str, Any]:
    return {"metadata": metadata(event_type), **PAYLOADS[event_type], **changes}


def test_every_intake_event_type_has_a_sample() -> None:
    intake = {t for t in CATALOGUE.event_types() if CATALOGUE.writer(t).path.startswith("intake/")}
    assert intake == set(PAYLOADS)
    assert {t: CATALOGUE.versions(t) for t in PAYLOADS} == {
        t: VERSIONS.get(t, [1]) for t in PAYLOADS
    }


@pytest.mark.parametrize("event_type", sorted(PAYLOADS))
def test_round_trip(event_type: str) -> None:
    record = event(event_type)
    data = CATALOGUE.encode(event_type, record)
    decoded = CATALOGUE.decode(data)
    assert decoded.event_type == event_type
    assert decoded.version == CATALOGUE.newest_version(event_type)
    assert decoded.fingerprint == data[2:10] == CATALOGUE.fingerprint(event_type)
    assert decoded.record == record


def test_defaults_fill_optional_fields_and_uuids_come_back_canonical() -> None:
    record = event("IntakeRegistered")
    del record["birth_year"], record["metadata"]["traceparent"]
    record["metadata"]["event_id"] = "6F1C2A9E-4B7D-4C1E-9A3F-0D2B8E5C7A10"
    decoded = CATALOGUE.decode(CATALOGUE.encode("IntakeRegistered", record)).record
    assert decoded["birth_year"] is None and decoded["metadata"]["traceparent"] is None
    assert decoded["metadata"]["event_id"] == "6f1c2a9e-4b7d-4c1e-9a3f-0d2b8e5c7a10"


@pytest.mark.parametrize("version", [1, 2])
def test_a_registration_written_before_the_gender_reads_as_not_stated(version: int) -> None:
    fields = {f["name"] for f in CATALOGUE.schema("IntakeRegistered", version)["fields"]}
    record = {k: v for k, v in event("IntakeRegistered").items() if k in fields}
    decoded = CATALOGUE.decode(CATALOGUE.encode("IntakeRegistered", record, version=version))
    assert (decoded.version, decoded.record["gender"]) == (version, "NOT_STATED")
    assert decoded.record["person"] == record["person"]


USER_ASSESSMENT = {
    "assessment_id": str(uuid.uuid4()),
    "contact_easy": "YES",
    "clear_information": "PARTLY",
    "felt_understood": "NO",
    "influence": "NO_ANSWER",
    "whole_situation": "YES",
    "situation_improved": "PARTLY",
}


def test_a_user_assessment_round_trips_with_one_rating_scale_for_every_item() -> None:
    record = {"metadata": metadata("UserAssessmentRecorded"), **USER_ASSESSMENT}
    decoded = CATALOGUE.decode(CATALOGUE.encode("UserAssessmentRecorded", record))
    assert decoded.record == record and decoded.version == 1
    canonical = CATALOGUE.writer("UserAssessmentRecorded").canonical_form
    assert canonical.count('"name":"se.goteborg.likvard.followup.Rating"') == 1
    with pytest.raises(EncodeError):  # a free-text answer is not on the scale
        CATALOGUE.encode("UserAssessmentRecorded", {**record, "influence": "SOMEWHAT"})


def test_header_is_marker_and_crc64_fingerprint_of_the_expanded_writer_schema() -> None:
    data = CATALOGUE.encode("CaseClosed", event("CaseClosed", reason="OTHER"))
    assert data[:2] == SINGLE_OBJECT_MARKER == b"\xc3\x01"
    # Computed independently: fastavro parses the standalone schema with nothing preloaded.
    standalone = CATALOGUE.schema("CaseClosed")
    canonical = to_parsing_canonical_form(fastavro.parse_schema(standalone))
    expected = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    assert data[2:10] == expected == CATALOGUE.fingerprint("CaseClosed")
    body = fastavro.schemaless_reader(io.BytesIO(data[10:]), fastavro.parse_schema(standalone))
    assert isinstance(body, dict) and body["reason"] == "OTHER"


def test_crc64_avro_matches_the_avro_reference_value() -> None:
    # Avro's own test vector: fingerprint64("null") = 7195948357588979594, little-endian.
    assert crc64_avro("null") == (7195948357588979594).to_bytes(8, "little")


def test_shared_types_are_defined_once_in_the_canonical_form() -> None:
    canonical = CATALOGUE.writer("IntakeRegistered").canonical_form
    assert canonical.count('"name":"se.goteborg.likvard.EventMetadata"') == 1
    assert canonical.count('"name":"se.goteborg.likvard.Substance"') == 1
    assert "logicalType" not in canonical  # the canonical form drops attributes


def test_fingerprints_are_distinct_per_event_type() -> None:
    fps = {CATALOGUE.fingerprint(t) for t in CATALOGUE.event_types()}
    assert len(fps) == len(CATALOGUE.event_types())


def test_unknown_fingerprint() -> None:
    with pytest.raises(UnknownFingerprint) as info:
        CATALOGUE.decode(SINGLE_OBJECT_MARKER + b"\x00" * 8 + b"\x00")
    assert info.value.fingerprint == b"\x00" * 8


@pytest.mark.parametrize(
    "data", [b"", b"\xc3", b"\xc3\x01\x00", b'{"json": true}', b"\x00" * 20, b"\x01\xc3" * 8]
)
def test_not_single_object(data: bytes) -> None:
    with pytest.raises(NotSingleObjectEncoded):
        CATALOGUE.decode(data)


def test_decode_takes_any_bytes_like_value_and_refuses_text() -> None:
    data = CATALOGUE.encode("CaseClosed", event("CaseClosed"))
    assert CATALOGUE.decode(bytearray(data)).record == CATALOGUE.decode(memoryview(data)).record
    with pytest.raises(NotSingleObjectEncoded):
        CATALOGUE.decode(data.hex())  # type: ignore[arg-type]


def test_truncated_and_trailing_bytes_are_corrupt() -> None:
    data = CATALOGUE.encode("CaseTransferred", event("CaseTransferred"))
    for cut in (1, 3, len(data) - 11):
        with pytest.raises(CorruptRecord):
            CATALOGUE.decode(data[:-cut])
    with pytest.raises(CorruptRecord, match="1 unexpected bytes"):
        CATALOGUE.decode(data + b"\x00")


def test_huge_length_prefix_is_corrupt_not_a_crash() -> None:
    header = SINGLE_OBJECT_MARKER + CATALOGUE.fingerprint("ConsentWithdrawn")
    huge = b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # zig-zag varint near 2**63
    with pytest.raises(CorruptRecord):
        CATALOGUE.decode(header + huge + b"x" * 10)


def test_invalid_record_is_refused_naming_the_field_but_not_the_value() -> None:
    record = event("IntakeRegistered", substances=[f"COFFEE-{PNR}"])
    with pytest.raises(EncodeError) as info:
        CATALOGUE.encode("IntakeRegistered", record)
    message = str(info.value)
    assert "IntakeRegistered v3" in message and "substances" in message
    assert PNR not in message and "COFFEE" not in message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"birth_year": "1971"}, "birth_year"),
        ({"person": None}, "person"),
        ({"persson": "ab" * 32}, "persson"),
        (
            {"metadata": {**metadata("IntakeRegistered"), "occurred_at": datetime(2026, 1, 1)}},
            "metadata.occurred_at",
        ),
        ({"metadata": {**metadata("IntakeRegistered"), "event_id": PNR}}, "metadata.event_id"),
        ({"metadata": {**metadata("IntakeRegistered"), "actor": None}}, "actor"),
    ],
)
def test_encode_refuses_what_the_contract_forbids(change: dict[str, Any], field: str) -> None:
    with pytest.raises(EncodeError) as info:
        CATALOGUE.encode("IntakeRegistered", event("IntakeRegistered", **change))
    assert field in str(info.value)
    assert PNR not in str(info.value)


def test_unknown_event_type_or_version() -> None:
    with pytest.raises(UnknownEventType):
        CATALOGUE.encode("NoSuchEvent", event("CaseClosed"))
    with pytest.raises(EncodeError, match="no version 9"):
        CATALOGUE.encode("CaseClosed", event("CaseClosed"), version=9)
    with pytest.raises(UnknownEventType):
        CATALOGUE.fingerprint("EventMetadata")  # a shared type, not an event


def test_schemas_dir_can_be_chosen_by_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, root)
    (root / "intake" / "CaseReopened.v1.avsc").unlink()
    monkeypatch.setenv(SCHEMAS_DIR_ENV, str(root))
    assert "CaseReopened" not in Catalogue.load().event_types()
    assert Catalogue.load(SCHEMAS).event_types() == CATALOGUE.event_types()


# --- mistakes in a schemas directory ---------------------------------------------------
def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, root)
    return root


def _read(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


def test_duplicate_version_is_refused(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "elsewhere").mkdir()
    shutil.copy(root / "intake" / "CaseClosed.v1.avsc", root / "elsewhere" / "CaseClosed.v1.avsc")
    with pytest.raises(SchemaDirectoryError, match="CaseClosed version 1 is defined twice"):
        Catalogue.load(root)


def test_record_name_must_match_the_file_name(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    shutil.copy(root / "intake" / "CaseClosed.v1.avsc", root / "intake" / "CaseEnded.v1.avsc")
    with pytest.raises(SchemaDirectoryError, match="named after the type"):
        Catalogue.load(root)


@pytest.mark.parametrize("name", ["CaseClosed.avsc", "CaseClosed.v01.avsc", "CaseClosed-v2.avsc"])
def test_file_names_must_carry_a_version(tmp_path: Path, name: str) -> None:
    root = _copy(tmp_path)
    shutil.copy(root / "intake" / "CaseClosed.v1.avsc", root / "intake" / name)
    with pytest.raises(SchemaDirectoryError, match=r"<Name>\.v<N>\.avsc"):
        Catalogue.load(root)


def test_an_event_must_start_with_metadata(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    path = root / "intake" / "CaseClosed.v2.avsc"
    v1 = _read(root / "intake" / "CaseClosed.v1.avsc")
    path.write_text(json.dumps({**v1, "fields": v1["fields"][::-1]}), encoding="utf-8")
    with pytest.raises(SchemaDirectoryError, match="first field is 'metadata'"):
        Catalogue.load(root)


def test_a_version_identical_on_the_wire_is_refused(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    v1 = _read(root / "intake" / "CaseClosed.v1.avsc")
    (root / "intake" / "CaseClosed.v2.avsc").write_text(
        json.dumps({**v1, "doc": "Only the documentation changed."}), encoding="utf-8"
    )
    with pytest.raises(SchemaDirectoryError, match="same parsing canonical form"):
        Catalogue.load(root)


def test_invalid_json_and_missing_directory(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "intake" / "CaseClosed.v2.avsc").write_text("{not json", encoding="utf-8")
    with pytest.raises(SchemaDirectoryError, match="not readable JSON"):
        Catalogue.load(root)
    with pytest.raises(SchemaDirectoryError, match="does not exist"):
        Catalogue.load(tmp_path / "nowhere")


def test_a_new_version_of_a_shared_type_keeps_old_bytes_readable(tmp_path: Path) -> None:
    old_bytes = CATALOGUE.encode("ConsentWithdrawn", event("ConsentWithdrawn"))
    root = _copy(tmp_path)
    meta = _read(root / "common" / "EventMetadata.v1.avsc")
    meta["fields"].append({"name": "tenant", "type": ["null", "string"], "default": None})
    (root / "common" / "EventMetadata.v2.avsc").write_text(json.dumps(meta), encoding="utf-8")
    catalogue = Catalogue.load(root)
    assert catalogue.fingerprint("ConsentWithdrawn") != CATALOGUE.fingerprint("ConsentWithdrawn")
    decoded = catalogue.decode(old_bytes)
    assert decoded.version == 1
    assert decoded.record["metadata"]["tenant"] is None
    assert len(catalogue.writers("ConsentWithdrawn")) == 2


# --- hostile bytes ---------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_codec_errors(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        CATALOGUE.decode(data)


@settings(max_examples=500, deadline=None)
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
    encoded = bytearray(CATALOGUE.encode(event_type, event(event_type)))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(10, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(CodecError):
        CATALOGUE.decode(bytes(encoded))
