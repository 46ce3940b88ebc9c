"""Least privilege in PostgreSQL: who owns the schemas, and what each service's role may do.

One owner role (`likvard_owner`) owns every schema and table and runs the migrations
(`likvard db migrate`). Each service connects as a login role of its own that may read and
append to its own schema only: never UPDATE or DELETE an event, never own a table (an
owner could disable or drop the append-only trigger), never see another schema. The key
store's role (`likvard_keys`) alone may read the persons' wrapped data keys.

What a role may do is a table here, `PARTS`, the least each process needs (found by reading
what it runs, proved by tests/test_db_roles.py running the services' paths as the roles):
- streams: SELECT ... FOR UPDATE and UPDATE of the head (version, last_hash) per append;
- outbox: the relay claims rows FOR UPDATE SKIP LOCKED, which PostgreSQL allows only with
  an UPDATE privilege, so UPDATE of one column (created_at) that nothing writes; DELETE
  after the broker's ack;
- known_cases: an upsert (INSERT ... ON CONFLICT DO UPDATE) under FOR UPDATE;
- the read models (projections): SELECT, INSERT, UPDATE, DELETE (they are rebuilt from
  the topics; retention culls them);
- identity columns need no sequence privilege; NOTIFY, LISTEN and advisory locks none.

This module is pure SQL generation, plus `apply` functions that run it on a connection.
Grants are re-applied after every migration (`grant_part`), table by table: a table a later
migration adds gets no privilege until it is listed here (`ungoverned` finds such tables).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from likvard.db import check_schema_name

OWNER = "likvard_owner"
ROLE_PREFIX = "likvard_"


@dataclass(frozen=True)
class Grant:
    """The privileges of a part's role on one table; () means none, on purpose."""

    table: str
    privileges: tuple[str, ...]


@dataclass(frozen=True)
class Part:
    """What one role may do in one schema, and where that schema lives in a deployment with
    a database per service (`database`). `kinds` are its `likvard.db` migration kinds."""

    name: str
    schema: str
    role: str
    database: str
    grants: tuple[Grant, ...]
    kinds: tuple[str, ...] = ()
    # May create schemas in its database: the read side's replays (the auditor's History
    # page, POST /history/replays) build fresh read models in a schema of their own.
    creates_schemas: bool = False

    @property
    def tables(self) -> list[str]:
        return [g.table for g in self.grants]


_READ_APPEND = ("SELECT", "INSERT")
_EVENT_STORE = (
    Grant("schema_migrations", ("SELECT",)),
    Grant("streams", ("SELECT", "INSERT", "UPDATE (version, last_hash)")),
    Grant("events", _READ_APPEND),
    Grant("outbox", ("SELECT", "INSERT", "DELETE", "UPDATE (created_at)")),
)
_CONSUMER = (Grant("inbox", _READ_APPEND), Grant("known_cases", ("SELECT", "INSERT", "UPDATE")))
_READ_MODEL = ("SELECT", "INSERT", "UPDATE", "DELETE")

PARTS: dict[str, Part] = {
    p.name: p
    for p in (
        Part(
            "intake",
            "intake",
            "likvard_intake",
            "intake",
            (*_EVENT_STORE, Grant("inbox", ())),
            ("eventstore",),
        ),
        Part(
            "keys",
            "keys",
            "likvard_keys",
            "intake",
            (
                Grant("schema_migrations", ("SELECT",)),
                Grant("data_keys", (*_READ_APPEND, "UPDATE")),
            ),
            ("keys",),
        ),
        Part(
            "referral",
            "referral",
            "likvard_referral",
            "referral",
            (*_EVENT_STORE, *_CONSUMER),
            ("eventstore",),
        ),
        Part(
            "followup",
            "followup",
            "likvard_followup",
            "followup",
            (*_EVENT_STORE, *_CONSUMER),
            ("eventstore",),
        ),
        Part(
            "projections",
            "projections",
            "likvard_projections",
            "projections",
            tuple(
                Grant(t, _READ_MODEL)
                for t in (
                    "processed",
                    "case_facts",
                    "timeline",
                    "access_log",
                    # what the read models were computed up to (services/projections/provenance)
                    "applied_offsets",
                    "chain_heads",
                    "replay_settings",
                    # the auditors' replay jobs and chain verifications (history.py)
                    "replay_jobs",
                    "verifications",
                )
            ),
            creates_schemas=True,
        ),
        Part(
            "access-log",
            "access_log",
            "likvard_access_log",
            "access_log",
            (*_EVENT_STORE, Grant("inbox", ())),
            ("eventstore",),
        ),
    )
}
"""Every part, by the name `likvard db migrate` takes. `keys` lives in the intake database."""

DATABASES = sorted({p.database for p in PARTS.values()})


def roles() -> list[str]:
    """Every role Likvärd uses: the owner first, then one per part."""
    return [OWNER, *(p.role for p in PARTS.values())]


def password_variable(role: str) -> str:
    """The environment variable holding a role's password: likvard_access_log ->
    LIKVARD_ACCESS_LOG_DB_PASSWORD."""
    return f"LIKVARD_{role.removeprefix(ROLE_PREFIX).upper()}_DB_PASSWORD"


def _ident(*names: str) -> sql.Identifier:
    return sql.Identifier(*names)


# --- the SQL (pure) ------------------------------------------------------------------------
def role_sql(role: str, *, exists: bool, password_hash: str | None) -> list[sql.Composed]:
    """Create or bring into line one login role: no superuser, no CREATEDB or CREATEROLE,
    no inheritance, no row-level-security bypass; the password (a SCRAM hash, never the
    clear text in the server's log) only when given."""
    statements = [] if exists else [sql.SQL("CREATE ROLE {}").format(_ident(role))]
    attributes = sql.SQL(
        "ALTER ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION"
        " NOBYPASSRLS"
    ).format(_ident(role))
    if password_hash is not None:
        attributes = sql.SQL("{} PASSWORD {}").format(attributes, sql.Literal(password_hash))
    return [*statements, attributes]


def database_sql(database: str, parts: Iterable[Part]) -> list[sql.Composed]:
    """A service's database (one per service): owned by the owner role, connectable only by
    the roles of the parts it holds; nobody else creates in it or in its `public`."""
    db = _ident(database)
    out = [
        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, _ident(OWNER)),
        sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db),
        sql.SQL("GRANT CONNECT, TEMPORARY, CREATE ON DATABASE {} TO {}").format(db, _ident(OWNER)),
    ]
    out += [sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, _ident(p.role)) for p in parts]
    out += _schema_creators(database, parts)
    return out


def _schema_creators(database: str, parts: Iterable[Part]) -> list[sql.Composed]:
    return [
        sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(_ident(database), _ident(p.role))
        for p in parts
        if p.creates_schemas
    ]


def shared_database_sql(database: str) -> list[sql.Composed]:
    """One database for every part (`likvard up`, a laptop): the owner may create schemas,
    and so may the parts that build schemas of their own (the read side's replays)."""
    return [
        sql.SQL("GRANT CONNECT, CREATE ON DATABASE {} TO {}").format(
            _ident(database), _ident(OWNER)
        ),
        *_schema_creators(database, PARTS.values()),
    ]


def adopt_sql(
    schema: str, tables: Iterable[str], functions: Iterable[tuple[str, str]]
) -> list[sql.Composed]:
    """Hand an existing schema (made by an earlier release as another role) and what is in
    it to the owner role, so `likvard db migrate` may change it."""
    s = check_schema_name(schema)
    out = [sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(_ident(s), _ident(OWNER))]
    out += [
        sql.SQL("ALTER TABLE {} OWNER TO {}").format(_ident(s, t), _ident(OWNER)) for t in tables
    ]
    out += [  # (name, identity arguments as PostgreSQL prints them)
        sql.SQL("ALTER FUNCTION {}({}) OWNER TO {}").format(
            _ident(s, name), sql.SQL(args), _ident(OWNER)
        )
        for name, args in functions
    ]
    return out


def grant_sql(
    part: Part, schema: str | None = None, existing: Iterable[str] | None = None
) -> list[sql.Composed]:
    """The part's role gets USAGE on its schema and exactly its `grants` there: first every
    privilege it holds on the schema's tables is revoked (a privilege dropped from `PARTS`
    goes away), then each listed one granted. `existing`: only these tables (a table a
    process creates later, such as known_cases, is granted on the next run)."""
    s = _ident(check_schema_name(schema or part.schema))
    role = _ident(part.role)
    present = set(part.tables if existing is None else existing)
    out = [
        sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(s),
        sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(s, role),
        sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(s, role),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, role),
    ]
    for g in part.grants:
        if g.privileges and g.table in present:
            out.append(
                sql.SQL("GRANT {} ON {}.{} TO {}").format(
                    sql.SQL(", ").join(sql.SQL(p) for p in g.privileges), s, _ident(g.table), role
                )
            )
    return out


# --- applying it -----------------------------------------------------------------------------
def _tables(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY 1",
        (schema,),
    ).fetchall()
    return [r[0] for r in rows]


def _functions(conn: psycopg.Connection[Any], schema: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT p.proname, pg_get_function_identity_arguments(p.oid) FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s ORDER BY 1, 2",
        (schema,),
    ).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def _run(conn: psycopg.Connection[Any], statements: Iterable[sql.SQL | sql.Composed]) -> None:
    for statement in statements:
        conn.execute(statement)


def create_roles(
    conn: psycopg.Connection[Any],
    passwords: Mapping[str, str | None],
    names: Iterable[str] | None = None,
) -> dict[str, str]:
    """Create (or bring into line) the roles as an administrator (superuser or CREATEROLE);
    a role whose password is None keeps the one it has (a new one then has none: it can
    sign in only where the server trusts the connection, a development server). Returns
    role -> "created" | "updated"."""
    done: dict[str, str] = {}
    with conn.transaction():
        for role in names or roles():
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            password = passwords.get(role)
            hashed = (
                conn.pgconn.encrypt_password(password.encode(), role.encode()).decode()
                if password
                else None
            )
            _run(conn, role_sql(role, exists=exists is not None, password_hash=hashed))
            done[role] = "updated" if exists else "created"
    return done


def prepare_database(
    conn: psycopg.Connection[Any],
    parts: Iterable[Part],
    *,
    own_database: bool,
    schemas: Mapping[str, str] | None = None,
) -> list[str]:
    """As the administrator, in the database `conn` is connected to: its ownership and
    CONNECT grants (`own_database`: a database per service) or the owner's CREATE on a
    shared one, and every existing schema of `parts` handed to the owner. Returns the
    schemas adopted."""
    parts = list(parts)
    schemas = dict(schemas or {})
    adopted: list[str] = []
    with conn.transaction():
        database = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        _run(conn, database_sql(database, parts) if own_database else shared_database_sql(database))
        if own_database:
            _run(conn, [sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC")])
        for part in parts:
            schema = schemas.get(part.name, part.schema)
            row = conn.execute(
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s", (schema,)
            ).fetchone()
            if row is None or row[0] == OWNER:
                continue
            _run(conn, adopt_sql(schema, _tables(conn, schema), _functions(conn, schema)))
            adopted.append(schema)
    return adopted


def grant_part(conn: psycopg.Connection[Any], part: Part, schema: str | None = None) -> None:
    """Apply the part's grants (as the owner, after its migrations), in one transaction."""
    schema = schema or part.schema
    with conn.transaction():
        _run(conn, grant_sql(part, schema, _tables(conn, schema)))


def ungoverned(conn: psycopg.Connection[Any], part: Part, schema: str | None = None) -> list[str]:
    """Tables in the part's schema that `PARTS` says nothing about: a migration added them
    and nobody decided what the role may do with them."""
    return [t for t in _tables(conn, schema or part.schema) if t not in part.tables]
