"""The `likvard` command: run the stack, serve a service, relay, topics, republish, verify."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from likvard.config import ConfigError, Settings, load_settings, service_port

if TYPE_CHECKING:
    from likvard.eventstore import EventStore
    from services.projections.replay import ReplayResult

app = typer.Typer(
    help="Likvärd: event-sourced case tracking for the city's addiction care.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

# Write services: name -> ASGI app factory, and the consumer (if the service consumes
# other services' topics) as "module:build", build(settings) -> (InboxConsumer, topics).
APPS = {
    "intake": "services.intake.api:create_app",
    "referral": "services.referral.api:create_app",
    "followup": "services.followup.api:create_app",
}
# Read side: the reporting API (served like the write services) and its worker.
READ_APPS = {"projections": "services.projections.api:create_app"}
CONSUMERS = {
    "referral": "services.referral.consumer:build",
    "followup": "services.followup.consumer:build",
}


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc


def _check_service(service: str, known: dict[str, str] = APPS) -> str:
    if service not in known:
        raise _fail(f"unknown service {service!r}; known: {', '.join(sorted(known))}")
    return service


def _logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LIKVARD_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _store(settings: Settings, service: str) -> EventStore:
    from likvard.eventstore import open_store

    return open_store(settings, service, max_size=4)


@app.command()
def topics() -> None:
    """Create the Kafka topics from deploy/topics.toml (existing ones are left alone)."""
    from likvard.topics import TopicError, ensure_topics, load_topics

    settings = _settings()
    try:
        outcome = ensure_topics(settings.require_kafka(), load_topics(prefix=settings.topic_prefix))
    except (TopicError, ConfigError) as exc:
        raise _fail(str(exc)) from exc
    for name, what in sorted(outcome.items()):
        console.print(f"{name}: {what}")


@app.command()
def serve(
    service: str = typer.Argument(..., help="intake | referral | followup | projections"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on"),
    port: int = typer.Option(0, help="Port (default: the service's standard port)"),
    workers: int = typer.Option(1, min=1, help="Worker processes (each has its own pool)"),
) -> None:
    """Serve a service's HTTP API (its event store, or the read models, migrated at start)."""
    import uvicorn

    apps = APPS | READ_APPS
    _check_service(service, apps)
    _logging()
    settings = _settings()
    try:
        settings.require_database()
        if service == "intake":
            settings.require_pseudonym_secret()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    uvicorn.run(
        apps[service],
        factory=True,
        host=host,
        port=port or service_port(service),
        log_level="info",
        workers=workers,
    )


@app.command()
def relay(service: str = typer.Argument(..., help="intake | referral | followup")) -> None:
    """Publish the service's outbox to Kafka until stopped (SIGTERM/SIGINT)."""
    from likvard.relay import OutboxRelay
    from likvard.topics import load_topics

    _check_service(service)
    _logging()
    settings = _settings()
    try:
        dsn, bootstrap = settings.require_database(), settings.require_kafka()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    from likvard.telemetry import setup_tracing

    setup_tracing(f"{service}-relay")
    _store(settings, service).pool.close()  # migrate before relaying
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    OutboxRelay(
        dsn,
        service,
        bootstrap,
        topics=load_topics(prefix=settings.topic_prefix),
        batch_size=settings.relay_batch_size,
    ).run(stop)


@app.command()
def consume(service: str = typer.Argument(..., help="referral | followup")) -> None:
    """Consume the topics SERVICE learns from (exactly-once effect) until stopped."""
    import importlib

    from confluent_kafka import Consumer

    from likvard.inbox import consumer_config

    if service not in CONSUMERS:
        raise _fail(
            f"{service!r} consumes nothing; services with a consumer: {', '.join(CONSUMERS)}"
        )
    _logging()
    settings = _settings()
    try:
        bootstrap = settings.require_kafka()
        module, _, func = CONSUMERS[service].partition(":")
        inbox, topics = getattr(importlib.import_module(module), func)(settings)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    group = f"{settings.topic_prefix}likvard-{service}"
    overrides: dict[str, int] = {}
    session = os.environ.get("LIKVARD_CONSUMER_SESSION_TIMEOUT_MS")
    if session:  # the dev broker takes half the session timeout to let a member join
        overrides = {
            "session.timeout.ms": int(session),
            "heartbeat.interval.ms": int(session) // 10,
        }
    inbox.run(Consumer(consumer_config(bootstrap, group, **overrides)), topics, stop)


@app.command()
def project(schema: str = typer.Option("projections", help="Read-model schema")) -> None:
    """Run the live projection worker (faust) into the read models until stopped."""
    from services.projections.worker import run

    _logging()
    settings = _settings()
    try:
        settings.require_database()
        settings.require_kafka()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    run(settings, schema)


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
    from likvard.topics import SERVICE_TOPICS
    from services.projections.replay import Replay, ReplayError, replay_schema_name

    settings = _settings()
    try:
        dsn, bootstrap = settings.require_database(), settings.require_kafka()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    if swap and as_of is not None:
        raise _fail("--swap cannot go with --as-of: a replay as of a date shows the past")
    target = schema or replay_schema_name()
    topics = [settings.topic(t) for t in SERVICE_TOPICS.values()]
    try:
        check_schema_name(live)
        run = Replay(
            dsn, bootstrap, topics, target, as_of=as_of.date() if as_of else None,
            batch_size=batch_size,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
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
    except ReplayError as exc:
        raise _fail(str(exc), 1) from exc
    finally:
        run.close()


def _print_replay(result: ReplayResult) -> None:
    """Summary on stdout (the progress bar is on stderr), so it can be kept as a record."""
    out = Console(soft_wrap=True)
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
    start: datetime = typer.Option(
        ..., "--from", formats=["%Y-%m-%d"], help="First intake day of the follow-up report"
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

    settings = _settings()
    try:
        dsn = settings.require_database()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    last = (end or datetime.now()).date()
    try:
        with psycopg.connect(dsn) as conn:
            document = build(
                conn, schema, start=start.date(), end=last, structure=structure, period=period
            )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    except psycopg.errors.UndefinedTable as exc:
        raise _fail(
            f"no read models in schema {schema!r}: run `likvard project` or `likvard replay`"
        ) from exc
    try:
        out.write_text(document, encoding="utf-8")
    except OSError as exc:
        raise _fail(f"cannot write {out}: {exc.strerror}") from exc
    console.print(f"wrote {out} ({len(document) // 1024} KiB)")


@app.command()
def demo(
    persons: int = typer.Option(2000, min=1, help="Synthetic persons"),
    years: int = typer.Option(3, min=1, max=15, help="Years of activity, up to today"),
    bias: list[str] = typer.Option(
        [], help="Planted disparity DISTRICT:metric:factor (repeatable)"
    ),
    seed: int = typer.Option(1, help="Same seed, same activity"),
) -> None:
    """Generate realistic synthetic activity through the public APIs of a running stack
    (`likvard up`), which publishes it to Kafka, with optional planted disparities."""
    from likvard.demo import DemoFailed, DemoUrls, main

    try:
        urls = DemoUrls(
            *(f"http://127.0.0.1:{service_port(s)}" for s in ("intake", "referral", "followup"))
        )
        main(persons, years, bias, seed, urls, console)
    except (ValueError, ConfigError) as exc:
        raise _fail(str(exc)) from exc
    except DemoFailed as exc:
        raise _fail(str(exc), 1) from exc


@app.command()
def republish(service: str = typer.Argument(..., help="intake | referral | followup")) -> None:
    """Produce every stored event of SERVICE to Kafka again (refills an empty broker)."""
    from likvard.republish import RepublishError, republish as do_republish

    _check_service(service)
    settings = _settings()
    try:
        bootstrap = settings.require_kafka()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
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
            raise _fail(str(exc), 1) from exc
    console.print(f"republished {sent} events of {service} to {store.topic}")


@app.command()
def verify(
    service: str = typer.Argument(..., help="intake | referral | followup"),
    stream: str = typer.Option(None, help="Only this stream (case id)"),
) -> None:
    """Verify the hash chain of every stream; exit code 1 if any break is found."""
    _check_service(service)
    store = _store(_settings(), service)
    breaks = store.verify(stream)
    if not breaks:
        console.print(f"[green]ok[/green]: {store.count()} events, every hash chain intact")
        return
    for b in breaks:
        console.print(
            f"[red]break[/red] stream {b.stream_id} version {b.stream_version}"
            f" (position {b.global_position}): {b.reason}"
        )
    raise typer.Exit(1)


@app.command()
def up(
    services: str = typer.Option(
        "intake,referral,followup,projections", help="Comma-separated services to run"
    ),
    broker_port: int = typer.Option(9092, help="Port of the development broker"),
) -> None:
    """Run the whole stack on this machine, until Ctrl-C.

    With no settings: an embedded PostgreSQL and the Tansu broker (memory only). With
    LIKVARD_DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS set, those servers are used instead.
    """
    from likvard.devstack import EmbeddedPostgres, StackError, Supervisor, TansuBroker, wait_until
    from likvard.topics import TopicError, ensure_topics, load_topics

    wanted = [
        _check_service(s.strip(), APPS | READ_APPS) for s in services.split(",") if s.strip()
    ]
    started = time.monotonic()
    env = dict(os.environ)
    pg: EmbeddedPostgres | None = None
    broker: TansuBroker | None = None
    sup = Supervisor(env)
    stopping = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if not env.get("LIKVARD_DATABASE_URL"):
            pg = EmbeddedPostgres()
            env["LIKVARD_DATABASE_URL"] = pg.start()
            console.print("PostgreSQL   embedded (temporary; gone when you stop)")
        else:
            console.print("PostgreSQL   from LIKVARD_DATABASE_URL")
        if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
            broker = TansuBroker(broker_port)
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.start()
            env.setdefault("LIKVARD_CONSUMER_SESSION_TIMEOUT_MS", "4000")
            console.print(f"Kafka        Tansu dev broker on {broker.bootstrap} (memory only)")
        else:
            console.print(f"Kafka        {env['KAFKA_BOOTSTRAP_SERVERS']}")
        if not env.get("LIKVARD_PSEUDONYM_SECRET"):
            env["LIKVARD_PSEUDONYM_SECRET"] = secrets.token_hex(32)
            console.print(
                "[yellow]LIKVARD_PSEUDONYM_SECRET not set: using a random one for this"
                " run (pseudonyms will differ next time)[/yellow]"
            )
        outcome = ensure_topics(
            env["KAFKA_BOOTSTRAP_SERVERS"], load_topics(prefix=env.get("LIKVARD_TOPIC_PREFIX", ""))
        )
        console.print(f"Topics       {len(outcome)} ready")
        import httpx

        ports = {name: service_port(name, env) for name in wanted}
        for name in wanted:
            port = ports[name]
            sup.spawn(f"{name}", ["serve", name, "--port", str(port)])
            if name in READ_APPS:
                sup.spawn(f"{name}-worker", ["project"])
                continue
            sup.spawn(f"{name}-relay", ["relay", name])
            if name in CONSUMERS:
                sup.spawn(f"{name}-consumer", ["consume", name])

        def all_ready() -> bool:
            if sup.dead():
                return True
            for name in wanted:
                try:
                    r = httpx.get(f"http://127.0.0.1:{ports[name]}/readyz", timeout=0.5)
                    if r.status_code != 200:
                        return False
                except httpx.HTTPError:
                    return False
            return True

        wait_until(
            lambda: stopping.is_set() or all_ready(),
            60,
            "the services to become ready",
            interval=0.2,
        )
        if sup.dead():
            raise StackError(f"{sup.dead()[0].name} exited at start; see its output above")
        console.print(f"[green]Likvärd is up[/green] in {time.monotonic() - started:.1f}s:")
        for name in wanted:
            port = ports[name]
            console.print(f"  {name:<12} http://127.0.0.1:{port}  (API docs: /docs)")
        if pg is not None or broker is not None:  # the dev servers: nothing secret to show
            console.print(
                "Other likvard commands (replay, report, verify, ...) reach this stack with:\n"
                f"  export LIKVARD_DATABASE_URL='{env['LIKVARD_DATABASE_URL']}'"
                f" KAFKA_BOOTSTRAP_SERVERS={env['KAFKA_BOOTSTRAP_SERVERS']}",
                soft_wrap=True,
            )
        console.print("Press Ctrl-C to stop.")
        while not stopping.wait(0.5):
            if sup.dead():
                child = sup.dead()[0]
                raise StackError(
                    f"{child.name} stopped unexpectedly (exit {child.proc.returncode})"
                )
    except (StackError, TopicError, ConfigError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        code = 1
    else:
        code = 0
    finally:
        console.print("stopping...")
        sup.stop_all()
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.stop()
        console.print("stopped")
    sys.exit(code)


if __name__ == "__main__":
    app()
