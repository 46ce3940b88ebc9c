"""Replays and chain verifications run for auditors from the reporting API, as jobs.

`ReplayJobs` starts a replay (`replay.Replay`, as `likvard replay` runs it) or a chain
verification in a background thread and keeps each job in PostgreSQL, so the console can
watch its progress and the result outlives a restart of the API:

- `<schema>.replay_jobs`: one row per replay: who asked, the as-of date, status (queued,
  running, done, failed), the records read so far and the expected total, the fresh schema
  it built, and at the end the checksum of every read model, the replay's beside the live
  one's (`compare_checksums`). Only a replay without an as-of date is expected to equal the
  live read models: they move on with every event, and an as-of replay shows the history
  as it had occurred up to that day.
- `<schema>.verifications`: one row per chain verification: status ok, broken or failed,
  records and streams checked, and the breaks (where, and why; never a payload). The API
  verifies the records on Kafka (every source topic from offset 0, `likvard.chain`: what
  a replay checks, without projecting), which the projections service can read in any
  deployment; `likvard verify SERVICE` records its check of an event store here too
  (`record_verification`), with `source` naming which.

At most one replay, and one verification, runs at a time, across every process on the
database: a job holds a session advisory lock on its own connection from the moment it
is accepted until it ends, so a second start is refused (`Busy`), and a job row still
'queued' or 'running' while nobody holds the lock was left by a process that died: it is
marked failed ("interrupted") when the API starts or the next job is accepted.

A failure is recorded as a reason of our own words (`failure_reason`): never a database
error's text, which can quote a row.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from likvard.chain import ChainCheck, RecordBreak
from likvard.config import ConfigError
from likvard.db import check_schema_name, make_pool, may_migrate
from likvard.eventstore import ChainBreak
from likvard.topic_reader import TopicReader, TopicReadError, record_headers
from services.projections import readmodels
from services.projections.replay import LIVE_SCHEMA, Replay, replay_schema_name

log = logging.getLogger("likvard.projections.history")

JOBS_TABLE, VERIFICATIONS_TABLE = "replay_jobs", "verifications"
TABLES = (JOBS_TABLE, VERIFICATIONS_TABLE)
MAX_BREAKS = 1000  # kept per job; `break_count` has them all
KAFKA_SOURCE = "kafka"
INTERRUPTED = "interrupted"
PROGRESS_SECONDS = 0.5  # at most this often a running job's row is updated


class Busy(Exception):
    """A replay (or a verification) is already running: only one at a time."""


class HistoryUnavailable(Exception):
    """The job tables are missing and this role may not create them (`likvard db migrate`)."""


# --- the pure part -----------------------------------------------------------------------
def compare_checksums(
    replay: Mapping[str, str], live: Mapping[str, str] | None
) -> list[dict[str, Any]]:
    """Per read model (sorted), the replay's checksum beside the live one's: equal or not.
    `live` None: the live read models could not be summed (then never equal)."""
    tables = sorted(set(replay) | set(live or {}))
    return [
        {
            "table": t,
            "replay": replay.get(t),
            "live": (live or {}).get(t),
            "equal": live is not None
            and replay.get(t) is not None
            and replay.get(t) == live.get(t),
        }
        for t in tables
    ]


def _reason(text: str) -> str:
    # A codec error quotes what it could not decode: keep only our own words.
    return "event bytes do not decode" if text.startswith("event bytes do not decode") else text


def record_breaks(breaks: Sequence[RecordBreak]) -> list[dict[str, Any]]:
    """Breaks of the records on Kafka as stored (the first MAX_BREAKS)."""
    return [
        {
            "topic": b.topic,
            "partition": b.partition,
            "offset": b.offset,
            "stream_id": b.stream_id,
            "version": b.stream_version,
            "position": None,
            "reason": _reason(b.reason),
        }
        for b in breaks[:MAX_BREAKS]
    ]


def store_breaks(topic: str | None, breaks: Sequence[ChainBreak]) -> list[dict[str, Any]]:
    """Breaks of an event store (`likvard verify`) in the same shape: the store's topic,
    no partition or offset, its global position instead."""
    return [
        {
            "topic": topic,
            "partition": None,
            "offset": None,
            "stream_id": b.stream_id,
            "version": b.stream_version,
            "position": b.global_position,
            "reason": _reason(b.reason),
        }
        for b in breaks[:MAX_BREAKS]
    ]


def failure_reason(exc: BaseException) -> str:
    """Why a job failed, in words that hold no data: our own errors' messages (about
    topics, schemas, settings), a database error's SQLSTATE, else the error's kind."""
    if isinstance(exc, ConfigError):
        return str(exc)[:300]
    if isinstance(exc, TopicReadError):  # ReplayError too; its applier part quotes the DB
        return str(exc).split(": ", 1)[0][:300] if "failed: " in str(exc) else str(exc)[:300]
    if isinstance(exc, psycopg.Error):
        return f"database error {exc.sqlstate or type(exc).__name__}"
    return f"unexpected error ({type(exc).__name__})"


def job_schema(schema: str, job_id: uuid.UUID, now: datetime | None = None) -> str:
    """The fresh schema of a replay job: `<schema>_replay_<time>_<id>` (the CLI's name with
    the job's id, so two jobs never meet), `projections_replay_...` if that is too long."""
    base = replay_schema_name(now)  # projections_replay_<time>
    suffix = f"_{job_id.hex[:6]}"
    named = schema + base[len(LIVE_SCHEMA) :] + suffix
    return check_schema_name(named if len(named) <= 63 else base + suffix)


@dataclass(frozen=True)
class ChainResult:
    """What a chain verification found."""

    records: int
    streams: int
    breaks: list[dict[str, Any]]
    break_count: int

    @property
    def status(self) -> str:
        return "broken" if self.break_count else "ok"


def verify_topics(
    bootstrap: str, topics: Sequence[str], *, settle: float = 1.0, batch_size: int = 5000
) -> ChainResult:
    """The hash chain of every stream on `topics`, from the records alone (as a replay
    checks it, without projecting anything)."""
    chain = ChainCheck()
    reader = TopicReader(bootstrap, topics, settle=settle)
    try:
        for messages in reader.batches(batch_size):
            for m in messages:
                headers = {k: v or b"" for k, v in record_headers(m)}
                chain.add(
                    str(m.topic()),
                    int(m.partition() or 0),
                    int(m.offset() or 0),
                    headers,
                    m.value() or b"",
                )
    finally:
        reader.close()
    breaks = chain.finish()
    return ChainResult(chain.records, len(chain.streams), record_breaks(breaks), len(breaks))


# --- the tables --------------------------------------------------------------------------
def _t(schema: str, table: str) -> sql.Identifier:
    return sql.Identifier(check_schema_name(schema), table)


def tables_exist(conn: psycopg.Connection[Any], schema: str) -> bool:
    return all(
        conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.{t}",)).fetchone() == (True,)
        for t in TABLES
    )


def migrate(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Create the job tables (idempotent, in the caller's transaction); False when they are
    missing and this role may not create them."""
    check_schema_name(schema)
    if not may_migrate(conn, schema):
        return tables_exist(conn, schema)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id uuid PRIMARY KEY, actor text NOT NULL,"
            " as_of date, started_at timestamptz NOT NULL, finished_at timestamptz,"
            " status text NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),"
            " events bigint NOT NULL DEFAULT 0, total bigint, replay_schema text NOT NULL,"
            " checksums jsonb, summary jsonb, error text)"
        ).format(_t(schema, JOBS_TABLE))
    )
    conn.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS replay_jobs_started ON {} (started_at DESC)").format(
            _t(schema, JOBS_TABLE)
        )
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id uuid PRIMARY KEY, actor text NOT NULL,"
            " source text NOT NULL, started_at timestamptz NOT NULL, finished_at timestamptz,"
            " status text NOT NULL CHECK (status IN ('running', 'ok', 'broken', 'failed')),"
            " records bigint, streams integer, break_count integer,"
            " breaks jsonb NOT NULL DEFAULT '[]', error text)"
        ).format(_t(schema, VERIFICATIONS_TABLE))
    )
    conn.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS verifications_started ON {} (started_at DESC)").format(
            _t(schema, VERIFICATIONS_TABLE)
        )
    )
    return True


def _mark_interrupted(conn: psycopg.Connection[Any], schema: str, table: str) -> int:
    """Jobs left queued or running by a process that is gone (the caller holds the lock)."""
    cur = conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'failed', error = %s, finished_at = now()"
            " WHERE status IN ('queued', 'running')"
        ).format(_t(schema, table)),
        (INTERRUPTED,),
    )
    return cur.rowcount


def record_verification(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    actor: str,
    source: str,
    started_at: datetime,
    result: ChainResult,
) -> uuid.UUID:
    """Keep a finished verification (`likvard verify` records its store checks here)."""
    vid = uuid.uuid4()
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, actor, source, started_at, finished_at, status, records,"
            " streams, break_count, breaks) VALUES (%s, %s, %s, %s, now(), %s, %s, %s, %s, %s)"
        ).format(_t(schema, VERIFICATIONS_TABLE)),
        (
            vid,
            actor,
            source,
            started_at,
            result.status,
            result.records,
            result.streams,
            result.break_count,
            Jsonb(result.breaks),
        ),
    )
    return vid


_JOB_COLUMNS = (
    "id, actor, as_of, status, started_at, finished_at, events, total, replay_schema,"
    " checksums, summary, error"
)
_VERIFICATION_COLUMNS = (
    "id, actor, source, status, started_at, finished_at, records, streams, break_count,"
    " breaks, error"
)


def _with_equal(row: dict[str, Any]) -> dict[str, Any]:
    """A job row with `equal`: every read model's checksums equal (None until compared)."""
    sums = row["checksums"]
    return row | {"equal": all(c["equal"] for c in sums) if sums else None}


def jobs(conn: psycopg.Connection[Any], schema: str, limit: int = 20) -> list[dict[str, Any]]:
    """The most recent replay jobs, newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                f"SELECT {_JOB_COLUMNS} FROM {{}} ORDER BY started_at DESC, id LIMIT %s"
            ).format(_t(schema, JOBS_TABLE)),
            (limit,),
        )
        return [_with_equal(r) for r in cur.fetchall()]


def job(conn: psycopg.Connection[Any], schema: str, job_id: uuid.UUID) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(f"SELECT {_JOB_COLUMNS} FROM {{}} WHERE id = %s").format(
                _t(schema, JOBS_TABLE)
            ),
            (job_id,),
        )
        found = cur.fetchone()
        return _with_equal(found) if found is not None else None


def verification(
    conn: psycopg.Connection[Any], schema: str, vid: uuid.UUID | None = None
) -> dict[str, Any] | None:
    """One verification, or (vid None) the latest started."""
    where = sql.SQL("WHERE id = %s") if vid is not None else sql.SQL("")
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                f"SELECT {_VERIFICATION_COLUMNS} FROM {{}} {{}}"
                " ORDER BY started_at DESC, id LIMIT 1"
            ).format(_t(schema, VERIFICATIONS_TABLE), where),
            (vid,) if vid is not None else (),
        )
        return cur.fetchone()


# --- the runner --------------------------------------------------------------------------
def _lock(dsn: str, key: str) -> psycopg.Connection[Any]:
    """A connection of its own holding the session lock `key`; Busy if another holds it.
    The lock goes with the connection, so a process that dies releases it."""
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,))
        if row.fetchone() != (True,):
            raise Busy(key)
    except BaseException:
        conn.close()
        raise
    return conn


class ReplayJobs:
    """Replay and verification jobs of one read-model schema, each in a thread of its own.

    `before_run(kind, job_id)`, if given, is called in the job's thread once it is running
    and before it reads anything (a test holds a job there to see the second start
    refused)."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        bootstrap: str | None,
        topics: Sequence[str],
        settle: float = 1.0,
        batch_size: int = 5000,
        before_run: Callable[[str, uuid.UUID], None] | None = None,
    ) -> None:
        self.dsn, self.schema = dsn, check_schema_name(schema)
        self.bootstrap, self.topics = bootstrap, list(topics)
        self.settle, self.batch_size = settle, batch_size
        self.before_run = before_run
        self.pool: ConnectionPool | None = None
        self.available = False
        self.threads: list[threading.Thread] = []

    def _key(self, kind: str) -> str:
        return f"likvard.history.{kind}.{self.schema}"

    def open(self) -> None:
        """Migrate (if this role may), and fail the jobs that a dead process left running."""
        self.pool = make_pool(self.dsn, max_size=3, name="likvard-history")
        self.pool.open(wait=True, timeout=30)
        with self.pool.connection() as conn, conn.transaction():
            self.available = migrate(conn, self.schema)
        if not self.available:
            log.warning(
                "no %s tables in schema %s and this role may not create them: replays and"
                " verifications answer 503 until `likvard db migrate` makes them",
                "/".join(TABLES),
                self.schema,
            )
            return
        for kind, table in (("replay", JOBS_TABLE), ("verify", VERIFICATIONS_TABLE)):
            try:
                conn = _lock(self.dsn, self._key(kind))
            except Busy:
                continue  # another process runs one: its rows are alive
            with conn:
                if n := _mark_interrupted(conn, self.schema, table):
                    log.warning("%d %s job(s) were interrupted by a restart", n, kind)

    def close(self, wait: float = 0.0) -> None:
        """Stop taking reads; a running job goes on in its daemon thread until the process
        ends (and is marked interrupted at the next start if it did not finish)."""
        for t in self.threads:
            t.join(wait)
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        if self.pool is None or not self.available:
            raise HistoryUnavailable(self.schema)
        with self.pool.connection() as conn:
            yield conn

    # reads
    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return jobs(conn, self.schema, limit)

    def job(self, job_id: uuid.UUID) -> dict[str, Any] | None:
        with self._conn() as conn:
            return job(conn, self.schema, job_id)

    def verification(self, vid: uuid.UUID) -> dict[str, Any] | None:
        with self._conn() as conn:
            return verification(conn, self.schema, vid)

    def latest_verification(self) -> dict[str, Any] | None:
        with self._conn() as conn:
            return verification(conn, self.schema)

    # starts
    def _accept(
        self, kind: str, table: str, insert: Callable[[psycopg.Connection[Any]], uuid.UUID]
    ) -> tuple[psycopg.Connection[Any], uuid.UUID]:
        """Take the kind's lock on a connection of the job's own and insert its row; the
        connection (and lock) then belongs to the job's thread."""
        if not self.available:
            raise HistoryUnavailable(self.schema)
        conn = _lock(self.dsn, self._key(kind))
        try:
            _mark_interrupted(conn, self.schema, table)  # we hold the lock: nobody runs
            return conn, insert(conn)
        except BaseException:
            conn.close()
            raise

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="likvard-history", daemon=True)
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    def start(self, as_of: date | None, actor: str) -> uuid.UUID:
        """Accept a replay as of `as_of` (None: the whole history); Busy if one runs."""
        job_id = uuid.uuid4()
        target = job_schema(self.schema, job_id)

        def insert(conn: psycopg.Connection[Any]) -> uuid.UUID:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, actor, as_of, started_at, status, replay_schema)"
                    " VALUES (%s, %s, %s, now(), 'queued', %s)"
                ).format(_t(self.schema, JOBS_TABLE)),
                (job_id, actor, as_of, target),
            )
            return job_id

        conn, _ = self._accept("replay", JOBS_TABLE, insert)
        self._spawn(self._run_replay, conn, job_id, as_of, target)
        return job_id

    def verify(self, actor: str) -> uuid.UUID:
        """Accept a verification of every source topic's records; Busy if one runs."""
        vid = uuid.uuid4()

        def insert(conn: psycopg.Connection[Any]) -> uuid.UUID:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, actor, source, started_at, status)"
                    " VALUES (%s, %s, %s, now(), 'running')"
                ).format(_t(self.schema, VERIFICATIONS_TABLE)),
                (vid, actor, KAFKA_SOURCE),
            )
            return vid

        conn, _ = self._accept("verify", VERIFICATIONS_TABLE, insert)
        self._spawn(self._run_verify, conn, vid)
        return vid

    # the threads
    def _set(self, conn: psycopg.Connection[Any], table: str, rid: uuid.UUID, **cols: Any) -> None:
        names = sql.SQL(", ").join(
            sql.SQL("{} = now()").format(sql.Identifier(c))
            if v is _NOW
            else sql.SQL("{} = %s").format(sql.Identifier(c))
            for c, v in cols.items()
        )
        values = [
            Jsonb(v) if isinstance(v, list | dict) else v for v in cols.values() if v is not _NOW
        ]
        conn.execute(
            sql.SQL("UPDATE {} SET {} WHERE id = %s").format(_t(self.schema, table), names),
            (*values, rid),
        )

    def _run_replay(
        self, conn: psycopg.Connection[Any], job_id: uuid.UUID, as_of: date | None, target: str
    ) -> None:
        started = time.monotonic()
        last = 0.0
        built = False

        def progress(done: int, total: int) -> None:
            nonlocal last
            if time.monotonic() - last >= PROGRESS_SECONDS:
                last = time.monotonic()
                self._set(conn, JOBS_TABLE, job_id, events=done, total=total)

        try:
            self._set(conn, JOBS_TABLE, job_id, status="running")
            if self.before_run is not None:
                self.before_run("replay", job_id)
            if not self.bootstrap:
                raise ConfigError("no Kafka broker is configured (KAFKA_BOOTSTRAP_SERVERS)")
            run = Replay(
                self.dsn,
                self.bootstrap,
                self.topics,
                target,
                as_of=as_of,
                batch_size=self.batch_size,
                settle=self.settle,
            )
            try:
                built = True  # from here on the schema is this job's (Replay refuses one that is)
                result = run.run(progress)
            finally:
                run.close()
            live = self._live_checksums()
            self._set(
                conn,
                JOBS_TABLE,
                job_id,
                status="done",
                finished_at=_NOW,
                events=result.records,
                total=result.records,
                checksums=compare_checksums(result.checksums, live),
                summary={
                    "projected": result.projected,
                    "after_as_of": result.after_as_of,
                    "undecodable": result.undecodable,
                    "chain_events": result.chain_events,
                    "streams": result.streams,
                    "break_count": len(result.breaks),
                    "breaks": record_breaks(result.breaks),
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
            log.info("replay %s done into %s (%d records)", job_id, target, result.records)
        except Exception as exc:
            reason = failure_reason(exc)
            log.error("replay %s failed: %s", job_id, reason)
            if built and "already exists" not in reason:
                self._drop(target)
            self._finish_failed(conn, JOBS_TABLE, job_id, reason)
        finally:
            conn.close()  # and with it the lock

    def _live_checksums(self) -> dict[str, str] | None:
        """The live read models' checksums in one snapshot; None if they cannot be read."""
        try:
            with psycopg.connect(self.dsn) as conn:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return readmodels.checksum(conn, self.schema)
        except psycopg.Error as exc:
            log.warning("live checksums of %s not read: %s", self.schema, failure_reason(exc))
            return None

    def _drop(self, target: str) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(target))
                )
        except psycopg.Error as exc:
            log.warning("half-built replay schema %s not dropped: %s", target, failure_reason(exc))

    def _finish_failed(
        self, conn: psycopg.Connection[Any], table: str, rid: uuid.UUID, reason: str
    ) -> None:
        try:
            self._set(conn, table, rid, status="failed", finished_at=_NOW, error=reason)
        except psycopg.Error:  # the row stays running; the next start marks it interrupted
            log.error("job %s: its failure could not be recorded", rid)

    def _run_verify(self, conn: psycopg.Connection[Any], vid: uuid.UUID) -> None:
        try:
            if self.before_run is not None:
                self.before_run("verify", vid)
            if not self.bootstrap:
                raise ConfigError("no Kafka broker is configured (KAFKA_BOOTSTRAP_SERVERS)")
            result = verify_topics(
                self.bootstrap, self.topics, settle=self.settle, batch_size=self.batch_size
            )
            self._set(
                conn,
                VERIFICATIONS_TABLE,
                vid,
                status=result.status,
                finished_at=_NOW,
                records=result.records,
                streams=result.streams,
                break_count=result.break_count,
                breaks=result.breaks,
            )
            log.info("verification %s: %s (%d records)", vid, result.status, result.records)
        except Exception as exc:
            reason = failure_reason(exc)
            log.error("verification %s failed: %s", vid, reason)
            self._finish_failed(conn, VERIFICATIONS_TABLE, vid, reason)
        finally:
            conn.close()


class _Now:
    """A column set to the database's now()."""


_NOW: Any = _Now()
