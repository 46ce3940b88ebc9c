"""Backward compatibility of the contracts: the newest schema of every event type must read
every older writer schema, so events written years ago stay readable forever.

The check follows Avro's schema-resolution rules, and is stricter where Avro would read old
events but silently lose or reinterpret what they say (see schemas/README.md):
- a field in an older version must still exist in the newest (by name or alias);
- an enum symbol of an older version must still exist in the newest;
- a logical type (uuid, date, timestamp-micros, ...) must not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from likvard.codec import Catalogue, SchemaVersion

__all__ = ["check_backward_compatible", "reader_problems"]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_PROMOTIONS = frozenset(
    {
        ("int", "long"),
        ("int", "float"),
        ("int", "double"),
        ("long", "float"),
        ("long", "double"),
        ("float", "double"),
        ("string", "bytes"),
        ("bytes", "string"),
    }
)


def check_backward_compatible(catalogue: Catalogue) -> list[str]:
    """Problems found (empty = compatible), one sentence each, for every writer schema of
    every event type that the newest schema of that type cannot fully read."""
    problems: list[str] = []
    for event_type in catalogue.event_types():
        reader = catalogue.reader(event_type)
        for writer in catalogue.writers(event_type):
            if writer.fingerprint == reader.fingerprint:
                continue
            label = f"{event_type} v{writer.version} -> v{reader.version}"
            if not writer.primary:
                label += f" (as written with older shared types, {writer.fingerprint.hex()})"
            problems.extend(f"{label}: {p}" for p in reader_problems(writer, reader))
    return problems


def reader_problems(writer: SchemaVersion, reader: SchemaVersion) -> list[str]:
    """Why `reader` cannot read what `writer` wrote without loss (empty = it can)."""
    return _Check(writer.parsed["__named_schemas"], reader.parsed["__named_schemas"]).check(
        writer.parsed, reader.parsed, ""
    )


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class _Check:
    def __init__(self, writer_named: Mapping[str, Any], reader_named: Mapping[str, Any]) -> None:
        self.wn = writer_named
        self.rn = reader_named
        self.seen: set[tuple[str, str]] = set()

    @staticmethod
    def _resolve(schema: Any, named: Mapping[str, Any]) -> Any:
        while True:
            if isinstance(schema, str) and schema not in _PRIMITIVES and schema in named:
                schema = named[schema]
            elif isinstance(schema, dict) and not isinstance(schema.get("type"), str):
                schema = schema.get("type")
            elif isinstance(schema, dict) and schema["type"] in named:
                schema = named[schema["type"]]
            else:
                return schema

    @staticmethod
    def _kind(schema: Any) -> str:
        if isinstance(schema, list):
            return "union"
        if isinstance(schema, str):
            return schema
        kind = str(schema.get("type"))
        return "record" if kind == "error" else kind

    @staticmethod
    def _logical(schema: Any) -> str | None:
        return schema.get("logicalType") if isinstance(schema, dict) else None

    def _names_match(self, w: Any, r: Any) -> bool:
        wanted = _short(str(w.get("name", "")))
        names = {_short(str(r.get("name", ""))), *(_short(a) for a in r.get("aliases", []))}
        return wanted in names

    def _matches(self, w: Any, r: Any) -> bool:
        """Avro's 'match' used to pick the reader union branch for a writer type."""
        wk, rk = self._kind(w), self._kind(r)
        if wk in ("record", "enum", "fixed"):
            return wk == rk and self._names_match(w, r)
        return wk == rk or (wk, rk) in _PROMOTIONS

    def check(self, w: Any, r: Any, path: str) -> list[str]:
        w, r = self._resolve(w, self.wn), self._resolve(r, self.rn)
        where = f"field {path!r}" if path else "the record"
        if isinstance(w, list):  # every branch the writer may have used must be readable
            return [p for branch in w for p in self.check(branch, r, path)]
        if isinstance(r, list):
            for branch in r:
                resolved = self._resolve(branch, self.rn)
                if self._matches(w, resolved):
                    return self.check(w, resolved, path)
            return [f"{where} was {self._kind(w)}; no branch of the newest union can read it"]
        wk, rk = self._kind(w), self._kind(r)
        if not self._matches(w, r):
            if wk == rk:  # named types whose names differ
                return [f"{where} changes type from {w.get('name')} to {r.get('name')}"]
            return [f"{where} changes type from {wk} to {rk}, which Avro cannot convert"]
        if self._logical(w) != self._logical(r):
            return [
                f"{where} changes logical type from {self._logical(w) or 'none'} to"
                f" {self._logical(r) or 'none'}, so old values would mean something else"
            ]
        if wk == "record":
            return self._record(w, r, path)
        if wk == "enum":
            lost = [s for s in w.get("symbols", []) if s not in r.get("symbols", [])]
            if lost:
                return [f"{where} loses enum symbol(s) {', '.join(lost)} of {_short(w['name'])}"]
        if wk == "fixed" and w.get("size") != r.get("size"):
            return [f"{where} changes fixed size from {w.get('size')} to {r.get('size')}"]
        if wk == "array":
            return self.check(w.get("items"), r.get("items"), f"{path}[]")
        if wk == "map":
            return self.check(w.get("values"), r.get("values"), f"{path}{{}}")
        return []

    def _record(self, w: Any, r: Any, path: str) -> list[str]:
        key = (str(w["name"]), str(r["name"]))
        if key in self.seen:  # a recursive type already being checked
            return []
        self.seen.add(key)
        prefix = f"{path}." if path else ""
        written = {f["name"]: f for f in w.get("fields", [])}
        matched: set[str] = set()
        problems: list[str] = []
        for rf in r.get("fields", []):
            name = next((n for n in [rf["name"], *rf.get("aliases", [])] if n in written), None)
            if name is None:
                if "default" not in rf:
                    problems.append(
                        f"field {prefix + rf['name']!r} is new and has no default,"
                        " so older events have no value for it"
                    )
                continue
            matched.add(name)
            problems.extend(self.check(written[name]["type"], rf["type"], prefix + rf["name"]))
        for name in written:
            if name not in matched:
                problems.append(
                    f"field {prefix + name!r} is gone from the newest version (removed, or"
                    " renamed without an alias), so its values in older events would be lost"
                )
        return problems
