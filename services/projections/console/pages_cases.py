"""A case's timeline (auditors; a case worker for the cases the policy gives them) and the
access log (auditors). The timeline is the reporting API's `GET /cases/{id}/timeline` and
`/chain` read in this process: the same read model, the same policy question, the same
access-log entry, the same opening of sealed personal details."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, date, datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from psycopg_pool import ConnectionPool

from likvard.policy import (
    EMERGENCY_REASONS,
    Action,
    SystemScope,
    allowed,
)
from likvard.sealing import ERASED, PERSONAL, UNREADABLE, WITHHELD, Sealer
from services.projections import access_log, case_view, readmodels
from services.projections.console.web import N_, PREFIX, Console, Refused, reads_cases

ID_PATTERN = r"^[A-Za-z0-9._:@-]+$"
# The policy's emergency reasons, marked for the catalogue (the kernel's texts are English).
REASON_TEXT = {
    "risk-to-life-or-health": N_("Acute risk to the person's life or health"),
    "child-at-risk": N_("A child in the household may be at risk"),
    "person-present-urgent": N_("The person is present and needs help that cannot wait"),
    "out-of-hours-duty": N_("Out-of-hours social services duty (socialjour)"),
}


def _fields(payload: dict[str, Any], personal: tuple[str, ...]) -> list[dict[str, Any]]:
    """An event's fields to show: the personal ones marked as the reader may see them."""
    state = payload.get(PERSONAL)
    shown = []
    for name, value in payload.items():
        if name == PERSONAL:
            continue
        if name in personal and state in (ERASED, WITHHELD, UNREADABLE):
            shown.append({"name": name, "value": None, "state": state})
        elif value is None or value == []:
            continue
        else:
            text = (
                value
                if isinstance(value, str)
                else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
            )
            shown.append({"name": name, "value": text, "state": "open"})
    return shown


def add_routes(router: APIRouter, console: Console, schema: str) -> None:
    @router.get("/cases")
    def find_case(
        request: Request, case_id: Annotated[str | None, Query(max_length=128)] = None
    ) -> Response:
        viewer = console.viewer(request)
        if not reads_cases(viewer.principal):
            console.check(request, viewer, Action.CASE_HISTORY, SystemScope("case-timeline"))
        if case_id and re.fullmatch(ID_PATTERN, case_id):
            return console.redirect(f"{PREFIX}/cases/{quote(case_id, safe='')}")
        return console.render(request, viewer, "case_find.html")

    @router.get("/cases/{case_id}")
    def case_timeline(
        request: Request,
        case_id: str,
        emergency: Annotated[str | None, Query(max_length=64)] = None,
    ) -> Response:
        viewer = console.viewer(request)
        _ = console.gettext(viewer.language)
        not_found = console.render(
            request,
            viewer,
            "problem.html",
            404,
            title=_("Case not found"),
            detail=_("No event of this case has been seen."),
        )
        if case_view.not_a_case_id(case_id) or len(case_id) > 128:
            return not_found  # nothing read, and no identity number in the log
        sealer: Sealer = request.app.state.sealer
        pool: ConnectionPool = request.app.state.pool
        with pool.connection() as conn:
            scope = case_view.scope(conn, schema, case_id)
            reason = emergency if emergency in EMERGENCY_REASONS else None
            try:
                decision = console.check(
                    request, viewer, Action.CASE_HISTORY, scope, emergency=reason
                )
            except Refused as refused:
                # A case worker outside the case's district may read it in an emergency,
                # with a reason, always flagged: ask for the reason.
                asks = reason is None and bool(
                    allowed(
                        viewer.principal,
                        Action.CASE_HISTORY,
                        scope,
                        now=datetime.now(UTC),
                        emergency=next(iter(EMERGENCY_REASONS)),
                    )
                )
                if not asks:
                    raise refused from None
                return console.render(
                    request,
                    viewer,
                    "case_emergency.html",
                    403,
                    case_id=case_id,
                    reasons={c: REASON_TEXT.get(c, t) for c, t in EMERGENCY_REASONS.items()},
                )
            rows = case_view.opened_timeline(
                conn, schema, case_id, sealer, viewer.principal, decision
            )
            if not rows:
                return not_found
            chains = readmodels.chain_status(conn, schema, case_id)
        events = [
            {
                "row": row,
                "personal": row["payload"].get(PERSONAL),
                "fields": _fields(row["payload"], sealer.fields(row["event_type"])),
            }
            for row in rows
        ]
        return console.render(
            request,
            viewer,
            "case_timeline.html",
            case_id=case_id,
            events=events,
            chains=chains,
            emergency=reason,
            emergency_text=REASON_TEXT.get(reason or "", reason or ""),
        )

    @router.get("/access-log")
    def read_access_log(
        request: Request,
        case_id: Annotated[str | None, Query(max_length=255)] = None,
        actor: Annotated[str | None, Query(max_length=255)] = None,
        start: Annotated[str | None, Query(alias="from", max_length=10)] = None,
        end: Annotated[str | None, Query(alias="to", max_length=10)] = None,
        emergency: Annotated[str | None, Query(max_length=5)] = None,
        outcome: Annotated[str | None, Query(max_length=10)] = None,
        after: Annotated[str | None, Query(max_length=64)] = None,
    ) -> Response:
        viewer = console.viewer(request)
        console.check(request, viewer, Action.ACCESS_LOG_READ, SystemScope("access-log"))
        _ = console.gettext(viewer.language)
        errors: list[str] = []

        def ident(value: str | None, what: str) -> str | None:
            if not value:
                return None
            if not re.fullmatch(ID_PATTERN, value):
                errors.append(
                    _("%(what)s may hold only letters, digits and ._:@-") % {"what": what}
                )
                return None
            return value

        def day(value: str | None, what: str) -> date | None:
            if not value:
                return None
            try:
                return date.fromisoformat(value)
            except ValueError:
                errors.append(_("%(what)s is not a date (YYYY-MM-DD)") % {"what": what})
                return None

        wanted_case, wanted_actor = ident(case_id, _("Case")), ident(actor, _("Actor"))
        first_day, last_day = day(start, _("From")), day(end, _("To"))
        if first_day and last_day and last_day < first_day:
            errors.append(_("“To” is before “From”."))
        flag = {"true": True, "false": False}.get(emergency or "")
        wanted_outcome = outcome if outcome in ("allowed", "refused") else None
        cursor = None
        if after:
            try:
                cursor = uuid.UUID(after)
            except ValueError:
                errors.append(_("The page cursor is not valid."))
        entries: list[Any] = []
        more = None
        if not errors:
            first, last = access_log.day_window(first_day, last_day)
            wanted = access_log.Filter(wanted_case, wanted_actor, first, last, flag, wanted_outcome)
            pool: ConnectionPool = request.app.state.pool
            with pool.connection() as conn:
                try:
                    found = access_log.query(conn, schema, wanted, limit=101, after=cursor)
                except access_log.UnknownCursor:
                    errors.append(_("The page cursor is not valid."))
                    found = []
            entries = found[:100]
            more = entries[-1].event_id if len(found) > 100 else None
        params = {
            "case_id": case_id or "",
            "actor": actor or "",
            "from": start or "",
            "to": end or "",
            "emergency": emergency or "",
            "outcome": outcome or "",
        }
        return console.render(
            request,
            viewer,
            "access_log.html",
            400 if errors else 200,
            entries=entries,
            errors=errors,
            params=params,
            next_cursor=more,
        )
