"""The access log's group commit against its peer, one commit per read, in the same run.

Many request threads each record one read and wait for it to be committed (as an API
does before it answers). Group commit shares one transaction among every read waiting;
the peer (max_batch=1) commits each read on its own, which is what "a database round trip
per request" would cost. Prints reads/s and the wait per read for both, and their ratio.

    .venv/bin/python -m bench.bench_access_log [--threads 64] [--reads 100]
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from datetime import UTC, datetime

from bench.common import database, machine, report
from likvard.access_log import open_access_log
from likvard.config import Settings
from likvard.guard import AccessEntry


def entry(case_id: str) -> AccessEntry:
    return AccessEntry(
        actor="bench-cw-nordost",
        roles="case-worker",
        action="case.read",
        resource=f"case:{case_id}",
        case_id=case_id,
        allowed=True,
        reason="own-district",
        emergency_reason=None,
        service="intake",
        occurred_at=datetime.now(UTC),
        trace_id=None,
    )


def run(url: str, threads: int, reads: int, max_batch: int) -> tuple[float, list[float], int]:
    """Seconds for threads x reads recorded reads, each read's wait (ms), and commits."""
    schema = f"bench_access_{uuid.uuid4().hex[:8]}"
    writer = open_access_log(
        Settings(database_url=url), "intake", schema=schema, max_batch=max_batch
    )
    waits: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)

    def reader() -> None:
        mine = []
        start.wait()
        for _ in range(reads):
            began = time.perf_counter()
            writer.record([entry(str(uuid.uuid4()))])
            mine.append((time.perf_counter() - began) * 1000)
        with lock:
            waits.extend(mine)

    workers = [threading.Thread(target=reader) for _ in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    began = time.perf_counter()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - began
    commits = writer.stats.batches
    writer.close()
    return seconds, waits, commits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--reads", type=int, default=100)
    args = parser.parse_args()
    n = args.threads * args.reads
    print(f"machine: {machine()}; {args.threads} threads x {args.reads} reads")
    with database() as url:
        group = run(url, args.threads, args.reads, max_batch=2_000)
        single = run(url, args.threads, args.reads, max_batch=1)
    report(f"group commit ({group[2]} commits)", n, group[0], group[1])
    report(f"one commit per read ({single[2]} commits)", n, single[0], single[1])
    print(f"group commit / one commit per read: {single[0] / group[0]:.1f}x the reads/s")


if __name__ == "__main__":
    main()
