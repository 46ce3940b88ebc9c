"""The ops port of the workers (relay, consumer, ingest, projection worker): `/healthz`,
`/readyz` and `/metrics` over HTTP, so containers, Kubernetes probes and Prometheus treat
them like the HTTP services (which serve the same three paths on their own port).

Set LIKVARD_OPS_PORT to serve it (the image sets 9464); unset, nothing is served (`likvard
up` runs many workers on one machine). `/healthz` answers 200 while the worker's loop has
beaten within LIKVARD_LIVENESS_SECONDS (a hung loop is restarted); `/readyz` answers 200
when it is alive and its dependencies answer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from likvard import telemetry

log = logging.getLogger("likvard.ops")

PORT_ENV = "LIKVARD_OPS_PORT"
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
    ) -> None:
        self.heartbeat = heartbeat
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
        return self.heartbeat.age() < self.liveness_seconds

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
    heartbeat: Heartbeat, ready: Callable[[], bool] = lambda: True
) -> OpsServer | None:
    """Start the ops server on LIKVARD_OPS_PORT if it is set; None otherwise."""
    port = os.environ.get(PORT_ENV, "")
    if not port:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{PORT_ENV} must be a port number, not {port!r}")
    liveness = float(os.environ.get(LIVENESS_ENV, "60"))
    server = OpsServer(int(port), heartbeat, ready, liveness_seconds=liveness).start()
    announce(f"http://127.0.0.1:{server.port}")
    log.info("ops endpoints (/healthz, /readyz, /metrics) on port %d", server.port)
    return server
