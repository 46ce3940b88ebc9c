"""The ops port of the workers (relay, consumer, ingest, projection worker): `/healthz`,
`/readyz` and `/metrics` over HTTP, so containers, Kubernetes probes and Prometheus treat
them like the HTTP services (which serve the same three paths on their own port).

Set LIKVARD_OPS_PORT to serve it (the image sets 9464); unset, nothing is served (`likvard
up` runs many workers on one machine). `/healthz` answers 200 while the worker's loop has
beaten within LIKVARD_LIVENESS_SECONDS and, for consumers, has not stalled (lag and no
completed batch for LIKVARD_STALL_SECONDS: see `likvard.consumer_loop`), so a hung loop is
restarted; `/readyz` answers 200 when it is alive and its dependencies answered it last.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.metrics import CallbackOptions, Observation

from likvard import telemetry

log = logging.getLogger("likvard.ops")
_meter = telemetry.meter("likvard.ops")

PORT_ENV = "LIKVARD_OPS_PORT"
STALL_ENV = "LIKVARD_STALL_SECONDS"
DEFAULT_STALL_SECONDS = 120.0
LIVENESS_ENV = "LIKVARD_LIVENESS_SECONDS"
PROBE_FILE_ENV = "LIKVARD_PROBE_FILE"
DEFAULT_PROBE_FILE = "/tmp/likvard-probe"


def announce(base_url: str) -> None:
    """Note where this process answers probes, for `likvard probe` with no target (the
    image's health check, the same for every role). Best effort: a read-only file system
    only loses that shortcut."""
    path = os.environ.get(PROBE_FILE_ENV, DEFAULT_PROBE_FILE)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(base_url)
    except OSError as exc:
        log.info("could not note the probe address in %s: %s", path, exc)


def announced() -> str | None:
    """The base URL `announce` noted, if any."""
    try:
        with open(os.environ.get(PROBE_FILE_ENV, DEFAULT_PROBE_FILE), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


class Heartbeat:
    """Beaten by a worker's loop on every turn; stale means the loop is stuck."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        return self._clock() - self._last


_registry: list[Progress] = []
_registry_lock = threading.Lock()


def _observe_stalled(_options: CallbackOptions) -> Iterable[Observation]:
    with _registry_lock:
        progresses = list(_registry)
    for p in progresses:
        yield Observation(1 if p.stalled() else 0, {"worker": p.name})


_meter.create_observable_gauge(
    "likvard.worker.stalled",
    [_observe_stalled],
    unit="1",
    description="1 while a worker cannot make progress: lag and no completed batch, or a"
    " failing batch, for longer than LIKVARD_STALL_SECONDS.",
)


def stall_seconds_from_env() -> float:
    raw = os.environ.get(STALL_ENV, "")
    if not raw:
        return DEFAULT_STALL_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{STALL_ENV} must be a number of seconds, not {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{STALL_ENV} must be positive, not {raw!r}")
    return value


class Progress:
    """What a consumer loop tells its probes and metrics (pure state, injectable clock)."""

    def __init__(
        self,
        name: str,
        *,
        stall_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: Heartbeat | None = None,
        register: bool = True,
    ) -> None:
        self.name = name
        self.stall_seconds = stall_seconds or stall_seconds_from_env()
        self._clock = clock
        self.heartbeat = heartbeat or Heartbeat(clock)
        now = clock()
        self.last_completed = now
        self.failing_since: float | None = None
        self.last_failure = ""
        self.lag: dict[tuple[str, int], int] = {}
        self.lag_since: float | None = None
        self.database_ok = True
        self.broker_ok = True
        if register:
            with _registry_lock:
                _registry.append(self)

    def beat(self) -> None:
        self.heartbeat.beat()

    def completed(self) -> None:
        self.last_completed = self._clock()
        self.failing_since = None
        self.database_ok = True

    def failed(self, reason: str, *, database: bool = False) -> None:
        if self.failing_since is None:
            self.failing_since = self._clock()
        self.last_failure = reason
        if database:
            self.database_ok = False

    def recovered(self) -> None:
        """The fault that made it fail is over without a batch (e.g. a rejoined group)."""
        self.failing_since = None
        self.broker_ok = True

    def set_lag(self, lag: dict[tuple[str, int], int]) -> None:
        self.lag = dict(lag)
        if sum(lag.values()) > 0:
            if self.lag_since is None:
                self.lag_since = self._clock()
        else:
            self.lag_since = None

    def stalled(self) -> bool:
        """No progress for `stall_seconds`: a batch failing that long, or lag that long with
        no completed batch."""
        now = self._clock()
        if self.failing_since is not None and now - self.failing_since > self.stall_seconds:
            return True
        if self.lag_since is None:
            return False
        since = max(self.last_completed, self.lag_since)
        return now - since > self.stall_seconds

    def alive(self, liveness_seconds: float) -> bool:
        return self.heartbeat.age() < liveness_seconds and not self.stalled()

    def ready(self) -> bool:
        return self.database_ok and self.broker_ok and self.failing_since is None


class OpsServer:
    """A small threaded HTTP server in a daemon thread."""

    def __init__(
        self,
        port: int,
        heartbeat: Heartbeat,
        ready: Callable[[], bool] = lambda: True,
        *,
        host: str = "0.0.0.0",
        liveness_seconds: float = 60.0,
        stalled: Callable[[], bool] = lambda: False,
    ) -> None:
        self.heartbeat = heartbeat
        self.stalled = stalled
        self.ready = ready
        self.liveness_seconds = liveness_seconds
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body, content_type = server.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                """Probes every few seconds are not worth a log line."""

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def alive(self) -> bool:
        """The loop turns, and makes progress when it has work (`stalled`)."""
        return self.heartbeat.age() < self.liveness_seconds and not self.stalled()

    def answer(self, path: str) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        route = path.split("?", 1)[0]
        if route == "/healthz":
            return (200, b"ok\n", text) if self.alive() else (503, b"stuck\n", text)
        if route == "/readyz":
            try:
                ready = self.alive() and self.ready()
            except Exception:  # a dependency that fails to answer is not ready
                ready = False
            return (200, b"ready\n", text) if ready else (503, b"not ready\n", text)
        if route == "/metrics":
            body, content_type = telemetry.prometheus_exposition()
            return 200, body, content_type
        return 404, b"not found\n", text

    def start(self) -> OpsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_from_env(
    heartbeat: Heartbeat,
    ready: Callable[[], bool] = lambda: True,
    stalled: Callable[[], bool] = lambda: False,
) -> OpsServer | None:
    """Start the ops server on LIKVARD_OPS_PORT if it is set; None otherwise."""
    port = os.environ.get(PORT_ENV, "")
    if not port:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{PORT_ENV} must be a port number, not {port!r}")
    liveness = float(os.environ.get(LIVENESS_ENV, "60"))
    server = OpsServer(
        int(port), heartbeat, ready, liveness_seconds=liveness, stalled=stalled
    ).start()
    announce(f"http://127.0.0.1:{server.port}")
    log.info("ops endpoints (/healthz, /readyz, /metrics) on port %d", server.port)
    return server
