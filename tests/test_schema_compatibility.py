"""Every schema version in schemas/ is readable by the newest one (backward compatible), and
the check really fails for changes that are not."""

from __future__ import annotations

import io
import json
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.utils import generate_many

from likvard.codec import SINGLE_OBJECT_MARKER, Catalogue, IncompatibleSchema, SchemaVersion
from likvard.schema_compat import check_backward_compatible
from tests.test_codec import SCHEMAS, event

REPO = Catalogue.load(SCHEMAS)
WRITERS = REPO.writers()


def test_every_version_in_schemas_is_readable_by_the_newest() -> None:
    assert check_backward_compatible(REPO) == []


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, uuid.UUID) else value


def _encode(catalogue: Catalogue, writer: SchemaVersion, record: dict[str, Any]) -> bytes:
    if writer.primary:
        return catalogue.encode(writer.event_type, record, version=writer.version)
    body = io.BytesIO()  # an older shared-type combination: written as an old producer did
    fastavro.schemaless_writer(body, writer.parsed, record)
    return SINGLE_OBJECT_MARKER + writer.fingerprint + body.getvalue()


@pytest.mark.parametrize(
    "writer", WRITERS, ids=[f"{w.event_type}-v{w.version}-{w.fingerprint.hex()}" for w in WRITERS]
)
def test_generated_records_of_every_version_decode_with_the_newest(writer: SchemaVersion) -> None:
    _check_samples(REPO, writer)


def _check_samples(catalogue: Catalogue, writer: SchemaVersion) -> None:
    """Random records of the writer schema decode with the newest reader, and every field
    both versions share keeps the value the writer gave it."""
    reader = catalogue.reader(writer.event_type)
    shared = {f["name"] for f in writer.parsed["fields"]} & {
        f["name"] for f in reader.parsed["fields"]
    }
    state = random.getstate()  # generate_many draws from the global `random`: fix the seed
    random.seed(f"{writer.event_type}-{writer.version}")
    try:
        records = list(generate_many(writer.parsed, 20))
    finally:
        random.setstate(state)
    for record in records:
        data = _encode(catalogue, writer, record)
        decoded = catalogue.decode(data)
        assert (decoded.event_type, decoded.version) == (writer.event_type, writer.version)
        as_written = _plain(fastavro.schemaless_reader(io.BytesIO(data[10:]), writer.parsed))
        for name in shared:
            assert decoded.record[name] == as_written[name], name


# --- an evolving event in a temporary schemas directory ---------------------------------
def _evolve(tmp_path: Path, change: Any) -> Catalogue:
    """The repo's schemas plus a CaseClosed v2 made from v1 by `change`."""
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, root)
    v1 = json.loads((root / "intake" / "CaseClosed.v1.avsc").read_text(encoding="utf-8"))
    v2 = change(json.loads(json.dumps(v1)))
    (root / "intake" / "CaseClosed.v2.avsc").write_text(json.dumps(v2), encoding="utf-8")
    return Catalogue.load(root)


def _add_field(new_field: dict[str, Any]) -> Any:
    def change(schema: dict[str, Any]) -> dict[str, Any]:
        schema["fields"].append(new_field)
        return schema

    return change


V1_BYTES = REPO.encode("CaseClosed", event("CaseClosed", reason="NO_CONTACT"))


def test_a_field_added_with_a_default_keeps_old_events_readable(tmp_path: Path) -> None:
    catalogue = _evolve(
        tmp_path,
        _add_field({"name": "follow_up_offered", "type": "boolean", "default": False}),
    )
    assert catalogue.versions("CaseClosed") == [1, 2]
    assert check_backward_compatible(catalogue) == []
    decoded = catalogue.decode(V1_BYTES)
    assert decoded.version == 1  # written as v1 ...
    assert decoded.record["follow_up_offered"] is False  # ... read as v2, default filled in
    assert decoded.record["reason"] == "NO_CONTACT"
    for writer in catalogue.writers("CaseClosed"):
        _check_samples(catalogue, writer)
    v2 = catalogue.encode("CaseClosed", event("CaseClosed", follow_up_offered=True))
    assert catalogue.decode(v2).version == 2


def test_a_field_added_without_a_default_is_caught(tmp_path: Path) -> None:
    catalogue = _evolve(tmp_path, _add_field({"name": "follow_up_offered", "type": "boolean"}))
    problems = check_backward_compatible(catalogue)
    assert len(problems) == 1
    assert problems[0].startswith("CaseClosed v1 -> v2:")
    assert "'follow_up_offered' is new and has no default" in problems[0]
    with pytest.raises(IncompatibleSchema):  # and indeed old bytes no longer decode
        catalogue.decode(V1_BYTES)


def _rename_reason(alias: bool) -> Any:
    def change(schema: dict[str, Any]) -> dict[str, Any]:
        schema["fields"][1]["name"] = "close_reason"
        if alias:
            schema["fields"][1]["aliases"] = ["reason"]
        return schema

    return change


def test_a_rename_with_an_alias_is_compatible(tmp_path: Path) -> None:
    catalogue = _evolve(tmp_path, _rename_reason(alias=True))
    assert check_backward_compatible(catalogue) == []
    assert catalogue.decode(V1_BYTES).record["close_reason"] == "NO_CONTACT"


def _with_reason(reason: dict[str, Any] | str) -> Any:
    def change(schema: dict[str, Any]) -> dict[str, Any]:
        schema["fields"][1]["type"] = reason
        return schema

    return change


def _drop_reason(schema: dict[str, Any]) -> dict[str, Any]:
    schema["fields"] = [*schema["fields"][:1], {"name": "note", "type": "int", "default": 0}]
    return schema


SYMBOLS = ["GOALS_REACHED", "PLANNED_END", "PERSON_DECLINED", "NO_CONTACT", "OTHER"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_rename_reason(alias=False), "'close_reason' is new and has no default"),
        (_drop_reason, "'reason' is gone from the newest version"),
        (_with_reason("string"), "changes type from enum to string"),
        (
            _with_reason({"type": "enum", "name": "CloseReason", "symbols": SYMBOLS}),
            "loses enum symbol(s) MOVED_OUT_OF_CITY, DECEASED",
        ),
        (
            _with_reason({"type": "enum", "name": "EndReason", "symbols": SYMBOLS}),
            "changes type from",
        ),
    ],
)
def test_incompatible_changes_are_caught(tmp_path: Path, change: Any, expected: str) -> None:
    problems = check_backward_compatible(_evolve(tmp_path, change))
    assert problems and expected in " ".join(problems), problems


def test_appending_an_enum_symbol_is_compatible(tmp_path: Path) -> None:
    def change(schema: dict[str, Any]) -> dict[str, Any]:
        schema["fields"][1]["type"]["symbols"].append("TRANSFERRED_TO_HEALTHCARE")
        return schema

    catalogue = _evolve(tmp_path, change)
    assert check_backward_compatible(catalogue) == []
    assert catalogue.decode(V1_BYTES).record["reason"] == "NO_CONTACT"


def test_a_changed_logical_type_is_caught(tmp_path: Path) -> None:
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, root)
    v1 = json.loads((root / "intake" / "ConsentWithdrawn.v1.avsc").read_text(encoding="utf-8"))
    v1["fields"][1]["type"] = "string"  # drops logicalType uuid: same bytes, other meaning
    v1["fields"].append({"name": "note", "type": ["null", "string"], "default": None})
    (root / "intake" / "ConsentWithdrawn.v2.avsc").write_text(json.dumps(v1), encoding="utf-8")
    problems = check_backward_compatible(Catalogue.load(root))
    assert len(problems) == 1 and "logical type from uuid to none" in problems[0]
