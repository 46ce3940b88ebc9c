"""Append path: direct kernel calls (serial and threaded) and HTTP with concurrent clients.

Run: .venv/bin/python -m bench.bench_append [--events N] [--http-requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
from psycopg_pool import ConnectionPool

from bench.common import database, machine, report
from likvard.cli.devstack import free_port, wait_until
from likvard.codec import Catalogue
from likvard.eventstore import EventStore
from likvard.keys import KekRing, KeyStore, LocalKek
from services.intake.personal import attach
from tests.support import closed, registered


def kernel_serial(store: EventStore, n: int, *, sealed: bool = True) -> float:
    """Serial appends of registrations, each of a new person: with a birth year (sealed
    with the person's new data key, as intake does) or without (nothing to seal)."""
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        person = secrets.token_hex(32)
        event = registered(person=person, birth_year=1980 if sealed else None)
        t = time.perf_counter()
        store.append(str(uuid.uuid4()), 0, [event])
        latencies.append((time.perf_counter() - t) * 1000)
    seconds = time.perf_counter() - start
    what = "sealed birth year" if sealed else "nothing to seal"
    report(f"kernel append, 1 thread, 1 event/append, {what}", n, seconds, latencies)
    return n / seconds


def kernel_threads(store: EventStore, n: int, threads: int) -> None:
    latencies: list[float] = []
    lock = threading.Lock()
    per = n // threads

    def work() -> None:
        mine = []
        for _ in range(per):
            case = str(uuid.uuid4())
            t = time.perf_counter()
            store.append(case, 0, [registered()])
            mine.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            store.append(case, 1, [closed()])
            mine.append((time.perf_counter() - t) * 1000)
        with lock:
            latencies.extend(mine)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    report(
        f"kernel append, {threads} threads, 1 event/append",
        per * threads * 2,
        time.perf_counter() - start,
        latencies,
    )


LIKVARD = [sys.executable, "-m", "likvard.cli"]


def dev_token(idp: str) -> str:
    """A Nordost case worker's token from the development provider."""
    r = httpx.post(
        idp + "/token",
        data={"grant_type": "password", "username": "case-worker-nordost", "password": "dev"},
        timeout=10,
    )
    r.raise_for_status()
    return str(r.json()["access_token"])


async def http_clients(base: str, token: str, n: int, concurrency: int, workers: int) -> list[str]:
    """POST /cases from `concurrency` clients, then GET /cases/{id} of each (every read is
    access-logged, committed before it is answered); the case ids."""
    body = {
        "personal_identity_number": "19121212-1212",
        "district": "nordost",
        "substances": ["ALCOHOL"],
        "referral_source": "SELF",
        "children_in_household": "NO",
    }
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    failures = 0
    headers = {"Authorization": f"Bearer {token}"}
    cases: list[str] = []

    async def client() -> None:
        nonlocal failures
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as c:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t = time.perf_counter()
                r = await c.post("/cases", json=body)
                latencies.append((time.perf_counter() - t) * 1000)
                if r.status_code != 201:
                    failures += 1
                else:
                    cases.append(r.json()["case_id"])

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    report(
        f"HTTP POST /cases, {concurrency} clients, {workers} worker(s)",
        n,
        time.perf_counter() - start,
        latencies,
    )
    if failures:
        print(f"  {failures} requests failed", file=sys.stderr)
    reads: asyncio.Queue[str] = asyncio.Queue()
    for case in cases:
        reads.put_nowait(case)
    read_latencies: list[float] = []
    refused = 0

    async def reader() -> None:
        nonlocal refused
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as c:
            while True:
                try:
                    case = reads.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t = time.perf_counter()
                r = await c.get(f"/cases/{case}")
                read_latencies.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    refused += 1

    start = time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(concurrency)))
    report(
        f"HTTP GET /cases/{{id}} (access-logged), {concurrency} clients",
        len(cases),
        time.perf_counter() - start,
        read_latencies,
    )
    if refused:
        print(f"  {refused} reads failed", file=sys.stderr)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--http-requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()
    print(f"# append benchmark on {machine()}")
    with database() as url:
        pool = ConnectionPool(url, min_size=2, max_size=args.threads + 2, open=True)
        store = EventStore(
            pool, "bench_append", Catalogue.load(), producer="bench", topic="likvard.intake.v1"
        )
        store.migrate()
        # The intake store seals personal details with each person's data key (key store
        # in its own schema, the KEK in memory), as the service runs it.
        kek = KekRing(LocalKek("bench", os.urandom(32)))
        data_keys = KeyStore(pool, kek, schema="bench_keys")
        data_keys.migrate()
        attach(store, data_keys)
        # Alternating rounds, so warm-up and the machine's noise fall on both alike.
        kernel_serial(store, 200, sealed=False)  # warm-up, not counted
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _round in range(3):
            for sealed in (False, True):
                rates[sealed].append(kernel_serial(store, args.events // 3, sealed=sealed))
        ratio = statistics.median(rates[True]) / statistics.median(rates[False])
        print(f"  sealing: {ratio:.2f} x the rate of appends with nothing to seal (medians)")
        kernel_threads(store, args.events, args.threads)
        pool.close()

        port, idp_port = free_port(), free_port()
        idp = f"http://127.0.0.1:{idp_port}"
        keys = Path(tempfile.mkdtemp()) / "dev-idp-keys.json"
        env = dict(
            os.environ,
            LIKVARD_DATABASE_URL=url,
            LIKVARD_PSEUDONYM_SECRET=secrets.token_hex(32),
            LIKVARD_KEK=base64.b64encode(os.urandom(32)).decode(),
            LIKVARD_LOG_LEVEL="WARNING",
            LIKVARD_OIDC_ISSUER=idp,
            LIKVARD_OIDC_AUDIENCE="likvard",
        )
        provider = subprocess.Popen(
            [*LIKVARD, "dev-idp", "--port", str(idp_port), "--keys", str(keys)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "likvard.cli",
                "serve",
                "intake",
                "--port",
                str(port),
                "--workers",
                str(args.workers),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                try:
                    return httpx.get(base + "/readyz", timeout=0.5).status_code == 200
                except httpx.HTTPError:
                    return False

            def signs_in() -> bool:
                try:
                    return httpx.get(idp + "/jwks", timeout=0.5).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, 60, "the intake service")
            wait_until(signs_in, 60, "the development OpenID provider")
            token = dev_token(idp)
            asyncio.run(
                http_clients(base, token, args.http_requests, args.concurrency, args.workers)
            )
        finally:
            for p in (proc, provider):
                p.terminate()
                p.wait(10)


if __name__ == "__main__":
    main()
