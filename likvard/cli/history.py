"""The history: replay into fresh read models, the HTML report, republish, verify."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from likvard.cli.base import (
    APPS,
    app,
    check_service,
    console,
    day_window,
    event_store,
    fail,
    settings_or_exit,
    stdout,
)
from likvard.cli.operator import record_read
from likvard.config import ConfigError, Settings
from likvard.policy import Action

if TYPE_CHECKING:
    from likvard.eventstore import ChainBreak, EventStore
    from services.projections.replay import ReplayResult
    from services.projections.reproduce import Parameters


@app.command()
def replay(
    as_of: datetime | None = typer.Option(
        None, "--as-of", formats=["%Y-%m-%d"], help="Only events that occurred up to this date"
    ),
    as_known_on: datetime | None = typer.Option(
        None,
        "--as-known-on",
        formats=["%Y-%m-%d"],
        help="Only events recorded by this date: what the city could have known then",
    ),
    schema: str | None = typer.Option(
        None, help="Fresh schema to build (default: projections_replay_<time>)"
    ),
    swap: bool = typer.Option(False, "--swap", help="Make the rebuilt read models live"),
    live: str = typer.Option("projections", help="The live read-model schema (for --swap)"),
    batch_size: int = typer.Option(5000, min=1, help="Events per transaction"),
    processes: int | None = typer.Option(
        None,
        min=1,
        max=64,
        help="Processes reading and applying a share of the partitions each (default:"
        " LIKVARD_REPLAY_PROCESSES, else 1)",
    ),
) -> None:
    """Rebuild every read model from offset 0 into a fresh schema, verifying every stream's
    hash chain; prints a checksum per read model. Exit 1 if the chain is broken."""
    from likvard.db import check_schema_name
    from likvard.topic_reader import TopicReadError
    from services.projections.readmodels import SOURCE_TOPICS
    from services.projections.replay import Replay, replay_schema_name

    settings = settings_or_exit()
    try:
        dsn, bootstrap = settings.require_database(), settings.require_kafka()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    if swap and (as_of is not None or as_known_on is not None):
        raise fail("--swap cannot go with --as-of or --as-known-on: it shows the past")
    target = schema or replay_schema_name()
    topics = [settings.topic(t) for t in SOURCE_TOPICS]  # the access log's too
    try:
        check_schema_name(live)
        check_schema_name(target)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    record_read(settings, Action.REPLAY, "replay")  # every case's history is read
    try:
        run = Replay(
            dsn,
            bootstrap,
            topics,
            target,
            as_of=as_of.date() if as_of else None,
            known_on=as_known_on.date() if as_known_on else None,
            batch_size=batch_size,
            processes=processes,
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    try:
        with Progress(
            TextColumn("replay"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("records"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(target, total=None)
            result = run.run(lambda done, total: progress.update(task, completed=done, total=total))
        _print_replay(result)
        if result.breaks:
            raise typer.Exit(1)
        if swap:
            retired = run.swap(live)
            console.print(
                f"[green]swapped[/green]: {target} is now live as {live}"
                + (f"; the old read models are kept as {retired}" if retired else "")
            )
    except TopicReadError as exc:  # a ReplayError, or a topic that could not be read
        raise fail(str(exc), 1) from exc
    finally:
        run.close()


def _print_replay(result: ReplayResult) -> None:
    """Summary on stdout (the progress bar is on stderr), so it can be kept as a record."""
    out = stdout()
    out.print(f"replayed into schema [bold]{result.schema}[/bold] in {result.seconds:.1f}s")
    for topic, n in sorted(result.per_topic.items()):
        out.print(f"  {topic}: {n} records")
    out.print(
        f"  events projected: {result.projected}; left out as after the as-of date:"
        f" {result.after_as_of}; undecodable: {result.undecodable}"
    )
    if result.after_known_on:
        out.print(f"  left out as recorded after the as-known-on date: {result.after_known_on}")
    for example in result.undecodable_examples:
        out.print(f"    undecodable {example}")
    if result.breaks:
        out.print(f"[red]hash chain: {len(result.breaks)} breaks[/red]")
        for b in result.breaks[:50]:
            out.print(
                f"  [red]break[/red] {b.topic}[{b.partition}]@{b.offset} stream {b.stream_id}"
                f" version {b.stream_version}: {b.reason}"
            )
        if len(result.breaks) > 50:
            out.print(f"  ... and {len(result.breaks) - 50} more")
    else:
        out.print(
            f"  hash chain: [green]intact[/green] ({result.chain_events} events in"
            f" {result.streams} streams)"
        )
    for table, digest in sorted(result.checksums.items()):
        out.print(f"  checksum {table}: {digest}")


@app.command()
def report(
    out: Path | None = typer.Option(
        None, "--out", help="The file to write: HTML, or the JSON record if it ends in .json"
    ),
    start: datetime | None = typer.Option(
        None,
        "--from",
        formats=["%Y-%m-%d"],
        help="First intake day of the follow-up report (default: 1 January of the --to year)",
    ),
    end: datetime = typer.Option(
        None,
        "--to",
        formats=["%Y-%m-%d"],
        help="Last intake day (default: the city's today)",
    ),
    structure: str = typer.Option("current", help="District structure: current | as-recorded"),
    period: str = typer.Option("year", help="Rows per year | month"),
    flag_rule: str = typer.Option(
        "holm",
        "--flag-rule",
        help="The audit's flags: holm (Holm-adjusted p < 0.05 over every district x metric"
        " comparison) | band (the need-adjusted ratio's interval excludes 1 and it is outside"
        " 0.8-1.25)",
    ),
    schema: str = typer.Option("projections", help="Read-model schema"),
    as_of: datetime | None = typer.Option(
        None,
        "--as-of",
        formats=["%Y-%m-%d"],
        help="Figures from the events that occurred by this date (replayed from Kafka)",
    ),
    as_known_on: datetime | None = typer.Option(
        None,
        "--as-known-on",
        formats=["%Y-%m-%d"],
        help="Figures as the city could have known them on this date: events recorded by"
        " then (replayed from Kafka); prints what differs from the figures as of now",
    ),
    reproduce: Path | None = typer.Option(
        None,
        "--reproduce",
        help="A report file (HTML or JSON) to check: replay Kafka up to its offsets into a"
        " fresh schema and compare every figure; exit 1 if any differs",
    ),
) -> None:
    """Write a self-contained HTML report (follow-up report and equal-access audit, with
    charts and its provenance) that opens offline; or check one with --reproduce."""
    from services.projections.reproduce import Parameters, default_as_of

    settings = settings_or_exit()
    try:
        dsn = settings.require_database()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    if reproduce is not None:
        if out is not None or as_of is not None or as_known_on is not None or flag_rule != "holm":
            raise fail("--reproduce takes only the report file: its record has the rest")
        _reproduce(settings, dsn, reproduce)
        return
    if out is None:
        raise fail("give --out FILE to write a report, or --reproduce FILE to check one")
    first, last = day_window(start, end)
    occurred = as_of.date() if as_of else None
    known = as_known_on.date() if as_known_on else None
    try:
        params = Parameters(
            first,
            last,
            structure,
            period,
            default_as_of(occurred, known),
            flag_rule=flag_rule,
            answer_days=settings.referral_answer_days,
            window_days=settings.followup_window_days,
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if occurred is None and known is None:
        document, record = _report(dsn, schema, params, json_out=out.suffix == ".json")
    else:
        document, record = _report_as_of(settings, dsn, params, occurred, known, out)
        if known is not None:
            _print_known_on(dsn, schema, params, record, known)
    try:
        out.write_text(document, encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror}") from exc
    console.print(f"wrote {out} ({len(document) // 1024} KiB)")


def _report(
    dsn: str, schema: str, params: Parameters, *, json_out: bool
) -> tuple[str, dict[str, Any]]:
    """The report over `schema` as HTML (or its JSON record) and its record."""
    from services.projections.html_report import build_report
    from services.projections.reproduce import record_json

    try:
        with psycopg.connect(dsn) as conn:
            document, made = build_report(conn, schema, params)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    except psycopg.errors.UndefinedTable as exc:
        raise fail(
            f"no read models in schema {schema!r}: run `likvard project` or `likvard replay`"
        ) from exc
    except psycopg.OperationalError as exc:
        raise fail(f"cannot reach the database: {exc}", 1) from exc
    return (record_json(made.record) + "\n" if json_out else document), made.record


def _report_as_of(
    settings: Settings,
    dsn: str,
    params: Parameters,
    occurred: date | None,
    known: date | None,
    out: Path,
) -> tuple[str, dict[str, Any]]:
    """Replay into a scratch schema with the cutoffs, report over it, drop it."""
    from likvard.topic_reader import TopicReadError
    from services.projections.readmodels import SOURCE_TOPICS
    from services.projections.replay import Replay, replay_schema_name

    try:
        bootstrap = settings.require_kafka()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    record_read(settings, Action.REPLAY, "replay")  # every case's history is read
    scratch = replay_schema_name().replace("_replay_", "_report_")
    topics = [settings.topic(t) for t in SOURCE_TOPICS]
    run = Replay(dsn, bootstrap, topics, scratch, as_of=occurred, known_on=known)
    try:
        result = run.run()
        if result.breaks:
            raise fail(f"hash chain: {len(result.breaks)} breaks: run `likvard replay`", 1)
        return _report(dsn, scratch, params, json_out=out.suffix == ".json")
    except TopicReadError as exc:
        raise fail(str(exc), 1) from exc
    finally:
        run.close()
        _drop_schema(dsn, scratch)


def _print_known_on(
    dsn: str, schema: str, params: Parameters, record: dict[str, Any], known: date
) -> None:
    """As known on DATE versus as of now (live read models, same period): what changed
    through events recorded later."""
    from services.projections.reproduce import compare, default_as_of, snapshot

    figures = record["figures"]
    try:
        with psycopg.connect(dsn) as conn:
            now = snapshot(conn, schema, dataclasses.replace(params, as_of=default_as_of()))
    except psycopg.Error as exc:
        console.print(f"[yellow]no comparison with schema {schema}[/yellow]: {exc.sqlstate}")
        return
    changed = compare(figures, now.record["figures"])
    out = stdout()
    out.print(
        f"as known on {known.isoformat()} versus as of now ({schema}): {len(changed)} of"
        f" {len(figures)} figures differ (events recorded later)"
    )
    for d in changed[:100]:
        out.print(f"  {d.figure}: known on {known.isoformat()} {d.in_file}, now {d.replayed}")
    if len(changed) > 100:
        out.print(f"  ... and {len(changed) - 100} more")


def _drop_schema(dsn: str, schema: str) -> None:
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _reproduce(settings: Settings, dsn: str, path: Path) -> None:
    """Replay up to the file's offsets, compare every figure; exit 0 identical, 1 not."""
    from likvard.db import check_schema_name
    from likvard.topic_reader import TopicReadError
    from services.projections.replay import replay_schema_name
    from services.projections.reproduce import (
        ReproduceError,
        check_reproducible,
        read_record,
        reproduce,
    )

    try:
        record = read_record(path)
        check_reproducible(record)
        bootstrap = settings.require_kafka()
    except (ConfigError, ReproduceError) as exc:
        raise fail(str(exc)) from exc
    scratch = check_schema_name(replay_schema_name().replace("_replay_", "_reproduce_"))
    record_read(settings, Action.REPLAY, "replay")  # every case's history is read
    try:
        result = reproduce(dsn, bootstrap, record, scratch)
    except ReproduceError as exc:
        raise fail(str(exc)) from exc
    except TopicReadError as exc:
        raise fail(str(exc), 1) from exc
    except psycopg.OperationalError as exc:
        raise fail(f"cannot reach the database: {exc}", 1) from exc
    out = stdout()
    for note in result.notes:
        out.print(f"[yellow]note[/yellow]: {note}")
    if result.breaks:
        out.print(f"[red]hash chain: {result.breaks} breaks[/red] in the replayed history")
    for d in result.provenance:
        out.print(f"[red]differs[/red] {d.figure}: in the file {d.in_file}, replayed {d.replayed}")
    for d in result.differences:
        out.print(f"[red]differs[/red] {d.figure}: in the file {d.in_file}, replayed {d.replayed}")
    if result.identical:
        out.print(
            f"[green]identical[/green]: all {result.figures} figures of {path.name} reproduced"
            " from the events up to its offsets (chain heads match)"
        )
        return
    out.print(
        f"[red]not identical[/red]: {len(result.differences)} of {result.figures} figures"
        f" differ{'; the provenance differs too' if result.provenance else ''}"
    )
    raise typer.Exit(1)


@app.command()
def republish(
    service: str = typer.Argument(..., help="intake | referral | followup | access-log"),
) -> None:
    """Produce every stored event of SERVICE (or of the access log) to Kafka again (refills
    an empty broker)."""
    from likvard.republish import RepublishError, republish as do_republish

    _check(service)
    settings = settings_or_exit()
    try:
        bootstrap = settings.require_kafka()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    store = _store(settings, service)
    total = store.count()
    with Progress(
        TextColumn("republish"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(service, total=total)
        try:
            sent = do_republish(
                store, bootstrap, progress=lambda n: progress.update(task, completed=n)
            )
        except RepublishError as exc:
            raise fail(str(exc), 1) from exc
        finally:
            store.pool.close()
    console.print(f"republished {sent} events of {service} to {store.topic}")


def _check(service: str) -> None:
    """A write service or `access-log`; exit 2 naming them otherwise."""
    from likvard.access_log import SERVICE

    check_service(service, {**APPS, SERVICE: ""})


def _store(settings: Settings, service: str, schema: str | None = None) -> EventStore:
    """The event store of a write service, or the access log's (`access-log`)."""
    from likvard import access_log
    from likvard.eventstore import open_store

    try:
        _check(service)
        if service != access_log.SERVICE:
            if schema is None:
                return event_store(settings, service)
            return open_store(settings, service, schema=schema, max_size=4)
        return access_log.open_store(settings, schema=access_log.schema_name(schema), service="cli")
    except ValueError as exc:  # a schema name that is not one
        raise fail(str(exc)) from exc
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    except psycopg.OperationalError as exc:
        raise fail(f"cannot reach the database: {exc}", 1) from exc


@app.command()
def verify(
    service: str = typer.Argument(..., help="intake | referral | followup | access-log"),
    stream: str = typer.Option(None, help="Only this stream (case id)"),
    schema: str = typer.Option(
        None, help="The event-store schema (default: the service's name; access-log: access_log)"
    ),
    projections_database_url: str = typer.Option(
        None,
        envvar="LIKVARD_PROJECTIONS_DATABASE_URL",
        help="Where the result is kept for the auditors' console: the read models' database"
        " (default LIKVARD_DATABASE_URL)",
    ),
    projections_schema: str = typer.Option(
        "projections", help="The read models' schema that keeps the result"
    ),
) -> None:
    """Verify the hash chain of every stream; exit code 1 if any break is found. For
    `access-log`, also each row's queryable copy against its chained bytes and the stream
    heads (an edited or deleted entry). Verifying one case's stream is a read of that case:
    it is logged under the operator's identity first. A check of the whole store is kept in
    the read models' `verifications` (the console's latest verification), if they are in
    that database."""
    from likvard import access_log, access_log_audit
    from likvard.eventstore import verify_chain

    _check(service)
    settings = settings_or_exit()
    store = _store(settings, service, schema)
    started = datetime.now(UTC)
    try:
        if service == access_log.SERVICE:
            breaks = access_log_audit.verify(store, stream)
            streams = len(access_log_audit.streams(store)) if stream is None else 1
        elif stream is not None:
            events = store.read_stream(stream)
            case_id = str(events[0].metadata["case_id"]) if events else stream
            record_read(settings, Action.VERIFY, f"case:{case_id}", case_id)
            breaks, streams = verify_chain(iter(events), store.catalogue), 1
        else:
            breaks, streams = store.verify(), 0
        count = store.count() if stream is None else store.stream_version(stream)
        if stream is None:
            _keep_verification(
                settings,
                projections_database_url or settings.require_database(),
                projections_schema,
                service,
                store,
                started,
                count,
                breaks,
            )
    finally:
        store.pool.close()
    if not breaks:
        where = f" in {streams} stream(s)" if streams else ""
        console.print(f"[green]ok[/green]: {count} events{where}, every hash chain intact")
        return
    for b in breaks:
        console.print(
            f"[red]break[/red] stream {b.stream_id} version {b.stream_version}"
            f" (position {b.global_position}): {b.reason}"
        )
    raise typer.Exit(1)


def _keep_verification(
    settings: Settings,
    url: str,
    schema: str,
    service: str,
    store: EventStore,
    started: datetime,
    count: int,
    breaks: list[ChainBreak],
) -> None:
    """Record a whole store's check in the read models' verifications; a note (never a
    failure, the check's exit code stands) if it cannot be kept."""
    from psycopg import sql

    from likvard.cli.operator import TOKEN_ENV, operator, os_login
    from likvard.db import check_schema_name
    from services.projections import history

    if os.environ.get(TOKEN_ENV, "").strip():
        try:
            actor = operator(settings).actor
        except typer.Exit:  # the token does not verify (said above): not kept under it
            return
    else:
        actor = os_login()
    try:
        check_schema_name(schema)
        with store.pool.connection() as conn:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}.streams").format(sql.Identifier(store.schema))
            ).fetchone()
        result = history.ChainResult(
            count, int(row[0]) if row else 0, history.store_breaks(store.topic, breaks), len(breaks)
        )
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            if conn.execute("SELECT to_regnamespace(%s)", (schema,)).fetchone() == (None,):
                console.print(
                    f"[dim]not kept: no read-model schema {schema} in that database[/dim]"
                )
                return
            with conn.transaction():
                if not history.migrate(conn, schema):
                    console.print(f"[yellow]not kept[/yellow]: no table {schema}.verifications")
                    return
                history.record_verification(
                    conn,
                    schema,
                    actor=actor,
                    source=f"store:{service}",
                    started_at=started,
                    result=result,
                )
    except (ValueError, psycopg.Error) as exc:
        why = exc.sqlstate if isinstance(exc, psycopg.Error) else str(exc)
        console.print(f"[yellow]verification not kept[/yellow] in {schema}: {why}")
