"""Where a read-model schema's figures came from: what a report records so it can be
reproduced (`reproduce.py`).

Three small tables beside the read models, written in the same transaction as each batch
(the live worker's and a replay's), so a report read in one snapshot sees exactly the
offsets and chain heads that its figures were folded from:

* ``applied_offsets(topic, partition, "offset")``: per topic partition, the highest offset
  of a record read into the schema (applied, a duplicate, or undecodable: each was seen);
* ``chain_heads(topic, stream_id, version, hash)``: per stream, the hash of its highest
  version seen. A digest of them (`heads_digest`) names the history up to those offsets:
  a broker refilled by `republish` may put other records at the same offsets, and the
  digest then differs;
* ``replay_settings(key, value)``: a replay's cutoffs (as of, as known on), since the
  schema's figures then leave events out and a reproduction must leave the same ones out.

Both upserts keep the greatest (offset, version), so re-delivery, concurrent workers and
replays in any order converge on the same rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from likvard.db import check_schema_name, may_migrate

OFFSETS = "applied_offsets"
HEADS = "chain_heads"
SETTINGS = "replay_settings"
TABLES = (OFFSETS, HEADS, SETTINGS)
REFERENCE_FILE = Path(__file__).resolve().parents[2] / "likvard" / "reference" / "reference.json"


def migrate(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Create the provenance tables (idempotent, in the caller's transaction); False when
    the role may not create them and they are missing (then nothing is recorded, and the
    schema's reports say they cannot be reproduced)."""
    t = sql.Identifier(check_schema_name(schema))
    if not may_migrate(conn, schema):
        return exists(conn, schema)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(t))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.applied_offsets (topic text NOT NULL,"
            ' partition integer NOT NULL, "offset" bigint NOT NULL,'
            " PRIMARY KEY (topic, partition))"
        ).format(t)
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.chain_heads (topic text NOT NULL,"
            " stream_id text NOT NULL, version integer NOT NULL, hash text NOT NULL,"
            " PRIMARY KEY (topic, stream_id))"
        ).format(t)
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.replay_settings (key text PRIMARY KEY, value text)"
        ).format(t)
    )
    return True


def exists(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Whether every provenance table is in `schema` (checked without raising, so a
    caller's transaction is not aborted)."""
    for name in TABLES:
        row = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f"{check_schema_name(schema)}.{name}",)
        ).fetchone()
        if not (row and row[0]):
            return False
    return True


@dataclass
class Marks:
    """What a batch of records adds to the provenance: offsets and chain heads (pure)."""

    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    heads: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)

    def add(self, topic: str, partition: int, offset: int, headers: Mapping[str, bytes]) -> None:
        key = (topic, partition)
        if offset > self.offsets.get(key, -1):
            self.offsets[key] = offset
        try:
            stream_id = headers["stream_id"].decode()
            version = int(headers["stream_version"])
            digest = headers["hash"].decode()
        except (KeyError, ValueError, UnicodeDecodeError):
            return  # an unchained record: the chain check reports it; it is no head
        head = (topic, stream_id)
        if head not in self.heads or version > self.heads[head][0]:
            self.heads[head] = (version, digest)

    def __bool__(self) -> bool:
        return bool(self.offsets)


def record(conn: psycopg.Connection[Any], schema: str, marks: Marks) -> None:
    """Upsert a batch's marks in the caller's transaction (greatest offset and version win;
    rows in key order, so concurrent writers lock them in the same order)."""
    if not marks:
        return
    t = sql.Identifier(check_schema_name(schema))
    keys = sorted(marks.offsets)
    conn.execute(
        sql.SQL(
            'INSERT INTO {}.applied_offsets AS t (topic, partition, "offset")'
            " SELECT * FROM unnest(%s::text[], %s::int[], %s::bigint[])"
            ' ON CONFLICT (topic, partition) DO UPDATE SET "offset" = excluded."offset"'
            ' WHERE excluded."offset" > t."offset"'
        ).format(t),
        ([k[0] for k in keys], [k[1] for k in keys], [marks.offsets[k] for k in keys]),
    )
    if not marks.heads:
        return
    heads = sorted(marks.heads)
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.chain_heads AS t (topic, stream_id, version, hash)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[])"
            " ON CONFLICT (topic, stream_id) DO UPDATE"
            " SET version = excluded.version, hash = excluded.hash"
            " WHERE excluded.version > t.version"
        ).format(t),
        (
            [h[0] for h in heads],
            [h[1] for h in heads],
            [marks.heads[h][0] for h in heads],
            [marks.heads[h][1] for h in heads],
        ),
    )


def set_cutoffs(
    conn: psycopg.Connection[Any], schema: str, *, as_of: date | None, known_on: date | None
) -> None:
    """Record a replay's cutoffs in its schema (None: no cutoff)."""
    t = sql.Identifier(check_schema_name(schema))
    for key, value in (("as_of", as_of), ("as_known_on", known_on)):
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.replay_settings (key, value) VALUES (%s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ).format(t),
            (key, value.isoformat() if value else None),
        )


def heads_digest(heads: Iterable[tuple[str, str, int, str]]) -> str:
    """SHA-256 over (topic, stream, version, hash) lines in byte order of topic and stream:
    one value naming every stream's head."""
    digest = hashlib.sha256()
    for topic, stream_id, version, hash_hex in sorted(heads, key=lambda h: (h[0], h[1])):
        digest.update(f"{topic}\t{stream_id}\t{version}\t{hash_hex}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Applied:
    """What a schema's read models were folded from, read in the caller's snapshot."""

    offsets: dict[tuple[str, int], int]
    streams: int
    heads_sha256: str
    cutoffs: dict[str, str | None]

    def offsets_json(self) -> list[dict[str, Any]]:
        return [
            {"topic": topic, "partition": partition, "offset": offset}
            for (topic, partition), offset in sorted(self.offsets.items())
        ]


def applied(conn: psycopg.Connection[Any], schema: str) -> Applied:
    """The offsets, chain-heads digest and cutoffs of `schema` (empty when it has no
    provenance tables: read models made without Kafka, or before provenance existed)."""
    if not exists(conn, schema):
        return Applied({}, 0, heads_digest([]), {})
    t = sql.Identifier(check_schema_name(schema))
    offsets = {
        (str(topic), int(p)): int(o)
        for topic, p, o in conn.execute(
            sql.SQL('SELECT topic, partition, "offset" FROM {}.applied_offsets').format(t)
        ).fetchall()
    }
    heads = [
        (str(a), str(b), int(c), str(d))
        for a, b, c, d in conn.execute(
            sql.SQL("SELECT topic, stream_id, version, hash FROM {}.chain_heads").format(t)
        ).fetchall()
    ]
    cutoffs = {
        str(k): (None if v is None else str(v))
        for k, v in conn.execute(sql.SQL("SELECT key, value FROM {}.replay_settings").format(t))
    }
    return Applied(offsets, len(heads), heads_digest(heads), cutoffs)


@cache
def code_version() -> dict[str, str | None]:
    """The package version, and the git commit when known: LIKVARD_GIT_COMMIT (set at
    image build), else the checkout's HEAD (an image has no git: then None)."""
    try:
        version: str | None = metadata.version("likvard")
    except metadata.PackageNotFoundError:
        version = None
    commit = os.environ.get("LIKVARD_GIT_COMMIT") or None
    root = Path(__file__).resolve().parents[2]
    if commit is None and (root / ".git").exists():
        try:
            done = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            commit = (done.stdout.strip() or None) if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"package": "likvard", "version": version, "commit": commit}


def reference_version(path: Path = REFERENCE_FILE) -> int | str | None:
    """The `version` of the reference data (districts, units, interventions) in use."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int | str) else None
