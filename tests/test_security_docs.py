"""docs/security.md stays true to the code it describes: every role, action, reason code
and emergency reason of the policy (likvard/policy.py, the single source) is named, the
numbers and the header are the code's, and the files it links to exist."""

from __future__ import annotations

import re
from pathlib import Path

from likvard import policy
from likvard.guard import EMERGENCY_HEADER
from likvard.identity import Role

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"


def text() -> str:
    return DOC.read_text(encoding="utf-8")


def reason_codes() -> set[str]:
    """Every reason the policy can give: the literals of its _yes(...) and _no(...)."""
    source = Path(policy.__file__).read_text(encoding="utf-8")
    return set(re.findall(r'_(?:yes|no)\(\s*"([a-z-]+)"', source)) | {
        m for pair in re.findall(r'"([a-z-]+)" if .+? else "([a-z-]+)"', source) for m in pair
    }


def test_the_doc_names_every_role_action_and_emergency_reason() -> None:
    doc = text()
    for role in Role:
        assert f"`{role}`" in doc, role
    for action in policy.Action:
        assert f"`{action}`" in doc, action
    for code, meaning in policy.EMERGENCY_REASONS.items():
        assert f"| `{code}` | {meaning} |" in doc, code
    assert f"{EMERGENCY_HEADER}: <code>" in doc
    assert f"FORMER_DISTRICT_READ_DAYS = {policy.FORMER_DISTRICT_READ_DAYS}" in doc


def test_the_doc_names_every_reason_code_of_the_policy() -> None:
    codes = reason_codes()
    assert {"own-district", "not-your-district", "former-district-expired"} <= codes
    missing = sorted(c for c in codes if f"`{c}`" not in text())
    assert missing == []


def test_the_docs_links_point_at_files_that_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text())
    assert links
    for link in links:
        if "://" not in link:
            assert (DOC.parent / link).exists(), link
