"""District reference data: validity dates across the 2021 reorganisation, successors."""

from __future__ import annotations

from datetime import date

from likvard.districts import DistrictRegistry

REG = DistrictRegistry.load()


def test_ten_committees_until_2020_and_four_areas_from_2021() -> None:
    assert len(REG.current(date(2020, 12, 31))) == 10
    assert sorted(d.code for d in REG.current(date(2021, 1, 1))) == [
        "centrum",
        "hisingen",
        "nordost",
        "sydvast",
    ]
    assert REG.current(date(2010, 12, 31)) == []


def test_validity_is_inclusive_and_unknown_codes_are_invalid() -> None:
    assert REG.valid_on("lundby", date(2020, 12, 31))
    assert not REG.valid_on("lundby", date(2021, 1, 1))
    assert REG.valid_on("hisingen", date(2040, 1, 1))
    assert not REG.valid_on("atlantis", date(2021, 1, 1))
    assert not REG.is_known("atlantis") and REG.get("atlantis") is None


def test_successors_map_the_old_structure_to_the_new() -> None:
    for old in ("lundby", "norra-hisingen", "vastra-hisingen"):
        assert REG.successor_of(old) == "hisingen"
        district = REG.get(old)
        assert district is not None and district.successor_confirmed
    assert REG.successor_of("angered") == "nordost"
    angered = REG.get("angered")
    assert angered is not None and not angered.successor_confirmed
    assert REG.successor_of("centrum") == "centrum"
    assert REG.successor_of("atlantis") == "atlantis"
    # Every successor is itself a known district in the new structure.
    for d in REG.current(date(2020, 6, 1)):
        assert d.successor is not None
        assert REG.valid_on(d.successor, date(2021, 1, 1))


def test_names_keep_swedish_letters() -> None:
    district = REG.get("orgryte-harlanda")
    assert district is not None and district.name == "Örgryte-Härlanda"
