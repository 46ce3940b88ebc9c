"""`likvard db`: the database roles, and the migrations run as their owner.

`likvard db roles` (an administrator: superuser or CREATEROLE) creates the owner role and
one login role per service, passwords from LIKVARD_<ROLE>_DB_PASSWORD; `likvard db migrate`
(as the owner, LIKVARD_OWNER_DATABASE_URL) applies every migration and the grants of
`likvard.db_roles.PARTS`. The services then connect as their roles, which may not run DDL:
they only check the schema is current (`likvard.db.may_migrate`). docs/security.md,
"Database roles"."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
import typer
from psycopg.conninfo import make_conninfo

from likvard import db, db_roles
from likvard.cli.base import app, console, fail, stdout

db_app = typer.Typer(
    help="Database roles and migrations: create the roles, migrate as the owner.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")

PER_SERVICE_HELP = (
    "A database per service (compose, Kubernetes): each part in its own database on the"
    " URL's server (keys in intake's; other names from LIKVARD_DATABASE_NAMES); without"
    " it, every part in the URL's database"
)


def _url(option: str | None, *variables: str) -> str:
    for value in (option, *(os.environ.get(v) for v in variables)):
        if value:
            return value
    raise fail(
        f"no database URL: pass --url or set {' or '.join(variables)} (e.g."
        " postgresql://likvard_owner:PASSWORD@host/intake)"
    )


def _parts(names: list[str] | None) -> list[db_roles.Part]:
    unknown = [n for n in names or [] if n not in db_roles.PARTS]
    if unknown:
        raise fail(f"unknown part {', '.join(unknown)}; known: {', '.join(db_roles.PARTS)}")
    return [db_roles.PARTS[n] for n in names] if names else list(db_roles.PARTS.values())


NAMES_ENV = "LIKVARD_DATABASE_NAMES"


def database_names(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The real name of each service database, when not its own (`intake`, ...):
    LIKVARD_DATABASE_NAMES=intake=likvard_intake_prod,referral=... (a managed server's
    naming, or a test's)."""
    text = (os.environ if env is None else env).get(NAMES_ENV) or ""
    names = dict.fromkeys(db_roles.DATABASES, "")
    out = {d: d for d in db_roles.DATABASES}
    for item in filter(None, (i.strip() for i in text.split(","))):
        database, _, real = item.partition("=")
        if database.strip() not in names or not real.strip():
            raise fail(
                f"{NAMES_ENV} must be DATABASE=NAME pairs (DATABASE one of"
                f" {', '.join(db_roles.DATABASES)}), not {item!r}"
            )
        out[database.strip()] = real.strip()
    return out


def part_url(url: str, part: db_roles.Part, per_service: bool) -> str:
    """Where a part lives: its own database on the URL's server, or the URL's database."""
    return make_conninfo(url, dbname=database_names()[part.database]) if per_service else url


def schema_of(part: db_roles.Part) -> str:
    """The part's schema; the access log's may be renamed (LIKVARD_ACCESS_LOG_SCHEMA)."""
    if part.name == "access-log":
        from likvard.access_log import schema_name

        return schema_name()
    return part.schema


def _known_cases(conn: psycopg.Connection[Any], schema: str) -> None:
    from likvard.known_cases import CaseDirectory

    CaseDirectory(schema).migrate(conn)


def _followup_indexes(conn: psycopg.Connection[Any], schema: str) -> None:
    from services.followup.service import prepare

    prepare(conn, schema)


def _read_models(conn: psycopg.Connection[Any], schema: str) -> None:
    from services.projections import readmodels

    with conn.transaction():
        readmodels.migrate(conn, schema)


def _history(conn: psycopg.Connection[Any], schema: str) -> None:
    from services.projections import history

    with conn.transaction():
        history.migrate(conn, schema)


# What each part creates at start besides its `likvard.db` migrations (the services' own
# idempotent DDL), run here as the owner so that the services' roles never need to.
EXTRA_STEPS: dict[str, list[Callable[[psycopg.Connection[Any], str], None]]] = {
    "referral": [_known_cases],
    "followup": [_known_cases, _followup_indexes],
    "projections": [_read_models, _history],
}


def migrate_part(conn: psycopg.Connection[Any], part: db_roles.Part, schema: str) -> list[str]:
    """Every migration of one part as the owner, then its grants; returns what was applied.
    `conn` is in autocommit mode (each step commits on its own)."""
    os.environ[db.MIGRATE_ENV] = "auto"  # this process is the one that migrates
    if not db.may_migrate(conn, schema):
        owner = conn.execute(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
        whose = f"schema {schema} is owned by {owner[0]}" if owner else "it may not create schemas"
        raise db.MigrationError(
            f"the role {conn.info.user!r} may not migrate {part.name} ({whose}): run"
            f" `likvard db roles` as an administrator first (it makes {db_roles.OWNER} the"
            " owner of every schema), then migrate with the owner's URL"
        )
    applied = [f"{kind} {v:04d}" for kind in part.kinds for v in db.migrate(conn, schema, kind)]
    for step in EXTRA_STEPS.get(part.name, []):
        step(conn, schema)
    db_roles.grant_part(conn, part, schema)
    return applied


def run_migrations(
    url: str,
    parts: list[db_roles.Part],
    *,
    per_service: bool,
    schemas: Mapping[str, str] | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """`likvard db migrate`'s body (also `likvard up`'s): each part in its database."""
    for part in parts:
        schema = (schemas or {}).get(part.name) or schema_of(part)
        with psycopg.connect(part_url(url, part, per_service), autocommit=True) as conn:
            applied = migrate_part(conn, part, schema)
            left = db_roles.ungoverned(conn, part, schema)
        where = f"{part.database}.{schema}" if per_service else schema
        say(
            f"{part.name:<12} {where}: {', '.join(applied) or 'up to date'};"
            f" grants for {part.role} applied"
        )
        if left:
            say(f"  note: no grants defined for {', '.join(left)} (likvard.db_roles.PARTS)")


def create_all_roles(
    url: str,
    *,
    per_service: bool,
    env: Mapping[str, str] | None = None,
    schemas: Mapping[str, str] | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """`likvard db roles`'s body (also `likvard up`'s), as an administrator."""
    e = os.environ if env is None else env
    passwords = {r: e.get(db_roles.password_variable(r)) or None for r in db_roles.roles()}
    with psycopg.connect(url, autocommit=True) as conn:
        done = db_roles.create_roles(conn, passwords)
    for role, what in done.items():
        note = (
            ""
            if passwords[role]
            else f" (password unchanged: {db_roles.password_variable(role)} is not set)"
        )
        say(f"role {role:<20} {what}{note}")
    groups: dict[str, list[db_roles.Part]] = {}
    for part in db_roles.PARTS.values():
        groups.setdefault(part.database if per_service else "", []).append(part)
    for database, parts in groups.items():
        target = make_conninfo(url, dbname=database_names()[database]) if per_service else url
        with psycopg.connect(target, autocommit=True) as conn:
            adopted = db_roles.prepare_database(
                conn, parts, own_database=per_service, schemas=schemas
            )
            name = conn.info.dbname
        say(
            f"database {name:<16} ready for {', '.join(p.role for p in parts)}"
            + (f"; handed to {db_roles.OWNER}: {', '.join(adopted)}" if adopted else "")
        )


@db_app.command("roles")
def roles(
    url: str = typer.Option(
        None, help="An administrator's URL (default: LIKVARD_ADMIN_DATABASE_URL)"
    ),
    per_service: bool = typer.Option(False, "--database-per-service", help=PER_SERVICE_HELP),
) -> None:
    """Create the owner role and each service's role (idempotent; an administrator runs it).

    Passwords come from LIKVARD_OWNER_DB_PASSWORD, LIKVARD_INTAKE_DB_PASSWORD, ...
    (likvard.db_roles.password_variable); a role whose variable is unset keeps its
    password. Existing schemas (an earlier release made them as another role) are
    handed to likvard_owner."""
    target = _url(url, "LIKVARD_ADMIN_DATABASE_URL")
    try:
        create_all_roles(target, per_service=per_service, say=stdout().print)
    except psycopg.Error as exc:
        raise fail(f"creating the roles failed: {type(exc).__name__}: {exc}", 1) from exc


@db_app.command("migrate")
def migrate(
    parts: list[str] = typer.Argument(
        None, help=f"Parts to migrate (default: all): {', '.join(db_roles.PARTS)}"
    ),
    url: str = typer.Option(
        None,
        help="The owner role's URL (default: LIKVARD_OWNER_DATABASE_URL, else"
        " LIKVARD_DATABASE_URL)",
    ),
    per_service: bool = typer.Option(False, "--database-per-service", help=PER_SERVICE_HELP),
) -> None:
    """Apply every pending migration as the owner role, then the services' grants.

    Run it before the services start (the compose `migrate` service, the Kubernetes
    likvard-migrate Job); the services' roles may not migrate, and a service finding its
    schema behind stops with "run likvard db migrate". Safe to re-run."""
    target = _url(url, "LIKVARD_OWNER_DATABASE_URL", "LIKVARD_DATABASE_URL")
    try:
        run_migrations(target, _parts(parts), per_service=per_service, say=stdout().print)
    except db.MigrationError as exc:
        raise fail(str(exc), 1) from exc
    except psycopg.Error as exc:
        raise fail(f"migrating failed: {type(exc).__name__}: {exc}", 1) from exc
    console.print("[green]migrated[/green]")
