"""Sealing personal details with a person's data key: pure, no database."""

from __future__ import annotations

import os
import uuid

import pytest

from likvard.codec import Catalogue
from likvard.keys import DataKey
from likvard.sealing import (
    ERASED,
    OPEN,
    UNREADABLE,
    WITHHELD,
    open_data,
    personal_fields,
    seal_data,
)

CATALOGUE = Catalogue.load()
MARKER = "Goal-marker-Åsa Nilsson 0701234567"


def key() -> DataKey:
    return DataKey(str(uuid.uuid4()), os.urandom(32))


def care_plan() -> dict[str, object]:
    return {"plan_id": str(uuid.uuid4()), "goals": [MARKER, "Sova"], "person_participated": True}


def test_the_contract_names_the_personal_fields() -> None:
    assert personal_fields(CATALOGUE, "CarePlanAgreed") == ("goals",)
    assert personal_fields(CATALOGUE, "IntakeRegistered") == ("birth_year",)
    assert personal_fields(CATALOGUE, "CaseClosed") == ()


def test_sealed_data_holds_no_clear_text_and_encodes_to_the_contract() -> None:
    k, event_id = key(), str(uuid.uuid4())
    sealed = seal_data("CarePlanAgreed", event_id, care_plan(), ("goals",), k)
    assert sealed["goals"] == [] and sealed["personal"]["key_id"] == k.key_id
    assert MARKER.encode() not in sealed["personal"]["ciphertext"]
    record = {"metadata": _metadata("CarePlanAgreed", event_id), **sealed}
    data = CATALOGUE.encode("CarePlanAgreed", record)
    assert MARKER.encode() not in data and b"Sova" not in data


def test_a_reader_with_the_key_gets_the_text_back() -> None:
    k, event_id = key(), str(uuid.uuid4())
    sealed = seal_data("CarePlanAgreed", event_id, care_plan(), ("goals",), k)
    opened = open_data("CarePlanAgreed", event_id, sealed, ("goals",), k, show=True)
    assert opened["goals"] == [MARKER, "Sova"] and opened["personal"] == OPEN


def test_the_stored_json_copy_with_hex_bytes_opens_too() -> None:
    k, event_id = key(), str(uuid.uuid4())
    sealed = seal_data("CarePlanAgreed", event_id, care_plan(), ("goals",), k)
    as_json = {
        **sealed,
        "personal": {
            **sealed["personal"],
            "nonce": sealed["personal"]["nonce"].hex(),
            "ciphertext": sealed["personal"]["ciphertext"].hex(),
        },
    }
    assert open_data("CarePlanAgreed", event_id, as_json, ("goals",), k, show=True)["goals"][0] == (
        MARKER
    )


@pytest.mark.parametrize(
    ("show", "has_key", "state"), [(False, True, WITHHELD), (True, False, ERASED)]
)
def test_withheld_and_erased_show_no_text(show: bool, has_key: bool, state: str) -> None:
    k, event_id = key(), str(uuid.uuid4())
    sealed = seal_data("CarePlanAgreed", event_id, care_plan(), ("goals",), k)
    opened = open_data(
        "CarePlanAgreed", event_id, sealed, ("goals",), k if has_key else None, show=show
    )
    assert opened["personal"] == state and opened["goals"] == []
    assert MARKER not in repr(opened)


def test_a_ciphertext_moved_to_another_event_does_not_open() -> None:
    k = key()
    sealed = seal_data("CarePlanAgreed", str(uuid.uuid4()), care_plan(), ("goals",), k)
    opened = open_data("CarePlanAgreed", str(uuid.uuid4()), sealed, ("goals",), k, show=True)
    assert opened["personal"] == UNREADABLE and opened["goals"] == []


def test_a_legacy_clear_event_is_withheld_from_roles_that_do_not_see_text() -> None:
    legacy = care_plan()
    opened = open_data("CarePlanAgreed", str(uuid.uuid4()), legacy, ("goals",), None, show=False)
    assert opened["goals"] == [] and opened["personal"] == WITHHELD


def test_nothing_personal_means_no_sealed_record() -> None:
    data = {"person": "ab" * 32, "birth_year": None}
    sealed = seal_data("IntakeRegistered", str(uuid.uuid4()), data, ("birth_year",), key())
    assert sealed["personal"] is None and sealed["birth_year"] is None


def _metadata(event_type: str, event_id: str) -> dict[str, object]:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return {
        "event_id": event_id,
        "event_type": event_type,
        "case_id": str(uuid.uuid4()),
        "stream_version": 1,
        "occurred_at": now,
        "recorded_at": now,
        "producer": "likvard-intake",
        "district": "nordost",
        "actor": "cw-1",
        "correlation_id": str(uuid.uuid4()),
        "causation_id": None,
        "traceparent": None,
    }
