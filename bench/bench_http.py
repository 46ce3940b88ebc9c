"""HTTP path of `POST /cases` against its ceiling, side by side in one run.

Likvärd's intake app (`likvard serve intake`, 1 worker, signed-in case worker, the whole
command path) against a minimal FastAPI app doing one INSERT per request into the same
PostgreSQL (the ceiling), with the same body, the same bearer header, the same clients.
The load is `wrk` (Debian's package) with a Lua script, 32 connections; rounds alternate
Likvärd and the ceiling, and the medians of 3 are compared.

Two placements of the processes on this machine's cores:
- `pinned`: each server on core 0 (`taskset -c 0`), wrk on core 1 (`taskset -c 1`), so the
  load generator never takes the server's CPU (PostgreSQL is not pinned: it runs on both).
- `shared`: no pinning; server, wrk and PostgreSQL share both cores.

Run: .venv/bin/python -m bench.bench_http [--seconds 8] [--runs 3] [--placement pinned]
     [--tree before=/tmp/head --tree after=.]  (Likvärd trees side by side in the rounds)
     [--profile DIR]  (cProfile of every thread of each Likvärd server, DIR/<tree>.prof)

Besides req/s and p50/p99 (wrk's), each run reports the server process's CPU time per
request (all threads, from /proc), which the machine's other load disturbs least.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from fastapi import FastAPI
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from pydantic import BaseModel

from bench.common import database, machine
from likvard.cli.devstack import free_port, wait_until

BODY = {
    "personal_identity_number": "19121212-1212",
    "district": "nordost",
    "substances": ["ALCOHOL"],
    "referral_source": "SELF",
    "children_in_household": "NO",
}
CEILING_URL_ENV = "BENCH_HTTP_CEILING_DATABASE_URL"


# -- the ceiling: FastAPI + one INSERT per request ---------------------------------------


class CeilingBody(BaseModel):
    personal_identity_number: str
    district: str
    substances: list[str]
    referral_source: str
    children_in_household: str


class CeilingResult(BaseModel):
    case_id: uuid.UUID


def ceiling_app() -> FastAPI:
    """What the machine can do with FastAPI and psycopg: parse the body, one INSERT in its
    own transaction (pool of 20, as intake's), answer 201 with a JSON id."""
    pool = ConnectionPool(os.environ[CEILING_URL_ENV], min_size=4, max_size=20, open=False)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        pool.open(wait=True)
        with pool.connection() as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS bench_http_ceiling"
                " (id uuid PRIMARY KEY, body jsonb NOT NULL, at timestamptz DEFAULT now())"
            )
        yield
        pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/cases", status_code=201, response_model=CeilingResult)
    def register(body: CeilingBody) -> CeilingResult:
        case_id = uuid.uuid4()
        with pool.connection() as c:
            c.execute(
                "INSERT INTO bench_http_ceiling (id, body) VALUES (%s, %s)",
                (case_id, Jsonb(body.model_dump())),
            )
        return CeilingResult(case_id=case_id)

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


# -- the load ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    rate: float  # requests/s
    p50: float  # ms
    p99: float  # ms
    requests: int
    failed: int  # non-2xx answers and socket errors
    cpu_ms: float = 0.0  # the server process's CPU time (all threads) per request


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Run:
    """The figures of `wrk --latency` output."""
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"([0-9]+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+([0-9]+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(bad.group(1)) if bad else 0) + (
        sum(int(g) for g in errors.groups()) if errors else 0
    )
    return Run(rate, p50, p99, total, failed)


def lua_script(token: str) -> str:
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(BODY))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(
    pid: int, url: str, script: Path, seconds: int, connections: int, core: str | None
) -> Run:
    """A load run, with the server's CPU per request: the figure the machine's other
    tenants disturb least (the rate depends on who else has the cores)."""
    before = cpu_seconds(pid)
    run = load(url, script, seconds, connections, core)
    used = cpu_seconds(pid) - before
    return replace(run, cpu_ms=1000 * used / max(run.requests, 1))


def load(url: str, script: Path, seconds: int, connections: int, core: str | None) -> Run:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script)]
    if core is not None:
        cmd = ["taskset", "-c", core, *cmd]
    out = subprocess.run([*cmd, url + "/cases"], capture_output=True, text=True, check=True)
    return parse_wrk(out.stdout)


# -- the processes -----------------------------------------------------------------------


@contextmanager
def process(
    cmd: list[str], env: dict[str, str], cwd: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A server for the benchmark's duration (SIGTERM at the end: cProfile then writes)."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_ready(base: str, what: str) -> None:
    def ready() -> bool:
        try:
            return httpx.get(base + "/readyz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 60, what)


def dev_token(idp: str) -> str:
    """A Nordost case worker's token from the development provider."""
    r = httpx.post(
        idp + "/token",
        data={"grant_type": "password", "username": "case-worker-nordost", "password": "dev"},
        timeout=10,
    )
    r.raise_for_status()
    return str(r.json()["access_token"])


def check_answer(base: str, token: str) -> None:
    """One request through each server before any is timed: a 201 with a case id."""
    r = httpx.post(
        base + "/cases", json=BODY, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    if r.status_code != 201 or "case_id" not in r.json():
        raise SystemExit(f"{base}: POST /cases answered {r.status_code}: {r.text[:200]}")


def _median(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.rate for r in runs),
        statistics.median(r.p50 for r in runs),
        statistics.median(r.p99 for r in runs),
        sum(r.requests for r in runs),
        sum(r.failed for r in runs),
        statistics.median(r.cpu_ms for r in runs),
    )


def _line(name: str, r: Run) -> str:
    return (
        f"  {name:<10} {r.rate:8.0f} req/s  p50 {r.p50:6.1f} ms  p99 {r.p99:6.1f} ms"
        f"  cpu {r.cpu_ms:5.2f} ms/req  ({r.requests} requests, {r.failed} failed)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8, help="per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--placement", choices=["pinned", "shared", "both"], default="both", help="see above"
    )
    parser.add_argument(
        "--profile", type=Path, help="a directory: cProfile every thread of each Likvärd server"
    )
    parser.add_argument("--serve-profiled", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a Likvärd source tree to serve (repeatable: before=/tmp/base); default: this one",
    )
    args = parser.parse_args()
    if args.serve_profiled:
        serve_profiled(args.serve_profiled, args.port)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    placements = ["pinned", "shared"] if args.placement == "both" else [args.placement]
    trees = dict(t.split("=", 1) for t in args.tree) or {"likvard": os.getcwd()}
    print(f"# HTTP POST /cases benchmark on {machine()}, {args.connections} connections")
    with database() as url, ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp())
        idp_port, ceiling_port = free_port(), free_port()
        idp = f"http://127.0.0.1:{idp_port}"
        env = dict(
            os.environ,
            LIKVARD_DATABASE_URL=url,
            LIKVARD_PSEUDONYM_SECRET=secrets.token_hex(32),
            LIKVARD_KEK=base64.b64encode(os.urandom(32)).decode(),
            LIKVARD_LOG_LEVEL="WARNING",
            LIKVARD_OIDC_ISSUER=idp,
            LIKVARD_OIDC_AUDIENCE="likvard",
            **{CEILING_URL_ENV: url},
        )
        idp_cmd = [sys.executable, "-m", "likvard.cli", "dev-idp", "--port", str(idp_port)]
        stack.enter_context(process([*idp_cmd, "--keys", str(tmp / "keys.json")], env))
        bases: dict[str, str] = {}
        pids: dict[str, int] = {}
        for name, tree in trees.items():  # one after the other: each migrates the schemas
            port = free_port()
            cmd = [sys.executable, "-m", "likvard.cli", "serve", "intake", "--port", str(port)]
            if args.profile:
                here = Path(__file__)
                if Path(tree).resolve() != here.parent.parent.resolve():
                    shutil.copy(here, Path(tree) / "bench" / here.name)  # the same harness
                out = (args.profile / f"{name}.prof").resolve()
                cmd = [sys.executable, "-m", "bench.bench_http", "--serve-profiled", str(out)]
                cmd += ["--port", str(port)]
            pids[name] = stack.enter_context(process(cmd, env, cwd=tree)).pid
            bases[name] = f"http://127.0.0.1:{port}"
            wait_ready(bases[name], f"the intake service of {name} ({tree})")
        ceiling = [
            *(sys.executable, "-m", "uvicorn", "bench.bench_http:ceiling_app", "--factory"),
            *("--port", str(ceiling_port), "--log-level", "warning", "--no-access-log"),
        ]
        pids["ceiling"] = stack.enter_context(process(ceiling, env)).pid
        bases["ceiling"] = f"http://127.0.0.1:{ceiling_port}"
        wait_ready(bases["ceiling"], "the ceiling app")
        wait_until(lambda: _answers(idp + "/jwks"), 60, "the development OpenID provider")
        token = dev_token(idp)
        script = tmp / "post.lua"
        script.write_text(lua_script(token))
        for b in bases.values():
            check_answer(b, token)
        for placement in placements:
            _pin(list(pids.values()), placement)
            core = "1" if placement == "pinned" else None
            for target in bases.values():  # warm-up, not counted
                load(target, script, 2, args.connections, core)
            results: dict[str, list[Run]] = {name: [] for name in bases}
            for _round in range(args.runs):  # interleaved: every server once per round
                for name, target in bases.items():
                    run = measured(pids[name], target, script, args.seconds, args.connections, core)
                    results[name].append(run)
            where = (
                "servers on core 0, wrk on core 1, PostgreSQL unpinned"
                if placement == "pinned"
                else "no pinning: servers, wrk and PostgreSQL share both cores"
            )
            print(f"placement {placement} ({where}); medians of {args.runs} x {args.seconds} s")
            for name, runs in results.items():
                for i, r in enumerate(runs):
                    print(_line(f"{name}#{i + 1}", r))
            medians = {name: _median(runs) for name, runs in results.items()}
            for name, m in medians.items():
                print(_line(name, m))
            for name in trees:
                ratio = medians[name].rate / medians["ceiling"].rate
                cpu = medians[name].cpu_ms / medians["ceiling"].cpu_ms
                print(f"  ratio {name}/ceiling: {ratio:.2f} (CPU per request: {cpu:.1f} x)")
            print(f"  load average after: {os.getloadavg()[0]:.1f}", flush=True)


def serve_profiled(out: Path, port: int) -> None:
    """Serve intake as `likvard serve intake` does (1 worker), under cProfile in every
    thread (the event loop and the thread pool's workers, each its own profiler, merged
    into `out` when the server stops)."""
    import cProfile
    import pstats
    import signal
    import threading

    import uvicorn

    profiles: list[cProfile.Profile] = []

    def start(*_args: object) -> None:  # the first event of a new thread: its own profiler
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()

    def stopped(_sig: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stopped)
    threading.setprofile(start)
    main_profile = cProfile.Profile()
    profiles.append(main_profile)
    main_profile.enable()
    try:
        uvicorn.run(
            "services.intake.api:create_app",
            factory=True,
            port=port,
            log_level="warning",
            access_log=False,
        )
    finally:
        main_profile.disable()
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(out)


def _pin(pids: list[int], placement: str) -> None:
    """Move the servers' processes (all their threads) to core 0, or back onto every core."""
    cores = "0" if placement == "pinned" else f"0-{(os.cpu_count() or 2) - 1}"
    for pid in pids:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cores, str(pid)], check=True, capture_output=True
        )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
