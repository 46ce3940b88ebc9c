"""Every schema version in schemas/ is readable by the newest one (backward compatible),
and the check really fails for a change that is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from likvard.codec import Catalogue
from likvard.schema_compat import check_backward_compatible

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def test_every_version_in_schemas_reads_with_the_newest() -> None:
    assert check_backward_compatible(Catalogue.load(SCHEMAS)) == []


def _evolve(tmp_path: Path, new_field: dict[str, Any]) -> Catalogue:
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, root)
    v1 = json.loads((root / "intake" / "CaseClosed.v1.avsc").read_text(encoding="utf-8"))
    v2 = {**v1, "fields": [*v1["fields"], new_field]}
    (root / "intake" / "CaseClosed.v2.avsc").write_text(json.dumps(v2), encoding="utf-8")
    return Catalogue.load(root)


def test_a_field_added_with_a_default_keeps_old_events_readable(tmp_path: Path) -> None:
    catalogue = _evolve(tmp_path, {"name": "note_code", "type": "string", "default": "none"})
    assert catalogue.versions("CaseClosed") == [1, 2]
    assert check_backward_compatible(catalogue) == []
    old = Catalogue.load(SCHEMAS)
    from tests.test_codec import metadata

    v1_bytes = old.encode("CaseClosed", {"metadata": metadata("CaseClosed"), "reason": "OTHER"})
    decoded = catalogue.decode(v1_bytes)
    assert decoded.version == 1  # written as v1 ...
    assert decoded.record["note_code"] == "none"  # ... read as v2, the default filled in
    assert decoded.record["reason"] == "OTHER"


def test_a_field_added_without_a_default_is_caught(tmp_path: Path) -> None:
    catalogue = _evolve(tmp_path, {"name": "note_code", "type": "string"})
    problems = check_backward_compatible(catalogue)
    assert len(problems) == 1
    assert "CaseClosed v1 -> v2" in problems[0]
