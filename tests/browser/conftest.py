"""Fixtures for the browser tests: one headless Chromium per session, a fresh Swedish
context and page per test with the outside-request guard attached (see harness.py).

Without a Chromium binary every test under tests/browser skips with harness.SKIP_MESSAGE.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from tests.browser.harness import (
    CONTEXT_OPTIONS,
    LAUNCH_ARGS,
    SKIP_MESSAGE,
    RequestGuard,
    find_chromium,
    set_screenshot_root,
)

HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives a real Chromium through Playwright")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test under tests/browser when there is no Chromium to launch."""
    if find_chromium() is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_MESSAGE)
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """The system Chromium's path (LIKVARD_CHROMIUM, /usr/bin/chromium, PATH)."""
    path = find_chromium()
    if path is None:
        pytest.skip(SKIP_MESSAGE)
    return path


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """Per module, not per session: Playwright's sync API runs an event loop on this thread
    while it is open, and the tests after the browser tests call asyncio.run()."""
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright, chromium_executable: str) -> Iterator[Browser]:
    """One headless Chromium per module (never a downloaded one)."""
    launched = playwright.chromium.launch(
        executable_path=chromium_executable, headless=True, args=LAUNCH_ARGS
    )
    yield launched
    launched.close()


@pytest.fixture(scope="session", autouse=True)
def screenshot_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<basetemp>/screenshots`: where screenshots() writes unless LIKVARD_SCREENSHOTS is set."""
    directory = tmp_path_factory.getbasetemp() / "screenshots"
    set_screenshot_root(directory)
    return directory


@pytest.fixture
def request_guard() -> RequestGuard:
    """Records the test's requests; blocks non-loopback ones (restrict_to narrows it)."""
    return RequestGuard()


@pytest.fixture
def context(browser: Browser, request_guard: RequestGuard) -> Iterator[BrowserContext]:
    """sv-SE, Europe/Stockholm, 1280x800, the page's CSP in force, outside requests blocked."""
    ctx = browser.new_context(**CONTEXT_OPTIONS)
    request_guard.attach(ctx)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()
