"""Avro single-object encoding of Likvärd events, with `schemas/` as the schema catalogue.

An event on the wire (Kafka value, event-store row) is `C3 01`, the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema, then the Avro binary body. The fingerprint lets
any reader find the exact writer schema in `schemas/` and resolve it to the newest version of
that event type, so events written years ago stay readable (DESIGN.md, "Contracts").

Layout of a schemas directory (see schemas/README.md):
- `common/<Name>.v<N>.avsc`: shared named types (EventMetadata, enums), referenced by full name;
- `<folder>/<EventType>.v<N>.avsc`: one record per event type and version whose first field is
  `metadata: se.goteborg.likvard.EventMetadata`.

A reference to a common type is expanded in place (defined at its first use, referred to by
full name after that), so every event version has one standalone writer schema whose parsing
canonical form, and hence fingerprint, is the one any Avro implementation computes.
When a common type gains a version, every event version keeps the fingerprints it had with
the older versions of that type too, so bytes written before the change still decode.

Error messages never contain record values: events hold personal data.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint as avro_fingerprint, parse_schema, to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

__all__ = [
    "DEFAULT_SCHEMAS_DIR",
    "FINGERPRINT_SIZE",
    "HEADER_SIZE",
    "METADATA_TYPE",
    "SCHEMAS_DIR_ENV",
    "SINGLE_OBJECT_MARKER",
    "Catalogue",
    "CodecError",
    "CorruptRecord",
    "Decoded",
    "EncodeError",
    "IncompatibleSchema",
    "MalformedValue",
    "NotSingleObjectEncoded",
    "SchemaDirectoryError",
    "SchemaVersion",
    "UnknownEventType",
    "UnknownFingerprint",
    "crc64_avro",
]

SINGLE_OBJECT_MARKER = b"\xc3\x01"
FINGERPRINT_SIZE = 8
HEADER_SIZE = len(SINGLE_OBJECT_MARKER) + FINGERPRINT_SIZE
METADATA_TYPE = "se.goteborg.likvard.EventMetadata"
COMMON_FOLDER = "common"
SCHEMAS_DIR_ENV = "LIKVARD_SCHEMAS_DIR"
DEFAULT_SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"

_FILE_NAME = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.v(?P<version>[1-9][0-9]*)\.avsc")
_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_NAMED = frozenset({"record", "error", "enum", "fixed"})
_TIMESTAMPS = frozenset({"timestamp-millis", "timestamp-micros"})


# --- errors ----------------------------------------------------------------------------
class CodecError(Exception):
    """Base of every error the codec raises; decode of any bytes raises nothing else."""


class SchemaDirectoryError(CodecError):
    """The schemas directory has a mistake (bad file name, duplicate version, ...)."""


class EncodeError(CodecError):
    """A record that does not match its event schema, so it must not be written."""


class UnknownEventType(EncodeError):
    """An event type or version that the schemas directory does not define (so nothing can
    be encoded as it)."""


class NotSingleObjectEncoded(CodecError):
    """Bytes that do not start with the 10-byte Avro single-object header."""


class UnknownFingerprint(CodecError):
    """A header naming a writer schema that is not in the schemas directory."""

    def __init__(self, fingerprint: bytes) -> None:
        super().__init__(
            f"No schema in the catalogue has the fingerprint {fingerprint.hex()}: the event was"
            " written with a schema that is not (yet) in schemas/, or its header is corrupt."
        )
        self.fingerprint = fingerprint


class CorruptRecord(CodecError):
    """A known header followed by a body that does not decode with that writer schema."""


class MalformedValue(CorruptRecord):
    """A body that decodes, but a field breaks its logical type (a uuid that is not a UUID):
    the bytes are well-formed Avro that breaks the contract."""


class IncompatibleSchema(CodecError):
    """An older writer schema that the newest reader schema of its event type cannot read."""


# --- values ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Decoded:
    """A decoded event: which type and schema version wrote it, and the record as read with
    the newest schema of that type (uuid fields as canonical lowercase strings)."""

    event_type: str
    version: int
    fingerprint: bytes
    record: dict[str, Any]


@dataclass(frozen=True, eq=False)
class SchemaVersion:
    """One writer schema of an event type: a file version, expanded with one set of versions
    of the common types it uses (`primary` = with the newest ones, the one used to write)."""

    event_type: str
    version: int
    fingerprint: bytes
    canonical_form: str = field(repr=False)
    schema: dict[str, Any] = field(repr=False)
    """Standalone JSON schema (docs and defaults kept), as a district system would use it."""
    parsed: dict[str, Any] = field(repr=False)
    """The same schema parsed by fastavro."""
    primary: bool = True
    path: str = ""


def crc64_avro(schema: dict[str, Any] | str) -> bytes:
    """CRC-64-AVRO fingerprint of a schema's parsing canonical form, as the 8 header bytes.

    fastavro returns the hex of the little-endian bytes (as Java's implementation does)."""
    return bytes.fromhex(
        avro_fingerprint(to_parsing_canonical_form(parse_schema(schema)), "CRC-64-AVRO")
    )


# --- loading ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _SchemaFile:
    path: str  # relative to the schemas directory, for messages
    name: str
    fullname: str
    namespace: str
    version: int
    raw: dict[str, Any]


def _split_name(name: str, namespace: str) -> tuple[str, str]:
    """(fullname, namespace) of a name written in the context of `namespace`."""
    if "." in name:
        return name, name.rsplit(".", 1)[0]
    return (f"{namespace}.{name}" if namespace else name), namespace


def _read_file(root: Path, path: Path) -> _SchemaFile:
    rel = path.relative_to(root).as_posix()
    m = _FILE_NAME.fullmatch(path.name)
    if m is None:
        raise SchemaDirectoryError(
            f"schemas/{rel}: a schema file must be named <Name>.v<N>.avsc (for example"
            " IntakeRegistered.v2.avsc), with N a whole number from 1 without leading zeros."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaDirectoryError(f"schemas/{rel} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("type") not in _NAMED or "name" not in raw:
        raise SchemaDirectoryError(
            f"schemas/{rel} must hold one named Avro type (a record, enum or fixed)."
        )
    fullname, namespace = _split_name(str(raw["name"]), str(raw.get("namespace") or ""))
    short = fullname.rsplit(".", 1)[-1]
    if not namespace:
        raise SchemaDirectoryError(
            f"schemas/{rel}: {short} has no namespace; use se.goteborg.likvard for shared"
            " types and se.goteborg.likvard.<service> for events."
        )
    if short != m["name"]:
        raise SchemaDirectoryError(
            f"schemas/{rel} defines {short!r}, but its file name says {m['name']!r}:"
            " the file must be named after the type it defines."
        )
    return _SchemaFile(rel, short, fullname, namespace, int(m["version"]), raw)


def _check_event_file(f: _SchemaFile) -> None:
    fields = f.raw.get("fields")
    first = fields[0] if isinstance(fields, list) and fields else None
    if (
        f.raw["type"] != "record"
        or not isinstance(first, dict)
        or first.get("name") != "metadata"
        or first.get("type") != METADATA_TYPE
    ):
        raise SchemaDirectoryError(
            f"schemas/{f.path}: an event schema must be a record whose first field is"
            f" 'metadata' of type {METADATA_TYPE} (shared types belong in schemas/common/)."
        )


def _add(table: dict[str, dict[int, _SchemaFile]], key: str, f: _SchemaFile) -> None:
    versions = table.setdefault(key, {})
    if f.version in versions:
        raise SchemaDirectoryError(
            f"{key} version {f.version} is defined twice: schemas/{versions[f.version].path}"
            f" and schemas/{f.path}. Each version must be in exactly one file."
        )
    versions[f.version] = f


class _Expander:
    """Inlines common types into one schema: each defined at its first use, then by name."""

    def __init__(self, commons: Mapping[str, _SchemaFile]) -> None:
        self.commons = commons
        self.defined: set[str] = set()
        self.used: set[str] = set()

    def expand(self, schema: Any, namespace: str) -> Any:
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return schema
            full, _ = _split_name(schema, namespace)
            if full in self.defined:
                return full
            common = self.commons.get(full)
            if common is None:
                return schema  # a name fastavro will report as unknown
            self.used.add(full)
            inlined = {k: v for k, v in common.raw.items() if k != "namespace"}
            inlined["name"] = full
            return self.expand(inlined, namespace)
        if isinstance(schema, list):
            return [self.expand(branch, namespace) for branch in schema]
        if not isinstance(schema, dict):
            return schema
        out = dict(schema)
        kind = schema.get("type")
        if kind in _NAMED and isinstance(schema.get("name"), str):
            full, inner = _split_name(schema["name"], str(schema.get("namespace") or namespace))
            self.defined.add(full)
            if kind in ("record", "error") and isinstance(schema.get("fields"), list):
                out["fields"] = [
                    {**f, "type": self.expand(f.get("type"), inner)} if isinstance(f, dict) else f
                    for f in schema["fields"]
                ]
        elif kind == "array":
            out["items"] = self.expand(schema.get("items"), namespace)
        elif kind == "map":
            out["values"] = self.expand(schema.get("values"), namespace)
        elif kind not in _PRIMITIVES:
            out["type"] = self.expand(kind, namespace)
        return out


def _expand(f: _SchemaFile, commons: Mapping[str, _SchemaFile]) -> tuple[dict[str, Any], set[str]]:
    expander = _Expander(commons)
    expanded = expander.expand(copy.deepcopy(f.raw), "")
    return expanded, expander.used


class Catalogue:
    """Every event schema version in a schemas directory, indexed by type and fingerprint."""

    def __init__(self, root: Path, writers: list[SchemaVersion]) -> None:
        self.root = root
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        self._primary: dict[str, dict[int, SchemaVersion]] = {}
        self._all: dict[str, list[SchemaVersion]] = {}
        for w in writers:
            other = self._by_fingerprint.get(w.fingerprint)
            if other is not None:
                if (other.event_type, other.version) == (w.event_type, w.version):
                    continue  # a common type's new version that did not change the form
                raise SchemaDirectoryError(
                    f"{w.event_type} v{w.version} and {other.event_type} v{other.version} have"
                    " the same parsing canonical form, so their bytes could not be told apart;"
                    " a new version must change field names or types, not only docs/defaults."
                )
            self._by_fingerprint[w.fingerprint] = w
            self._all.setdefault(w.event_type, []).append(w)
            if w.primary:
                self._primary.setdefault(w.event_type, {})[w.version] = w
        self._newest = {t: vs[max(vs)] for t, vs in self._primary.items()}
        # Per writer schema read as the newest of its type: its compiled fast reader, or
        # None when it has none (built on first use: see `_FastReader`).
        self._fast: dict[bytes, _FastReader | None] = {}
        self.fast = True  # False: always the generic path (the tests compare the two)

    @classmethod
    def load(cls, root: Path | None = None) -> Catalogue:
        """Load `root`, else $LIKVARD_SCHEMAS_DIR, else the repository's `schemas/`.

        Mistakes in the directory fail here, at start-up, rather than on some later event."""
        if root is None:
            env = os.environ.get(SCHEMAS_DIR_ENV)
            root = Path(env) if env else DEFAULT_SCHEMAS_DIR
        root = Path(root)
        if not root.is_dir():
            raise SchemaDirectoryError(f"The schemas directory {root} does not exist.")
        commons: dict[str, dict[int, _SchemaFile]] = {}
        events: dict[str, dict[int, _SchemaFile]] = {}
        event_names: dict[str, str] = {}
        for path in sorted(root.rglob("*.avsc")):
            f = _read_file(root, path)
            parts = path.relative_to(root).parts
            if len(parts) < 2:
                raise SchemaDirectoryError(
                    f"schemas/{f.path} must be in a folder: common/ for shared types, or the"
                    " folder of the service that owns the event."
                )
            if parts[0] == COMMON_FOLDER:
                _add(commons, f.fullname, f)
                continue
            _check_event_file(f)
            if event_names.setdefault(f.name, f.fullname) != f.fullname:
                raise SchemaDirectoryError(
                    f"The event type {f.name} is defined in two namespaces"
                    f" ({event_names[f.name]} and {f.fullname}); event type names must be"
                    " unique across services."
                )
            _add(events, f.name, f)
        if not events:
            raise SchemaDirectoryError(f"The schemas directory {root} holds no event schemas.")
        if METADATA_TYPE not in commons:
            raise SchemaDirectoryError(
                f"The schemas directory {root} has no common/EventMetadata.v<N>.avsc."
            )
        newest_commons = {name: vs[max(vs)] for name, vs in commons.items()}
        writers: list[SchemaVersion] = []
        for versions in events.values():
            for f in versions.values():
                writers.extend(_writer_schemas(f, commons, newest_commons))
        return cls(root, writers)

    # --- lookup ------------------------------------------------------------------------
    def event_types(self) -> list[str]:
        return sorted(self._primary)

    def versions(self, event_type: str) -> list[int]:
        return sorted(self._versions(event_type))

    def newest_version(self, event_type: str) -> int:
        return self.reader(event_type).version

    def reader(self, event_type: str) -> SchemaVersion:
        """The newest schema of an event type: what decode resolves every version to."""
        self._versions(event_type)
        return self._newest[event_type]

    def writer(self, event_type: str, version: int | None = None) -> SchemaVersion:
        """The schema `encode` writes with (`version` defaults to the newest)."""
        versions = self._versions(event_type)
        if version is None:
            return self._newest[event_type]
        if version not in versions:
            raise UnknownEventType(
                f"{event_type} has no version {version} in schemas/"
                f" (known: {', '.join(map(str, sorted(versions)))})."
            )
        return versions[version]

    def writers(self, event_type: str | None = None) -> list[SchemaVersion]:
        """Every schema bytes of this type may have been written with, oldest first."""
        types = [event_type] if event_type is not None else self.event_types()
        for t in types:
            self._versions(t)
        return sorted(
            (w for t in types for w in self._all[t]),
            key=lambda w: (w.event_type, w.version, not w.primary),
        )

    def schema(self, event_type: str, version: int | None = None) -> dict[str, Any]:
        """Standalone JSON schema of an event version (a copy; for docs and producers)."""
        return copy.deepcopy(self.writer(event_type, version).schema)

    def fingerprint(self, event_type: str, version: int | None = None) -> bytes:
        """The 8 fingerprint bytes of the header `encode` writes for this version."""
        return self.writer(event_type, version).fingerprint

    def writer_for(self, fingerprint: bytes) -> SchemaVersion | None:
        """The writer schema with this fingerprint, or None if it is not in schemas/."""
        return self._by_fingerprint.get(bytes(fingerprint))

    def owner(self, event_type: str) -> str:
        """The service that owns an event type: the folder of its schema files."""
        self._versions(event_type)
        return self._newest[event_type].path.split("/", 1)[0]

    def _versions(self, event_type: str) -> dict[int, SchemaVersion]:
        versions = self._primary.get(event_type)
        if versions is None:
            raise UnknownEventType(f"{event_type!r} is not an event type in schemas/.")
        return versions

    # --- encoding ----------------------------------------------------------------------
    def encode(self, event_type: str, record: dict[str, Any], version: int | None = None) -> bytes:
        """Validate `record` against the event type's schema (newest by default) and return
        its single-object encoding. Raises EncodeError naming the field that is wrong."""
        writer = self.writer(event_type, version)
        what = f"{event_type} v{writer.version}"
        if not isinstance(record, Mapping):
            raise EncodeError(f"A {what} record must be a dict, not {type(record).__name__}.")
        try:
            validate(record, writer.parsed, raise_errors=True)
        except ValidationError as exc:
            raise EncodeError(_validation_message(what, writer.parsed["name"], exc)) from None
        named: dict[str, Any] = writer.parsed["__named_schemas"]
        problem = _check_value(writer.parsed, record, named, "")
        if problem is not None:
            raise EncodeError(f"The {what} record is invalid: {problem}.")
        body = io.BytesIO()
        body.write(SINGLE_OBJECT_MARKER)
        body.write(writer.fingerprint)
        try:
            schemaless_writer(body, writer.parsed, record)
        except Exception as exc:  # any fastavro failure means a bad record
            raise EncodeError(
                f"The {what} record could not be written ({type(exc).__name__});"
                " a value does not fit its field's type."
            ) from None
        return body.getvalue()

    # --- decoding ----------------------------------------------------------------------
    def decode(self, data: bytes | bytearray | memoryview) -> Decoded:
        """Decode single-object encoded bytes with the newest schema of their event type.

        Any input raises only CodecError subclasses, so consumers can dead-letter bad
        records instead of crashing."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise NotSingleObjectEncoded(
                f"An encoded event must be bytes, not {type(data).__name__}."
            )
        data = bytes(data)
        if len(data) < HEADER_SIZE:
            raise NotSingleObjectEncoded(
                f"The data is {len(data)} bytes long, shorter than the {HEADER_SIZE}-byte"
                " Avro single-object header, so it is not an encoded event."
            )
        if data[:2] != SINGLE_OBJECT_MARKER:
            raise NotSingleObjectEncoded(
                "The data does not start with the Avro single-object marker C3 01,"
                " so it is not an encoded event (or was written in another format)."
            )
        fp = data[2:HEADER_SIZE]
        writer = self._by_fingerprint.get(fp)
        if writer is None:
            raise UnknownFingerprint(fp)
        reader = self._newest[writer.event_type]
        what = f"{writer.event_type} v{writer.version}"
        body = io.BytesIO(data[HEADER_SIZE:])
        if reader is writer and self.fast:
            fast = self._fast.get(fp, _UNBUILT)
            if fast is _UNBUILT:
                fast = self._fast[fp] = _FastReader.build(writer)
            if fast is not None:
                return Decoded(writer.event_type, writer.version, fp, fast.read(body, data, what))
        try:
            if reader is writer:
                record = schemaless_reader(body, writer.parsed, None)
            else:
                record = schemaless_reader(body, writer.parsed, reader.parsed)
        except SchemaResolutionError:
            raise IncompatibleSchema(
                f"A {what} event cannot be read with the newest schema (v{reader.version}):"
                " the schemas are not backward compatible."
            ) from None
        except ValueError as exc:
            if "UUID" not in str(exc):  # fastavro's reading of a uuid field
                raise _undecodable(what, "ValueError") from None
            raise _not_a_uuid(what) from None
        except Exception as exc:  # arbitrary bytes may fail in any way
            raise _undecodable(what, type(exc).__name__) from None
        _check_whole(what, data, body)
        if not isinstance(record, dict):
            raise CorruptRecord(f"The body of a {what} event did not decode to a record.")
        return Decoded(writer.event_type, writer.version, fp, _plain(record))


# --- the compiled fast reader ----------------------------------------------------------
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAYS_SHIFT = date(1970, 1, 1).toordinal()
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CONVERTED = frozenset({"uuid", "date", *_TIMESTAMPS})
Convert = Callable[[Any], Any]


_PENDING: Any = object()


class _Unsupported(Exception):
    """A schema shape the fast reader does not compile (it then decodes the generic way)."""


def _uuid_text(value: str) -> str:
    """A uuid field as its canonical text (what fastavro's UUID and `_plain` give), without
    building a UUID when it is canonical already (nearly always)."""
    if _CANONICAL_UUID.fullmatch(value):
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise _BadUuid from None


class _BadUuid(Exception):
    pass


def _timestamp_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)  # as fastavro: not fromtimestamp (bpo-36439)


def _timestamp_millis(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value * 1000)


def _date(value: int) -> date:
    return date.fromordinal(value + _DAYS_SHIFT)


_LOGICAL: dict[str, Convert] = {
    "uuid": _uuid_text,
    "timestamp-micros": _timestamp_micros,
    "timestamp-millis": _timestamp_millis,
    "date": _date,
}


def _strip_logical(schema: Any) -> Any:
    """The schema without the logical types the fast reader converts itself."""
    if isinstance(schema, list):
        return [_strip_logical(s) for s in schema]
    if isinstance(schema, dict):
        return {
            k: _strip_logical(v)
            for k, v in schema.items()
            if not (k == "logicalType" and v in _CONVERTED)
        }
    return schema


class _Compiler:
    """Turns a schema into one converter of the values fastavro reads from its stripped
    form (None: nothing to convert), or raises _Unsupported."""

    def __init__(self) -> None:
        self.named: dict[str, Convert | None] = {}

    def _name(self, schema: dict[str, Any], namespace: str) -> tuple[str, str]:
        name = str(schema["name"])
        if "." in name:
            return name, name.rsplit(".", 1)[0]
        space = str(schema.get("namespace", namespace))
        return (f"{space}.{name}" if space else name), space

    def compile(self, schema: Any, namespace: str = "") -> Convert | None:
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return None
            for candidate in (schema, f"{namespace}.{schema}"):
                if candidate in self.named:
                    found = self.named[candidate]
                    if found is _PENDING:
                        raise _Unsupported(schema)  # a recursive record
                    return found
            raise _Unsupported(schema)  # a name not defined before its use
        if isinstance(schema, list):
            return self._union(schema, namespace)
        if not isinstance(schema, dict):
            raise _Unsupported(repr(schema))
        kind = schema.get("type")
        if isinstance(kind, dict | list):
            return self.compile(kind, namespace)
        if kind in ("record", "error"):
            return self._record(schema, namespace)
        if kind in ("enum", "fixed"):
            self.named[self._name(schema, namespace)[0]] = None
            return None
        if kind == "array":
            item = self.compile(schema["items"], namespace)
            return None if item is None else (lambda v: [item(x) for x in v])
        if kind == "map":
            value = self.compile(schema["values"], namespace)
            return None if value is None else (lambda v: {k: value(x) for k, x in v.items()})
        logical = schema.get("logicalType")
        if logical in _CONVERTED:
            return _LOGICAL[str(logical)]
        return self.compile(kind, namespace) if isinstance(kind, str) else None

    def _union(self, branches: list[Any], namespace: str) -> Convert | None:
        converters = [(b, self.compile(b, namespace)) for b in branches]
        convert = [c for _, c in converters if c is not None]
        if not convert:
            return None
        others = [b for b, c in converters if c is None and b != "null"]
        if len(convert) > 1 or others:
            raise _Unsupported("a union whose branch cannot be told from its value")
        only = convert[0]
        return lambda v: None if v is None else only(v)

    def _record(self, schema: dict[str, Any], namespace: str) -> Convert | None:
        fullname, space = self._name(schema, namespace)
        self.named[fullname] = _PENDING  # until its fields are compiled
        fields: list[tuple[str, Convert]] = []
        for f in schema.get("fields", []):
            c = self.compile(f["type"], space)
            if c is not None:
                fields.append((str(f["name"]), c))
        if not fields:
            self.named[fullname] = None
            return None

        def convert(record: dict[str, Any]) -> dict[str, Any]:
            for name, c in fields:
                record[name] = c(record[name])
            return record

        self.named[fullname] = convert
        return convert


_UNBUILT: Any = object()


def _undecodable(what: str, error: str) -> CorruptRecord:
    """The generic and the fast reader refuse undecodable bytes in the same words."""
    return CorruptRecord(
        f"The body of a {what} event does not decode ({error}); the bytes are truncated or corrupt."
    )


def _not_a_uuid(what: str) -> MalformedValue:
    return MalformedValue(
        f"A {what} event has a uuid field whose value is not a UUID"
        " (written as 8-4-4-4-12 hexadecimal digits)."
    )


def _check_whole(what: str, data: bytes, body: io.BytesIO) -> None:
    """The record took every byte after the header (else: corrupt, or another schema)."""
    extra = len(data) - HEADER_SIZE - body.tell()
    if extra:
        raise CorruptRecord(
            f"A {what} event has {extra} unexpected bytes after its record;"
            " the bytes are corrupt or were written with another schema."
        )


class _FastReader:
    """Decoding with one writer schema that is the newest of its type (nearly every
    record): fastavro reads the schema stripped of the logical types, and one compiled
    converter per schema turns exactly the fields that carry one into their values (a
    uuid's canonical text, a timestamp, a date), instead of fastavro building a UUID of
    every id and `_plain` walking the whole record to turn them back into text. The result
    equals the generic path's, errors included (tests/test_codec_fast_decode.py)."""

    def __init__(self, parsed: dict[str, Any], convert: Convert | None) -> None:
        self.parsed, self.convert = parsed, convert

    @classmethod
    def build(cls, writer: SchemaVersion) -> _FastReader | None:
        try:
            convert = _Compiler().compile(writer.schema)
            parsed = parse_schema(_strip_logical(writer.schema))
        except _Unsupported:
            return None
        return cls(parsed, convert) if isinstance(parsed, dict) else None

    def read(self, body: io.BytesIO, data: bytes, what: str) -> dict[str, Any]:
        try:
            record = schemaless_reader(body, self.parsed, None)
            if not isinstance(record, dict):
                raise CorruptRecord(f"The body of a {what} event did not decode to a record.")
            if self.convert is not None:
                record = self.convert(record)
        except CodecError:
            raise
        except ValueError:  # as the generic path names it (a UnicodeDecodeError too)
            raise _undecodable(what, "ValueError") from None
        except _BadUuid:
            raise _not_a_uuid(what) from None
        except Exception as exc:  # arbitrary bytes may fail in any way
            raise _undecodable(what, type(exc).__name__) from None
        _check_whole(what, data, body)
        return record


# --- helpers ---------------------------------------------------------------------------
def _writer_schemas(
    f: _SchemaFile,
    commons: Mapping[str, Mapping[int, _SchemaFile]],
    newest: Mapping[str, _SchemaFile],
) -> list[SchemaVersion]:
    """The primary writer schema of a file, plus one per older combination of the versions
    of the common types it uses (so bytes written before a common type changed decode)."""
    _, used = _expand(f, newest)
    names, frontier = set(used), list(used)
    while frontier:  # common types used by any version of the common types used
        for cf in commons[frontier.pop()].values():
            for name in _expand(cf, newest)[1] - names:
                names.add(name)
                frontier.append(name)
    ordered = sorted(names)
    out: list[SchemaVersion] = []
    for combo in itertools.product(*(sorted(commons[n], reverse=True) for n in ordered)):
        choice = {**newest, **{n: commons[n][v] for n, v in zip(ordered, combo, strict=True)}}
        primary = all(choice[n] is newest[n] for n in ordered)
        expanded, _ = _expand(f, choice)
        try:
            parsed = parse_schema(expanded)
            canonical = to_parsing_canonical_form(parsed)
        except Exception as exc:  # fastavro raises several types here
            raise SchemaDirectoryError(
                f"schemas/{f.path} is not a valid Avro schema: {exc}"
            ) from exc
        if not isinstance(parsed, dict):  # _check_event_file made sure it is a record
            raise SchemaDirectoryError(f"schemas/{f.path} does not define a record.")
        out.append(
            SchemaVersion(
                event_type=f.name,
                version=f.version,
                fingerprint=bytes.fromhex(avro_fingerprint(canonical, "CRC-64-AVRO")),
                canonical_form=canonical,
                schema=expanded,
                parsed=parsed,
                primary=primary,
                path=f.path,
            )
        )
    return out


def _plain(value: Any) -> Any:
    """uuid.UUID values (fastavro's reading of uuid strings) back to canonical strings:
    events carry ids as strings, so a decoded record equals the record that was encoded."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _describe(schema: Any) -> str:
    """A short human description of a schema type, e.g. 'long (timestamp-micros)'."""
    if isinstance(schema, list):
        return " or ".join(_describe(s) for s in schema)
    if isinstance(schema, str):
        return schema.rsplit(".", 1)[-1] if schema not in _PRIMITIVES else schema
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "enum":
            return f"one of {', '.join(schema.get('symbols', []))}"
        if kind in _NAMED:
            return f"a {kind} {str(schema.get('name', '')).rsplit('.', 1)[-1]}"
        if kind == "array":
            return f"an array of {_describe(schema.get('items'))}"
        if kind == "map":
            return f"a map of {_describe(schema.get('values'))}"
        if "logicalType" in schema:
            return f"{kind} ({schema['logicalType']})"
        return _describe(kind)
    return str(schema)


def _validation_message(what: str, record_name: str, exc: ValidationError) -> str:
    errors = getattr(exc, "errors", None) or []
    if not errors:
        return f"The {what} record does not match its schema."
    first = errors[0]
    path = str(getattr(first, "field", "") or "")
    if path.startswith(record_name + "."):
        where = f"field {path[len(record_name) + 1 :]!r}"
    elif "." in path:  # a field of a nested record: fastavro names the record, not the path
        record, name = path.rsplit(".", 1)
        where = f"field {name!r} of {record.rsplit('.', 1)[-1]}"
    else:
        where = "the record"
    datum = getattr(first, "datum", None)
    expected = _describe(getattr(first, "schema", None))
    if datum is None:
        return f"The {what} record is invalid: {where} is missing or null, expected {expected}."
    return (
        f"The {what} record is invalid: {where} has a value of type {type(datum).__name__},"
        f" expected {expected}."
    )


def _resolve(schema: Any, named: Mapping[str, Any]) -> Any:
    while True:
        if isinstance(schema, str) and schema in named:
            schema = named[schema]
        elif isinstance(schema, dict) and not isinstance(schema.get("type"), str):
            schema = schema.get("type")
        elif (
            isinstance(schema, dict)
            and schema["type"] not in _PRIMITIVES
            and schema["type"] not in _NAMED
            and schema["type"] not in ("array", "map")
        ):
            schema = schema["type"]
        else:
            return schema


def _fits(schema: Any, value: Any) -> bool:
    """Whether `value` plausibly belongs to this union branch (fastavro already validated)."""
    kind = schema if isinstance(schema, str) else schema.get("type")
    if isinstance(value, Mapping):
        return kind in ("record", "error", "map")
    if isinstance(value, list | tuple):
        return kind == "array"
    if isinstance(value, str):
        return kind in ("string", "enum")
    if isinstance(value, datetime):
        return kind == "long"
    if isinstance(value, date):
        return kind == "int"
    return False


def _check_value(schema: Any, value: Any, named: Mapping[str, Any], path: str) -> str | None:
    """What Avro validation lets through but the contract forbids: unknown fields (a typo
    would silently drop data), malformed uuids (unreadable later) and naive datetimes
    (ambiguous instants). Returns the first problem, or None."""
    schema = _resolve(schema, named)
    if value is None:
        return None
    if isinstance(schema, list):
        for branch in schema:
            branch = _resolve(branch, named)
            if _fits(branch, value):
                return _check_value(branch, value, named, path)
        return None
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if kind in ("record", "error") and isinstance(value, Mapping):
        fields = schema.get("fields", [])
        unknown = sorted(str(k) for k in value if k not in {f["name"] for f in fields})
        if unknown:
            where = repr(path) if path else "the record"
            return f"{where} has field(s) the schema does not define: {', '.join(unknown)}"
        for f in fields:
            sub = f"{path}.{f['name']}" if path else f["name"]
            problem = _check_value(f["type"], value.get(f["name"]), named, sub)
            if problem is not None:
                return problem
    elif kind == "array" and isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problem = _check_value(schema.get("items"), item, named, f"{path}[{i}]")
            if problem is not None:
                return problem
    elif kind == "map" and isinstance(value, Mapping):
        for key, item in value.items():
            problem = _check_value(schema.get("values"), item, named, f"{path}[{key!r}]")
            if problem is not None:
                return problem
    elif schema.get("logicalType") == "uuid" and isinstance(value, str):
        try:
            uuid.UUID(value)
        except ValueError:
            return f"field {path!r} is not a UUID"
    elif (
        schema.get("logicalType") in _TIMESTAMPS
        and isinstance(value, datetime)
        and value.utcoffset() is None
    ):
        return f"field {path!r} is a naive datetime; give a timezone-aware one (UTC)"
    return None
