"""History (auditors): start a replay as of a date into a fresh schema, watch it, compare
its checksums with the live read models; start a chain verification and see the last one.
The page drives `services.projections.history` (the same jobs `POST /history/replays` and
`POST /history/verifications` start) in this process. While a replay runs, the page
refreshes itself (a meta refresh: no script)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import date
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from likvard.config import Settings
from likvard.policy import Action, SystemScope
from services.projections import history
from services.projections.console.web import N_, PREFIX, Console, Viewer

REPLAY_SCOPE = SystemScope("replay")  # as the history API and the navigation name them
VERIFY_SCOPE = SystemScope("verification")
# A job's status as the templates show it (`_(job.status)`), marked for the catalogue.
STATUS_WORDS = (N_("queued"), N_("running"), N_("done"), N_("failed"), N_("ok"))
REPLAY_TEXTS = (
    N_("Replays are not available here."),
    N_("A replay is already running; wait for it."),
)
VERIFY_TEXTS = (N_("Verification is not available here."), N_("A verification is already running."))


def _jobs(request: Request) -> history.ReplayJobs | None:
    """The app's history jobs when they can run here (their tables exist), else None."""
    jobs: history.ReplayJobs | None = getattr(request.app.state, "history", None)
    return jobs if jobs is not None and jobs.available else None


def add_routes(router: APIRouter, console: Console, schema: str, settings: Settings) -> None:
    def page(
        request: Request, viewer: Viewer, *, error: str | None = None, status: int = 200
    ) -> Response:
        """The History page for a viewer the policy let in."""
        jobs = _jobs(request)
        replays = jobs.jobs(limit=10) if jobs is not None else []
        latest = jobs.latest_verification() if jobs is not None else None
        may_verify = viewer.may(Action.VERIFY, VERIFY_SCOPE)
        return console.render(
            request,
            viewer,
            "history.html",
            status,
            replays=replays,
            latest=latest,
            may_verify=may_verify,
            error=error,
            available=jobs is not None,
        )

    @router.get("/history")
    def history_page(request: Request) -> Response:
        viewer = console.viewer(request)
        console.check(request, viewer, Action.REPLAY, REPLAY_SCOPE)
        return page(request, viewer)

    def run(
        request: Request,
        viewer: Viewer,
        start: Callable[[history.ReplayJobs], uuid.UUID],
        texts: tuple[str, str],
        then: Callable[[uuid.UUID], str],
    ) -> Response:
        """Start a job (the caller has asked the policy); its page, or the History page
        saying why not (`texts`: not available here, already running)."""
        _ = console.gettext(viewer.language)
        jobs = _jobs(request)
        try:
            job_id = start(jobs) if jobs is not None else None
        except history.HistoryUnavailable:
            job_id = None
        except history.Busy:
            return page(request, viewer, error=_(texts[1]), status=409)
        if job_id is None:
            return page(request, viewer, error=_(texts[0]), status=503)
        return console.redirect(then(job_id))

    @router.post("/history/replays")
    async def start_replay(request: Request) -> Response:
        def act(viewer: Viewer, form: dict[str, Any]) -> Response:
            console.check(request, viewer, Action.REPLAY, REPLAY_SCOPE)
            _ = console.gettext(viewer.language)
            text = str(form.get("as_of", "")).strip()
            try:
                as_of = date.fromisoformat(text) if text else None
            except ValueError:
                error = _("The date is not a date (YYYY-MM-DD).")
                return page(request, viewer, error=error, status=400)
            return run(
                request,
                viewer,
                lambda jobs: jobs.start(as_of, viewer.principal.subject),
                REPLAY_TEXTS,
                lambda job_id: f"{PREFIX}/history/replays/{job_id}",
            )

        return await console.posted(request, act)

    @router.get("/history/replays/{job_id}")
    def replay_job(request: Request, job_id: str) -> Response:
        viewer = console.viewer(request)
        console.check(request, viewer, Action.REPLAY, REPLAY_SCOPE)
        _ = console.gettext(viewer.language)
        jobs = _jobs(request)
        job = None
        try:
            wanted = uuid.UUID(job_id)
        except ValueError:
            wanted = None
        if jobs is not None and wanted is not None:
            job = jobs.job(wanted)
        if job is None:
            return console.render(
                request,
                viewer,
                "problem.html",
                404,
                title=_("Replay not found"),
                detail=_("No replay has this id."),
            )
        running = job["status"] in ("queued", "running")
        return console.render(request, viewer, "history_job.html", job=job, running=running)

    @router.post("/history/verifications")
    async def start_verification(request: Request) -> Response:
        def act(viewer: Viewer, form: dict[str, Any]) -> Response:
            console.check(request, viewer, Action.VERIFY, VERIFY_SCOPE)
            return run(
                request,
                viewer,
                lambda jobs: jobs.verify(viewer.principal.subject),
                VERIFY_TEXTS,
                lambda _id: f"{PREFIX}/history",
            )

        return await console.posted(request, act)
