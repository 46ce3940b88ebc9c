"""The audit's statistics (services/projections/stats.py) on hand-computed examples, and
the audit's false-flag rate and power on synthetic data (pure: no database, no Kafka)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from statsmodels.duration.survfunc import SurvfuncRight

from bench.bench_audit_flags import DISTRICTS, PLANTED, false_flags
from services.projections import stats
from services.projections.audit import PersonOutcome, audit, audit_report, synthetic_rows

AS_OF = datetime(2026, 6, 1, tzinfo=UTC)

# --- indirect standardisation ---------------------------------------------------------


def test_observed_and_expected_by_hand() -> None:
    # stratum x: a has (1, 1), b has (1, 0) -> city rate 3/4
    # stratum y: a has (1, 0), b has (0, 0) -> city rate 1/4
    # a: O = 3, E = 2 * 3/4 + 2 * 1/4 = 2, SR = 1.5
    # variance of O - E (hypergeometric, per stratum n_d * n_rest / (n - 1) * p (1 - p)):
    #   x: 2 * 2/3 * 3/4 * 1/4 = 0.25, y: the same -> 0.5; z = (3 - 2) / sqrt(0.5) = 1.414
    units = ["a"] * 4 + ["b"] * 4
    strata = ["x", "x", "y", "y"] * 2
    outcome = [True, True, True, False, True, False, False, False]
    out = stats.indirect_standardisation(units, strata, outcome)
    a, b = out["a"], out["b"]
    assert (a.observed, a.persons) == (3, 4)
    assert a.expected == pytest.approx(2.0) and a.ratio == pytest.approx(1.5)
    assert a.variance == pytest.approx(0.5) and a.z == pytest.approx(math.sqrt(2))
    assert b.observed == 1 and b.ratio == pytest.approx(0.5) and b.z == pytest.approx(-math.sqrt(2))
    # |z| < 1.96, so the score interval contains 1
    assert a.ci_low is not None and a.ci_high is not None and a.ci_low < 1 < a.ci_high


def test_garwood_exact_interval_matches_the_table() -> None:
    # exact Poisson 95 % limits for 3 observed: 0.619 and 8.767 (Garwood 1936, any table)
    low, high = stats.exact_poisson_interval(3)
    assert low == pytest.approx(0.6187, abs=1e-4) and high == pytest.approx(8.7673, abs=1e-4)
    assert stats.exact_poisson_interval(0)[0] == 0.0
    # O = 3, E = 2 -> the SR interval is the count's divided by E
    out = stats.indirect_standardisation(
        ["a"] * 4 + ["b"] * 4, ["x"] * 8, [True] * 3 + [False] * 5, method="exact"
    )
    assert out["a"].ci_low == pytest.approx(0.6187 / out["a"].expected, abs=1e-4)


def test_score_interval_excludes_one_exactly_when_z_is_beyond_the_critical_value() -> None:
    rows = synthetic_rows(3, 300, DISTRICTS, bias={("centrum", "timely_start"): 0.85})
    for metric in ("timely_start", "specialist_access"):
        eligible = [r for r in rows if r.outcomes[metric] is not None]
        out = stats.indirect_standardisation(
            [r.district for r in eligible],
            [(r.need_level, r.age_band, r.gender) for r in eligible],
            [bool(r.outcomes[metric]) for r in eligible],
        )
        for s in out.values():
            assert s.z is not None and s.ci_low is not None and s.ci_high is not None
            assert s.ci_low < (s.ratio or 0) < s.ci_high
            assert (s.ci_high < 1 or s.ci_low > 1) == (abs(s.z) > 1.959964)


# --- funnel ----------------------------------------------------------------------------


def test_binomial_limits_interpolate_and_narrow_with_size() -> None:
    # n = 100, p = 0.5: the exact 97.5 % point is r = 60 (F(60) = 0.9824, F(59) = 0.9716),
    # interpolated: 60 - (0.9824 - 0.975) / (0.9824 - 0.9716) = 59.32 -> 0.593
    assert stats.binomial_limit(0.5, 100, 0.975) == pytest.approx(0.5932, abs=1e-4)
    # the 2.5 % point: r = 40 (F(40) = 0.0284, F(39) = 0.0176): 40 - 0.315 = 39.68 -> 0.397
    # (the published interpolation spreads each count's mass over the unit below it, so the
    # pair is centred half a count below n p)
    assert stats.binomial_limit(0.5, 100, 0.025) == pytest.approx(0.3968, abs=1e-4)
    widths = [stats.binomial_limit(0.3, n, 0.999) - 0.3 for n in (20, 100, 500, 2000)]
    assert widths == sorted(widths, reverse=True) and widths[-1] > 0


def test_overdispersion_winsorises_the_extremes() -> None:
    # nine zeros and one 3: the 90th percentile is 0 + 0.1 * 3 = 0.3, so 3 becomes 0.3;
    # phi = 0.3^2 / 10 = 0.009
    phi, p = stats.overdispersion([0.0] * 9 + [3.0])
    assert phi == pytest.approx(0.009)
    assert p > 0.99
    spread = [(-1) ** i * 3.0 for i in range(12)]  # every z = +-3: phi = 9
    phi, p = stats.overdispersion(spread)
    assert phi == pytest.approx(9.0) and p < 1e-6


def _std(unit: str, persons: int, observed: int, rate: float) -> stats.Standardised:
    e = persons * rate
    v = persons * rate * (1 - rate)
    return stats.Standardised(
        unit, persons, observed, e, v, observed / e, None, None, (observed - e) / math.sqrt(v)
    )


def test_funnel_widens_its_limits_by_phi_only_with_enough_units() -> None:
    # twelve districts of 400 at +-3 standard errors around 0.5 (se = 0.025): phi = 9
    units = [_std(f"d{i}", 400, 200 + (30 if i % 2 else -30), 0.5) for i in range(12)]
    wide = stats.funnel(units, 0.5)
    assert wide.phi_applied and wide.phi == pytest.approx(9.0)
    # limits: 0.5 +- 1.96 * sqrt(9 * 0.25 / 400) = 0.5 +- 0.147
    point = wide.points[0]
    assert point.high_95 == pytest.approx(0.5 + 1.959964 * 0.075, abs=1e-6)
    assert point.position == "inside" and point.z_adjusted == pytest.approx(-1.0)
    plain = stats.funnel(units[:4], 0.5)  # four districts: phi estimated, not applied
    assert not plain.phi_applied and plain.note
    # 170 / 400 = 0.425: below the 95 % limit (~0.451) but above the 99.8 % one (~0.423)
    assert plain.points[0].rate == pytest.approx(0.425)
    assert plain.points[0].position == "low_95"
    curve = plain.curve
    assert len(curve.persons) == len(curve.low_95) == len(curve.high_998)
    assert all(lo <= hi for lo, hi in zip(curve.low_998, curve.low_95, strict=True))
    assert 400 in curve.persons


# --- Holm ------------------------------------------------------------------------------


def test_holm_on_four_p_values_by_hand() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04; times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04;
    # made monotone: 0.02, 0.03, 0.06, 0.06. At 5 % two are flagged; Benjamini-Hochberg
    # (0.02, 0.02, 0.04, 0.04) would flag all four.
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([None, 0.01]) == [None, 0.01]
    assert stats.holm([None]) == [None]


# --- Kaplan-Meier ----------------------------------------------------------------------


def test_kaplan_meier_on_six_persons_by_hand() -> None:
    # days 2, 3, 3+, 5, 7+, 8 (+ = still waiting):
    #   t=2: 6 at risk, 1 ends -> S = 5/6
    #   t=3: 5 at risk, 1 ends (the one censored at 3 is still at risk) -> 5/6 * 4/5 = 2/3
    #   t=5: 3 at risk -> 2/3 * 2/3 = 4/9;  t=8: 1 at risk -> 0
    # median: first S <= 0.5 -> 5 days; 90th percentile: first S <= 0.1 -> 8 days
    km = stats.kaplan_meier([2, 3, 3, 5, 7, 8], [True, True, False, True, False, True])
    assert km.times == (2, 3, 5, 8)
    assert km.survival == pytest.approx((5 / 6, 2 / 3, 4 / 9, 0.0))
    assert km.quantile(0.5) == 5 and km.quantile(0.9) == 8
    assert (km.persons, km.events) == (6, 4)
    nobody = stats.kaplan_meier([4, 9], [False, False])
    assert nobody.quantile(0.5) is None and nobody.events == 0


def _waits(
    days: list[float | None],
    district: str,
    need: str = "LOW",
    started: float = 0,
) -> list[stats.WaitRow]:
    """Waits that started `started` days before AS_OF (None: still waiting)."""
    start = AS_OF - timedelta(days=started)
    return [
        stats.WaitRow(start, None if d is None else start + timedelta(days=d), district, need)
        for d in days
    ]


def test_censoring_median_is_kaplan_meier_not_the_mean_of_those_seen() -> None:
    # 8 persons; 4 were seen after 10, 20, 30, 40 days; 4 still wait, for 25, 35, 45, 60 days
    #   t=10: 8 at risk -> 7/8;  t=20: 7 -> 7/8 * 6/7 = 3/4;  25 censored
    #   t=30: 5 at risk -> 3/4 * 4/5 = 3/5;  35 censored;  t=40: 3 at risk -> 3/5 * 2/3 = 2/5
    # KM median = 40 days. The mean of those seen is 25 days (and their median 25);
    # counting those waiting as zero would give a median of 5.
    rows = _waits([10, 20, 30, 40], "a", started=100)
    for waited in (25, 35, 45, 60):
        rows += _waits([None], "a", started=waited)
    report = stats.wait_report({"intake_to_first_visit": rows}, as_of=AS_OF, min_cell=1)
    (city, district) = report.summaries
    assert city.district == stats.CITY and district.district == "a"
    assert district.persons == 8 and district.events == 4 and district.censored == 4
    assert district.median_days == pytest.approx(40)
    seen_mean = (10 + 20 + 30 + 40) / 4
    assert district.median_days != pytest.approx(seen_mean)
    assert district.p90_days is None  # S never falls to 0.1: too many still waiting
    assert district.curve[-1] == pytest.approx((40.0, 0.4))


def test_waits_censored_when_observation_stops_and_ended_after_as_of_is_still_waiting() -> None:
    start = AS_OF - timedelta(days=50)
    rows = [
        stats.WaitRow(start, AS_OF + timedelta(days=3), "a", "LOW"),  # ends after as-of
        stats.WaitRow(start, None, "a", "LOW", censored_at=start + timedelta(days=5)),
        stats.WaitRow(start, start + timedelta(days=10), "a", "LOW"),
        stats.WaitRow(AS_OF + timedelta(days=1), None, "a", "LOW"),  # not yet started
    ]
    report = stats.wait_report({"w": rows}, as_of=AS_OF, min_cell=1)
    city = report.summaries[0]
    # 3 counted: 50+ (censored at as-of), 5+ (censored at closing), 10 (ended)
    # t=10: 2 at risk (the 5+ left before) -> S = 1/2: median 10
    assert (city.persons, city.events, city.censored) == (3, 1, 2)
    assert city.median_days == pytest.approx(10)


def test_slow_district_is_found_after_need_adjustment() -> None:
    rows: list[stats.WaitRow] = []
    for district, scale in (("slow", 3.0), ("b", 1.0), ("c", 1.0), ("d", 1.0)):
        for need, base in (("LOW", 10.0), ("HIGH", 30.0)):
            days = [base * scale * (i + 0.5) / 20 for i in range(40)]
            rows += _waits(days[:35] + [None] * 5, district, need, started=300)
    report = stats.wait_report({"w": rows}, as_of=AS_OF)
    by = {s.district: s for s in report.summaries}
    assert report.comparisons == 4
    slow = by["slow"]
    assert slow.hazard_ratio is not None and slow.hazard_ratio < 0.6
    assert slow.hr_high is not None and slow.hr_high < 1
    assert slow.flagged and slow.p_holm is not None and slow.p_holm < 0.001
    assert slow.median_days is not None and by["b"].median_days is not None
    assert slow.median_days > 2 * by["b"].median_days


def test_small_districts_wait_is_suppressed() -> None:
    rows = _waits([1, 2, 3, 4, 5, 6], "big", started=30) + _waits([1, 2], "tiny", started=30)
    by = {s.district: s for s in stats.wait_report({"w": rows}, as_of=AS_OF).summaries}
    tiny = by["tiny"]
    assert tiny.suppressed and tiny.persons is None and tiny.median_days is None
    assert tiny.curve == () and not tiny.flagged


def test_kaplan_meier_agrees_with_statsmodels_on_a_larger_sample() -> None:
    days = [float((i * 37) % 50 + 1) for i in range(60)]
    ended = [i % 3 != 0 for i in range(60)]
    km = stats.kaplan_meier(days, ended)
    sf = SurvfuncRight(days, [float(e) for e in ended])
    assert km.survival == pytest.approx(tuple(sf.surv_prob))


# --- the audit: false flags and power --------------------------------------------------


def test_no_disparity_across_50_seeds_flags_at_most_5_percent() -> None:
    rates = false_flags(range(50))
    print(
        f"\nno disparity: {rates.holm_any} of {rates.seeds} seeds ({rates.holm_share:.1%})"
        f" with any Holm flag over {rates.comparisons} comparisons;"
        f" band rule {rates.band_any}"
    )
    assert rates.comparisons == len(DISTRICTS) * 5
    assert rates.holm_share <= 0.05


def test_planted_disparity_is_found_by_sr_funnel_and_holm() -> None:
    report = audit_report(synthetic_rows(0, 400, DISTRICTS, bias={PLANTED: 0.6}))
    (cell,) = [c for c in report.cells if (c.district, c.metric) == PLANTED]
    assert cell.sr is not None and cell.sr_high is not None and cell.sr_high < 1
    assert cell.funnel_position == "low_99.8"
    assert cell.holm_flagged and cell.flagged and cell.p_holm is not None
    assert cell.comparisons == report.comparisons == 20
    # no other district is flagged as getting less
    lower = [(c.district, c.metric) for c in report.cells if c.holm_flagged and (c.sr or 1) < 1]
    assert lower == [PLANTED]
    fun = report.funnels[PLANTED[1]]
    assert [p.unit for p in fun.points] == sorted(DISTRICTS)
    assert cell.expected is not None and cell.persons is not None
    assert fun.target == pytest.approx(cell.expected / cell.persons, rel=0.2)
    assert fun.points[[p.unit for p in fun.points].index(PLANTED[0])].rate == cell.funnel_rate


def test_planted_disparity_in_ten_districts_survives_the_overdispersion_factor() -> None:
    districts = tuple(f"d{i:02d}" for i in range(10))
    rows = synthetic_rows(1, 300, districts, bias={("d03", "timely_start"): 0.6})
    report = audit_report(rows)
    (cell,) = [c for c in report.cells if (c.district, c.metric) == ("d03", "timely_start")]
    assert cell.holm_flagged and cell.funnel_position == "low_99.8"
    assert cell.sr_high is not None and cell.sr_high < 1


def test_flag_rule_band_keeps_the_old_flag_and_holm_fields_are_there_either_way() -> None:
    rows = synthetic_rows(0, 400, DISTRICTS, bias={PLANTED: 0.5})
    band = audit(rows)
    holm = audit(rows, flag_rule="holm")
    assert [c.flagged for c in band] == [c.band_flagged for c in band]
    assert [c.flagged for c in holm] == [c.holm_flagged for c in holm]
    assert [c.p_holm for c in band] == [c.p_holm for c in holm]
    with pytest.raises(ValueError, match="flag_rule"):
        audit(rows, flag_rule="bonferroni")  # type: ignore[arg-type]


def test_strata_include_age_band_and_gender() -> None:
    # the outcome depends only on gender, which the need-only model cannot see: the SR's
    # expected count (strata include gender) matches the observed one
    rows = []
    for i in range(200):
        district = "a" if i < 100 else "b"
        woman = (i < 80) or (100 <= i < 120)  # a: 80 % women, b: 20 %
        outcome = (i % 10 < 8) if woman else (i % 10 < 2)
        rows.append(
            PersonOutcome(
                f"p{i}", district, "LOW", {"m": outcome}, gender="WOMAN" if woman else "MAN"
            )
        )
    cells = {c.district: c for c in audit(rows)}
    assert cells["a"].ratio is not None and cells["a"].ratio > 2  # crude: very unequal
    assert cells["a"].sr == pytest.approx(1.0)
    assert not cells["a"].holm_flagged
