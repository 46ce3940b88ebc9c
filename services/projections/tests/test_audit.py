"""Tests of the equal-access audit statistics (fixed seeds, no timing)."""

from __future__ import annotations

import math
import random

import pytest

from services.projections.audit import (
    METRICS,
    AuditCell,
    PersonOutcome,
    audit,
    synthetic_rows,
)

DISTRICTS = ("nordost", "centrum", "sydvast", "hisingen")
# Fixed seed. With bias 0.6 planted in nordost, another district's rest of the city
# includes nordost and so looks worse, which pushes that district's ratio up (~1.1-1.2):
# over seeds 0..59 a second (favourable) flag appears in about 1 in 6. Seed 0 has none.
SEED = 0
PERSONS = 400


def _cell(cells: list[AuditCell], district: str, metric: str) -> AuditCell:
    (found,) = [c for c in cells if c.district == district and c.metric == metric]
    return found


def test_no_bias_flags_nothing() -> None:
    cells = audit(synthetic_rows(SEED, PERSONS, DISTRICTS))
    assert len(cells) == len(DISTRICTS) * len(METRICS)
    assert not any(c.suppressed for c in cells)
    assert [c for c in cells if c.flagged] == []
    for c in cells:
        assert c.adjusted_ratio is not None and c.ci_low is not None and c.ci_high is not None
        assert c.ci_low <= c.adjusted_ratio <= c.ci_high
        assert c.mh_ratio == pytest.approx(c.adjusted_ratio, rel=0.05)


def test_planted_disparity_is_the_only_flag() -> None:
    rows = synthetic_rows(SEED, PERSONS, DISTRICTS, {("nordost", "specialist_access"): 0.6})
    cells = audit(rows)
    flagged = [(c.district, c.metric) for c in cells if c.flagged]
    assert flagged == [("nordost", "specialist_access")]
    planted = _cell(cells, "nordost", "specialist_access")
    assert planted.adjusted_ratio is not None and planted.adjusted_ratio < 0.8
    assert planted.ci_high is not None and planted.ci_high < 1.0


def test_small_district_is_suppressed_without_numbers() -> None:
    rows = synthetic_rows(SEED, PERSONS, DISTRICTS[1:])
    rows += [
        PersonOutcome(f"tiny-{i}", "tiny", "HIGH", {"specialist_access": i % 2 == 0})
        for i in range(3)
    ]
    cell = _cell(audit(rows), "tiny", "specialist_access")
    assert cell.suppressed and not cell.flagged
    assert cell.persons is None and cell.rate is None and cell.city_rate is None
    assert cell.ratio is None and cell.adjusted_ratio is None
    assert cell.ci_low is None and cell.ci_high is None and cell.mh_ratio is None


def test_few_outcomes_are_suppressed() -> None:
    rows = synthetic_rows(SEED, PERSONS, DISTRICTS[1:])
    rows += [
        PersonOutcome(f"rare-{i}", "rare", "LOW", {"specialist_access": i < 3}) for i in range(50)
    ]
    cell = _cell(audit(rows), "rare", "specialist_access")
    assert cell.suppressed and cell.persons is None and cell.rate is None


def test_need_level_confounding_is_adjusted_away() -> None:
    mix = {"nordost": (0.05, 0.10, 0.85), "centrum": (0.45, 0.40, 0.15)}
    cells = audit(synthetic_rows(SEED, PERSONS, DISTRICTS, need_mix=mix))
    cell = _cell(cells, "nordost", "followup_completion")
    assert cell.ratio is not None and cell.ratio < 0.85  # crude comparison looks unequal
    assert cell.adjusted_ratio is not None
    assert 0.8 < cell.adjusted_ratio < 1.25
    assert abs(math.log(cell.adjusted_ratio)) < abs(math.log(cell.ratio)) / 2
    assert not cell.flagged


def test_order_of_rows_does_not_matter() -> None:
    rows = synthetic_rows(SEED, PERSONS, DISTRICTS, {("centrum", "timely_start"): 0.7})
    shuffled = list(rows)
    random.Random(7).shuffle(shuffled)
    assert audit(shuffled) == audit(rows)


def test_uncomputable_statistics_get_a_note() -> None:
    # the rest of the city never has the outcome: no ratio can be computed
    rows = [PersonOutcome(f"a-{i}", "a", "LOW", {"m": i % 2 == 0}) for i in range(20)]
    rows += [PersonOutcome(f"b-{i}", "b", "LOW", {"m": False}) for i in range(20)]
    cell = _cell(audit(rows), "a", "m")
    assert not cell.suppressed and cell.rate == 0.5 and cell.city_rate == 0.0
    assert cell.ratio is None and cell.adjusted_ratio is None and not cell.flagged
    assert cell.note


def test_single_district_city_has_no_comparison() -> None:
    rows = [PersonOutcome(f"a-{i}", "a", "LOW", {"m": i % 2 == 0}) for i in range(20)]
    (cell,) = audit(rows)
    assert cell.city_rate is None and cell.ratio is None and not cell.flagged
    assert cell.note
