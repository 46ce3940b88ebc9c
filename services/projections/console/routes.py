"""The console's routes: sign-in and sign-out, the language switch, the start page, and
the pages of each role (from the page modules), all under `/console`."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from likvard.config import Settings
from likvard.districts import DistrictRegistry
from likvard.http import ProblemError
from services.projections.console import (
    i18n,
    pages_analysis,
    pages_cases,
    pages_history,
    pages_inbox,
)
from services.projections.console.session import (
    LANGUAGE_COOKIE,
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    SIGNIN_SECONDS,
    CookieBox,
    new_session,
    new_signin,
)
from services.projections.console.signin import Provider, SignInError
from services.projections.console.web import (
    PREFIX,
    ROUTE_POLICY,
    Console,
    Refused,
    SignInNeeded,
    language,
    local_path,
)

log = logging.getLogger("likvard.console")
STATIC = Path(__file__).parent / "static"


def _public_url(request: Request, configured: str | None) -> str:
    """The console's own address as the browser sees it (LIKVARD_CONSOLE_URL behind a
    proxy that rewrites the host), for the redirect address the provider sends back to."""
    return configured or f"{request.url.scheme}://{request.url.netloc}{PREFIX}"


def install_console(
    app: FastAPI, settings: Settings, schema: str, registry: DistrictRegistry
) -> Console:
    """Serve the console from `app` (the reporting API's, whose pool, authenticator,
    access log and sealer it uses)."""
    own = settings.console
    box = CookieBox(own.secret) if own.secret is not None else None
    if box is None:
        log.warning("LIKVARD_CONSOLE_SECRET is not set: the console answers 503")
    issuer = settings.oidc_issuer or ""
    parts = urlsplit(issuer)
    issuer_origin = f"{parts.scheme}://{parts.netloc}" if parts.netloc else ""
    console = Console(box, issuer_origin, own.secure_cookies)
    provider = Provider(settings, own.client_id) if settings.oidc_issuer else None
    app.state.console = console
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    def cookie(response: Response, request: Request, name: str, value: str, age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=age,
            path=PREFIX,
            httponly=True,
            samesite="lax",
            secure=console.secure_for(request),
        )

    def need_provider() -> Provider:
        if provider is None:
            raise ProblemError(
                503, "no-identity-provider", "Sign-in not configured", "Set LIKVARD_OIDC_ISSUER."
            )
        return provider

    @router.get("/")
    def home(request: Request) -> Response:
        viewer = console.viewer(request)
        roles = ", ".join(sorted(str(r) for r in viewer.principal.roles))
        return console.render(request, viewer, "home.html", roles=roles)

    @router.get("/login")
    def login(
        request: Request, next: Annotated[str | None, Query(max_length=2000)] = None
    ) -> Response:
        box = console.require_box()
        p = need_provider()
        signin = new_signin(local_path(next))
        try:
            target = p.authorize_url(
                f"{_public_url(request, own.url)}/callback",
                signin.state,
                signin.nonce,
                signin.verifier,
                language(request),
            )
        except SignInError as exc:
            _ = console.gettext(language(request))
            return _problem(request, 503, _("Sign-in is not possible now"), exc.reason)
        response = console.redirect(target)
        cookie(response, request, SIGNIN_COOKIE, box.seal(SIGNIN_COOKIE, signin), SIGNIN_SECONDS)
        return response

    @router.get("/callback")
    def callback(
        request: Request,
        code: Annotated[str | None, Query(max_length=2000)] = None,
        state: Annotated[str | None, Query(max_length=200)] = None,
        error: Annotated[str | None, Query(max_length=200)] = None,
    ) -> Response:
        box = console.require_box()
        p = need_provider()
        signin = box.signin(request.cookies.get(SIGNIN_COOKIE))
        _ = console.gettext(language(request))
        if error is not None:
            return _problem(
                request, 400, _("Sign-in failed"), _("The identity provider refused the sign-in.")
            )
        if signin is None or state is None or code is None or state != signin.state:
            return _problem(
                request,
                400,
                _("Sign-in failed"),
                _("The sign-in expired or was not started here. Sign in again."),
            )
        try:
            tokens = p.exchange(
                code,
                signin.verifier,
                f"{_public_url(request, own.url)}/callback",
                signin.nonce,
                request.app.state.authenticator,
            )
        except SignInError as exc:
            log.info("console sign-in refused", extra={"reason": exc.reason})
            return _problem(request, 400, _("Sign-in failed"), exc.reason)
        session = new_session(tokens.access_token, tokens.expires_at)
        response = console.redirect(signin.next)
        age = max(tokens.expires_at - int(time.time()), 60)
        cookie(response, request, SESSION_COOKIE, box.seal(SESSION_COOKIE, session), age)
        response.delete_cookie(SIGNIN_COOKIE, path=PREFIX)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        return await console.posted(request, lambda _viewer, _form: _logout(request))

    def _logout(request: Request) -> Response:
        after = f"{_public_url(request, own.url)}/signed-out"
        target = after
        if provider is not None:
            try:
                target = provider.logout_url(after) or after
            except SignInError:
                target = after
        response = console.redirect(target)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    @router.get("/signed-out")
    def signed_out(request: Request) -> Response:
        return console.render(request, None, "signed_out.html")

    @router.get("/language")
    def switch_language(
        request: Request,
        lang: Annotated[str, Query(max_length=5)],
        next: Annotated[str | None, Query(max_length=2000)] = None,
    ) -> Response:
        response = console.redirect(local_path(next))
        cookie(response, request, LANGUAGE_COOKIE, i18n.language_of(lang), 365 * 86400)
        return response

    @router.get("/static/console.css")
    def stylesheet() -> Response:
        response = FileResponse(STATIC / "console.css", media_type="text/css")
        response.headers["Cache-Control"] = "public, max-age=3600"
        return console.headers(response)

    pages_analysis.add_routes(router, console, schema, registry, settings)
    pages_cases.add_routes(router, console, schema)
    pages_inbox.add_routes(router, console, settings)
    pages_history.add_routes(router, console, schema, settings)

    def _problem(request: Request, status: int, title: str, detail: str) -> Response:
        return console.render(request, None, "problem.html", status, title=title, detail=detail)

    app.include_router(router)

    def in_html(
        kind: type[Exception], status_of: Callable[[Any], int], detail_of: Callable[[Any], str]
    ) -> None:
        """Errors of a console page as a page (the API's problem+json elsewhere)."""
        api_handler = app.exception_handlers[kind]

        async def handler(request: Request, exc: Exception) -> Response:
            if not request.url.path.startswith(PREFIX + "/") and request.url.path != PREFIX:
                answer = api_handler(request, exc)
                return await answer if inspect.isawaitable(answer) else answer
            _ = console.gettext(language(request))
            status = status_of(exc)
            titles = {
                404: _("Page not found"),
                403: _("Not allowed"),
                422: _("The page's address is not valid"),
                503: _("Not available now"),
            }
            title = titles.get(status, _("Something went wrong"))
            return _problem(request, status, title, detail_of(exc))

        app.add_exception_handler(kind, handler)

    in_html(ProblemError, lambda e: e.status, lambda e: e.detail)
    in_html(RequestValidationError, lambda e: 422, lambda e: "")
    in_html(StarletteHTTPException, lambda e: e.status_code, lambda e: "")

    @app.exception_handler(SignInNeeded)
    async def sign_in_first(request: Request, exc: SignInNeeded) -> Response:
        return console.redirect(f"{PREFIX}/login?next={quote(exc.next_page, safe='')}")

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return console.render(request, exc.viewer, "refused.html", 403, detail=exc.detail)

    unlisted = {
        path
        for r in router.routes
        if (path := (getattr(r, "path", "").removeprefix(PREFIX) or "/")) not in ROUTE_POLICY
    }
    if unlisted:
        raise RuntimeError(f"console routes without a policy entry: {sorted(unlisted)}")
    return console
