"""Long-running roles: serve an API, relay an outbox, consume, ingest, project; topics
and the containers' probe."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import TYPE_CHECKING

import typer

from likvard.cli.base import (
    APPS,
    CONSUMERS,
    INGESTERS,
    READ_APPS,
    app,
    check_service,
    console,
    event_store,
    fail,
    group_member,
    group_overrides,
    logging_for,
    ops_port,
    require_topics_or_exit,
    settings_or_exit,
    start_telemetry,
    stop_on_signals,
)
from likvard.config import ConfigError, Settings, service_port

if TYPE_CHECKING:
    pass


def _require_kek(settings: Settings) -> None:
    """The key-encryption key that wraps the data keys: checked before anything starts."""
    from likvard.keys import KekError, kek_from_settings

    try:
        kek_from_settings(settings)
    except KekError as exc:
        raise ConfigError(str(exc)) from exc


@app.command()
def topics() -> None:
    """Create the Kafka topics from deploy/topics.toml (existing ones get the definition's
    retention; partitions are never altered)."""
    from likvard.topics import TopicError, ensure_topics, load_topics

    settings = settings_or_exit()
    try:
        outcome = ensure_topics(settings.require_kafka(), load_topics(prefix=settings.topic_prefix))
    except (TopicError, ConfigError) as exc:
        raise fail(str(exc)) from exc
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
    check_service(service, apps)
    logging_for(service)
    settings = settings_or_exit()
    try:
        settings.require_database()
        if service == "intake":
            settings.require_pseudonym_secret()
            _require_kek(settings)
        listen = port or service_port(service)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
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
def relay(
    service: str = typer.Argument(..., help="intake | referral | followup | access-log"),
) -> None:
    """Publish the service's outbox (or the access log's) to Kafka until stopped
    (SIGTERM/SIGINT)."""
    from likvard import access_log
    from likvard.relay import OutboxRelay, register_outbox_gauges
    from likvard.topics import ACCESS_LOG_TOPIC, SERVICE_TOPICS, load_topics

    if service != access_log.SERVICE:
        check_service(service, {**APPS, access_log.SERVICE: ""})
    role = f"{service}-relay"
    logging_for(role)
    settings = settings_or_exit()
    try:
        if service == access_log.SERVICE:
            dsn, schema = access_log.database_url(settings), access_log.schema_name()
            topic = ACCESS_LOG_TOPIC
        else:
            dsn, schema, topic = settings.require_database(), service, SERVICE_TOPICS[service]
        bootstrap = settings.require_kafka()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    start_telemetry(role)
    if service == access_log.SERVICE:  # migrate before relaying
        access_log.open_store(settings, schema=schema, service="relay").pool.close()
    else:
        event_store(settings, service).pool.close()
    register_outbox_gauges(dsn, schema, service)
    stop = stop_on_signals()
    worker = OutboxRelay(
        dsn,
        schema,
        bootstrap,
        topics=load_topics(prefix=settings.topic_prefix),
        batch_size=settings.relay_batch_size,
    )
    require_topics_or_exit(bootstrap, settings, [settings.topic(topic)])
    with ops_port(worker.progress):
        worker.run(stop)


@app.command()
def consume(service: str = typer.Argument(..., help="referral | followup")) -> None:
    """Consume the topics SERVICE learns from (exactly-once effect) until stopped."""
    import importlib

    if service not in CONSUMERS:
        raise fail(
            f"{service!r} consumes nothing; services with a consumer: {', '.join(CONSUMERS)}"
        )

    role = f"{service}-consumer"
    logging_for(role)
    settings = settings_or_exit()
    try:
        bootstrap = settings.require_kafka()
        module, _, func = CONSUMERS[service].partition(":")
        inbox, topics = getattr(importlib.import_module(module), func)(settings)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    start_telemetry(role)
    stop = stop_on_signals()
    require_topics_or_exit(bootstrap, settings, topics)
    consumer, lag = group_member(bootstrap, f"{settings.topic_prefix}likvard-{service}")
    with ops_port(inbox.progress):
        inbox.run(consumer, topics, stop, lag=lag)


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

    check_service(service, INGESTERS)
    role = f"{service}-ingest"
    logging_for(role)
    settings = settings_or_exit()
    try:
        bootstrap = settings.require_kafka()
        settings.require_database()
        module, _, func = INGESTERS[service].partition(":")
        processor = getattr(importlib.import_module(module), func)(settings, schema or service)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    except psycopg.OperationalError as exc:
        raise fail(f"cannot reach the database: {exc}", 1) from exc
    start_telemetry(role)
    stop = stop_on_signals()
    worker = IngestWorker(
        processor,
        DeadLetterSink(bootstrap, settings.topic(DEAD_LETTER_TOPIC), service),
        batch_size=batch_size,
        metrics_=IngestMetrics(telemetry.meter("likvard.ingest"), service),
    )
    require_topics_or_exit(
        bootstrap, settings, [settings.topic(INGEST_TOPIC), settings.topic(DEAD_LETTER_TOPIC)]
    )
    consumer, lag = group_member(bootstrap, f"{settings.topic_prefix}likvard-{service}-ingest")
    try:
        with ops_port(worker.progress):
            worker.run(consumer, settings.topic(INGEST_TOPIC), stop, lag=lag)
    finally:
        processor.store.pool.close()
        if processor.store.personal is not None:
            processor.store.personal.close()
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
            base = f"http://127.0.0.1:{service_port(check_service(target, APPS | READ_APPS))}"
    except ConfigError as exc:  # 1, not 2: Docker reserves 2 in health checks
        raise fail(str(exc), 1) from exc
    url = f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:
            status = int(answer.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise fail(f"{url} does not answer: {exc}", 1) from exc
    if status != 200:
        raise fail(f"{url} answered {status}", 1)


@app.command()
def project(schema: str = typer.Option("projections", help="Read-model schema")) -> None:
    """Run the live projection worker into the read models until stopped (SIGTERM/SIGINT)."""
    from services.projections.worker import build

    role = "projections-worker"
    logging_for(role)
    settings = settings_or_exit()
    batch = os.environ.get("LIKVARD_PROJECTION_BATCH_SIZE", "1000")
    if not batch.isdigit() or int(batch) < 1:
        raise fail(f"LIKVARD_PROJECTION_BATCH_SIZE must be a positive number, not {batch!r}")
    try:
        worker, consumer = build(
            settings, schema, batch_size=int(batch), consumer_overrides=group_overrides()
        )
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    start_telemetry(role)
    stop = stop_on_signals()
    require_topics_or_exit(settings.require_kafka(), settings, worker.topics)
    with ops_port(worker.progress):
        worker.run(consumer, stop)
