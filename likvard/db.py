"""PostgreSQL plumbing shared by every service: pools, schema names and versioned migrations.

Who migrates (docs/security.md, "Database roles"): LIKVARD_MIGRATE=auto (the default) lets a
process apply pending migrations at start when its role may create in the schema (the
owner role, or the superuser of a development database); a service's own role may not, so
the process only checks that the schema is at the version this release needs and stops
with "run `likvard db migrate`" if not. LIKVARD_MIGRATE=off never migrates at start, even
as the owner: production runs `likvard db migrate` (a job) before the services.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


MIGRATE_ENV = "LIKVARD_MIGRATE"
MIGRATE_MODES = ("auto", "off")
MIGRATE_HINT = (
    "run `likvard db migrate` with the owner role's URL (LIKVARD_OWNER_DATABASE_URL) before"
    " the services start (docs/security.md, Database roles)"
)


class MigrationError(RuntimeError):
    """A migration failed, or the schema is not at the version this release needs and this
    process may not migrate it; the database is left at the last version that applied fully."""


def migrate_mode(env: dict[str, str] | None = None) -> str:
    """LIKVARD_MIGRATE: `auto` (the default) or `off`; MigrationError names the fix."""
    value = ((os.environ if env is None else env).get(MIGRATE_ENV) or "auto").strip().lower()
    if value not in MIGRATE_MODES:
        raise MigrationError(
            f"{MIGRATE_ENV} must be auto (migrate at start when this role may create in the"
            f" schema) or off (never: `likvard db migrate` does it), not {value!r}"
        )
    return value


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


@contextmanager
def autocommit(pool: ConnectionPool) -> Iterator[psycopg.Connection[Any]]:
    """A pooled connection in autocommit for one block: a lone statement is then its own
    transaction, with no BEGIN and COMMIT round trips around it."""
    with pool.connection() as conn:
        if conn.autocommit:
            yield conn
            return
        conn.autocommit = True
        try:
            yield conn
        finally:
            with suppress(psycopg.Error):
                conn.autocommit = False


def _migration_files(kind: str) -> list[tuple[int, str, str]]:
    """Migrations shipped in the package, named `<kind>_<NNNN>_<name>.sql`, in version order."""
    found: list[tuple[int, str, str]] = []
    for entry in resources.files("likvard.migrations").iterdir():
        m = re.match(rf"^{kind}_(\d{{4}})_(\w+)\.sql$", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found)


def may_migrate(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Whether this process runs DDL in `schema` at start: LIKVARD_MIGRATE is not `off` and
    the connected role may create in the schema (or, when it does not exist yet, in the
    database). A service's role may not: it only checks (`require_current`,
    `require_relations`). Every idempotent CREATE/ALTER at start asks this first."""
    if migrate_mode() == "off":
        return False
    row = conn.execute(
        "SELECT CASE WHEN to_regnamespace(%s) IS NULL"
        " THEN has_database_privilege(current_database(), 'CREATE')"
        " ELSE has_schema_privilege(%s, 'CREATE') END",
        (check_schema_name(schema), schema),
    ).fetchone()
    return bool(row and row[0])


def pending(conn: psycopg.Connection[Any], schema: str, kind: str) -> list[int]:
    """The shipped migrations of `kind` not yet applied to `schema` (all of them when the
    schema or its migrations table does not exist)."""
    check_schema_name(schema)
    shipped = [version for version, _, _ in _migration_files(kind)]
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.schema_migrations",)
    ).fetchone()
    if not (row and row[0]):
        return shipped
    done = {
        int(r[0])
        for r in conn.execute(
            sql.SQL("SELECT version FROM {}.schema_migrations WHERE kind = %s").format(
                sql.Identifier(schema)
            ),
            (kind,),
        ).fetchall()
    }
    return [v for v in shipped if v not in done]


def require_current(conn: psycopg.Connection[Any], schema: str, kind: str) -> None:
    """MigrationError with the fix unless `schema` holds every shipped migration of `kind`."""
    try:
        missing = pending(conn, schema, kind)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise MigrationError(
            f"the role {conn.info.user!r} may not read {schema}.schema_migrations (its"
            f" grants are missing): {MIGRATE_HINT}"
        ) from exc
    if missing:
        raise MigrationError(
            f"schema {schema} lacks the {kind} migrations {', '.join(f'{v:04d}' for v in missing)}"
            f" this release needs, and the role {conn.info.user!r} may not apply them: "
            + MIGRATE_HINT
        )


def require_relations(conn: psycopg.Connection[Any], schema: str, names: list[str]) -> None:
    """MigrationError with the fix unless every table `names` exists in `schema`: the check
    a process makes instead of its CREATE TABLE IF NOT EXISTS when `may_migrate` is false."""
    missing = [
        name
        for name in names
        if not conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f"{check_schema_name(schema)}.{name}",)
        ).fetchone()[0]  # type: ignore[index]
    ]
    if missing:
        raise MigrationError(
            f"schema {schema} has no table {', '.join(missing)}, and the role"
            f" {conn.info.user!r} may not create it: " + MIGRATE_HINT
        )


def migrate(conn: psycopg.Connection[Any], schema: str, kind: str) -> list[int]:
    """Apply the pending migrations of `kind` to `schema`; returns the versions applied.

    Runs under a transaction-level advisory lock so several processes starting at once
    (service, relay, CLI) apply each migration exactly once. A process that may not
    migrate (`may_migrate`) only checks the schema is current, and applies nothing.
    """
    check_schema_name(schema)
    with conn.transaction():  # its own: a pooled connection is not left in a transaction
        allowed = may_migrate(conn, schema)
        if not allowed:
            require_current(conn, schema, kind)
    if not allowed:
        return []
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
        done = {int(row[0]) for row in cur.fetchall()}
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
