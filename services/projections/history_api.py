"""The history on the reporting API, for the auditors' console: start a replay as of a
date into a fresh schema, watch it, compare its checksums with the live read models, and
start or see the chain verification (`history.ReplayJobs` runs them as jobs).

Every route needs REPLAY or VERIFY (auditors only, `likvard.policy`); a refusal is in the
access log, and so is every accepted start, as `likvard replay` logs its read: a replay
reads every case's history. Installed on the app of `services/projections/api.py` with
``install_history(app, settings, schema)``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from likvard import guard, http, telemetry
from likvard.config import Settings
from likvard.identity import Principal
from likvard.policy import Action, Decision, SystemScope
from services.projections import history, readmodels

REPLAYS = SystemScope("replay")
VERIFICATIONS = SystemScope("verification")
TAG = "history"

REPLAY_DESCRIPTION = (
    " A replay reads every topic from offset 0, verifies every stream's hash chain, and"
    " projects the events (with an as-of date: only those that occurred by the end of that"
    " day, city time) into a fresh schema (`replay_schema`), as `likvard replay` does; at"
    " the end `checksums` sets each read model's SHA-256 beside the live read models'."
    " Only a replay without `as_of` is expected to equal the live read models (`equal`"
    " true), and only if no event arrived meanwhile: the live read models move on, while an"
    " as-of replay's checksums are those of the history as it had occurred by that day."
    " Auditors only."
)


class ReplayRequest(BaseModel):
    """What to replay: the whole history, or as of a day."""

    model_config = ConfigDict(extra="forbid")
    as_of: http.Day | None = Field(
        None, description="Only events that occurred up to the end of this day (city time)"
    )


class ChecksumComparison(BaseModel):
    """One read model: the replay's checksum, the live one's (null if it could not be
    read), and whether they are equal."""

    table: str
    replay: str | None
    live: str | None
    equal: bool


class ChainBreakView(BaseModel):
    """Where a hash chain is broken, and why: a record on Kafka (topic, partition, offset)
    or, from `likvard verify`, an event store (its topic and global `position`)."""

    topic: str | None
    partition: int | None
    offset: int | None
    stream_id: str | None
    version: int | None
    position: int | None
    reason: str


class ReplaySummary(BaseModel):
    """What a finished replay found: events projected, left out after the as-of date,
    undecodable; the chain (events linked, streams, breaks: the first 1000)."""

    projected: int
    after_as_of: int
    undecodable: int
    chain_events: int
    streams: int
    break_count: int
    breaks: list[ChainBreakView]
    seconds: float


class ReplayJob(BaseModel):
    """A replay job. `events` are the records read so far, `total` what the broker said
    there were (an estimate while running); `checksums`, `equal` and `summary` once done;
    `error` says why it failed (`interrupted`: the API stopped while it ran)."""

    id: uuid.UUID
    actor: str
    as_of: date | None
    status: Literal["queued", "running", "done", "failed"]
    started_at: datetime
    finished_at: datetime | None
    events: int
    total: int | None
    replay_schema: str
    checksums: list[ChecksumComparison] | None
    equal: bool | None = Field(description="Every read model's checksums are equal")
    summary: ReplaySummary | None
    error: str | None


class ReplayJobs(BaseModel):
    """Replay jobs, the most recent first."""

    jobs: list[ReplayJob]


class Verification(BaseModel):
    """A chain verification. `source`: `kafka` (the records of every source topic, as
    started here) or `store:<service>` (an event store, by `likvard verify SERVICE`).
    `breaks` holds the first 1000 of `break_count`; no payloads."""

    id: uuid.UUID
    actor: str
    source: str
    status: Literal["running", "ok", "broken", "failed"]
    started_at: datetime
    finished_at: datetime | None
    records: int | None
    streams: int | None
    break_count: int | None
    breaks: list[ChainBreakView]
    error: str | None


def _job_view(row: dict[str, Any]) -> ReplayJob:
    return ReplayJob(**row)


def _record_start(request: Request, caller: Principal, action: Action, decision: Decision) -> None:
    """An accepted start in the access log, as `likvard replay` records its read; 503 if
    the log cannot be written (then nothing starts)."""
    trace = telemetry.current_traceparent()
    entry = guard.AccessEntry(
        actor=caller.subject,
        roles=caller.role_names,
        action=str(action),
        resource=(REPLAYS if action is Action.REPLAY else VERIFICATIONS).name,
        case_id=None,
        allowed=True,
        reason=decision.reason,
        emergency_reason=None,
        service=request.app.state.service_name,
        occurred_at=datetime.now(UTC),
        trace_id=trace.split("-")[1] if trace and trace.count("-") >= 2 else None,
    )
    recorder: guard.AccessRecorder = request.app.state.access_log
    try:
        recorder.record([entry])
    except Exception as exc:
        raise http.ProblemError(
            503,
            "access-log-unavailable",
            "Access log unavailable",
            "The access log could not be written, so nothing was started. Retry in a few seconds.",
            headers={"Retry-After": "5"},
        ) from exc


def _jobs(request: Request) -> history.ReplayJobs:
    jobs: history.ReplayJobs = request.app.state.history
    return jobs


def _unavailable() -> http.ProblemError:
    return http.ProblemError(
        503,
        "history-unavailable",
        "History unavailable",
        "The replay and verification tables do not exist and this service may not create"
        " them: run `likvard db migrate`.",
        headers={"Retry-After": "60"},
    )


def _busy(what: str) -> http.ProblemError:
    return http.ProblemError(
        409,
        f"{what}-running",
        f"A {what} is running",
        f"Only one {what} runs at a time: wait for the running one to end.",
    )


BUSY_409: dict[int | str, dict[str, Any]] = {
    409: {"content": http.PROBLEM_CONTENT, "description": "One is already running"}
}


def history_router() -> APIRouter:
    """The routes; they find the jobs at `request.app.state.history` (`install_history`)."""
    router = APIRouter(tags=[TAG])

    @router.post(
        "/history/replays",
        status_code=202,
        summary="Start a replay into a fresh schema",
        description="Accepted: the job runs in the background; poll"
        " `GET /history/replays/{job_id}`. One replay at a time (409 while one runs)."
        + REPLAY_DESCRIPTION,
        responses=BUSY_409,
        openapi_extra=guard.policy(Action.REPLAY),
    )
    def start_replay(request: Request, caller: guard.Caller, body: ReplayRequest) -> ReplayJob:
        decision = guard.authorize(request, caller, Action.REPLAY, REPLAYS)
        jobs = _jobs(request)
        if not jobs.available:
            raise _unavailable()
        _record_start(request, caller, Action.REPLAY, decision)
        try:
            job_id = jobs.start(body.as_of, caller.subject)
            row = jobs.job(job_id)
        except history.Busy as exc:
            raise _busy("replay") from exc
        except history.HistoryUnavailable as exc:
            raise _unavailable() from exc
        assert row is not None
        return _job_view(row)

    @router.get(
        "/history/replays",
        summary="Recent replay jobs",
        description="The most recent replay jobs, newest first." + REPLAY_DESCRIPTION,
        openapi_extra=guard.policy(Action.REPLAY),
    )
    def list_replays(
        request: Request,
        caller: guard.Caller,
        limit: Annotated[int, Query(ge=1, le=100, description="At most this many")] = 20,
    ) -> ReplayJobs:
        guard.authorize(request, caller, Action.REPLAY, REPLAYS)
        try:
            rows = _jobs(request).jobs(limit)
        except history.HistoryUnavailable as exc:
            raise _unavailable() from exc
        return ReplayJobs(jobs=[_job_view(r) for r in rows])

    @router.get(
        "/history/replays/{job_id}",
        summary="One replay job: its progress, then its checksums",
        description="The job's status and progress; once done, its checksums beside the live"
        " read models'." + REPLAY_DESCRIPTION,
        openapi_extra=guard.policy(Action.REPLAY),
    )
    def get_replay(
        request: Request,
        caller: guard.Caller,
        job_id: Annotated[uuid.UUID, Path(description="The job's id")],
    ) -> ReplayJob:
        guard.authorize(request, caller, Action.REPLAY, REPLAYS)
        try:
            row = _jobs(request).job(job_id)
        except history.HistoryUnavailable as exc:
            raise _unavailable() from exc
        if row is None:
            raise http.ProblemError(
                404, "unknown-replay", "No such replay", "No replay job has this id."
            )
        return _job_view(row)

    @router.post(
        "/history/verifications",
        status_code=202,
        summary="Verify every stream's hash chain on Kafka",
        description="Accepted: reads every source topic from offset 0 and checks each"
        " stream's hash chain from the records alone (what a replay checks, without"
        " projecting); poll `GET /history/verifications/latest`. One at a time (409 while one"
        " runs). `likvard verify SERVICE` checks an event store and is recorded too. Auditors"
        " only.",
        responses=BUSY_409,
        openapi_extra=guard.policy(Action.VERIFY),
    )
    def start_verification(request: Request, caller: guard.Caller) -> Verification:
        decision = guard.authorize(request, caller, Action.VERIFY, VERIFICATIONS)
        jobs = _jobs(request)
        if not jobs.available:
            raise _unavailable()
        _record_start(request, caller, Action.VERIFY, decision)
        try:
            vid = jobs.verify(caller.subject)
            row = jobs.verification(vid)
        except history.Busy as exc:
            raise _busy("verification") from exc
        except history.HistoryUnavailable as exc:
            raise _unavailable() from exc
        assert row is not None
        return Verification(**row)

    @router.get(
        "/history/verifications/latest",
        summary="The latest chain verification",
        description="The most recently started verification (from here, or recorded by"
        " `likvard verify`), running or finished: ok, broken (with the breaks) or failed."
        " 404 if there has been none. Auditors only.",
        openapi_extra=guard.policy(Action.VERIFY),
    )
    def latest_verification(request: Request, caller: guard.Caller) -> Verification:
        guard.authorize(request, caller, Action.VERIFY, VERIFICATIONS)
        try:
            row = _jobs(request).latest_verification()
        except history.HistoryUnavailable as exc:
            raise _unavailable() from exc
        if row is None:
            raise http.ProblemError(
                404, "no-verification", "No verification", "No chain verification has run yet."
            )
        return Verification(**row)

    def not_allowed() -> None:
        """Starlette answers a method a path lacks with the first route's methods only; this
        path has two routes, so its 405 names both (RFC 9110's `Allow`)."""
        raise StarletteHTTPException(405, headers={"Allow": "GET, POST"})

    router.add_api_route(
        "/history/replays",
        not_allowed,
        methods=["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"],
        include_in_schema=False,
    )
    return router


def install_history(
    app: FastAPI,
    settings: Settings,
    schema: str,
    *,
    settle: float = 1.0,
    before_run: Callable[[str, uuid.UUID], None] | None = None,
) -> None:
    """Add the history routes to the reporting app over the read models in `schema`: the
    jobs are opened when the app starts (after its own start) and closed when it stops.
    Replays use the settings' database and broker and the source topics with its prefix."""
    jobs = history.ReplayJobs(
        settings.require_database(),
        schema,
        bootstrap=settings.kafka_bootstrap,
        topics=[settings.topic(t) for t in readmodels.SOURCE_TOPICS],
        settle=settle,
        before_run=before_run,
    )
    app.state.history = jobs
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            await run_in_threadpool(jobs.open)
            try:
                yield state
            finally:
                await run_in_threadpool(jobs.close)

    app.router.lifespan_context = lifespan
    app.include_router(history_router())
