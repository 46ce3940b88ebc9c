"""The console's pure parts: sealed cookies, the return address, PKCE, the words."""

from __future__ import annotations

import base64
import hashlib

import pytest

from likvard.oidc import pkce_s256
from services.projections.console import i18n
from services.projections.console.session import (
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    CookieBox,
    new_session,
    new_signin,
)
from services.projections.console.web import PAGES, ROUTE_POLICY, local_path

SECRET = b"k" * 32


def test_a_sealed_session_opens_with_its_key_only() -> None:
    box = CookieBox(SECRET)
    session = new_session("a.b.c", 2_000_000_000)
    sealed = box.seal(SESSION_COOKIE, session)
    assert "a.b.c" not in sealed
    assert box.session(sealed, now=1_000) == session
    assert CookieBox(b"x" * 32).session(sealed, now=1_000) is None  # another key
    flipped = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    assert box.session(flipped, now=1_000) is None  # tampered
    assert box.session(sealed, now=2_000_000_001) is None  # expired
    assert box.signin(sealed, now=1_000) is None  # a session is never a sign-in cookie


def test_a_signin_cookie_lasts_ten_minutes() -> None:
    box = CookieBox(SECRET)
    signin = new_signin("/console/waits", now=1_000)
    sealed = box.seal(SIGNIN_COOKIE, signin)
    assert box.signin(sealed, now=1_500) == signin
    assert box.signin(sealed, now=1_000 + 601) is None
    assert len(signin.verifier) >= 43 and signin.state != signin.nonce


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        CookieBox(b"short")


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        ("/console/waits?structure=current", "/console/waits?structure=current"),
        ("/console", "/console"),
        ("https://evil.example/console/", "/console/"),
        ("//evil.example/console/", "/console/"),
        ("/console/\\evil", "/console/"),
        ("/docs", "/console/"),
        (None, "/console/"),
    ],
)
def test_the_return_address_stays_in_the_console(asked: str | None, expected: str) -> None:
    assert local_path(asked) == expected


def test_the_code_challenge_is_s256_of_the_verifier() -> None:
    verifier = "a" * 64
    digest = hashlib.sha256(verifier.encode()).digest()
    assert pkce_s256(verifier) == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert "=" not in pkce_s256(verifier) and len(pkce_s256(verifier)) == 43


def test_every_navigation_page_has_a_policy_entry() -> None:
    for page in PAGES:
        assert ROUTE_POLICY[page.path] == page.action, page.path


def test_swedish_is_the_default_and_english_the_message_ids() -> None:
    assert i18n.language_of(None) == "sv" and i18n.language_of("de") == "sv"
    assert i18n.translations("sv").gettext("Sign out") == "Logga ut"
    assert i18n.translations("en").gettext("Sign out") == "Sign out"


def test_times_are_shown_in_the_city_time_zone() -> None:
    # 23:30 UTC on 31 December is already New Year's Day in Stockholm
    assert "2027" in i18n.when("2026-12-31T23:30:00+00:00", "sv")
    assert "00:30" in i18n.when("2026-12-31T23:30:00+00:00", "sv")


def test_every_text_of_the_console_has_its_swedish() -> None:
    """Every message the code and the templates ask for is in the Swedish catalogue."""
    from pathlib import Path

    from babel.messages.extract import extract_from_dir
    from babel.messages.pofile import read_po

    root = Path(i18n.__file__).parent
    methods = [("**.py", "python"), ("**/templates/**.html", "jinja2")]
    options = {"**/templates/**.html": {"extensions": "jinja2.ext.i18n"}}
    asked = {
        m[2] if isinstance(m[2], str) else m[2][0]
        for m in extract_from_dir(str(root), methods, options_map=options)
    }
    assert len(asked) > 200  # the extraction saw the pages
    with (root / "locale/sv/LC_MESSAGES/messages.po").open("rb") as f:
        swedish = {m.id: m.string for m in read_po(f) if m.id}
    missing = sorted(a for a in asked if not swedish.get(a))
    assert not missing, missing


def test_the_shared_reports_words_are_in_the_catalogue() -> None:
    """The metric and wait texts and the charts' words come from code outside the console:
    `shared_words` marks each of them, so each has its Swedish."""
    from dataclasses import fields

    from services.projections import charts, html_report
    from services.projections.console.shared_words import SHARED_WORDS

    words = charts.Words()
    used = {t for pair in html_report.METRIC_TEXT.values() for t in pair}
    used |= {t for pair in html_report.WAIT_TEXT.values() for t in pair}
    used |= {getattr(words, f.name) for f in fields(words)}
    assert used <= set(SHARED_WORDS), sorted(used - set(SHARED_WORDS))
    swedish = i18n.translations("sv")
    assert all(swedish.gettext(w) != w or w in ("median", "period") for w in SHARED_WORDS)


def test_a_timelines_personal_fields_show_how_the_reader_may_see_them() -> None:
    from services.projections.console.pages_cases import _fields

    erased: dict[str, object] = {
        "goals": [],
        "note": None,
        "person_participated": True,
        "personal": "erased",
    }
    shown = {f["name"]: (f["state"], f["value"]) for f in _fields(erased, ("goals", "note"))}
    assert shown == {
        "goals": ("erased", None),
        "note": ("erased", None),
        "person_participated": ("open", "true"),
    }
    opened: dict[str, object] = {"goals": ["Sova bättre"], "personal": "open"}
    assert _fields(opened, ("goals",)) == [
        {"name": "goals", "value": '["Sova bättre"]', "state": "open"}
    ]
    withheld: dict[str, object] = {"goals": [], "personal": "withheld"}
    assert _fields(withheld, ("goals",))[0]["state"] == "withheld"


def test_the_console_settings_come_from_the_environment_in_one_place() -> None:
    from likvard.config import ConfigError, console_settings

    assert console_settings({}).secret is None  # the console then answers 503
    key = base64.b64encode(bytes(range(32))).decode()
    found = console_settings(
        {
            "LIKVARD_CONSOLE_SECRET": key,
            "LIKVARD_CONSOLE_URL": "https://likvard.example/console/",
            "LIKVARD_CONSOLE_SECURE_COOKIES": "1",
            "LIKVARD_REFERRAL_URL": "http://referral:8002/",
        }
    )
    assert found.secret == bytes(range(32))  # base64 of 32 bytes
    assert found.url == "https://likvard.example/console"
    assert found.secure_cookies is True and found.client_id == "likvard-console"
    assert found.referral_url == "http://referral:8002"
    assert console_settings({"LIKVARD_CONSOLE_SECRET": "x" * 40}).secret == b"x" * 40
    with pytest.raises(ConfigError):
        console_settings({"LIKVARD_CONSOLE_SECRET": "too-short"})
    with pytest.raises(ConfigError):
        console_settings({"LIKVARD_CONSOLE_SECURE_COOKIES": "maybe"})
