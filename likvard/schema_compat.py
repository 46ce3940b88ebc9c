"""Backward compatibility of the contracts: the newest schema of every event type must read
every older version, so events written years ago stay readable forever."""

from __future__ import annotations

import io
from typing import Any

import fastavro
from fastavro.utils import generate_many

from likvard.codec import (
    SINGLE_OBJECT_MARKER,
    Catalogue,
    CodecError,
    SchemaVersion,
    uuids_as_text,
)


def check_backward_compatible(catalogue: Catalogue, samples: int = 25) -> list[str]:
    """Problems found (empty = compatible): for every version of every event type, records
    generated from that writer schema must decode with the newest reader and keep the
    values of the payload fields both versions share."""
    problems: list[str] = []
    for event_type in catalogue.event_types():
        newest = catalogue.schema(event_type)
        for version in catalogue.versions(event_type):
            problem = _check(catalogue, catalogue.schema(event_type, version), newest, samples)
            if problem:
                problems.append(problem)
    return problems


def _check(
    catalogue: Catalogue, writer: SchemaVersion, newest: SchemaVersion, samples: int
) -> str | None:
    shared = {f["name"] for f in writer.schema["fields"]} & {
        f["name"] for f in newest.schema["fields"]
    }
    shared.discard("metadata")
    label = f"{writer.event_type} v{writer.version} -> v{newest.version}"
    for i, record in enumerate(generate_many(writer.parsed, samples)):
        buf = io.BytesIO()
        buf.write(SINGLE_OBJECT_MARKER + writer.fingerprint)
        fastavro.schemaless_writer(buf, writer.parsed, record)
        data = buf.getvalue()
        try:
            decoded = catalogue.decode(data).record
        except CodecError as exc:
            return f"{label}: not readable ({exc})"
        as_written = _read_as_writer(writer, data)
        changed = sorted(n for n in shared if decoded.get(n) != as_written.get(n))
        if changed:
            return f"{label}: changes the values of {', '.join(changed)} (sample {i})"
    return None


def _read_as_writer(writer: SchemaVersion, data: bytes) -> dict[str, Any]:
    record = fastavro.schemaless_reader(io.BytesIO(data[10:]), writer.parsed, None)
    result: dict[str, Any] = uuids_as_text(record)
    return result
