"""Avro single-object encoding of Likvärd events, with a catalogue of every schema version.

Wire format (Avro specification, "Single object encoding"): the marker C3 01, the 8-byte
little-endian CRC-64-AVRO fingerprint of the writer schema's parsing canonical form, then
the Avro binary body. A reader looks the writer schema up by its fingerprint and resolves it
to the newest version of that event type, so events written years ago stay readable.

Schemas live in `schemas/<folder>/<Name>.v<N>.avsc`. Files in `schemas/common/` define named
types (the metadata record, shared enums) that event schemas reference by full name; any
other folder holds events: records whose first field is `metadata`.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint as avro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import validate

SINGLE_OBJECT_MARKER = b"\xc3\x01"
HEADER_LENGTH = 10
COMMON_FOLDER = "common"
_FILE_NAME = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.v(?P<version>[1-9][0-9]*)\.avsc$")
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


class CodecError(Exception):
    """Bytes or records that cannot be encoded or decoded. Messages never quote contents."""


class UnknownFingerprint(CodecError):
    pass


class NotSingleObjectEncoded(CodecError):
    pass


class CorruptRecord(CodecError):
    pass


class EncodeError(CodecError):
    pass


class SchemaCatalogueError(CodecError):
    """The schemas folder itself is wrong (a duplicate, a misnamed file, a bad reference)."""


@dataclass(frozen=True)
class Decoded:
    event_type: str
    version: int
    fingerprint: bytes
    record: dict[str, Any]


@dataclass(frozen=True)
class SchemaVersion:
    event_type: str
    version: int
    path: Path
    schema: dict[str, Any]  # self-contained: referenced named types are inlined
    parsed: Any
    fingerprint: bytes


def default_root() -> Path:
    env = os.environ.get("LIKVARD_SCHEMAS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "schemas"


def _full_name(schema: dict[str, Any]) -> str:
    name = str(schema["name"])
    namespace = schema.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _inline(node: Any, defs: dict[str, Any], namespace: str | None, seen: set[str]) -> Any:
    """Replace references to common named types by their definitions (the first time each
    appears), so every event schema is self-contained and has one canonical form."""
    if isinstance(node, str):
        if node in _PRIMITIVES:
            return node
        full = node if "." in node or namespace is None else f"{namespace}.{node}"
        for candidate in (node, full):
            if candidate in defs and candidate not in seen:
                seen.add(candidate)
                return _inline(defs[candidate], defs, namespace, seen)
        return node
    if isinstance(node, list):
        return [_inline(n, defs, namespace, seen) for n in node]
    if isinstance(node, dict):
        out = dict(node)
        if node.get("type") in ("record", "enum", "fixed") and "name" in node:
            seen.add(_full_name(node))
            namespace = node.get("namespace", namespace)
        if "fields" in node:
            out["fields"] = [
                {**f, "type": _inline(f["type"], defs, namespace, seen)} for f in node["fields"]
            ]
        for key in ("items", "values"):
            if key in node:
                out[key] = _inline(node[key], defs, namespace, seen)
        if isinstance(node.get("type"), dict | list) or (
            isinstance(node.get("type"), str)
            and node["type"] not in _PRIMITIVES
            and node["type"] not in ("record", "enum", "fixed", "array", "map")
        ):
            out["type"] = _inline(node["type"], defs, namespace, seen)
        return out
    return node


def fingerprint_of(schema: dict[str, Any]) -> bytes:
    """CRC-64-AVRO of the parsing canonical form, as the 8 little-endian bytes on the wire."""
    canonical = to_parsing_canonical_form(fastavro.parse_schema(schema, _write_hint=False))
    return bytes.fromhex(avro_fingerprint(canonical, "CRC-64-AVRO"))


class Catalogue:
    """Every schema version in `schemas/`, indexed by event type and by fingerprint."""

    def __init__(self, versions: Iterable[SchemaVersion]) -> None:
        self._by_type: dict[str, dict[int, SchemaVersion]] = {}
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        for v in versions:
            same_type = self._by_type.setdefault(v.event_type, {})
            if v.version in same_type:
                raise SchemaCatalogueError(
                    f"{v.event_type} v{v.version} is defined twice:"
                    f" {same_type[v.version].path} and {v.path}"
                )
            same_type[v.version] = v
            other = self._by_fingerprint.get(v.fingerprint)
            if other is not None:
                raise SchemaCatalogueError(
                    f"{v.path.name} and {other.path.name} have the same schema (fingerprint)"
                )
            self._by_fingerprint[v.fingerprint] = v

    @classmethod
    def load(cls, root: Path | None = None) -> Catalogue:
        root = root or default_root()
        if not root.is_dir():
            raise SchemaCatalogueError(f"schemas folder not found: {root}")
        defs: dict[str, Any] = {}
        for path in sorted((root / COMMON_FOLDER).glob("*.avsc")):
            schema = _read(path)
            defs[_full_name(schema)] = schema
        versions: list[SchemaVersion] = []
        for path in sorted(root.glob("*/*.avsc")):
            if path.parent.name == COMMON_FOLDER:
                continue
            versions.append(_load_event(path, defs))
        return cls(versions)

    def event_types(self) -> list[str]:
        return sorted(self._by_type)

    def versions(self, event_type: str) -> list[int]:
        return sorted(self._schemas_of(event_type))

    def newest_version(self, event_type: str) -> int:
        return max(self._schemas_of(event_type))

    def schema(self, event_type: str, version: int | None = None) -> SchemaVersion:
        versions = self._schemas_of(event_type)
        chosen = versions.get(version if version is not None else max(versions))
        if chosen is None:
            raise EncodeError(f"{event_type} has no schema version {version}")
        return chosen

    def fingerprint(self, event_type: str, version: int | None = None) -> bytes:
        return self.schema(event_type, version).fingerprint

    def _schemas_of(self, event_type: str) -> dict[int, SchemaVersion]:
        found = self._by_type.get(event_type)
        if not found:
            raise EncodeError(f"no schema for the event type {event_type!r}")
        return found

    def encode(self, event_type: str, record: dict[str, Any], version: int | None = None) -> bytes:
        """Single-object bytes of `record` in the given (default: newest) schema version."""
        sv = self.schema(event_type, version)
        try:
            validate(record, sv.parsed, raise_errors=True)
        except Exception as exc:  # fastavro's ValidationError; its text may quote the data
            fields = ", ".join(str(getattr(e, "field", "?")) for e in getattr(exc, "errors", ()))
            raise EncodeError(
                f"the {event_type} record does not match schema v{sv.version}"
                f" (field: {fields or 'unknown'})"
            ) from None
        buf = io.BytesIO()
        buf.write(SINGLE_OBJECT_MARKER)
        buf.write(sv.fingerprint)
        fastavro.schemaless_writer(buf, sv.parsed, record)
        return buf.getvalue()

    def decode(self, data: bytes) -> Decoded:
        """Decode single-object bytes into the newest schema of their event type.

        Raises only CodecError subclasses, whatever the bytes are."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise NotSingleObjectEncoded("an event must be bytes")
        data = bytes(data)
        if len(data) < HEADER_LENGTH or data[:2] != SINGLE_OBJECT_MARKER:
            raise NotSingleObjectEncoded(
                "not Avro single-object encoded (expected the marker C3 01 and an 8-byte"
                " schema fingerprint)"
            )
        fp = data[2:HEADER_LENGTH]
        writer = self._by_fingerprint.get(fp)
        if writer is None:
            raise UnknownFingerprint(
                f"no schema in the catalogue has the fingerprint {fp.hex()}; is the writer"
                " schema published in schemas/?"
            )
        reader = self.schema(writer.event_type)
        body = io.BytesIO(data[HEADER_LENGTH:])
        try:
            record = fastavro.schemaless_reader(
                body, writer.parsed, None if reader is writer else reader.parsed
            )
        except Exception as exc:  # any failure inside fastavro means the body is corrupt
            raise CorruptRecord(
                f"the {writer.event_type} v{writer.version} body does not decode"
                f" ({type(exc).__name__})"
            ) from None
        if body.tell() != len(data) - HEADER_LENGTH:
            raise CorruptRecord(
                f"the {writer.event_type} v{writer.version} body has trailing bytes"
            )
        if not isinstance(record, dict):
            raise CorruptRecord("the body is not a record")
        return Decoded(writer.event_type, writer.version, fp, uuids_as_text(record))


def uuids_as_text(value: Any) -> Any:
    """Ids read back as the strings they were written as, so a decoded event equals the
    decided one (fastavro returns uuid.UUID for the uuid logical type)."""
    if isinstance(value, dict):
        return {k: uuids_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [uuids_as_text(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _read(path: Path) -> dict[str, Any]:
    m = _FILE_NAME.match(path.name)
    if not m:
        raise SchemaCatalogueError(f"{path}: schema files must be named <Name>.v<N>.avsc")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SchemaCatalogueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict) or schema.get("name") != m.group("name"):
        raise SchemaCatalogueError(f"{path}: the schema's name must be {m.group('name')!r}")
    return schema


def _load_event(path: Path, defs: dict[str, Any]) -> SchemaVersion:
    raw = _read(path)
    fields = raw.get("fields") or []
    if raw.get("type") != "record" or not fields or fields[0].get("name") != "metadata":
        raise SchemaCatalogueError(
            f"{path}: an event must be a record whose first field is metadata"
        )
    version = int(_FILE_NAME.match(path.name).group("version"))  # type: ignore[union-attr]
    schema = _inline(raw, defs, raw.get("namespace"), set())
    try:
        parsed = fastavro.parse_schema(schema, _write_hint=False)
    except Exception as exc:
        raise SchemaCatalogueError(f"{path}: not a valid Avro schema: {exc}") from exc
    return SchemaVersion(raw["name"], version, path, schema, parsed, fingerprint_of(schema))
