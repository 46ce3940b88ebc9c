"""The unit inbox: the referrals addressed to the viewer's specialist unit, from every
district, overdue first and then the oldest; accept, decline with a reason, start and end
interventions from the page.

The referral service owns referrals, so the page calls its API with the viewer's own
access token: its policy and access log judge and record the read and every answer, and
every answer carries the version the page showed (If-Match), so a colleague's change in
between is a 409 the page explains in words instead of a silent overwrite."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response

from likvard.config import Settings, service_port
from likvard.policy import Action, UnitScope
from services.projections.console.web import N_, PREFIX, Console, Refused, Viewer

log = logging.getLogger("likvard.console")

DECLINE_REASONS = {
    "LACK_OF_CAPACITY": N_("No capacity"),
    "NOT_THE_RIGHT_INTERVENTION": N_("Not the right intervention"),
    "PERSON_DECLINED": N_("The person declined"),
    "UNABLE_TO_CONTACT": N_("Unable to contact the person"),
    "OTHER": N_("Other reason"),
}
OUTCOMES = {
    "COMPLETED_AS_PLANNED": N_("Completed as planned"),
    "DROPPED_OUT": N_("Dropped out"),
    "MOVED": N_("Moved"),
    "NO_LONGER_NEEDED": N_("No longer needed"),
    "OTHER": N_("Other outcome"),
}
STATUS_TEXT = {
    "requested": N_("Requested"),
    "accepted": N_("Accepted"),
    "declined": N_("Declined"),
    "withdrawn": N_("Withdrawn"),
}
DONE_TEXT = {
    "accepted": N_("The referral is accepted."),
    "declined": N_("The referral is declined."),
    "started": N_("The intervention is started."),
    "ended": N_("The intervention is ended."),
}


def referral_url(settings: Settings) -> str:
    """The referral API as this service reaches it (LIKVARD_REFERRAL_URL, else this host's
    standard referral port)."""
    return settings.console.referral_url or f"http://127.0.0.1:{service_port('referral')}"


class ApiAnswer:
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


def _call(base: str, method: str, path: str, viewer: Viewer, **kwargs: Any) -> ApiAnswer:
    headers = {"Authorization": f"Bearer {viewer.session.token}"} | kwargs.pop("headers", {})
    try:
        answer = httpx.request(method, base + path, headers=headers, timeout=10.0, **kwargs)
    except httpx.HTTPError as exc:
        log.warning("the referral API does not answer", extra={"error": type(exc).__name__})
        return ApiAnswer(503, None)
    try:
        body = answer.json()
    except ValueError:
        body = None
    return ApiAnswer(answer.status_code, body)


def _order(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Overdue first, then the open ones (requested, then accepted), oldest first."""
    rank = {"requested": 0, "accepted": 1}
    return sorted(
        entries,
        key=lambda e: (not e["overdue"], rank.get(e["status"], 2), e["requested_at"]),
    )


def add_routes(router: APIRouter, console: Console, settings: Settings) -> None:
    referrals = referral_url(settings)

    def inbox_page(
        request: Request,
        viewer: Viewer,
        *,
        message: str | None = None,
        error: str | None = None,
        status: int = 200,
    ) -> Response:
        unit = viewer.principal.unit or ""
        if not viewer.may(Action.UNIT_INBOX, UnitScope(unit)):
            console.check(request, viewer, Action.UNIT_INBOX, UnitScope(unit))
        _ = console.gettext(viewer.language)
        found = _call(referrals, "GET", f"/units/{quote(unit, safe='')}/referrals", viewer)
        if found.status == 403:
            raise Refused(_("The referral service refused your unit's inbox."), viewer)
        entries: list[dict[str, Any]] = []
        if found.status == 200 and isinstance(found.body, list):
            entries = _order(found.body)
        elif error is None:
            error = _("The referral service does not answer; try again shortly.")
            status = 503
        return console.render(
            request,
            viewer,
            "inbox.html",
            status,
            unit=unit,
            entries=entries,
            message=message,
            error=error,
            decline_reasons=DECLINE_REASONS,
            outcomes=OUTCOMES,
            status_text=STATUS_TEXT,
            answer_days=settings.referral_answer_days,
        )

    @router.get("/inbox")
    def inbox(request: Request, done: str | None = None) -> Response:
        viewer = console.viewer(request)
        _ = console.gettext(viewer.language)
        message = _(DONE_TEXT[done]) if done in DONE_TEXT else None
        return inbox_page(request, viewer, message=message)

    async def answer(
        request: Request, path: str, body: dict[str, Any], done: str, *, needs: tuple[str, ...] = ()
    ) -> Response:
        return await console.posted(
            request, lambda viewer, form: _answer(request, viewer, form, path, body, done, needs)
        )

    def _answer(
        request: Request,
        viewer: Viewer,
        form: dict[str, Any],
        path: str,
        body: dict[str, Any],
        done: str,
        needs: tuple[str, ...],
    ) -> Response:
        _ = console.gettext(viewer.language)
        for name in needs:
            value = str(form.get(name, ""))
            if not value:
                return inbox_page(
                    request, viewer, error=_("Choose a reason or an outcome first."), status=400
                )
            body[name] = value
        version = str(form.get("version", ""))
        headers = {"If-Match": f'"{version}"'} if version.isdigit() else {}
        result = _call(referrals, "POST", path, viewer, json=body, headers=headers)
        if result.status in (200, 201):
            return console.redirect(f"{PREFIX}/inbox?done={done}")
        if result.status == 409:
            text = _(
                "Someone else changed this referral while you had the page open (it is no"
                " longer at the version you saw). Nothing was saved: look at its new state"
                " below and answer again if it is still needed."
            )
        elif result.status == 403:
            raise Refused(_("Your roles do not allow this answer to the referral."), viewer)
        elif result.status == 404:
            text = _("The referral or intervention is not found.")
        elif result.status == 422:
            problem = result.body if isinstance(result.body, dict) else {}
            code = str(problem.get("type", "")).rsplit("/", 1)[-1]  # the problem's code
            text = _("The referral service refused the answer: %(code)s.") % {"code": code}
        else:
            text = _("The referral service does not answer; try again shortly.")
        return inbox_page(request, viewer, error=text, status=409 if result.status == 409 else 400)

    @router.post("/inbox/{referral_id}/accept")
    async def accept(request: Request, referral_id: str) -> Response:
        return await answer(
            request, f"/referrals/{quote(referral_id, safe='')}/accept", {}, "accepted"
        )

    @router.post("/inbox/{referral_id}/decline")
    async def decline(request: Request, referral_id: str) -> Response:
        return await answer(
            request,
            f"/referrals/{quote(referral_id, safe='')}/decline",
            {},
            "declined",
            needs=("reason",),
        )

    @router.post("/inbox/{referral_id}/start")
    async def start(request: Request, referral_id: str) -> Response:
        return await answer(
            request, f"/referrals/{quote(referral_id, safe='')}/interventions", {}, "started"
        )

    @router.post("/interventions/{intervention_id}/end")
    async def end(request: Request, intervention_id: str) -> Response:
        return await answer(
            request,
            f"/interventions/{quote(intervention_id, safe='')}/end",
            {},
            "ended",
            needs=("outcome",),
        )
