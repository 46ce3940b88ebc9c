"""The console's plumbing shared by its pages: who is looking (the session's token,
verified on every page as the APIs verify it), rendering in the viewer's language, the
security headers of every answer, anti-forgery checks of every form, and the policy table
that names the action of every console route.

Every page asks `likvard.policy.allowed` through `likvard.guard.authorize`, the function
the APIs use, so a refusal is the same refusal and is in the access log; a case-level page
is logged as the API's read of it would be.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from likvard import guard
from likvard.guard import AuthenticationError
from likvard.http import ProblemError
from likvard.identity import Principal, Role
from likvard.policy import Action, Decision, Resource, SystemScope, UnitScope, allowed
from services.projections.console import i18n
from services.projections.console.session import (
    LANGUAGE_COOKIE,
    SESSION_COOKIE,
    CookieBox,
    Session,
)

log = logging.getLogger("likvard.console")

PREFIX = "/console"


def N_(message: str) -> str:
    """Marks a message for the catalogue where it is translated later (`_(variable)`)."""
    return message


TEMPLATES = Path(__file__).parent / "templates"


# Who may open a case's page at all: the policy then decides per case, when it is opened.
CASE_READERS = frozenset({Role.AUDITOR, Role.CASE_WORKER})


def reads_cases(principal: Principal) -> bool:
    return bool(principal.roles & CASE_READERS)


@dataclass(frozen=True)
class Page:
    """A page of the navigation: its path, its title (a message id), who may open it (the
    action and resource the policy is asked about; no resource: a case's page, shown to
    those who read cases, the policy asked per case)."""

    path: str
    title: str
    action: Action
    resource: Callable[[Principal], Resource] | None = None

    def opens(self, viewer: Viewer) -> bool:
        if self.resource is None:
            return reads_cases(viewer.principal)
        return viewer.may(self.action, self.resource(viewer.principal))


def _system(name: str) -> Callable[[Principal], Resource]:
    return lambda _p: SystemScope(name)


def _own_unit(p: Principal) -> Resource:
    return UnitScope(p.unit or "")


# The navigation, in order. A page is shown to those the policy allows.
PAGES: tuple[Page, ...] = (
    Page("/equal-access", N_("Equal access"), Action.REPORT_READ, _system("report:equal-access")),
    Page("/indicators", N_("Indicators"), Action.REPORT_READ, _system("report:indicators")),
    Page("/waits", N_("Waiting times"), Action.REPORT_READ, _system("report:waits")),
    Page("/inbox", N_("Unit inbox"), Action.UNIT_INBOX, _own_unit),
    Page("/cases", N_("Case timeline"), Action.CASE_HISTORY, None),
    Page("/access-log", N_("Access log"), Action.ACCESS_LOG_READ, _system("access-log")),
    Page("/history", N_("History"), Action.REPLAY, _system("replay")),
)

# Every console route and what the policy is asked about it (None: no personal data and
# no case: sign-in, sign-out, the language switch, the style sheet). tests check that the
# app's console routes are exactly these.
ROUTE_POLICY: dict[str, Action | None] = {
    "/": None,
    "/login": None,
    "/callback": None,
    "/logout": None,
    "/signed-out": None,
    "/language": None,
    "/static/console.css": None,
    "/equal-access": Action.REPORT_READ,
    "/equal-access.csv": Action.REPORT_READ,
    "/report.html": Action.REPORT_READ,
    "/indicators": Action.REPORT_READ,
    "/waits": Action.REPORT_READ,
    "/inbox": Action.UNIT_INBOX,
    "/inbox/{referral_id}/accept": Action.REFERRAL_ANSWER,
    "/inbox/{referral_id}/decline": Action.REFERRAL_ANSWER,
    "/inbox/{referral_id}/start": Action.REFERRAL_ANSWER,
    "/interventions/{intervention_id}/end": Action.REFERRAL_ANSWER,
    "/cases": Action.CASE_HISTORY,
    "/cases/{case_id}": Action.CASE_HISTORY,
    "/access-log": Action.ACCESS_LOG_READ,
    "/history": Action.REPLAY,
    "/history/replays": Action.REPLAY,
    "/history/replays/{job_id}": Action.REPLAY,
    "/history/verifications": Action.VERIFY,
}


@dataclass(frozen=True)
class Viewer:
    """Who looks at a page: the verified principal, their session and language."""

    principal: Principal
    session: Session
    language: str

    def may(self, action: Action, resource: Resource) -> bool:
        return bool(allowed(self.principal, action, resource, now=datetime.now(UTC)))

    @property
    def pages(self) -> list[Page]:
        """The navigation: the pages the policy lets this viewer open."""
        return [p for p in PAGES if p.opens(self)]


class SignInNeeded(Exception):
    """No (valid) session: the page sends the browser to sign in and back."""

    def __init__(self, next_page: str) -> None:
        super().__init__(next_page)
        self.next_page = next_page


class Refused(Exception):
    """The policy refused the page (already logged by guard.authorize); the refusal page
    is shown to `viewer`, already verified."""

    def __init__(self, detail: str, viewer: Viewer) -> None:
        super().__init__(detail)
        self.detail = detail
        self.viewer = viewer


def language(request: Request) -> str:
    return i18n.language_of(request.cookies.get(LANGUAGE_COOKIE))


def local_path(value: str | None) -> str:
    """A return address inside the console (never another site: an open redirect)."""
    if not value or (not value.startswith(PREFIX + "/") and value != PREFIX):
        return PREFIX + "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or "\\" in value or value.startswith("//"):
        return PREFIX + "/"
    return value


class Console:
    """The console of one projections app: its cookie key, templates and policy checks."""

    def __init__(self, box: CookieBox | None, issuer_origin: str, secure: bool | None) -> None:
        self.box = box
        self.issuer_origin = issuer_origin
        self.secure = secure
        self.envs: dict[str, jinja2.Environment] = {}
        for lang in i18n.LANGUAGES:
            env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(TEMPLATES),
                autoescape=jinja2.select_autoescape(["html"], default=True),
                extensions=["jinja2.ext.i18n"],
                undefined=jinja2.StrictUndefined,
                trim_blocks=True,
                lstrip_blocks=True,
            )
            env.install_gettext_translations(i18n.translations(lang), newstyle=True)  # type: ignore[attr-defined]
            env.filters["when"] = lambda v, _l=lang: i18n.when(v, _l)
            env.filters["day"] = lambda v, _l=lang: i18n.day(v, _l)
            env.filters["num"] = lambda v, d=2, _l=lang: i18n.number(v, _l, d)
            env.filters["share"] = lambda v, _l=lang: i18n.share(v, _l)
            env.globals["PREFIX"] = PREFIX
            self.envs[lang] = env

    # -- who is looking ---------------------------------------------------------------

    def viewer(self, request: Request) -> Viewer:
        """The signed-in viewer, its token verified as the APIs verify theirs; else
        SignInNeeded, back to this page (a form post: back to the start page)."""
        box = self.require_box()
        session = box.session(request.cookies.get(SESSION_COOKIE))
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        back = target if request.method == "GET" else PREFIX + "/"
        if session is None:
            raise SignInNeeded(back)
        try:
            principal = guard.verified_principal(request.app.state.authenticator, session.token)
        except AuthenticationError:
            raise SignInNeeded(back) from None
        request.state.principal = principal
        return Viewer(principal, session, language(request))

    def require_box(self) -> CookieBox:
        if self.box is None:
            raise ProblemError(
                503,
                "console-not-configured",
                "Console not configured",
                "Set LIKVARD_CONSOLE_SECRET (32 bytes or more, the key of the console's"
                " session cookies) to serve the console.",
            )
        return self.box

    def check(
        self,
        request: Request,
        viewer: Viewer,
        action: Action,
        resource: Resource,
        emergency: str | None = None,
    ) -> Decision:
        """Ask the policy as the APIs do (logged as they log); Refused on a refusal."""
        try:
            return guard.authorize(request, viewer.principal, action, resource, emergency=emergency)
        except ProblemError as exc:
            if exc.status != 403:
                raise
            raise Refused(exc.detail, viewer) from None

    def check_form(self, request: Request, viewer: Viewer, form: Mapping[str, Any]) -> None:
        """A form's anti-forgery token is the session's, and it comes from this origin."""
        sent = str(form.get("csrf", ""))
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin is not None and origin != "null" and origin != own:
            raise ProblemError(
                403, "cross-origin-form", "Form refused", "The form was not sent from the console."
            )
        if not hmac.compare_digest(sent.encode(), viewer.session.csrf.encode()):
            raise ProblemError(
                403,
                "bad-csrf-token",
                "Form refused",
                "The form's anti-forgery token is not this session's: reload the page.",
            )

    async def posted(
        self, request: Request, act: Callable[[Viewer, dict[str, Any]], Response]
    ) -> Response:
        """A form's answer: the form read, then (in a worker thread: the policy, the
        provider's keys and the database block) the viewer and the form's anti-forgery
        checks, then `act(viewer, form)`."""
        form = dict((await request.form()).items())

        def run() -> Response:
            viewer = self.viewer(request)
            self.check_form(request, viewer, form)
            return act(viewer, form)

        return await run_in_threadpool(run)

    # -- answers ----------------------------------------------------------------------

    def secure_for(self, request: Request) -> bool:
        return request.url.scheme == "https" if self.secure is None else self.secure

    def headers(self, response: Response) -> Response:
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self'; img-src 'self' data:;"
            f" form-action 'self' {self.issuer_origin}; frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def render(
        self,
        request: Request,
        viewer: Viewer | None,
        template: str,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        lang = viewer.language if viewer is not None else language(request)
        env = self.envs[lang]
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        page = env.get_template(template).render(
            viewer=viewer,
            lang=lang,
            here=here,
            here_quoted=quote(here, safe=""),
            csrf=viewer.session.csrf if viewer is not None else "",
            **context,
        )
        return self.headers(HTMLResponse(page, status_code=status))  # type: ignore[return-value]

    def redirect(self, url: str, status: int = 303) -> Response:
        return self.headers(RedirectResponse(url, status_code=status))

    def gettext(self, lang: str) -> Callable[[str], str]:
        return i18n.translations(lang).gettext
