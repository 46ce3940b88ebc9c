"""The history: replay into fresh read models, the HTML report, republish, verify."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from likvard.cli.base import (
    APPS,
    app,
    check_service,
    console,
    event_store,
    fail,
    settings_or_exit,
    stdout,
)
from likvard.cli.operator import record_read
from likvard.config import ConfigError, Settings
from likvard.policy import Action

if TYPE_CHECKING:
    from likvard.eventstore import EventStore
    from services.projections.replay import ReplayResult


@app.command()
def replay(
    as_of: datetime | None = typer.Option(
        None, "--as-of", formats=["%Y-%m-%d"], help="Only events that occurred up to this date"
    ),
    schema: str | None = typer.Option(
        None, help="Fresh schema to build (default: projections_replay_<time>)"
    ),
    swap: bool = typer.Option(False, "--swap", help="Make the rebuilt read models live"),
    live: str = typer.Option("projections", help="The live read-model schema (for --swap)"),
    batch_size: int = typer.Option(5000, min=1, help="Events per transaction"),
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
    if swap and as_of is not None:
        raise fail("--swap cannot go with --as-of: a replay as of a date shows the past")
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
            batch_size=batch_size,
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
    out: Path = typer.Option(..., "--out", help="The HTML file to write"),
    start: datetime | None = typer.Option(
        None,
        "--from",
        formats=["%Y-%m-%d"],
        help="First intake day of the follow-up report (default: 1 January of the --to year)",
    ),
    end: datetime = typer.Option(
        None, "--to", formats=["%Y-%m-%d"], help="Last intake day (default: today)"
    ),
    structure: str = typer.Option("current", help="District structure: current | as-recorded"),
    period: str = typer.Option("year", help="Rows per year | month"),
    schema: str = typer.Option("projections", help="Read-model schema"),
) -> None:
    """Write a self-contained HTML report (follow-up report and equal-access audit, with
    charts) that opens offline."""
    import psycopg

    from services.projections.html_report import build

    settings = settings_or_exit()
    try:
        dsn = settings.require_database()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    last = (end or datetime.now()).date()
    first = start.date() if start else last.replace(month=1, day=1)
    try:
        with psycopg.connect(dsn) as conn:
            document = build(
                conn, schema, start=first, end=last, structure=structure, period=period
            )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    except psycopg.errors.UndefinedTable as exc:
        raise fail(
            f"no read models in schema {schema!r}: run `likvard project` or `likvard replay`"
        ) from exc
    try:
        out.write_text(document, encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror}") from exc
    console.print(f"wrote {out} ({len(document) // 1024} KiB)")


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
) -> None:
    """Verify the hash chain of every stream; exit code 1 if any break is found. For
    `access-log`, also each row's queryable copy against its chained bytes and the stream
    heads (an edited or deleted entry). Verifying one case's stream is a read of that case:
    it is logged under the operator's identity first."""
    from likvard import access_log, access_log_audit
    from likvard.eventstore import verify_chain

    _check(service)
    settings = settings_or_exit()
    store = _store(settings, service, schema)
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
