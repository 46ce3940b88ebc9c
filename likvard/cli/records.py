"""Records management on the command line: `likvard retention run` culls (shreds) the
persons past the retention period, `likvard keys rewrap` moves every data key to the
current key-encryption key after a KEK rotation."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import typer

from likvard.cli.base import app, console, fail, settings_or_exit, stdout
from likvard.config import ConfigError

if TYPE_CHECKING:
    import psycopg

    from likvard.config import Settings
    from likvard.retention import Plan

retention_app = typer.Typer(
    help="Culling (gallring): shred the personal data of persons whose last entry is past"
    " the retention period, except those the archive decision keeps.",
    no_args_is_help=True,
)
app.add_typer(retention_app, name="retention")
keys_app = typer.Typer(help="The persons' data keys (envelope encryption).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _persons(conn: psycopg.Connection[Any], projections: str) -> list[tuple[Any, ...]]:
    """Per person: the district of their latest case, their last entry, whether any case is
    in the archive sample (the read models count every service's events)."""
    from psycopg import sql

    from likvard.db import check_schema_name

    query = sql.SQL(
        "SELECT person,"
        " (array_agg(COALESCE(district_now, district_at_intake)"
        "  ORDER BY last_event_at DESC NULLS LAST))[1],"
        " max(last_event_at), bool_or(archive_sample)"
        " FROM {}.case_facts WHERE person IS NOT NULL AND last_event_at IS NOT NULL"
        " GROUP BY person"
    ).format(sql.Identifier(check_schema_name(projections)))
    return conn.execute(query).fetchall()


def _erased(conn: psycopg.Connection[Any], intake: str, persons: list[str]) -> set[str]:
    """The persons every one of whose cases already records an erasure."""
    from psycopg import sql

    from likvard.db import check_schema_name

    if not persons:
        return set()
    query = sql.SQL(
        "SELECT r.payload->>'person' FROM {s}.events r"
        " WHERE r.event_type = 'IntakeRegistered' AND r.payload->>'person' = ANY(%s)"
        " GROUP BY 1 HAVING bool_and(EXISTS (SELECT 1 FROM {s}.events e"
        "  WHERE e.stream_id = r.stream_id AND e.event_type = 'PersonalDataErased'))"
    ).format(s=sql.Identifier(check_schema_name(intake)))
    return {str(r[0]) for r in conn.execute(query, (persons,)).fetchall()}


def _plan(
    settings: Settings,
    projections_url: str,
    projections: str,
    intake: str,
    today: date,
    years: int,
) -> Plan:
    import psycopg

    from likvard.retention import Person, plan

    try:
        with psycopg.connect(projections_url, connect_timeout=10) as conn:
            rows = _persons(conn, projections)
        with psycopg.connect(settings.require_database(), connect_timeout=10) as conn:
            erased = _erased(conn, intake, [str(r[0]) for r in rows])
    except psycopg.errors.UndefinedTable as exc:
        raise fail(
            f"no read models in schema {projections!r} or no intake events in {intake!r}:"
            " run the projection worker first, or name the schemas"
        ) from exc
    except psycopg.Error as exc:
        raise fail(f"cannot read the records: {type(exc).__name__}", 1) from exc
    people: list[Person] = [
        Person(str(p), str(d or "?"), last, bool(sample), str(p) in erased)
        for p, d, last, sample in rows
    ]
    return plan(people, today, years)


def _show(result: Plan, years: int, today: date, dry_run: bool) -> None:
    from rich.table import Table

    from likvard.retention import cutoff

    out = stdout()
    verb = "would be culled" if dry_run else "culled"
    table = Table(title=f"Persons whose last entry is before {cutoff(today, years)} ({verb})")
    table.add_column("district")
    table.add_column("year of last entry", justify="right")
    table.add_column("persons", justify="right")
    for (district, year), n in sorted(result.counts.items()):
        table.add_row(district, str(year), str(n))
    out.print(table)
    out.print(
        f"{len(result.cull)} {verb}; kept by the archive decision: {result.kept_by_archive};"
        f" culled before: {result.already_culled}; within the {years}-year period:"
        f" {result.within_period}"
    )


@retention_app.command("run")
def retention_run(
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Only count (per district and year): change nothing"
    ),
    today: datetime = typer.Option(
        None, formats=["%Y-%m-%d"], help="Cull as of this day (default: today)"
    ),
    years: int = typer.Option(
        None, min=1, max=100, help="Retention period in years (default LIKVARD_RETENTION_YEARS)"
    ),
    projections_database_url: str = typer.Option(
        None,
        envvar="LIKVARD_PROJECTIONS_DATABASE_URL",
        help="The read models' database (default LIKVARD_DATABASE_URL)",
    ),
    intake_schema: str = typer.Option("intake", help="The intake event store's schema"),
    projections_schema: str = typer.Option("projections", help="The read models' schema"),
) -> None:
    """Cull every person whose last entry (in any case, any service) is older than the
    retention period and whom the archive decision does not keep: their data keys are
    destroyed and each case records PersonalDataErased (RETENTION_PERIOD_ENDED). Safe to
    re-run and to interrupt: a second run does nothing more. Lists counts, never persons."""
    from rich.progress import Progress

    from likvard.cli.operator import operator, record_read
    from likvard.policy import Action

    settings = settings_or_exit()
    try:
        settings.require_database()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    day = today.date() if today else date.today()
    period = years or settings.retention_years
    record_read(settings, Action.RECORDS_MANAGE, "retention-run")
    result = _plan(
        settings,
        projections_database_url or settings.require_database(),
        projections_schema,
        intake_schema,
        day,
        period,
    )
    if dry_run or not result.cull:
        _show(result, period, day, dry_run=True)
        return
    from likvard.districts import DistrictRegistry
    from likvard.eventstore import open_store
    from likvard.http import RequestContext
    from likvard.keys import open_key_store
    from services.intake.erasure import erase_person
    from services.intake.personal import keys_schema_for
    from services.intake.service import make_service

    ctx = RequestContext(
        actor=operator(settings).actor,
        correlation_id=str(uuid.uuid4()),
        traceparent=None,
    )
    try:
        keys = open_key_store(settings, schema=keys_schema_for(intake_schema), max_size=2)
    except Exception as exc:
        raise fail(f"cannot open the key store: {exc}", 1) from exc
    try:
        store = open_store(settings, "intake", schema=intake_schema, max_size=2)
        svc = make_service(store, DistrictRegistry.load())
        try:
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("culling", total=len(result.cull))
                for person in result.cull:
                    erase_person(svc, keys, person, "RETENTION_PERIOD_ENDED", ctx)
                    progress.advance(task)
        except Exception as exc:
            raise fail(
                f"culling stopped ({type(exc).__name__}); run it again to finish: what is"
                " done stays done",
                1,
            ) from exc
        finally:
            store.pool.close()
    finally:
        keys.pool.close()
    _show(result, period, day, dry_run=False)


@keys_app.command("rewrap")
def keys_rewrap(
    batch_size: int = typer.Option(500, min=1, max=10_000, help="Keys per transaction"),
    schema: str = typer.Option("keys", help="The key store's schema"),
) -> None:
    """After a KEK rotation (the new KEK in LIKVARD_KEK and LIKVARD_KEK_ID, the old one in
    LIKVARD_KEK_PREVIOUS): re-wrap every live data key with the new KEK. Safe to re-run;
    when it reports 0, LIKVARD_KEK_PREVIOUS can be removed."""
    from likvard.keys import KekError, open_key_store

    settings = settings_or_exit()
    try:
        keys = open_key_store(settings, schema=schema, max_size=1)
    except (ConfigError, KekError) as exc:
        raise fail(str(exc)) from exc
    except Exception as exc:
        raise fail(f"cannot open the key store: {type(exc).__name__}", 1) from exc
    try:
        moved = keys.rewrap(batch_size=batch_size)
    except KekError as exc:
        raise fail(str(exc)) from exc
    finally:
        keys.pool.close()
    stdout().print(f"{moved} data keys re-wrapped with KEK {keys.kek.current.kek_id}")
