"""The browser harness proven on tiny pages served by a real local server: Chromium loads them
under a strict CSP, axe passes a good page and fails a bad one, the guard catches an outside
script, screenshots have the right sizes and Tab reaches a button."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from playwright.sync_api import Error, Page

from tests.browser.harness import (
    SKIP_MESSAGE,
    RequestGuard,
    check_accessibility,
    screenshots,
    tab_to,
)
from tests.support import serving

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CSP = {"Content-Security-Policy": "default-src 'self'"}

GOOD = """<!doctype html>
<html lang="sv"><head><meta charset="utf-8"><title>Harnesstest</title>
<link rel="stylesheet" href="/style.css"></head>
<body><main>
<h1>Ärenden</h1>
<p><a href="/">Startsida</a></p>
<form><label for="district">Distrikt</label> <input id="district" name="district">
<button id="save" type="button">Spara</button></form>
</main></body></html>"""

BAD = """<!doctype html>
<html lang="sv"><head><meta charset="utf-8"><title>Dålig sida</title></head>
<body><main><h1>Dålig</h1><img src="/style.css"><input id="nolabel"></main></body></html>"""

INLINE = """<!doctype html>
<html lang="sv"><head><meta charset="utf-8"><title>Inline</title>
<script>window.inlineRan = true;</script></head><body><main><h1>Inline</h1></main></body></html>"""

OUTSIDE = """<!doctype html>
<html lang="sv"><head><meta charset="utf-8"><title>Utanför</title>
<script src="http://example.invalid/x.js"></script></head>
<body><main><h1>Utanför</h1></main></body></html>"""


def pages_app() -> FastAPI:
    """The good and bad pages under `default-src 'self'`; the outside page without a CSP
    (a CSP would stop its script before the request, and the guard is what is tested)."""
    app = FastAPI()

    @app.get("/")
    def good() -> HTMLResponse:
        return HTMLResponse(GOOD, headers=CSP)

    @app.get("/bad")
    def bad() -> HTMLResponse:
        return HTMLResponse(BAD, headers=CSP)

    @app.get("/inline")
    def inline() -> HTMLResponse:
        return HTMLResponse(INLINE, headers=CSP)

    @app.get("/outside")
    def outside() -> HTMLResponse:
        return HTMLResponse(OUTSIDE)

    @app.get("/style.css")
    def style() -> Response:
        css = "body { font-family: sans-serif; margin: 2rem; } :focus { outline: 3px solid; }"
        return Response(css, media_type="text/css", headers=CSP)

    return app


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    with serving(pages_app()) as url:
        yield url


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def test_page_loads_in_chromium_with_swedish_context(
    page: Page, site: str, request_guard: RequestGuard
) -> None:
    response = page.goto(site + "/")
    assert response is not None and response.status == 200
    assert response.headers["content-security-policy"] == "default-src 'self'"
    assert page.title() == "Harnesstest"
    assert page.get_by_role("heading", level=1).inner_text() == "Ärenden"
    assert page.evaluate("navigator.language") == "sv-SE"
    zone = page.evaluate("Intl.DateTimeFormat().resolvedOptions().timeZone")
    assert zone == "Europe/Stockholm"
    assert page.viewport_size == {"width": 1280, "height": 800}
    assert site + "/style.css" in request_guard.requests
    request_guard.assert_only_from({site})


def test_axe_finds_no_violations_on_the_good_page_under_its_csp(
    page: Page, site: str, request_guard: RequestGuard
) -> None:
    page.goto(site + "/")
    check_accessibility(page, "good page")
    # axe came from the bundled script, not from a CDN.
    request_guard.assert_only_from({site})
    assert request_guard.blocked == []


def test_the_csp_is_in_force_so_inline_injection_would_have_failed(
    page: Page, site: str, request_guard: RequestGuard
) -> None:
    """Why axe goes in through page.evaluate: an inline <script> is refused by this CSP."""
    page.goto(site + "/")
    with pytest.raises(Error, match="violates the following Content Security Policy"):
        page.add_script_tag(content="window.injectedInline = true;")
    assert page.evaluate("window.injectedInline === undefined")
    assert len(request_guard.console_errors) == 1

    page.goto(site + "/inline")
    assert page.evaluate("window.inlineRan === undefined")
    assert len(request_guard.console_errors) == 2
    assert all("Content Security Policy" in e for e in request_guard.console_errors)


def test_axe_reports_violations_on_a_bad_page(page: Page, site: str) -> None:
    page.goto(site + "/bad")
    with pytest.raises(AssertionError) as failure:
        check_accessibility(page, "bad page")
    message = str(failure.value)
    assert message.startswith("bad page: 2 accessibility rule(s) violated")
    assert "- image-alt [critical] Images must have alternative text: img" in message
    assert "- label [critical] Form elements must have labels: #nolabel" in message


def test_guard_catches_and_blocks_an_outside_script(
    page: Page, site: str, request_guard: RequestGuard
) -> None:
    page.goto(site + "/outside")
    assert request_guard.blocked == ["http://example.invalid/x.js"]
    with pytest.raises(AssertionError) as failure:
        request_guard.assert_only_from({site})
    assert "http://example.invalid/x.js" in str(failure.value)
    assert request_guard.foreign({site, "http://example.invalid"}) == []


def test_guard_restricted_to_origins_blocks_another_loopback_server(
    page: Page, site: str, request_guard: RequestGuard
) -> None:
    request_guard.restrict_to({"http://127.0.0.1:9"})
    with pytest.raises(Exception, match="ERR_BLOCKED_BY_CLIENT"):
        page.goto(site + "/")
    assert request_guard.blocked == [site + "/"]


def test_screenshots_at_both_sizes(
    page: Page, site: str, screenshot_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("LIKVARD_SCREENSHOTS", raising=False)
    page.goto(site + "/")
    paths = screenshots(page, "harness-good")
    assert paths == [
        screenshot_root / "harness-good-1280x800.png",
        screenshot_root / "harness-good-390x844.png",
    ]
    assert [png_size(p) for p in paths] == [(1280, 800), (390, 844)]
    assert page.viewport_size == {"width": 1280, "height": 800}

    monkeypatch.setenv("LIKVARD_SCREENSHOTS", str(tmp_path / "shots"))
    assert screenshots(page, "again")[1] == tmp_path / "shots" / "again-390x844.png"
    assert png_size(tmp_path / "shots" / "again-1280x800.png") == (1280, 800)


def test_tab_reaches_the_button_by_name_selector_or_predicate(page: Page, site: str) -> None:
    page.goto(site + "/")
    reached = tab_to(page, "Spara")
    assert (reached.role, reached.name, reached.tag) == ("button", "Spara", "button")
    page.keyboard.press("Shift+Tab")
    assert tab_to(page, "#save").name == "Spara"
    page.keyboard.press("Shift+Tab")
    assert tab_to(page, lambda f: f.role == "button").name == "Spara"


def test_tab_to_fails_with_the_focus_order_when_never_reached(page: Page, site: str) -> None:
    page.goto(site + "/")
    with pytest.raises(AssertionError) as failure:
        tab_to(page, "Radera", max_tabs=3)
    message = str(failure.value)
    assert "Tab never reached 'Radera' in 3 presses" in message
    assert '1. link "Startsida" <a>' in message
    assert '2. textbox "Distrikt" <input>' in message
    assert '3. button "Spara" <button>' in message


def test_without_chromium_every_browser_test_skips_with_the_hint() -> None:
    """A nested pytest run with LIKVARD_CHROMIUM pointing nowhere skips this whole file."""
    env = {**os.environ, "LIKVARD_CHROMIUM": "/nonexistent/chromium"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert SKIP_MESSAGE in run.stdout
    assert " passed" not in run.stdout and " failed" not in run.stdout
    assert f"{len(TESTS_IN_THIS_FILE)} skipped" in run.stdout


TESTS_IN_THIS_FILE = [name for name in dir() if name.startswith("test_")]
