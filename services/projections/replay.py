"""The auditors' replay: rebuild every read model from offset 0 into a fresh schema.

The same `readmodels.apply` as the live worker folds the events, so a replay of the whole
history gives the live read models' checksums. A fast batch consumer (confluent-kafka,
partitions assigned at offset 0, no consumer group, nothing committed) reads every topic of
`readmodels.SOURCE_TOPICS` (the service topics and the access log, so the access-log
streams' hash chains are verified and the access-log read model rebuilt like the rest);
decoding and the hash-chain check run in this thread while a second thread applies the
previous batch to PostgreSQL, so the two overlap.

Parallel by partition (`processes`, LIKVARD_REPLAY_PROCESSES; 1 by default): each process
reads the partitions whose number it owns (of every topic, so a case's records, keyed by its
id, stay in one process), verifies their chains and applies into the same fresh schema (the
set-based merges commute); this process then merges their chain checks
(`ChainCheck.merge`: a stream split across processes is still linked whole) and their
counts, and goes on from where they stopped for `swap`.

When is the replay done? A queried end offset alone cannot say (the dev broker under-reports
it: see DESIGN.md), so the replay reads at least up to the end offsets it was told, then
keeps reading until the broker has nothing more for `settle` seconds.

`--as-of DATE` projects only events that occurred before the end of DATE in the city's
time zone; `--as-known-on DATE` only events recorded by then (what the city could have
known that day: an event recorded late, though it occurred before, is left out). Every
record is still read and its chain link verified, since the history up to a date is only
trustworthy if the whole chain is intact.

`until` (a report's provenance: per topic partition the highest offset its figures were
folded from) reads each partition only up to that offset, chain check included; records
after it, or in partitions it does not name, are left out, and reading stops as soon as
every partition is past its offset. Each batch records its offsets and chain heads in the
schema (`provenance.py`), as the live worker does, so a report over a replayed schema is
reproducible too.

`swap` makes a rebuilt schema live. It takes the lock every live batch takes (shared), so
no batch is half-way; applies what arrived since the rebuild ended; checks that every event
the live read models have seen is in the rebuilt ones; then renames the schemas in one
transaction. The live worker goes on writing into the new schema under the same name.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from confluent_kafka import Message
from psycopg import sql

from likvard.chain import ChainCheck, RecordBreak
from likvard.codec import Catalogue, CodecError
from likvard.db import check_schema_name
from likvard.inbox import Incoming, decode_event
from likvard.topic_reader import TopicReader, TopicReadError, header_map
from services.projections import provenance, readmodels
from services.projections.timeline_chain import Link, link_of

CITY_TZ = ZoneInfo("Europe/Stockholm")
LIVE_SCHEMA = "projections"


class ReplayError(TopicReadError):
    """The replay could not run or could not be swapped in; the message says why."""


def as_of_cutoff(day: date) -> datetime:
    """Events that occurred before this instant are 'as of' `day` (end of the local day)."""
    return datetime.combine(day + timedelta(days=1), datetime.min.time(), CITY_TZ)


def recorded_at(e: Incoming) -> datetime:
    """When the event was recorded (stored by its service); its occurrence if older
    contracts carried no recording time."""
    at = e.metadata.get("recorded_at") or e.metadata["occurred_at"]
    assert isinstance(at, datetime)
    return at


def replay_schema_name(now: datetime | None = None) -> str:
    return f"{LIVE_SCHEMA}_replay_{(now or datetime.now(UTC)):%Y%m%d_%H%M%S}"


@dataclass
class ReplayResult:
    schema: str
    records: int = 0  # records read from Kafka
    projected: int = 0  # distinct events newly applied to the read models
    after_as_of: int = 0  # events left out because they occurred after the as-of date
    after_known_on: int = 0  # events left out because they were recorded after that date
    after_limit: int = 0  # records left out because they are past the `until` offsets
    undecodable: int = 0
    undecodable_examples: list[str] = field(default_factory=list)
    per_topic: dict[str, int] = field(default_factory=dict)
    breaks: list[RecordBreak] = field(default_factory=list)
    chain_events: int = 0
    streams: int = 0
    checksums: dict[str, str] = field(default_factory=dict)
    checksum_seconds: float = 0.0
    seconds: float = 0.0


def _headers(msg: Message) -> dict[str, bytes]:
    return header_map(msg)


@dataclass
class _Batch:
    """The decoded events of a batch of records, each one's chain link, and its marks."""

    events: list[Incoming] = field(default_factory=list)
    links: list[Link | None] = field(default_factory=list)
    marks: provenance.Marks = field(default_factory=provenance.Marks)

    def __bool__(self) -> bool:
        return bool(self.events or self.marks)

    def apply(self, conn: psycopg.Connection[Any], schema: str) -> int:
        """Project it and record its marks, in the caller's transaction."""
        new = readmodels.apply(conn, schema, self.events, self.links)
        provenance.record(conn, schema, self.marks)
        return new


class _Applier:
    """Applies batches on its own connection in a thread, so decoding overlaps the SQL."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema
        self.queue: queue.Queue[_Batch | None] = queue.Queue(maxsize=4)
        self.applied = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="replay-apply", daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while (batch := self.queue.get()) is not None:
                    with conn.transaction():
                        # A replay is rebuilt from Kafka if lost: no need to wait for fsync.
                        conn.execute("SET LOCAL synchronous_commit = off")
                        self.applied += batch.apply(conn, self.schema)
        except BaseException as exc:
            self.error = exc
            while self.queue.get() is not None:  # unblock the producer side until it stops
                pass

    def put(self, batch: _Batch) -> None:
        if self.error is not None:
            raise ReplayError(f"applying to the read models failed: {self.error}")
        self.queue.put(batch)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise ReplayError(f"applying to the read models failed: {self.error}")


def _schema_exists(conn: psycopg.Connection[Any], schema: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (schema,)
    ).fetchone()
    return row is not None


class Replay:
    """One replay run: read, verify, project; then optionally `swap` it in."""

    def __init__(
        self,
        dsn: str,
        bootstrap: str,
        topics: Sequence[str],
        schema: str,
        *,
        as_of: date | None = None,
        known_on: date | None = None,
        until: Mapping[tuple[str, int], int] | None = None,
        batch_size: int = 5000,
        settle: float = 1.0,
        catalogue: Catalogue | None = None,
        processes: int | None = None,
    ) -> None:
        self.dsn, self.bootstrap, self.topics = dsn, bootstrap, list(topics)
        self.schema = check_schema_name(schema)
        self.as_of, self.known_on = as_of, known_on
        self.cutoff = as_of_cutoff(as_of) if as_of else None
        self.known_cutoff = as_of_cutoff(known_on) if known_on else None
        self.until = dict(until) if until is not None else None
        self.batch_size = batch_size
        self.settle = settle
        self.catalogue = catalogue or Catalogue.load()
        self.chain = ChainCheck()
        self.result = ReplayResult(schema=self.schema)
        self.reader: TopicReader | None = None
        env = os.environ.get("LIKVARD_REPLAY_PROCESSES", "1")
        self.processes = max(1, processes if processes is not None else int(env or "1"))

    def _events(self, messages: list[Message]) -> _Batch:
        r = self.result
        batch = _Batch()
        for m in messages:
            topic, partition, offset = str(m.topic()), int(m.partition() or 0), int(m.offset() or 0)
            if self.until is not None and offset > self.until.get((topic, partition), -1):
                r.after_limit += 1
                continue
            value = m.value() or b""
            r.records += 1
            r.per_topic[topic] = r.per_topic.get(topic, 0) + 1
            headers = _headers(m)
            verified = self.chain.add(topic, partition, offset, headers, value)
            batch.marks.add(topic, partition, offset, headers)
            try:
                e = decode_event(self.catalogue, topic, partition, offset, value)
            except CodecError as exc:
                r.undecodable += 1
                if len(r.undecodable_examples) < 10:
                    r.undecodable_examples.append(f"{topic}[{partition}]@{offset}: {exc}")
                continue
            if self.cutoff is not None and e.metadata["occurred_at"] >= self.cutoff:
                r.after_as_of += 1
                continue
            if self.known_cutoff is not None and recorded_at(e) >= self.known_cutoff:
                r.after_known_on += 1
                continue
            batch.events.append(e)
            batch.links.append(link_of(headers, value, verified))
        return batch

    def _past_limits(self) -> bool:
        """With `until`: every partition has been read past its offset (nothing more to use)."""
        if self.until is None or self.reader is None:
            return False
        return all(n > self.until.get(k, -1) for k, n in self.reader.next.items())

    def run(self, progress: Callable[[int, int], None] | None = None) -> ReplayResult:
        """Rebuild into the fresh schema; `progress(done, expected)` after every batch."""
        started = time.monotonic()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            if _schema_exists(conn, self.schema):
                raise ReplayError(
                    f"schema {self.schema} already exists: a replay builds a fresh schema"
                    " (choose another --schema, or drop that one)"
                )
            with conn.transaction():
                readmodels.migrate(conn, self.schema)
                provenance.migrate(conn, self.schema)
                provenance.set_cutoffs(conn, self.schema, as_of=self.as_of, known_on=self.known_on)
        if self.processes > 1:
            self._run_shares(progress)
        else:
            self.reader = TopicReader(self.bootstrap, self.topics, settle=self.settle)
            self.result.projected = self._read(progress)
        r = self.result
        r.breaks = self.chain.finish()
        r.chain_events, r.streams = self.chain.events, len(self.chain.streams)
        summed = time.monotonic()
        with psycopg.connect(self.dsn) as conn:
            r.checksums = readmodels.checksum(conn, self.schema)
        r.checksum_seconds = time.monotonic() - summed
        r.seconds = time.monotonic() - started
        return r

    def _read(self, progress: Callable[[int, int], None] | None) -> int:
        """Read `self.reader` to its end, verifying and applying; returns the new events."""
        assert self.reader is not None
        applier = _Applier(self.dsn, self.schema)
        applier.thread.start()
        try:
            for messages in self.reader.batches(self.batch_size):
                batch = self._events(messages)
                if batch:
                    applier.put(batch)
                if progress:
                    progress(self.result.records, max(self.reader.expected, self.result.records))
                if self._past_limits():
                    break
        finally:
            applier.close()
        return applier.applied

    def _run_shares(self, progress: Callable[[int, int], None] | None) -> None:
        """Read and apply in `processes` processes, one share of the partitions each; then
        merge what they found and read on from where they stopped (for `swap`)."""
        share = _Share(
            self.dsn,
            self.bootstrap,
            tuple(self.topics),
            self.schema,
            self.as_of,
            self.known_on,
            self.until,
            self.batch_size,
            self.settle,
            str(self.catalogue.root),
            self.processes,
        )
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
        out: Any = ctx.Queue()
        procs = [ctx.Process(target=_read_share, args=(share, i, out)) for i in range(share.count)]
        for proc in procs:
            proc.start()
        done: dict[int, _ShareResult] = {}
        counts, expected = [0] * share.count, [0] * share.count
        try:
            while len(done) < share.count:
                try:
                    kind, index, value = out.get(timeout=1.0)
                except queue.Empty:
                    dead = [i for i, p in enumerate(procs) if p.exitcode is not None]
                    if any(i not in done for i in dead):
                        raise ReplayError("a replay process ended without its result") from None
                    continue
                if kind == "error":
                    raise ReplayError(f"a replay process failed: {value}")
                if kind == "expected":
                    expected[index] = value
                elif kind == "progress":
                    counts[index] = value
                    if progress:
                        progress(sum(counts), max(sum(expected), sum(counts)))
                else:
                    done[index] = value
        finally:
            for proc in procs:
                if proc.is_alive() and len(done) < share.count:
                    proc.terminate()
                proc.join()
        r = self.result
        start: dict[tuple[str, int], int] = {}
        for index in sorted(done):
            part = done[index]
            r.records += part.result.records
            r.projected += part.applied
            r.after_as_of += part.result.after_as_of
            r.after_known_on += part.result.after_known_on
            r.after_limit += part.result.after_limit
            r.undecodable += part.result.undecodable
            r.undecodable_examples += part.result.undecodable_examples
            r.undecodable_examples = r.undecodable_examples[:10]
            for topic, n in part.result.per_topic.items():
                r.per_topic[topic] = r.per_topic.get(topic, 0) + n
            self.chain.merge(part.chain)
            start.update(part.next)
        self.reader = TopicReader(self.bootstrap, self.topics, settle=self.settle, start=start)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def swap(self, live: str = LIVE_SCHEMA) -> str | None:
        """Make the rebuilt schema `live`; returns the name the old live schema was given
        (None if there was none). Refused for an as-of replay or a broken chain."""
        check_schema_name(live)
        if self.cutoff is not None or self.known_cutoff is not None or self.until is not None:
            raise ReplayError(
                "a replay as of a date, as known on a date or up to offsets shows the past:"
                " it cannot be made live"
            )
        if self.result.breaks:
            raise ReplayError(
                f"{len(self.result.breaks)} hash-chain breaks found: not swapping in read models"
                " built from a history that does not verify"
            )
        if self.reader is None:
            raise ReplayError("run the replay before swapping it in")
        retired = f"{live}_retired_{datetime.now(UTC):%Y%m%d_%H%M%S}"
        self._catch_up(None, within=60)  # most of what came meanwhile, before the lock
        with psycopg.connect(self.dsn, autocommit=True) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (readmodels.lock_key(live),))
            self._catch_up(conn, within=10)  # the rest, now that no live batch is in flight
            if self.chain.breaks:
                raise ReplayError("events that arrived during the swap break the hash chain")
            if not _schema_exists(conn, live):
                retired_name = None
            else:
                row = conn.execute(
                    sql.SQL(
                        "SELECT count(*) FROM (SELECT event_id FROM {}.processed"
                        " EXCEPT SELECT event_id FROM {}.processed) AS missing"
                    ).format(sql.Identifier(live), sql.Identifier(self.schema))
                ).fetchone()
                missing = int(row[0]) if row else 0
                if missing:
                    raise ReplayError(
                        f"{missing} events in the live read models are not in the rebuilt ones"
                        " (not on Kafka any more?): not swapping; run `likvard republish`"
                    )
                conn.execute(
                    sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                        sql.Identifier(live), sql.Identifier(retired)
                    )
                )
                retired_name = retired
            conn.execute(
                sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                    sql.Identifier(self.schema), sql.Identifier(live)
                )
            )
        self.schema = self.result.schema = live
        return retired_name

    def _catch_up(self, conn: psycopg.Connection[Any] | None, *, within: float) -> None:
        """Apply what arrived after the rebuild (in `conn`'s transaction, or a new one). A
        busy topic may never go quiet, so reading stops after `within` seconds; the check
        that every live event is in the rebuilt schema keeps the swap correct anyway."""
        assert self.reader is not None
        for messages in self.reader.batches(self.batch_size, within=within):
            batch = self._events(messages)
            if not batch:
                continue
            if conn is not None:
                self.result.projected += batch.apply(conn, self.schema)
                continue
            with psycopg.connect(self.dsn, autocommit=True) as own, own.transaction():
                self.result.projected += batch.apply(own, self.schema)


@dataclass(frozen=True)
class _Share:
    """What each process of a parallel replay needs (picklable)."""

    dsn: str
    bootstrap: str
    topics: tuple[str, ...]
    schema: str
    as_of: date | None
    known_on: date | None
    until: dict[tuple[str, int], int] | None
    batch_size: int
    settle: float
    schemas_root: str
    count: int


@dataclass
class _ShareResult:
    result: ReplayResult
    chain: ChainCheck
    next: dict[tuple[str, int], int]
    applied: int


def _read_share(share: _Share, index: int, out: Any) -> None:
    """One process of a parallel replay: the partitions p with p % count == index."""
    run = Replay(
        share.dsn,
        share.bootstrap,
        share.topics,
        share.schema,
        as_of=share.as_of,
        known_on=share.known_on,
        until=share.until,
        batch_size=share.batch_size,
        settle=share.settle,
        catalogue=Catalogue.load(Path(share.schemas_root)),
        processes=1,
    )
    try:
        run.reader = TopicReader(
            share.bootstrap,
            share.topics,
            settle=share.settle,
            partitions=lambda p: p % share.count == index,
        )
        out.put(("expected", index, run.reader.expected))
        applied = run._read(lambda done, _expected: out.put(("progress", index, done)))
        out.put(
            ("done", index, _ShareResult(run.result, run.chain, dict(run.reader.next), applied))
        )
    except BaseException as exc:
        out.put(("error", index, f"{type(exc).__name__}: {exc}"))
    finally:
        run.close()
