"""Service layer side by side with pyeventsourcing 9.5.6 on the same PostgreSQL.

The same two commands for both: register a new stream (a case), then load it and append
to it (close the case). Likvärd runs the intake decider through `likvard.service`
(direct appends, and with group commit); the peer runs an `eventsourcing` Application on
its PostgreSQL persistence in a schema of its own. 1 thread and 8 threads, rounds
interleaved (Likvärd and the peer alternate), medians of the rounds.

Run: flock /tmp/bench.lock .venv/bin/python -m bench.bench_service [--commands N]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from psycopg.conninfo import conninfo_to_dict

from bench.common import database, machine, percentile
from likvard.codec import Catalogue
from likvard.db import make_pool
from likvard.districts import DistrictRegistry
from likvard.eventstore import EventStore
from likvard.http import RequestContext
from services.intake import domain as d
from services.intake.service import make_service

CTX = RequestContext(actor="bench", correlation_id="bench", traceparent=None)


class Case(Aggregate):
    """The peer's aggregate: the same two facts as intake's registration and closing."""

    @event("Registered")
    def __init__(
        self,
        person: str,
        district: str,
        substances: list[str],
        referral_source: str,
        children_in_household: str,
    ) -> None:
        self.person = person
        self.district = district
        self.substances = substances
        self.referral_source = referral_source
        self.children_in_household = children_in_household
        self.closed: str | None = None

    @event("Closed")
    def close(self, reason: str) -> None:
        if self.closed is not None:
            raise ValueError("already closed")
        self.closed = reason


class Cases(Application[uuid.UUID]):
    def register(self) -> uuid.UUID:
        case = Case(secrets.token_hex(32), "nordost", ["ALCOHOL"], "SELF", "NO")
        self.save(case)
        return case.id

    def close_case(self, case_id: uuid.UUID) -> None:
        case: Case = self.repository.get(case_id)
        case.close("GOALS_REACHED")
        self.save(case)


BEFORE = "e748281"
"""The commit before the one-round-trip append and group commit (issue 16): its event store
and service layer, loaded from git, are the benchmark's "before"."""


def before_service(store: EventStore, districts: DistrictRegistry, commit: str) -> Any:
    """The intake service on the event store and service layer of `commit` (same schema)."""
    modules: dict[str, types.ModuleType] = {}
    for name in ("eventstore", "service"):
        source = subprocess.run(
            ["git", "show", f"{commit}:likvard/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout
        module = types.ModuleType(f"bench_before_{name}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(source, f"{commit}:likvard/{name}.py", "exec"), module.__dict__)
        modules[name] = module
    old = modules["eventstore"].EventStore(
        store.pool, store.schema, store.catalogue, producer=store.producer, topic=store.topic
    )
    return modules["service"].StreamService(
        old,
        initial_state=d.initial_state,
        evolve=d.evolve,
        decide=lambda command, state: d.decide(command, state, districts),
        to_domain=lambda t, data, at: d.DomainEvent(type=t, data=data, occurred_at=at),
        district_of=lambda state, _event: state.district or "",
    )


def peer_env(url: str, pool_size: int) -> dict[str, str]:
    """pyeventsourcing's PostgreSQL settings for the benchmark's database, own schema."""
    info = conninfo_to_dict(url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(info.get("dbname", "postgres")),
        "POSTGRES_HOST": str(info.get("host", "127.0.0.1")),
        "POSTGRES_PORT": str(info.get("port", 5432)),
        "POSTGRES_USER": str(info.get("user", "postgres")),
        "POSTGRES_PASSWORD": str(info.get("password", "")),
        "POSTGRES_SCHEMA": "bench_peer",
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": "0",
    }


def run_threads(threads: int, per_thread: int, one: Callable[[], None]) -> tuple[float, float]:
    """`one` (two commands) per_thread times in each thread: commands/s and p99 ms."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        mine: list[float] = []
        try:
            for _ in range(per_thread):
                t = time.perf_counter()
                one()
                mine.append((time.perf_counter() - t) * 500)  # per command: two commands
        except BaseException as exc:  # reported after the join
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return 2 * threads * per_thread / seconds, percentile(latencies, 99)


def likvard_pair(svc: Any, register_at: int | None = 0) -> Callable[[], None]:
    def one() -> None:
        case_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        register = d.RegisterIntake(
            case_id=case_id,
            occurred_at=now,
            person=secrets.token_hex(32),
            district="nordost",
            substances=("ALCOHOL",),
            referral_source="SELF",
            children_in_household="NO",
        )
        svc.execute(case_id, register, register_at, CTX)  # POST /cases: If-Match 0
        svc.execute(case_id, d.CloseCase(case_id, now, "GOALS_REACHED"), 1, CTX)

    return one


def peer_pair(app: Cases) -> Callable[[], None]:
    def one() -> None:
        app.close_case(app.register())

    return one


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commands", type=int, default=2400, help="commands per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["before", "direct", "group"],
        help=f"Likvärd: before (the code of {BEFORE}), direct, group",
    )
    parser.add_argument(
        "--register-at",
        choices=["0", "none"],
        default="0",
        help="expected version of the registration (none: the stream is read first)",
    )
    args = parser.parse_args()
    register_at = None if args.register_at == "none" else 0
    print(f"# service layer benchmark on {machine()}")
    print(
        f"# {args.commands} commands per run (register + load/append, halves), "
        f"{args.rounds} interleaved rounds, medians"
    )
    with database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA IF NOT EXISTS bench_peer")
        top = max(args.threads)
        pool = make_pool(url, min_size=top + 1, max_size=top + 1, name="bench-service")
        store = EventStore(
            pool, "bench_service", Catalogue.load(), producer="bench", topic="likvard.intake.v1"
        )
        store.migrate()
        districts = DistrictRegistry.load()
        direct = make_service(store, districts)
        direct.committer = None  # each append its own transaction
        grouped = make_service(store, districts)  # the services' default: group commit
        services = {"direct": direct}
        if "before" in args.modes:
            services["before"] = before_service(store, districts, BEFORE)
        if "group" in args.modes:
            services["group"] = grouped
        peer = Cases(env=peer_env(url, top + 1))
        likvard_pair(direct)()  # warm-up, creates nothing the runs depend on
        peer_pair(peer)()
        results: dict[tuple[str, int], list[float]] = {}
        p99s: dict[tuple[str, int], list[float]] = {}
        for _round in range(args.rounds):
            for threads in args.threads:
                per = max(1, args.commands // 2 // threads)
                runs: list[tuple[str, Callable[[], None]]] = [
                    (mode, likvard_pair(services[mode], register_at)) for mode in args.modes
                ]
                runs.append(("peer", peer_pair(peer)))
                for name, one in runs:
                    rate, p99 = run_threads(threads, per, one)
                    results.setdefault((name, threads), []).append(rate)
                    p99s.setdefault((name, threads), []).append(p99)
                    print(
                        f"  round {_round + 1} {name:<7} {threads} thread(s):"
                        f" {rate:8.0f} commands/s  p99 {p99:6.2f} ms",
                        flush=True,
                    )
        pool.close()
        peer.close()
        print()
        print("| threads | Likvärd mode | Likvärd commands/s | peer/s | ratio | p99 ms L/peer |")
        print("|---:|---|---:|---:|---:|---:|")
        for threads in args.threads:
            peer_rate = statistics.median(results[("peer", threads)])
            peer_p99 = statistics.median(p99s[("peer", threads)])
            for mode in args.modes:
                rate = statistics.median(results[(mode, threads)])
                p99 = statistics.median(p99s[(mode, threads)])
                print(
                    f"| {threads} | {mode} | {rate:.0f} | {peer_rate:.0f} |"
                    f" {rate / peer_rate:.2f} | {p99:.2f}/{peer_p99:.2f} |"
                )
    os.environ.pop("PERSISTENCE_MODULE", None)


if __name__ == "__main__":
    main()
