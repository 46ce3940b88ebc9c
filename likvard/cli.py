"""The `likvard` command: run the stack, serve a service, relay, topics, republish, verify."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from likvard.config import ConfigError, Settings, load_settings, service_port

if TYPE_CHECKING:
    from likvard.eventstore import EventStore

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


def _check_service(service: str) -> str:
    if service not in APPS:
        raise _fail(f"unknown service {service!r}; known: {', '.join(sorted(APPS))}")
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
    service: str = typer.Argument(..., help="intake | referral | followup"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on"),
    port: int = typer.Option(0, help="Port (default: the service's standard port)"),
    workers: int = typer.Option(1, min=1, help="Worker processes (each has its own pool)"),
) -> None:
    """Serve a service's HTTP API (its event store is migrated at start)."""
    import uvicorn

    _check_service(service)
    _logging()
    settings = _settings()
    try:
        settings.require_database()
        if service == "intake":
            settings.require_pseudonym_secret()
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    uvicorn.run(
        APPS[service],
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
        "intake,referral,followup", help="Comma-separated services to run"
    ),
    broker_port: int = typer.Option(9092, help="Port of the development broker"),
) -> None:
    """Run the whole stack on this machine, until Ctrl-C.

    With no settings: an embedded PostgreSQL and the Tansu broker (memory only). With
    LIKVARD_DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS set, those servers are used instead.
    """
    from likvard.devstack import EmbeddedPostgres, StackError, Supervisor, TansuBroker, wait_until
    from likvard.topics import TopicError, ensure_topics, load_topics

    wanted = [_check_service(s.strip()) for s in services.split(",") if s.strip()]
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
