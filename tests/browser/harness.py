"""Helpers for browser tests of the web console in Debian's Chromium, driven by Playwright.

Playwright never downloads a browser here: it launches the system Chromium (`find_chromium`).
The fixtures in tests/browser/conftest.py wire these helpers; a test reads

    def test_overview(page: Page, request_guard: RequestGuard, console_url: str) -> None:
        page.goto(console_url)
        check_accessibility(page, "overview")
        screenshots(page, "overview")
        tab_to(page, "Spara")
        request_guard.assert_only_from({console_url})

Pieces:
- `RequestGuard` (fixture `request_guard`): records every request of the browser context and
  aborts any to a non-loopback origin (or, after `restrict_to`, to any origin not listed), so a
  test can never reach the internet; `assert_only_from(origins)` fails listing foreign URLs.
  It also keeps the console's errors (a CSP refusal shows up there).
- `check_accessibility(page, name)`: axe-core (bundled with axe-playwright-python) with the
  WCAG 2.0/2.1 A and AA rules; fails with one line per violated rule, without page content.
- `screenshots(page, name)`: full-page PNGs at 1280x800 and 390x844.
- `tab_to(page, name_or_selector_or_predicate)`: keyboard-only navigation with Tab.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from playwright.sync_api import BrowserContext, ConsoleMessage, Page, Request, Route

SKIP_MESSAGE = (
    "Chromium is not installed: apt-get install chromium chromium-driver (Debian), "
    "or set LIKVARD_CHROMIUM to a Chromium binary"
)
LAUNCH_ARGS = ["--no-sandbox", "--disable-dev-shm-usage"]  # CI runs as root, /dev/shm is small
VIEWPORT = {"width": 1280, "height": 800}
CONTEXT_OPTIONS: dict[str, Any] = {
    "locale": "sv-SE",
    "timezone_id": "Europe/Stockholm",
    "viewport": VIEWPORT,
    # A service worker's fetches would pass by the route that blocks outside requests.
    "service_workers": "block",
}
SCREEN_SIZES = ((1280, 800), (390, 844))
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]"}
# Requests that never leave the browser (inline images, generated blobs, the blank page).
LOCAL_SCHEMES = {"data", "blob", "about"}


def find_chromium() -> str | None:
    """The Chromium binary to launch: LIKVARD_CHROMIUM when set (only it, so a wrong path
    skips instead of silently testing another browser), else /usr/bin/chromium, else
    `chromium` on PATH; None when there is none."""
    chosen = os.environ.get("LIKVARD_CHROMIUM")
    candidates = [chosen] if chosen else ["/usr/bin/chromium", shutil.which("chromium")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL (a base URL with a path or a trailing slash works too)."""
    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return f"{parts.scheme}:"
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass
class RequestGuard:
    """Every request a browser context makes, with the outside ones aborted before they leave."""

    allowed: set[str] | None = None  # None: any loopback origin (test servers on free ports)
    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def attach(self, context: BrowserContext) -> RequestGuard:
        """Record and route the context's requests; before any page is opened."""
        context.on("request", self._record)
        context.on("page", lambda page: page.on("console", self._console))
        context.route("**/*", self._route)
        return self

    def restrict_to(self, origins: Iterable[str]) -> None:
        """Abort from now on every request whose origin is not one of `origins`."""
        self.allowed = {origin_of(o) for o in origins}

    def is_allowed(self, url: str) -> bool:
        origin = origin_of(url)
        if origin.endswith(":") and origin[:-1] in LOCAL_SCHEMES:
            return True
        if self.allowed is not None:
            return origin in self.allowed
        return urlsplit(url).scheme in {"http", "https"} and _host(url) in LOOPBACK_HOSTS

    def foreign(self, origins: Iterable[str]) -> list[str]:
        """Requested URLs (blocked ones included) from none of `origins`."""
        wanted = {origin_of(o) for o in origins} | {f"{s}:" for s in LOCAL_SCHEMES}
        seen = dict.fromkeys(self.requests + self.blocked)
        return [url for url in seen if origin_of(url) not in wanted]

    def assert_only_from(self, origins: set[str]) -> None:
        """Fail listing every URL the page requested from outside `origins`."""
        outside = self.foreign(origins)
        assert not outside, (
            f"the page requested {len(outside)} URL(s) outside {sorted(origins)}:\n"
            + "\n".join(f"  {url}" for url in outside)
        )

    def _record(self, request: Request) -> None:
        self.requests.append(request.url)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def _route(self, route: Route) -> None:
        url = route.request.url
        if self.is_allowed(url):
            route.fallback()
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")


def _host(url: str) -> str:
    netloc = urlsplit(url).netloc.rsplit("@", 1)[-1].lower()
    if netloc.startswith("["):
        return netloc[: netloc.index("]") + 1]
    return netloc.split(":", 1)[0]


def accessibility_violations(page: Page) -> list[dict[str, Any]]:
    """axe-core's violations of the WCAG 2.0/2.1 A and AA rules on the page as it is now.

    axe-playwright-python injects its bundled axe.min.js with `page.evaluate(script)`, i.e.
    Chromium's DevTools Runtime.evaluate: nothing is fetched (the request guard sees no
    request) and the page's Content-Security-Policy does not apply to it, not even to axe's
    own `new Function` calls, because DevTools evaluation is exempt from script-src and
    'unsafe-eval'. So the context keeps the page's CSP in force (no `bypass_csp=True`): the
    console is tested under the CSP it ships with. (`add_script_tag(content=...)` would be
    refused by a CSP without 'unsafe-inline'; tests/browser/test_harness.py proves both.)
    """
    from axe_playwright_python.sync_playwright import Axe  # type: ignore[import-untyped]

    options = {"runOnly": {"type": "tag", "values": WCAG_TAGS}, "resultTypes": ["violations"]}
    results = Axe().run(page, options=options)
    violations: list[dict[str, Any]] = results.response["violations"]
    return violations


def violations_summary(violations: list[dict[str, Any]], first: int = 3) -> str:
    """One line per rule: id, impact, help, how many elements and the first CSS targets
    (no HTML snippets: a console page may show personal data)."""
    lines = []
    for v in violations:
        nodes = v.get("nodes", [])
        targets = [" >> ".join(_flat(node.get("target", []))) for node in nodes[:first]]
        more = f" (+{len(nodes) - first} more)" if len(nodes) > first else ""
        lines.append(
            f"- {v['id']} [{v.get('impact')}] {v.get('help')}: "
            f"{', '.join(targets)}{more} ({v.get('helpUrl', '')})"
        )
    return "\n".join(lines)


def _flat(target: list[Any]) -> list[str]:
    """axe targets are selectors, or lists of them for elements inside frames/shadow roots."""
    out: list[str] = []
    for part in target:
        out.extend(_flat(part) if isinstance(part, list) else [str(part)])
    return out


def check_accessibility(page: Page, name: str) -> None:
    """Fail when axe-core finds WCAG 2.1 A/AA violations on the page (`name` labels it)."""
    violations = accessibility_violations(page)
    assert not violations, (
        f"{name}: {len(violations)} accessibility rule(s) violated (WCAG 2.1 A/AA):\n"
        + violations_summary(violations)
    )


_screenshot_root: Path | None = None


def set_screenshot_root(directory: Path) -> None:
    """Where `screenshots` writes when LIKVARD_SCREENSHOTS is unset (conftest: basetemp)."""
    global _screenshot_root
    _screenshot_root = directory


def screenshot_dir() -> Path:
    """LIKVARD_SCREENSHOTS, else the session's `<basetemp>/screenshots`."""
    chosen = os.environ.get("LIKVARD_SCREENSHOTS")
    if chosen:
        directory = Path(chosen)
    elif _screenshot_root is not None:
        directory = _screenshot_root
    else:
        raise RuntimeError("no screenshot directory: set LIKVARD_SCREENSHOTS")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def screenshots(page: Page, name: str) -> list[Path]:
    """Full-page PNGs `<name>-1280x800.png` and `<name>-390x844.png`; the viewport is restored."""
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"screenshot name must be a plain file name part, not {name!r}")
    directory = screenshot_dir()
    before = page.viewport_size
    paths = []
    try:
        for width, height in SCREEN_SIZES:
            page.set_viewport_size({"width": width, "height": height})
            path = directory / f"{name}-{width}x{height}.png"
            page.screenshot(path=str(path), full_page=True)
            paths.append(path)
    finally:
        if before is not None:
            page.set_viewport_size(before)
    return paths


@dataclass(frozen=True)
class Focused:
    """The focused element as Chromium's accessibility tree shows it to a screen reader."""

    role: str
    name: str
    tag: str

    def __str__(self) -> str:
        return f'{self.role} "{self.name}" <{self.tag}>'


_MATCHES_JS = """(selector) => {
    const el = document.activeElement;
    if (!el || el === document.body) return false;
    try { return el.matches(selector); } catch (e) { return false; }
}"""


def focused(page: Page) -> Focused | None:
    """The element that has keyboard focus (None on the page body); Chromium only."""
    tag = page.evaluate(
        "() => { const el = document.activeElement;"
        " return el && el !== document.body ? el.tagName.toLowerCase() : null; }"
    )
    if tag is None:
        return None
    cdp = page.context.new_cdp_session(page)
    try:
        handle = cdp.send(
            "Runtime.evaluate", {"expression": "document.activeElement", "objectGroup": "tab"}
        )
        nodes = cdp.send(
            "Accessibility.getPartialAXTree",
            {"objectId": handle["result"]["objectId"], "fetchRelatives": False},
        )["nodes"]
        cdp.send("Runtime.releaseObjectGroup", {"objectGroup": "tab"})
    finally:
        cdp.detach()
    node = next((n for n in nodes if not n.get("ignored")), nodes[0] if nodes else {})
    role = str(node.get("role", {}).get("value", ""))
    name = str(node.get("name", {}).get("value", ""))
    return Focused(role, name, tag)


def tab_to(page: Page, target: str | Callable[[Focused], bool], max_tabs: int = 60) -> Focused:
    """Press Tab until the focused element matches `target`: a predicate on `Focused`, or a
    string that is its accessible name or a CSS selector it matches. Fails with the focus
    order seen when it is not reached within `max_tabs` presses."""
    seen: list[str] = []
    for _ in range(max_tabs):
        page.keyboard.press("Tab")
        now = focused(page)
        if now is None:
            seen.append("(page body)")
            continue
        seen.append(str(now))
        if callable(target):
            if target(now):
                return now
        elif now.name == target or page.evaluate(_MATCHES_JS, target):
            return now
    raise AssertionError(
        f"Tab never reached {target!r} in {max_tabs} presses; focus went to:\n"
        + "\n".join(f"  {i}. {s}" for i, s in enumerate(seen, 1))
    )
