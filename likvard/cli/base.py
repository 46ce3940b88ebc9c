"""What every `likvard` command shares: the Typer app, the console, settings and exits, the
services it runs, and the plumbing of long-running workers (signals, ops port, groups)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime
from types import FrameType
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from likvard import deadlines
from likvard.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from confluent_kafka import Consumer

    from likvard.eventstore import EventStore
    from likvard.ops import Progress as WorkerProgress
    from likvard.telemetry import ConsumerLag

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


def fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def stdout() -> Console:
    """Standard output for results; piped, tables are not cut to 80 columns."""
    columns = os.environ.get("COLUMNS", "")
    wide = max(200, int(columns) if columns.isdigit() else 0)
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else wide)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise fail(str(exc)) from exc


def day_window(
    start: datetime | None, end: datetime | None, now: datetime | None = None
) -> tuple[date, date]:
    """`--from` and `--to` as days: `--to` defaults to the city's today (at `now`; an intake
    day is the city's, so the host's date would leave out what happened after midnight in
    Stockholm and before it in UTC), `--from` to 1 January of the `--to` year."""
    last = end.date() if end else deadlines.city_today(now)
    return (start.date() if start else last.replace(month=1, day=1)), last


def check_service(service: str, known: dict[str, str] = APPS) -> str:
    if service not in known:
        raise fail(f"unknown service {service!r}; known: {', '.join(sorted(known))}")
    return service


def logging_for(service: str) -> None:
    from likvard.logs import setup_logging

    setup_logging(service)


def event_store(settings: Settings, service: str) -> EventStore:
    from likvard.eventstore import open_store

    try:
        return open_store(settings, service, max_size=4)
    except ConfigError as exc:  # no LIKVARD_DATABASE_URL: the hint, not a traceback
        raise fail(str(exc)) from exc


def group_overrides() -> dict[str, int]:
    """LIKVARD_CONSUMER_SESSION_TIMEOUT_MS for consumer groups (the dev broker takes half
    the session timeout to let a member join)."""
    session = os.environ.get("LIKVARD_CONSUMER_SESSION_TIMEOUT_MS")
    if not session:
        return {}
    if not session.isdigit() or int(session) < 1000:
        raise fail(
            f"LIKVARD_CONSUMER_SESSION_TIMEOUT_MS must be milliseconds (>= 1000), not {session!r}"
        )
    return {"session.timeout.ms": int(session), "heartbeat.interval.ms": int(session) // 10}


def group_member(
    bootstrap: str, group: str, **overrides: object
) -> tuple[Callable[[], Consumer], ConsumerLag]:
    """A factory of consumers in `group` (a fatal error rebuilds the consumer), and the
    gauge of its lag per partition (`likvard.consumer.lag`, from fresh watermarks)."""
    from confluent_kafka import Consumer

    from likvard.inbox import consumer_config
    from likvard.telemetry import ConsumerLag

    settings = {**group_overrides(), **overrides}

    def make() -> Consumer:
        return Consumer(consumer_config(bootstrap, group, **settings))

    return make, ConsumerLag(group)


def require_topics_or_exit(bootstrap: str, settings: Settings, names: list[str]) -> None:
    """The topics a process produces to or consumes exist with the partitions of
    deploy/topics.toml (created if missing); exit 1 with the fix otherwise."""
    from likvard.topics import TopicError, load_topics, require_topics

    try:
        require_topics(bootstrap, load_topics(prefix=settings.topic_prefix), names)
    except TopicError as exc:
        raise fail(str(exc), 1) from exc


def start_telemetry(role: str) -> None:
    from likvard import telemetry

    telemetry.setup_tracing(role)
    telemetry.setup_metrics(role)


@contextmanager
def ops_port(progress: WorkerProgress) -> Iterator[None]:
    """The worker's ops port (LIKVARD_OPS_PORT) for as long as it runs: alive while its loop
    turns and makes progress, ready when its database and broker answered it last."""
    from likvard.ops import serve_from_env

    try:
        server = serve_from_env(progress.heartbeat, progress.ready, progress.stalled)
    except (ValueError, OSError) as exc:
        raise fail(f"cannot serve the ops port: {exc}") from exc
    try:
        yield
    finally:
        if server is not None:
            server.stop()


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: long-running commands stop cleanly on it."""
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
