"""District reference data: validity dates across the 2021 reorganisation, successors,
unknown codes, and data that contradicts itself."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from likvard.districts import DEFAULT_PATH, District, DistrictRegistry, ReferenceDataError

REG = DistrictRegistry.load()
OLD = [
    "angered", "ostra-goteborg", "orgryte-harlanda", "centrum-2011", "majorna-linne",
    "askim-frolunda-hogsbo", "vastra-goteborg", "vastra-hisingen", "lundby", "norra-hisingen",
]  # fmt: skip
NEW = ["nordost", "centrum", "sydvast", "hisingen"]


def test_ten_committees_until_2020_and_four_areas_from_2021() -> None:
    assert [d.code for d in REG.current(date(2020, 12, 31))] == OLD
    assert [d.code for d in REG.current(date(2021, 1, 1))] == NEW
    assert REG.current(date(2010, 12, 31)) == []
    assert {d.kind for d in REG.current(date(2015, 6, 1))} == {"district-committee"}
    assert {d.kind for d in REG.current(date(2030, 6, 1))} == {"social-services-area"}


def test_validity_is_inclusive_and_unknown_codes_are_invalid() -> None:
    assert REG.valid_on("lundby", date(2011, 1, 1))
    assert REG.valid_on("lundby", date(2020, 12, 31))
    assert not REG.valid_on("lundby", date(2021, 1, 1))
    assert not REG.valid_on("hisingen", date(2020, 12, 31))
    assert REG.valid_on("hisingen", date(2040, 1, 1))
    assert not REG.valid_on("atlantis", date(2021, 1, 1))
    assert not REG.is_known("atlantis") and REG.get("atlantis") is None


def test_names_are_swedish() -> None:
    names = {d.code: d.name for d in REG}
    assert names["ostra-goteborg"] == "Östra Göteborg"
    assert names["orgryte-harlanda"] == "Örgryte-Härlanda"
    assert names["majorna-linne"] == "Majorna-Linné"
    assert names["askim-frolunda-hogsbo"] == "Askim-Frölunda-Högsbo"
    assert names["sydvast"] == "Sydväst"


def test_successors_and_which_are_confirmed() -> None:
    expected = {
        "lundby": "hisingen", "norra-hisingen": "hisingen", "vastra-hisingen": "hisingen",
        "angered": "nordost", "ostra-goteborg": "nordost",
        "centrum-2011": "centrum", "orgryte-harlanda": "centrum", "majorna-linne": "centrum",
        "askim-frolunda-hogsbo": "sydvast", "vastra-goteborg": "sydvast",
    }  # fmt: skip
    assert {code: REG.successor_of(code) for code in OLD} == expected
    confirmed = {code for code in OLD if (d := REG.get(code)) and d.successor_confirmed}
    assert confirmed == {"lundby", "norra-hisingen", "vastra-hisingen"}
    assert all(REG.successor_of(code) == code for code in NEW)  # current: no successor
    assert REG.successor_of("atlantis") == "atlantis"  # unknown: grouped on its own


def test_a_code_in_the_structure_of_a_date() -> None:
    assert REG.in_structure_of("lundby", date(2023, 5, 1)) == "hisingen"
    assert REG.in_structure_of("lundby", date(2015, 5, 1)) == "lundby"
    assert REG.in_structure_of("hisingen", date(2015, 5, 1)) is None  # no way back
    assert REG.in_structure_of("atlantis", date(2023, 5, 1)) is None


def test_the_data_file_says_what_it_is() -> None:
    doc = json.loads(DEFAULT_PATH.read_text(encoding="utf-8"))
    assert doc["version"] and all(
        doc["sources"][k] for k in ("districts", "units", "interventions")
    )


def _d(code: str, start: int, end: int | None, successor: str | None = None) -> District:
    return District(
        code=code,
        name=code.title(),
        valid_from=date(start, 1, 1),
        valid_to=None if end is None else date(end, 12, 31),
        kind="district-committee" if end else "social-services-area",
        successor=successor,
        successor_confirmed=False,
    )


def test_contradictory_data_is_refused() -> None:
    with pytest.raises(ReferenceDataError, match="listed twice"):
        DistrictRegistry([_d("a", 2011, None), _d("a", 2011, None)])
    with pytest.raises(ReferenceDataError, match="not a known district"):
        DistrictRegistry([_d("a", 2011, 2020, successor="b")])
    with pytest.raises(ReferenceDataError, match="ends before it starts"):
        DistrictRegistry([_d("a", 2011, 2009)])


def test_a_malformed_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "districts.json"
    path.write_text(json.dumps({"districts": [{"code": "a"}]}), encoding="utf-8")
    with pytest.raises(ReferenceDataError, match="malformed"):
        DistrictRegistry.load(path)


def test_a_district_brings_the_districts_it_replaced() -> None:
    registry = DistrictRegistry.load()
    hisingen = registry.with_predecessors(["hisingen"])
    assert {"hisingen", "lundby", "norra-hisingen", "vastra-hisingen"} <= hisingen
    assert "angered" not in hisingen and "angered" in registry.with_predecessors(["nordost"])
    assert registry.with_predecessors(["nosuch"]) == frozenset({"nosuch"})
