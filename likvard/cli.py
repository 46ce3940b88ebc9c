"""The `likvard` command: run the stack, serve a service, relay, topics, republish, verify."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from likvard.config import ConfigError, Settings, load_settings, service_port

if TYPE_CHECKING:
    from confluent_kafka import Consumer

    from likvard import dlq
    from likvard.eventstore import EventStore
    from likvard.ops import Progress as WorkerProgress
    from likvard.telemetry import ConsumerLag
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
# District ingest: each write service judges the district records of its own event types.
INGESTERS = {service: f"services.{service}.ingest:build" for service in APPS}


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _stdout() -> Console:
    """Standard output for results; piped, tables are not cut to 80 columns."""
    columns = os.environ.get("COLUMNS", "")
    wide = max(200, int(columns) if columns.isdigit() else 0)
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else wide)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc


def _check_service(service: str, known: dict[str, str] = APPS) -> str:
    if service not in known:
        raise _fail(f"unknown service {service!r}; known: {', '.join(sorted(known))}")
    return service


def _logging(service: str) -> None:
    from likvard.logs import setup_logging

    setup_logging(service)


def _store(settings: Settings, service: str) -> EventStore:
    from likvard.eventstore import open_store

    try:
        return open_store(settings, service, max_size=4)
    except ConfigError as exc:  # no LIKVARD_DATABASE_URL: the hint, not a traceback
        raise _fail(str(exc)) from exc


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

    from likvard.logs import log_config

    apps = APPS | READ_APPS
    _check_service(service, apps)
    _logging(service)
    settings = _settings()
    try:
        settings.require_database()
        if service == "intake":
            settings.require_pseudonym_secret()
        listen = port or service_port(service)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    from likvard.ops import announce

    def stopped(_sig: int, _frame: FrameType | None) -> None:
        """After uvicorn's graceful shutdown it re-raises the signal it caught: a stop that
        was asked for is a clean exit (0), not a kill (143)."""
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    announce(f"http://127.0.0.1:{listen}")
    uvicorn.run(
        apps[service],
        factory=True,
        host=host,
        port=listen,
        log_config=log_config(service),
        workers=workers,
    )


@app.command()
def relay(service: str = typer.Argument(..., help="intake | referral | followup")) -> None:
    """Publish the service's outbox to Kafka until stopped (SIGTERM/SIGINT)."""
    from likvard.relay import OutboxRelay, register_outbox_gauges
    from likvard.topics import SERVICE_TOPICS, load_topics

    _check_service(service)
    role = f"{service}-relay"
    _logging(role)
    settings = _settings()
    try:
        dsn, bootstrap = settings.require_database(), settings.require_kafka()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    _telemetry(role)
    _store(settings, service).pool.close()  # migrate before relaying
    register_outbox_gauges(dsn, service, service)
    stop = _stop_on_signals()
    worker = OutboxRelay(
        dsn,
        service,
        bootstrap,
        topics=load_topics(prefix=settings.topic_prefix),
        batch_size=settings.relay_batch_size,
    )
    _require_topics(bootstrap, settings, [settings.topic(SERVICE_TOPICS[service])])
    with _ops(worker.progress):
        worker.run(stop)


@app.command()
def consume(service: str = typer.Argument(..., help="referral | followup")) -> None:
    """Consume the topics SERVICE learns from (exactly-once effect) until stopped."""
    import importlib

    if service not in CONSUMERS:
        raise _fail(
            f"{service!r} consumes nothing; services with a consumer: {', '.join(CONSUMERS)}"
        )

    role = f"{service}-consumer"
    _logging(role)
    settings = _settings()
    try:
        bootstrap = settings.require_kafka()
        module, _, func = CONSUMERS[service].partition(":")
        inbox, topics = getattr(importlib.import_module(module), func)(settings)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    _telemetry(role)
    stop = _stop_on_signals()
    _require_topics(bootstrap, settings, topics)
    consumer, lag = _group_member(bootstrap, f"{settings.topic_prefix}likvard-{service}")
    with _ops(inbox.progress):
        inbox.run(consumer, topics, stop, lag=lag)


def _group_overrides() -> dict[str, int]:
    """LIKVARD_CONSUMER_SESSION_TIMEOUT_MS for consumer groups (the dev broker takes half
    the session timeout to let a member join)."""
    session = os.environ.get("LIKVARD_CONSUMER_SESSION_TIMEOUT_MS")
    if not session:
        return {}
    if not session.isdigit() or int(session) < 1000:
        raise _fail(
            f"LIKVARD_CONSUMER_SESSION_TIMEOUT_MS must be milliseconds (>= 1000), not {session!r}"
        )
    return {"session.timeout.ms": int(session), "heartbeat.interval.ms": int(session) // 10}


def _group_member(
    bootstrap: str, group: str, **overrides: object
) -> tuple[Callable[[], Consumer], ConsumerLag]:
    """A factory of consumers in `group` (a fatal error rebuilds the consumer), and the
    gauge of its lag per partition (`likvard.consumer.lag`, from fresh watermarks)."""
    from confluent_kafka import Consumer

    from likvard.inbox import consumer_config
    from likvard.telemetry import ConsumerLag

    settings = {**_group_overrides(), **overrides}

    def make() -> Consumer:
        return Consumer(consumer_config(bootstrap, group, **settings))

    return make, ConsumerLag(group)


def _require_topics(bootstrap: str, settings: Settings, names: list[str]) -> None:
    """The topics a process produces to or consumes exist with the partitions of
    deploy/topics.toml (created if missing); exit 1 with the fix otherwise."""
    from likvard.topics import TopicError, load_topics, require_topics

    try:
        require_topics(bootstrap, load_topics(prefix=settings.topic_prefix), names)
    except TopicError as exc:
        raise _fail(str(exc), 1) from exc


def _telemetry(role: str) -> None:
    from likvard import telemetry

    telemetry.setup_tracing(role)
    telemetry.setup_metrics(role)


@contextmanager
def _ops(progress: WorkerProgress) -> Iterator[None]:
    """The worker's ops port (LIKVARD_OPS_PORT) for as long as it runs: alive while its loop
    turns and makes progress, ready when its database and broker answered it last."""
    from likvard.ops import serve_from_env

    try:
        server = serve_from_env(progress.heartbeat, progress.ready, progress.stalled)
    except (ValueError, OSError) as exc:
        raise _fail(f"cannot serve the ops port: {exc}") from exc
    try:
        yield
    finally:
        if server is not None:
            server.stop()


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: long-running commands stop cleanly on it."""
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


@app.command()
def ingest(
    service: str = typer.Argument(..., help="intake | referral | followup"),
    batch_size: int = typer.Option(
        500, min=1, envvar="LIKVARD_INGEST_BATCH_SIZE", help="Records per batch"
    ),
    schema: str = typer.Option(None, help="The service's event-store schema (default: its name)"),
) -> None:
    """Judge district systems' records on likvard.district-ingest.v1 whose event types
    SERVICE owns: store the valid ones, dead-letter the rest with the reason."""
    import importlib

    import psycopg

    from likvard import telemetry
    from likvard.ingest import (
        DEAD_LETTER_TOPIC,
        INGEST_TOPIC,
        DeadLetterSink,
        IngestMetrics,
        IngestWorker,
    )

    _check_service(service, INGESTERS)
    role = f"{service}-ingest"
    _logging(role)
    settings = _settings()
    try:
        bootstrap = settings.require_kafka()
        settings.require_database()
        module, _, func = INGESTERS[service].partition(":")
        processor = getattr(importlib.import_module(module), func)(settings, schema or service)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    except psycopg.OperationalError as exc:
        raise _fail(f"cannot reach the database: {exc}", 1) from exc
    _telemetry(role)
    stop = _stop_on_signals()
    worker = IngestWorker(
        processor,
        DeadLetterSink(bootstrap, settings.topic(DEAD_LETTER_TOPIC), service),
        batch_size=batch_size,
        metrics_=IngestMetrics(telemetry.meter("likvard.ingest"), service),
    )
    _require_topics(
        bootstrap, settings, [settings.topic(INGEST_TOPIC), settings.topic(DEAD_LETTER_TOPIC)]
    )
    consumer, lag = _group_member(bootstrap, f"{settings.topic_prefix}likvard-{service}-ingest")
    try:
        with _ops(worker.progress):
            worker.run(consumer, settings.topic(INGEST_TOPIC), stop, lag=lag)
    finally:
        processor.store.pool.close()
    s = worker.stats
    console.print(
        f"ingest {service}: {s.accepted} accepted, {s.duplicates} duplicates,"
        f" {sum(s.dead_lettered.values())} dead-lettered"
        + "".join(f", {stage} {n}" for stage, n in sorted(s.dead_lettered.items()))
    )


@app.command()
def probe(
    target: str | None = typer.Argument(
        None,
        help="intake | referral | followup | projections (their port), worker (the ops port);"
        " none: wherever this container's process said it answers",
    ),
    path: str = typer.Option("/readyz", help="/readyz (ready), /healthz (alive)"),
) -> None:
    """Exit 0 if the process on this machine answers 200 at PATH: the containers' health
    check (the port comes from the same settings the process uses)."""
    import urllib.error
    import urllib.request

    from likvard.ops import PORT_ENV, announced

    try:
        if target is None:
            base = announced()
            if base is None:
                raise ConfigError("no process here has said where it answers probes")
        elif target == "worker":
            port = os.environ.get(PORT_ENV, "")
            if not port.isdigit():
                raise ConfigError(f"{PORT_ENV} is not set: a worker serves no ops port without it")
            base = f"http://127.0.0.1:{port}"
        else:
            base = f"http://127.0.0.1:{service_port(_check_service(target, APPS | READ_APPS))}"
    except ConfigError as exc:  # 1, not 2: Docker reserves 2 in health checks
        raise _fail(str(exc), 1) from exc
    url = f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:
            status = int(answer.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise _fail(f"{url} does not answer: {exc}", 1) from exc
    if status != 200:
        raise _fail(f"{url} answered {status}", 1)


@app.command()
def project(schema: str = typer.Option("projections", help="Read-model schema")) -> None:
    """Run the live projection worker into the read models until stopped (SIGTERM/SIGINT)."""
    from services.projections.worker import build

    role = "projections-worker"
    _logging(role)
    settings = _settings()
    batch = os.environ.get("LIKVARD_PROJECTION_BATCH_SIZE", "1000")
    if not batch.isdigit() or int(batch) < 1:
        raise _fail(f"LIKVARD_PROJECTION_BATCH_SIZE must be a positive number, not {batch!r}")
    try:
        worker, consumer = build(
            settings, schema, batch_size=int(batch), consumer_overrides=_group_overrides()
        )
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    _telemetry(role)
    stop = _stop_on_signals()
    _require_topics(settings.require_kafka(), settings, worker.topics)
    with _ops(worker.progress):
        worker.run(consumer, stop)


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
    from likvard.topics import SERVICE_TOPICS
    from services.projections.replay import Replay, replay_schema_name

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
            dsn,
            bootstrap,
            topics,
            target,
            as_of=as_of.date() if as_of else None,
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
    except TopicReadError as exc:  # a ReplayError, or a topic that could not be read
        raise _fail(str(exc), 1) from exc
    finally:
        run.close()


def _print_replay(result: ReplayResult) -> None:
    """Summary on stdout (the progress bar is on stderr), so it can be kept as a record."""
    out = _stdout()
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

    settings = _settings()
    try:
        dsn = settings.require_database()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    last = (end or datetime.now()).date()
    first = start.date() if start else last.replace(month=1, day=1)
    try:
        with psycopg.connect(dsn) as conn:
            document = build(
                conn, schema, start=first, end=last, structure=structure, period=period
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
    A process that stops is restarted after a backoff (1s doubling to 30s); the stack
    stops only on Ctrl-C, or when one keeps failing (more than 5 failed starts within 2
    minutes: exit code 1). A restarted dev broker gets its topics back, and every event
    again from the event stores (`likvard republish`).
    """
    from likvard.devstack import (
        EmbeddedPostgres,
        Server,
        StackError,
        Supervisor,
        TansuBroker,
        wait_until,
    )
    from likvard.topics import TopicError, ensure_topics, load_topics

    wanted = [_check_service(s.strip(), APPS | READ_APPS) for s in services.split(",") if s.strip()]
    started = time.monotonic()
    # Many workers share this machine: none serves an ops port (each would want the same);
    # and the probe notes would overwrite each other.
    env = {
        k: v for k, v in os.environ.items() if k not in ("LIKVARD_OPS_PORT", "LIKVARD_PROBE_FILE")
    }
    env["LIKVARD_PROBE_FILE"] = os.path.join(tempfile.gettempdir(), f"likvard-probe-{os.getpid()}")
    pg: EmbeddedPostgres | None = None
    broker: TansuBroker | None = None
    sup = Supervisor(env, say=lambda line: console.print(line, markup=False, soft_wrap=True))
    stopping = _stop_on_signals()

    def make_topics() -> int:
        prefix = env.get("LIKVARD_TOPIC_PREFIX", "")
        return len(ensure_topics(env["KAFKA_BOOTSTRAP_SERVERS"], load_topics(prefix=prefix)))

    def watch_broker(dev: TansuBroker) -> None:
        def back() -> str:
            """The dev broker forgot everything: its topics first, then every stored event
            again (the event stores are the source of truth)."""
            dev.start()
            try:
                n = make_topics()
            except TopicError as exc:
                dev.stop()
                raise StackError(str(exc)) from exc
            writers = [s for s in wanted if s in APPS]
            for s in writers:
                sup.spawn(f"{s}-republish", ["republish", s], oneshot=True)
            return (
                f"restarted on {dev.bootstrap} (memory only: it forgot every record); {n}"
                f" topics re-created; republishing {', '.join(writers) or 'nothing'} from"
                " the event stores"
            )

        sup.watch(Server("tansu-broker", dev.down, back))

    try:
        if not env.get("LIKVARD_DATABASE_URL"):
            pg = EmbeddedPostgres()
            env["LIKVARD_DATABASE_URL"] = pg.start()
            sup.watch(Server("postgresql", pg.down, pg.restart))
            console.print("PostgreSQL   embedded (temporary; gone when you stop)")
        else:
            console.print("PostgreSQL   from LIKVARD_DATABASE_URL")
        if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
            broker = TansuBroker(broker_port)
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.start()
            env.setdefault("LIKVARD_CONSUMER_SESSION_TIMEOUT_MS", "4000")
            watch_broker(broker)
            console.print(f"Kafka        Tansu dev broker on {broker.bootstrap} (memory only)")
        else:
            console.print(f"Kafka        {env['KAFKA_BOOTSTRAP_SERVERS']}")
        if not env.get("LIKVARD_PSEUDONYM_SECRET"):
            env["LIKVARD_PSEUDONYM_SECRET"] = secrets.token_hex(32)
            console.print(
                "[yellow]LIKVARD_PSEUDONYM_SECRET not set: using a random one for this"
                " run (pseudonyms will differ next time)[/yellow]"
            )
        console.print(f"Topics       {make_topics()} ready")
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
            sup.spawn(f"{name}-ingest", ["ingest", name])

        def all_ready() -> bool:
            sup.check()  # a child that stops at start is restarted too, or stops the stack
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
            sup.check()
    except (StackError, TopicError, ConfigError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
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


# --- dead letters -------------------------------------------------------------------------
dlq_app = typer.Typer(
    help="Read the dead-letter topic (district records the ingest path refused) and"
    " re-submit records after a fix.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")


def _dead_letters(settings: Settings) -> list[dlq.DeadLetter]:
    from likvard import dlq
    from likvard.ingest import DEAD_LETTER_TOPIC

    try:
        return dlq.read_all(settings.require_kafka(), settings.topic(DEAD_LETTER_TOPIC))
    except (ConfigError, dlq.DeadLetterError) as exc:
        raise _fail(str(exc)) from exc


def _source(letter: dlq.DeadLetter) -> str:
    source = letter.source
    return "?" if source is None else f"{source[0]}[{source[1]}]@{source[2]}"


@dlq_app.command("list")
def dlq_list(
    stage: str = typer.Option(None, help="Only this stage: decode | schema | rule | internal"),
    code: str = typer.Option(None, help="Only this code, e.g. case-closed"),
    service: str = typer.Option(None, help="Only those judged by this service"),
    event_type: str = typer.Option(None, "--event-type", help="Only this event type"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line"),
) -> None:
    """List the dead letters, oldest first, with why each was refused."""
    import json

    from rich.table import Table

    from likvard import dlq

    if stage is not None and stage not in dlq.STAGES:
        raise _fail(f"unknown stage {stage!r}; stages: {', '.join(dlq.STAGES)}")
    letters = _dead_letters(_settings())
    retried = dlq.retried_by(letters)
    chosen = dlq.select(letters, stage=stage, code=code, service=service, event_type=event_type)
    out = _stdout()
    if as_json:
        for x in chosen:
            out.print_json(
                json.dumps(
                    {
                        "id": x.id,
                        "failed_at": x.failed_at,
                        "stage": x.stage,
                        "code": x.code,
                        "service": x.service,
                        "event_type": x.event_type,
                        "event_id": x.event_id,
                        "source": _source(x),
                        "retry_of": x.retry_of or None,
                        "retried_as": retried.get(x.id, []),
                        "reason": x.reason,
                    }
                ),
                indent=None,
            )
        return
    if not chosen:
        console.print(f"no dead letters{' match' if len(letters) else ''}")
        return
    table = Table("id", "failed at", "stage", "code", "event type", "source", "retries", "reason")
    for x in chosen:
        notes = []
        if x.retry_of:
            notes.append(f"retry of {x.retry_of}")
        notes += [f"failed again as {i}" for i in retried.get(x.id, [])]
        table.add_row(
            x.id,
            x.failed_at[:19],
            x.stage,
            x.code,
            x.event_type or "-",
            _source(x),
            "; ".join(notes),
            x.reason,
        )
    out.print(table)
    by_stage = Counter(x.stage for x in chosen)
    out.print(
        f"{len(chosen)} dead letter(s): "
        + ", ".join(f"{stage} {n}" for stage, n in sorted(by_stage.items()))
    )


@dlq_app.command("show")
def dlq_show(
    letter_id: str = typer.Argument(..., metavar="ID", help="<partition>:<offset>, from list"),
    payload: bool = typer.Option(
        False, "--payload", help="Also print the decoded event (it may hold personal data)"
    ),
) -> None:
    """Show one dead letter: why it was refused, its headers, and what it holds."""
    import json

    from likvard import dlq
    from likvard.codec import Catalogue, CodecError

    try:
        dlq.parse_id(letter_id)
        (letter,) = dlq.find(_dead_letters(_settings()), [letter_id])
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    out = _stdout()
    out.print(f"[bold]dead letter {letter.id}[/bold]: {letter.stage}/{letter.code}")
    out.print(f"  reason:  {letter.reason}")
    out.print(f"  judged by the {letter.service} service at {letter.failed_at}")
    out.print(f"  source:  {_source(letter)}")
    if letter.retry_of:
        out.print(f"  retries: dead letter {letter.retry_of}")
    key = (letter.key or b"").decode("utf-8", errors="replace")
    out.print(f"  key:     {key or '(none)'}")
    value = letter.value or b""
    out.print(f"  value:   {len(value)} bytes, starting {value[:10].hex(' ') or '(empty)'}")
    out.print("  headers:")
    for name, raw in letter.headers:
        text = (raw or b"").decode("utf-8", errors="replace")
        out.print(f"    {name}: {text}")
    try:
        decoded = Catalogue.load().decode(value)
    except CodecError as exc:
        out.print(f"  decoded: no ({exc})")
        return
    record = dict(decoded.record)
    meta = record.pop("metadata")
    out.print(f"  decoded: {decoded.event_type} v{decoded.version}")
    for name in ("event_id", "case_id", "producer", "district", "actor", "occurred_at"):
        out.print(f"    metadata.{name}: {meta.get(name)}")
    if payload:
        out.print(json.dumps(record, default=str, ensure_ascii=False, indent=2))
    else:
        out.print(f"    fields: {', '.join(record)} (--payload prints their values)")


@dlq_app.command("retry")
def dlq_retry(
    ids: list[str] = typer.Argument(None, metavar="[ID]...", help="Dead letters to re-submit"),
    retry_all: bool = typer.Option(
        False, "--all", help="Every dead letter that matches the filters (not yet retried)"
    ),
    stage: str = typer.Option(None, help="With --all: only this stage"),
    code: str = typer.Option(None, help="With --all: only this code"),
    service: str = typer.Option(None, help="With --all: only those judged by this service"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be re-submitted"),
) -> None:
    """Re-submit dead letters to the ingest topic after a fix; the ingest path judges them
    again (a stored event is a duplicate then, a still wrong one a new dead letter)."""
    from likvard import dlq
    from likvard.ingest import INGEST_TOPIC

    if bool(ids) == retry_all:
        raise _fail("give dead-letter ids, or --all (with filters) to retry every match")
    if ids and (stage or code or service):
        raise _fail("--stage, --code and --service go with --all, not with ids")
    settings = _settings()
    letters = _dead_letters(settings)
    try:
        if ids:
            chosen = dlq.find(letters, ids)
        else:
            retried = dlq.retried_by(letters)
            chosen = [
                x
                for x in dlq.select(letters, stage=stage, code=code, service=service)
                if x.id not in retried  # its newest dead letter is retried instead
            ]
            summaries = [x for x in chosen if x.is_summary]
            if summaries:  # the record itself was too large to keep: nothing to re-submit
                console.print(
                    f"skipping {len(summaries)} summary dead letter(s) (record-too-large: the"
                    " record was not kept; ask its district system to send it again)"
                )
                chosen = [x for x in chosen if not x.is_summary]
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    for x in chosen:
        console.print(
            f"{'would re-submit' if dry_run else 're-submitting'} {x.id}"
            f" ({x.event_type or 'unknown type'}, {x.stage}/{x.code})"
        )
    if dry_run or not chosen:
        console.print(f"{len(chosen)} dead letter(s) {'would be ' if dry_run else ''}re-submitted")
        return
    try:
        sent = dlq.retry(settings.require_kafka(), settings.topic(INGEST_TOPIC), chosen)
    except (ConfigError, dlq.DeadLetterError) as exc:
        raise _fail(str(exc), 1) from exc
    console.print(f"re-submitted {sent} dead letter(s) to {settings.topic(INGEST_TOPIC)}")


# --- the contract ------------------------------------------------------------------------
schemas_app = typer.Typer(
    help="The event contract (schemas/): fingerprints and standalone schemas for producers.",
    no_args_is_help=True,
)
app.add_typer(schemas_app, name="schemas")


@schemas_app.command("list")
def schemas_list() -> None:
    """Every event type and version with the fingerprint its records' header carries."""
    from rich.table import Table

    from likvard.codec import Catalogue

    catalogue = Catalogue.load()
    table = Table("event type", "version", "owner", "fingerprint (header bytes 3-10)", "file")
    for w in catalogue.writers():
        if w.primary:
            table.add_row(
                w.event_type,
                str(w.version),
                catalogue.owner(w.event_type),
                w.fingerprint.hex(" "),
                f"schemas/{w.path}",
            )
    _stdout().print(table)


@schemas_app.command("export")
def schemas_export(
    out: Path = typer.Argument(..., help="Folder to write <EventType>.v<N>.avsc files into"),
) -> None:
    """Write every event version as one standalone schema (common types inlined): parsed
    by any Avro library, it gives the fingerprint Likvärd expects."""
    import json

    from likvard.codec import Catalogue

    catalogue = Catalogue.load()
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = 0
        for w in catalogue.writers():
            if w.primary:
                path = out / f"{w.event_type}.v{w.version}.avsc"
                path.write_text(
                    json.dumps(w.schema, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
                )
                written += 1
    except OSError as exc:
        raise _fail(f"cannot write to {out}: {exc.strerror}") from exc
    console.print(f"wrote {written} schemas to {out}")


if __name__ == "__main__":
    app()
