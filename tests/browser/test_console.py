"""The web console in a real Chromium against a real, seeded `likvard up` (tests/browser/stack.py):
sign-in through the development provider's login form, each role's pages and refusals, the
access log of a refusal, the unit inbox by keyboard (with its event on Kafka) and its 409 in
words, an as-of replay, the hash chains, accessibility (axe-core, WCAG 2.1 A/AA) and
screenshots of every page, no outside request, and reading without JavaScript.

The console speaks Swedish by default; texts are compared through its own catalogue
(`sv(...)`), so a reworded message fails here only if its translation is gone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, timedelta

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Response

from likvard.topics import SERVICE_TOPICS
from services.projections.console import i18n
from services.projections.console.web import PAGES
from tests.browser.harness import (
    CONTEXT_OPTIONS,
    SCREEN_SIZES,
    RequestGuard,
    accessibility_violations,
    origin_of,
    screenshots,
    tab_to,
    violations_summary,
)
from tests.browser.stack import Stack, running_stack
from tests.support import consume, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.integration]

sv: Callable[[str], str] = i18n.translations("sv").gettext
TITLES = {page.path: page.title for page in PAGES}
REPORTS = ["/equal-access", "/indicators", "/waits"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(autouse=True)
def only_console_and_provider(request_guard: RequestGuard, stack: Stack) -> None:
    """Abort anything a page asks of another origin (each test asserts none was asked)."""
    request_guard.restrict_to(stack.origins)


@contextmanager
def another_context(browser: Browser, guard: RequestGuard) -> Iterator[BrowserContext]:
    """A second browser (another person), guarded like the test's own context."""
    ctx = browser.new_context(**CONTEXT_OPTIONS)
    guard.attach(ctx)
    try:
        yield ctx
    finally:
        ctx.close()


def go(page: Page, stack: Stack, path: str) -> Response:
    """Open a console page (path after /console); the answer of the page itself."""
    answer = page.goto(stack.console.rstrip("/") + path)
    assert answer is not None, path
    return answer


def sign_in(page: Page, stack: Stack, username: str, path: str = "/") -> Response:
    """Open a console page signed out, sign in on the provider's login form, land on it."""
    go(page, stack, path)
    assert origin_of(page.url) == origin_of(stack.issuer), page.url  # sent to the provider
    page.fill("#username", username)
    page.fill("#password", "dev")
    with page.expect_navigation(url=re.compile(re.escape(stack.url("projections")))) as nav:
        page.locator("form button[type=submit]").click()
    landed = nav.value
    assert landed is not None
    assert page.url.startswith(stack.console.rstrip("/") + path.split("?")[0]), page.url
    return landed


def navigation(page: Page) -> list[str]:
    return [t.strip() for t in page.locator("header nav a").all_inner_texts()]


def assert_refused(answer: Response, page: Page) -> None:
    assert answer.status == 403, answer.status
    assert page.locator("h1").inner_text() == sv("Not allowed")
    assert page.get_by_role("alert").count() == 1


# Where a page is wider than the viewport: from each outermost element too wide (a table in
# its scrolling wrapper is not: WCAG 1.4.10 lets a data table scroll), the path down its too
# wide descendants; tag, id and class only, never content.
WIDER_THAN_VIEWPORT = """() => {
    const width = document.documentElement.clientWidth, out = [];
    const wide = (el) => el.getBoundingClientRect().right > width + 1;
    const label = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "")
        + (typeof el.className === "string" && el.className ? "." + el.className : "");
    for (const el of document.querySelectorAll("body *")) {
        if (!wide(el) || el.closest(".table-wrap")) continue;
        const parent = el.parentElement;
        if (parent && parent !== document.body && wide(parent)) continue;
        const path = [label(el)];
        for (let at = el; path.length < 6; ) {
            const wider = [...at.children].filter(wide);
            if (!wider.length) break;
            path.push(wider.map(label).join(" | "));
            at = wider[wider.length - 1];
        }
        out.push(path.join(" > "));
    }
    return [...new Set(out)];
}"""


def page_problems(page: Page) -> list[str]:
    """axe-core's WCAG 2.1 A/AA violations at both screen sizes, and sideways scrolling at
    390 px (WCAG 2.1 1.4.10 Reflow), all of them at once."""
    problems = []
    for width, height in SCREEN_SIZES:
        page.set_viewport_size({"width": width, "height": height})
        violations = accessibility_violations(page)
        if violations:
            problems.append(f"at {width} px:\n{violations_summary(violations)}")
    wide = page.evaluate("document.documentElement.scrollWidth")
    if wide > SCREEN_SIZES[-1][0]:
        where = "; ".join(page.evaluate(WIDER_THAN_VIEWPORT))
        problems.append(f"{wide} px wide at {SCREEN_SIZES[-1][0]} px (1.4.10 Reflow): {where}")
    page.set_viewport_size({"width": SCREEN_SIZES[0][0], "height": SCREEN_SIZES[0][1]})
    return problems


def assert_accessible(page: Page, name: str) -> None:
    """No WCAG 2.1 A/AA problem on the page (`check_accessibility` at both sizes, reflow)."""
    problems = page_problems(page)
    assert not problems, f"{name}:\n" + "\n".join(problems)


ROLES = {
    "analyst": (REPORTS, "/inbox"),
    "auditor": ([*REPORTS, "/cases", "/access-log", "/history"], "/inbox"),
    "unit-staff-centrum-beroendeteam": (["/inbox"], "/equal-access"),
    "case-worker-nordost": (["/cases"], "/access-log"),
    "records-officer": ([], "/equal-access"),
    "ops": ([], "/cases"),
}


@pytest.mark.parametrize("username", list(ROLES))
def test_each_role_signs_in_and_sees_only_its_pages(
    page: Page, request_guard: RequestGuard, stack: Stack, username: str
) -> None:
    pages, forbidden = ROLES[username]
    sign_in(page, stack, username)
    assert navigation(page) == [sv(TITLES[p]) for p in pages]
    if not pages:
        assert sv("Your roles give no page in the console.") in page.locator("main").inner_text()
    for path in pages:
        answer = go(page, stack, path)
        assert answer.status == 200, (path, answer.status)
    assert_refused(go(page, stack, forbidden), page)
    request_guard.assert_only_from(stack.origins)


def test_a_refused_case_read_is_in_the_access_log(
    page: Page, browser: Browser, request_guard: RequestGuard, stack: Stack
) -> None:
    case = stack.cases[-1]
    sign_in(page, stack, "analyst")
    assert_refused(go(page, stack, f"/cases/{case}"), page)
    assert case not in page.locator("main").inner_text()  # nothing of the case is shown
    with another_context(browser, request_guard) as ctx:
        auditor = ctx.new_page()
        sign_in(auditor, stack, "auditor", f"/access-log?case_id={case}&outcome=refused")

        def refused_entry() -> bool:
            auditor.reload()
            rows = auditor.locator("main table tbody tr").all_inner_texts()
            return any("dev-analyst" in r and "case.history" in r for r in rows)

        wait_for(refused_entry, 60, "the analyst's refused read in the access log page")
        rows = auditor.locator("main table tbody tr").all_inner_texts()
        assert all(sv("Refused") in r for r in rows), rows
    # The same entry through the API the page reads.
    answer = httpx.get(
        f"{stack.url('projections')}/access-log",
        params={"case_id": case, "outcome": "refused"},
        headers=stack.headers("auditor"),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entries"]
    assert any(e["actor"] == "dev-analyst" and e["action"] == "case.history" for e in entries)
    request_guard.assert_only_from(stack.origins)


def test_a_unit_worker_declines_a_referral_by_keyboard(
    page: Page, request_guard: RequestGuard, stack: Stack
) -> None:
    referral = stack.referrals[0]
    sign_in(page, stack, f"unit-staff-{stack.unit}", "/inbox")
    reason = page.locator(f"#reason-{referral}")
    tab_to(page, f"#reason-{referral}", max_tabs=150)
    page.keyboard.press("ArrowDown")
    chosen = reason.input_value()
    assert chosen, "ArrowDown chose no reason"
    tab_to(page, f"form[action$='/inbox/{referral}/decline'] button", max_tabs=3)
    with page.expect_navigation() as nav:
        page.keyboard.press("Enter")
    assert nav.value is not None and nav.value.status == 200
    assert page.url.endswith("/inbox?done=declined"), page.url
    assert page.get_by_role("status").inner_text() == sv("The referral is declined.")
    row = page.locator(f"#referral-{referral}")
    if row.count():  # the inbox may list answered referrals too: this one says declined
        assert sv("Declined") in row.inner_text()
        assert row.locator("select").count() == 0
    topic = SERVICE_TOPICS["referral"]

    def declined_on_kafka() -> bool:
        records = consume(stack.bootstrap, topic, at_least=1, timeout=15, settle=3)
        return any(
            r.headers.get("event_type") == b"ReferralDeclined"
            and r.headers.get("stream_id") == referral.encode()
            for r in records
        )

    wait_for(declined_on_kafka, 60, "ReferralDeclined of the referral on Kafka")
    request_guard.assert_only_from(stack.origins)


def test_an_answer_to_a_referral_changed_meanwhile_is_a_conflict_in_words(
    page: Page, context: BrowserContext, request_guard: RequestGuard, stack: Stack
) -> None:
    referral = stack.referrals[1]
    sign_in(page, stack, f"unit-staff-{stack.unit}", "/inbox")
    other = context.new_page()  # the same person in a second tab, opened before the change
    assert go(other, stack, "/inbox").status == 200
    with page.expect_navigation():
        page.locator(f"form[action$='/inbox/{referral}/accept'] button").click()
    assert page.get_by_role("status").inner_text() == sv("The referral is accepted.")
    other.select_option(f"#reason-{referral}", "LACK_OF_CAPACITY")
    with other.expect_navigation() as nav:
        other.locator(f"form[action$='/inbox/{referral}/decline'] button").click()
    assert nav.value is not None and nav.value.status == 409
    alert = other.get_by_role("alert")
    assert alert.count() == 1
    words = alert.inner_text()
    assert "version" in words and len(words.split()) > 10, words  # an explanation, not a code
    assert sv("Accepted") in other.locator(f"#referral-{referral}").inner_text()  # its new state
    request_guard.assert_only_from(stack.origins)


def test_an_auditor_replays_history_as_of_a_day_and_sees_its_checksums(
    page: Page, request_guard: RequestGuard, stack: Stack
) -> None:
    sign_in(page, stack, "auditor", "/history")
    screenshots(page, "history")
    assert_accessible(page, "history")
    form = page.locator("form[action$='/history/replays']")
    form.locator("input[name=as_of]").fill((date.today() - timedelta(days=30)).isoformat())
    with page.expect_navigation():
        form.locator("button[type=submit]").click()
    assert re.search(r"/history/replays/[0-9a-f-]{36}$", page.url), page.url

    def finished() -> bool:
        answer = page.reload()
        assert answer is not None and answer.status == 200, answer and answer.status
        failed = page.get_by_role("alert")
        assert failed.count() == 0, failed.first.inner_text()
        return page.locator("meta[http-equiv=refresh]").count() == 0

    wait_for(finished, 120, "the replay job to finish (its page stops refreshing itself)")
    assert page.locator("#job-status").inner_text() == sv("done")
    checksums = page.locator("#checksums tbody tr")
    assert checksums.count() > 0
    assert re.search(r"\b[0-9a-f]{16}", checksums.first.inner_text()), "no checksum shown"
    job = page.url.rsplit("/", 1)[-1]
    screenshots(page, "replay-job")
    assert_accessible(page, "replay-job")
    listed = go(page, stack, "/history")  # the list of replays shows the finished one
    assert listed.status == 200, listed.status
    assert page.locator(f"a[href$='/history/replays/{job}']").count() == 1
    request_guard.assert_only_from(stack.origins)


def test_an_auditor_sees_every_stream_of_a_case_verified(
    page: Page, request_guard: RequestGuard, stack: Stack
) -> None:
    sign_in(page, stack, "auditor", f"/cases/{stack.cases[2]}")
    caption = sv("The hash-chain status of each stream of the case")
    chains = page.locator("table", has=page.locator("caption", has_text=caption))
    rows = chains.locator("tbody tr")
    assert rows.count() >= 2  # the case's intake stream and its referral's stream
    for text in rows.all_inner_texts():
        assert sv("verified") in text, text
    request_guard.assert_only_from(stack.origins)


# name: (username or None for the login form, path, expected status)
PAGES_TO_CHECK: dict[str, tuple[str | None, str, int]] = {
    "login": (None, "/", 200),
    "start": ("auditor", "/", 200),
    "equal-access": ("analyst", "/equal-access", 200),
    "indicators": ("analyst", "/indicators", 200),
    "waits": ("analyst", "/waits", 200),
    "inbox": ("unit-staff-centrum-beroendeteam", "/inbox", 200),
    "case-find": ("auditor", "/cases", 200),
    "case-timeline": ("auditor", "/cases/{demo_case}", 200),
    "emergency": ("case-worker-hisingen", "/cases/{case}", 403),
    "access-log": ("auditor", "/access-log?case_id={case}", 200),
    "refused": ("analyst", "/inbox", 403),
    "signed-out": ("case-worker-nordost", "/", 200),
}


@pytest.mark.parametrize("name", list(PAGES_TO_CHECK))
def test_every_page_is_accessible_and_shot(
    page: Page, request_guard: RequestGuard, stack: Stack, name: str
) -> None:
    username, path, status = PAGES_TO_CHECK[name]
    path = path.format(case=stack.cases[0], demo_case=stack.demo_case)
    if username is None:
        go(page, stack, path)
        assert origin_of(page.url) == origin_of(stack.issuer)
        assert page.locator("#username").is_visible()
    else:
        sign_in(page, stack, username)
        answer = go(page, stack, path)
        assert answer.status == status, (name, answer.status)
    if name == "signed-out":
        with page.expect_navigation(url=re.compile(r"/console/signed-out$")):
            page.get_by_role("button", name=sv("Sign out")).click()
    screenshots(page, name)
    assert_accessible(page, name)
    if name == "signed-out":  # the session is gone: the console sends the browser to sign in
        go(page, stack, "/")
        assert origin_of(page.url) == origin_of(stack.issuer), page.url
    assert not [e for e in request_guard.console_errors if "Content Security Policy" in e]
    request_guard.assert_only_from(stack.origins)


def test_the_equal_access_page_reads_without_javascript(
    browser: Browser, request_guard: RequestGuard, stack: Stack
) -> None:
    ctx = browser.new_context(**CONTEXT_OPTIONS, java_script_enabled=False)
    request_guard.attach(ctx)
    try:
        page = ctx.new_page()
        sign_in(page, stack, "analyst", "/equal-access")
        tables = page.locator("table[data-metric]")
        assert tables.count() > 0
        assert tables.first.locator("tbody tr").count() > 0
        assert page.locator("h1").inner_text() == sv("Equal access")
    finally:
        ctx.close()
    request_guard.assert_only_from(stack.origins)
