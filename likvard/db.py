"""PostgreSQL plumbing shared by every service: pools, schema names and versioned migrations."""

from __future__ import annotations

import re
from importlib import resources

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class MigrationError(RuntimeError):
    """A migration failed; the database is left at the last version that applied fully."""


def check_schema_name(schema: str) -> str:
    """Schema names are spliced into SQL text, so only plain identifiers are allowed."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"not a valid schema name: {schema!r} (use lowercase letters, digits, _)")
    return schema


def ping(dsn: str, timeout: int = 3) -> bool:
    """Whether the database answers (readiness probes)."""
    try:
        with psycopg.connect(dsn, connect_timeout=timeout) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def make_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, name: str = "likvard"
) -> ConnectionPool:
    """A pool of connections. Broken connections are dropped when they come back; no
    per-checkout ping, which would double the round trips of every request."""
    pool = ConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        kwargs={"application_name": name},
    )
    pool.open(wait=True, timeout=30)
    return pool


def _migration_files(kind: str) -> list[tuple[int, str, str]]:
    """Migrations shipped in the package, named `<kind>_<NNNN>_<name>.sql`, in version order."""
    found: list[tuple[int, str, str]] = []
    for entry in resources.files("likvard.migrations").iterdir():
        m = re.match(rf"^{kind}_(\d{{4}})_(\w+)\.sql$", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(conn: psycopg.Connection[object], schema: str, kind: str) -> list[int]:
    """Apply the pending migrations of `kind` to `schema`; returns the versions applied.

    Runs under a transaction-level advisory lock so several processes starting at once
    (service, relay, CLI) apply each migration exactly once.
    """
    check_schema_name(schema)
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"likvard.migrate.{schema}",))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                " kind text NOT NULL, version integer NOT NULL, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (kind, version))"
            ).format(sql.Identifier(schema))
        )
        cur = conn.execute(
            sql.SQL("SELECT version FROM {}.schema_migrations WHERE kind = %s").format(
                sql.Identifier(schema)
            ),
            (kind,),
        )
        done = {int(row[0]) for row in cur.fetchall()}  # type: ignore[index]
        for version, name, text in _migration_files(kind):
            if version in done:
                continue
            try:
                conn.execute(text.replace("{schema}", schema).encode())
            except psycopg.Error as exc:
                raise MigrationError(
                    f"migration {kind} {version:04d} ({name}) failed in schema {schema}: {exc}"
                ) from exc
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.schema_migrations (kind, version, name) VALUES (%s, %s, %s)"
                ).format(sql.Identifier(schema)),
                (kind, version, name),
            )
            applied.append(version)
    return applied
