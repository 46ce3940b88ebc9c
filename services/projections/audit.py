"""Equal-access audit: the pure statistics (no database, no Kafka).

For persons with the same assessed need level, each district is compared with the
rest of the city on binary access metrics (specialist access, timely start,
guideline adherence, family engagement, follow-up completion; any metric name
found in the input is audited).

Per (district, metric) cell the audit reports:

* ``rate``: the district's crude rate among eligible persons;
* ``city_rate``: the crude rate in the rest of the city (all other districts);
* ``ratio``: the crude risk ratio ``rate / city_rate``;
* ``adjusted_ratio`` with ``ci_low``/``ci_high``: the need-adjusted risk ratio
  district vs rest of city and its confidence interval (``1 - alpha``);
* ``mh_ratio``: the Mantel-Haenszel pooled risk ratio over need-level strata, as a
  cross-check of ``adjusted_ratio``;
* ``observed``/``expected``, ``sr`` with ``sr_low``/``sr_high``: indirect
  standardisation against the whole city's rates within strata of need level, age band
  and gender (``stats.indirect_standardisation``, score interval);
* ``funnel_*``: the district on the metric's funnel plot (standardised rate, its 95 %
  and 99.8 % limits at its size, its position), the funnel itself in ``AuditReport``;
* ``p_value``/``p_holm``: the standardised comparison's two-sided p (over-dispersion
  allowed for when the funnel applies it) and its Holm adjustment over all
  ``comparisons`` district x metric tests;
* ``band_flagged``: the interval of ``adjusted_ratio`` excludes 1 *and* the ratio is
  outside ``ratio_band`` (0.8-1.25 by default); ``holm_flagged``: ``p_holm < alpha``;
* ``flagged``: the chosen rule's flag (``flag_rule="holm"``, the default, or ``"band"``);
* ``suppressed``: too few persons to publish anything.

Statistical method
------------------
The installed statsmodels ``StratifiedTable`` gives the Mantel-Haenszel pooled
risk ratio (``riskratio_pooled``) but no standard error or confidence interval
for it (it has those only for the pooled odds ratio), and the odds ratio is a poor
stand-in for a risk ratio when outcomes are common, as they are here. Rather than
hand-writing the Greenland-Robins variance, the need-adjusted risk ratio and its
interval come from a *modified Poisson regression* (Zou 2004): a statsmodels
``GLM`` with Poisson family and log link of the outcome on an in-district
indicator plus need-level fixed effects, with a heteroskedasticity-robust
(sandwich, HC0) covariance. ``exp(coefficient)`` is the risk ratio common to all
need levels, i.e. the same estimand as Mantel-Haenszel under homogeneity, and
the two estimates agree closely; the MH figure is reported alongside
(``mh_ratio``) from ``StratifiedTable.riskratio_pooled``. Point estimate and
interval thus come from one model, so the flag is coherent.

Strata without information on the comparison (need levels where the district or
the rest of the city has nobody eligible, or where nobody has the outcome) are
dropped before fitting. Nothing ever divides by zero: a statistic that cannot be
computed is ``None`` and the cell carries a ``note``.

Disclosure control: a cell is suppressed when the district has fewer than
``min_cell`` eligible persons, or fewer than ``min_cell`` persons with the
outcome or without it; a suppressed cell shows no numbers at all (not even the
person count or the rest-of-city rate) and is never flagged.

Results do not depend on the order of the input rows (rows are put in a
canonical order before any arithmetic).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Literal

import numpy as np
import numpy.typing as npt
from statsmodels.genmod.families import Poisson
from statsmodels.genmod.generalized_linear_model import GLM
from statsmodels.stats.contingency_tables import StratifiedTable
from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

from services.projections import stats

NEED_LEVELS: tuple[str, ...] = ("LOW", "MODERATE", "HIGH")
METRICS: tuple[str, ...] = (
    "specialist_access",
    "timely_start",
    "guideline_adherence",
    "family_engagement",
    "followup_completion",
)


@dataclass(frozen=True)
class PersonOutcome:
    """One person (counted once city-wide by the caller) and their outcomes.

    ``outcomes`` maps a metric name to True/False, or None when the person is not
    eligible for that metric. ``intake_day`` is the local date (city time zone) of the
    intake of the case the row is of, for selecting a period (None: not known).
    """

    person: str
    district: str
    need_level: str
    outcomes: Mapping[str, bool | None] = field(default_factory=dict)
    age_band: str = "UNKNOWN"
    gender: str = "NOT_STATED"
    intake_day: date | None = None


def select(
    rows: Sequence[PersonOutcome],
    *,
    start: date | None = None,
    end: date | None = None,
    need_level: str | None = None,
    gender: str | None = None,
    age_band: str | None = None,
) -> list[PersonOutcome]:
    """The persons the audit is asked about: intake within [start, end] (both included;
    a row with no intake day is left out once a bound is given), and the need level,
    gender and age band asked for (None: any). The audit of a selection compares its
    districts within it, so a filter narrows who is compared, never how."""
    if start is not None and end is not None and end < start:
        raise ValueError("end is before start")
    return [
        r
        for r in rows
        if (start is None or (r.intake_day is not None and r.intake_day >= start))
        and (end is None or (r.intake_day is not None and r.intake_day <= end))
        and (need_level is None or r.need_level == need_level)
        and (gender is None or r.gender == gender)
        and (age_band is None or r.age_band == age_band)
    ]


FlagRule = Literal["holm", "band"]


@dataclass(frozen=True)
class AuditCell:
    """The audit result for one district and one metric."""

    district: str
    metric: str
    persons: int | None
    rate: float | None
    city_rate: float | None
    ratio: float | None
    adjusted_ratio: float | None
    ci_low: float | None
    ci_high: float | None
    mh_ratio: float | None
    flagged: bool
    suppressed: bool
    note: str | None = None
    observed: int | None = None
    expected: float | None = None
    sr: float | None = None
    sr_low: float | None = None
    sr_high: float | None = None
    funnel_rate: float | None = None
    funnel_low_95: float | None = None
    funnel_high_95: float | None = None
    funnel_low_998: float | None = None
    funnel_high_998: float | None = None
    funnel_position: str | None = None
    p_value: float | None = None
    p_holm: float | None = None
    band_flagged: bool = False
    holm_flagged: bool = False
    comparisons: int | None = None


@dataclass(frozen=True)
class AuditReport:
    """The cells, each metric's funnel (points of the unsuppressed districts only) and the
    number of comparisons Holm controlled over."""

    cells: list[AuditCell]
    funnels: dict[str, stats.Funnel]
    comparisons: int
    flag_rule: FlagRule
    alpha: float


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _canonical(rows: Sequence[PersonOutcome]) -> list[PersonOutcome]:
    return sorted(rows, key=lambda r: (r.person, r.district, r.need_level, r.age_band, r.gender))


@dataclass(frozen=True)
class _Adjusted:
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    mh_ratio: float | None
    note: str | None


def _adjusted(
    in_district: npt.NDArray[np.bool_],
    outcome: npt.NDArray[np.bool_],
    strata: Sequence[str],
    alpha: float,
) -> _Adjusted:
    """Need-adjusted risk ratio (district vs rest) over informative strata."""
    strata_arr = np.asarray(strata)
    kept: list[str] = []
    tables: list[list[list[int]]] = []
    for level in sorted(set(strata)):
        s = strata_arr == level
        n1 = int(np.sum(s & in_district))
        n0 = int(np.sum(s & ~in_district))
        a = int(np.sum(s & in_district & outcome))
        c = int(np.sum(s & ~in_district & outcome))
        if n1 == 0 or n0 == 0 or a + c == 0:
            continue  # no information on the comparison in this stratum
        kept.append(level)
        tables.append([[a, n1 - a], [c, n0 - c]])
    if not kept:
        return _Adjusted(None, None, None, None, "no need-level stratum with information")

    mask = np.isin(strata_arr, kept)
    y = outcome[mask].astype(float)
    x_district = in_district[mask]
    if not y[x_district].any() or not y[~x_district].any():
        return _Adjusted(
            None, None, None, None, "no outcome in district or rest of city within strata"
        )

    mh_ratio = _finite(float(StratifiedTable(tables).riskratio_pooled))

    s_kept = strata_arr[mask]
    columns = [np.ones(len(y)), x_district.astype(float)]
    columns += [(s_kept == level).astype(float) for level in kept[1:]]
    design = np.column_stack(columns)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            warnings.simplefilter("error", PerfectSeparationWarning)
            result = GLM(y, design, family=Poisson()).fit(cov_type="HC0")
        beta = float(result.params[1])
        low, high = (float(v) for v in result.conf_int(alpha=alpha)[1])
    except Exception as exc:  # convergence or separation problems: report, don't crash
        return _Adjusted(None, None, None, mh_ratio, f"model could not be fitted: {exc}")
    ratio, ci_low, ci_high = (_finite(math.exp(v)) for v in (beta, low, high))
    if ratio is None or ci_low is None or ci_high is None:
        return _Adjusted(None, None, None, mh_ratio, "adjusted ratio is not finite")
    return _Adjusted(ratio, ci_low, ci_high, mh_ratio, None)


def _suppressed(district: str, metric: str, note: str) -> AuditCell:
    return AuditCell(
        district=district,
        metric=metric,
        persons=None,
        rate=None,
        city_rate=None,
        ratio=None,
        adjusted_ratio=None,
        ci_low=None,
        ci_high=None,
        mh_ratio=None,
        flagged=False,
        suppressed=True,
        note=note,
    )


def _cell(
    district: str,
    metric: str,
    eligible: Sequence[tuple[str, str, bool]],
    *,
    min_cell: int,
    alpha: float,
    ratio_band: tuple[float, float],
) -> AuditCell:
    in_district = np.array([d == district for d, _, _ in eligible], dtype=bool)
    outcome = np.array([o for _, _, o in eligible], dtype=bool)
    strata = [s for _, s, _ in eligible]

    n1 = int(in_district.sum())
    events1 = int((in_district & outcome).sum())
    if n1 < min_cell or events1 < min_cell or n1 - events1 < min_cell:
        return _suppressed(district, metric, f"suppressed: counts under {min_cell}")

    rate = events1 / n1
    n0 = int((~in_district).sum())
    events0 = int((~in_district & outcome).sum())
    notes: list[str] = []
    city_rate: float | None = None
    ratio: float | None = None
    if n0 == 0:
        notes.append("no eligible persons in the rest of the city")
    else:
        city_rate = events0 / n0
        if city_rate == 0:
            notes.append("rest-of-city rate is zero: crude ratio undefined")
        else:
            ratio = rate / city_rate

    adj = (
        _adjusted(in_district, outcome, strata, alpha)
        if n0 > 0
        else _Adjusted(None, None, None, None, None)
    )
    if adj.note:
        notes.append(adj.note)

    flagged = False
    if adj.ratio is not None and adj.ci_low is not None and adj.ci_high is not None:
        excludes_one = adj.ci_high < 1.0 or adj.ci_low > 1.0
        outside_band = adj.ratio < ratio_band[0] or adj.ratio > ratio_band[1]
        flagged = excludes_one and outside_band

    return AuditCell(
        district=district,
        metric=metric,
        persons=n1,
        rate=rate,
        city_rate=city_rate,
        ratio=ratio,
        adjusted_ratio=adj.ratio,
        ci_low=adj.ci_low,
        ci_high=adj.ci_high,
        mh_ratio=adj.mh_ratio,
        flagged=flagged,
        suppressed=False,
        note="; ".join(notes) or None,
        band_flagged=flagged,
    )


def audit(
    rows: Sequence[PersonOutcome],
    *,
    min_cell: int = 5,
    alpha: float = 0.05,
    ratio_band: tuple[float, float] = (0.8, 1.25),
    flag_rule: FlagRule = "band",
) -> list[AuditCell]:
    """Audit every (district, metric) pair found in ``rows``; sorted by district, metric.

    The compatibility entry point: ``flagged`` follows the band rule unless
    ``flag_rule="holm"``; ``audit_report`` (Holm by default) also gives the funnels."""
    return audit_report(
        rows, min_cell=min_cell, alpha=alpha, ratio_band=ratio_band, flag_rule=flag_rule
    ).cells


def audit_report(
    rows: Sequence[PersonOutcome],
    *,
    min_cell: int = 5,
    alpha: float = 0.05,
    ratio_band: tuple[float, float] = (0.8, 1.25),
    flag_rule: FlagRule = "holm",
    min_units_for_phi: int = 10,
) -> AuditReport:
    """The audit with its funnels: every (district, metric) cell, the standardised ratio
    and funnel position of each unsuppressed one, and flags by ``flag_rule``."""
    if flag_rule not in ("holm", "band"):
        raise ValueError(f"flag_rule must be 'holm' or 'band', not {flag_rule!r}")
    if min_cell < 1:
        raise ValueError("min_cell must be at least 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be between 0 and 1")
    if not 0 < ratio_band[0] <= 1 <= ratio_band[1]:
        raise ValueError("ratio_band must be (low, high) with 0 < low <= 1 <= high")

    ordered = _canonical(rows)
    districts = sorted({r.district for r in ordered})
    metrics = sorted({m for r in ordered for m in r.outcomes})
    cells: list[AuditCell] = []
    funnels: dict[str, stats.Funnel] = {}
    for metric in metrics:
        eligible: list[tuple[str, str, bool]] = []
        strata: list[tuple[str, str, str]] = []
        for r in ordered:
            value = r.outcomes.get(metric)
            if value is not None:
                eligible.append((r.district, r.need_level, bool(value)))
                strata.append((r.need_level, r.age_band, r.gender))
        metric_cells = [
            _cell(
                district,
                metric,
                eligible,
                min_cell=min_cell,
                alpha=alpha,
                ratio_band=ratio_band,
            )
            for district in districts
        ]
        if not eligible:
            cells += metric_cells
            continue
        sr = stats.indirect_standardisation(
            [d for d, _, _ in eligible], strata, [o for _, _, o in eligible], alpha=alpha
        )
        target = sum(1 for _, _, o in eligible if o) / len(eligible)
        shown = [sr[c.district] for c in metric_cells if not c.suppressed]
        fun = stats.funnel(shown, target, min_units_for_phi=min_units_for_phi)
        funnels[metric] = fun
        points = {p.unit: p for p in fun.points}
        for c in metric_cells:
            point = points.get(c.district)
            if c.suppressed or point is None:
                cells.append(c)
                continue
            s = sr[c.district]
            cells.append(
                replace(
                    c,
                    observed=s.observed,
                    expected=s.expected,
                    sr=s.ratio,
                    sr_low=s.ci_low,
                    sr_high=s.ci_high,
                    funnel_rate=point.rate,
                    funnel_low_95=point.low_95,
                    funnel_high_95=point.high_95,
                    funnel_low_998=point.low_998,
                    funnel_high_998=point.high_998,
                    funnel_position=point.position,
                    p_value=stats.two_sided_p(point.z_adjusted),
                )
            )
    adjusted = stats.holm([c.p_value for c in cells])
    comparisons = sum(1 for q in adjusted if q is not None)
    final: list[AuditCell] = []
    for c, q in zip(cells, adjusted, strict=True):
        holm_flag = q is not None and q < alpha
        final.append(
            replace(
                c,
                p_holm=q,
                holm_flagged=holm_flag,
                flagged=holm_flag if flag_rule == "holm" else c.band_flagged,
                comparisons=None if c.suppressed else comparisons,
            )
        )
    final.sort(key=lambda c: (c.district, c.metric))
    return AuditReport(final, funnels, comparisons, flag_rule, alpha)


# --- synthetic data -------------------------------------------------------------------

# Probability of each outcome by need level. Higher need means more specialist
# access but a harder time completing guideline care and follow-up.
BASE_RATES: Mapping[str, Mapping[str, float]] = {
    "specialist_access": {"LOW": 0.40, "MODERATE": 0.55, "HIGH": 0.70},
    "timely_start": {"LOW": 0.75, "MODERATE": 0.65, "HIGH": 0.55},
    "guideline_adherence": {"LOW": 0.70, "MODERATE": 0.60, "HIGH": 0.50},
    "family_engagement": {"LOW": 0.45, "MODERATE": 0.55, "HIGH": 0.65},
    "followup_completion": {"LOW": 0.80, "MODERATE": 0.65, "HIGH": 0.40},
}
# Probability that a person is eligible for the metric (else the outcome is None).
ELIGIBILITY: Mapping[str, float] = {
    "specialist_access": 1.0,
    "timely_start": 0.85,
    "guideline_adherence": 0.9,
    "family_engagement": 0.7,
    "followup_completion": 0.8,
}
SYNTHETIC_AGE_BANDS: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
GENDERS: tuple[str, ...] = ("WOMAN", "MAN", "OTHER", "NOT_STATED")
GENDER_MIX: tuple[float, ...] = (0.32, 0.63, 0.01, 0.04)
# Need-level mixes (LOW, MODERATE, HIGH), cycled over the districts in order.
DEFAULT_NEED_MIXES: tuple[tuple[float, float, float], ...] = (
    (0.15, 0.35, 0.50),
    (0.40, 0.40, 0.20),
    (0.30, 0.40, 0.30),
    (0.25, 0.45, 0.30),
)


def synthetic_rows(
    seed: int,
    persons_per_district: int,
    districts: Sequence[str],
    bias: Mapping[tuple[str, str], float] | None = None,
    *,
    need_mix: Mapping[str, tuple[float, float, float]] | None = None,
) -> list[PersonOutcome]:
    """Reproducible synthetic persons for tests and demos.

    Need-level mix differs by district (``need_mix`` overrides the default cycle
    ``DEFAULT_NEED_MIXES``), outcome rates depend on need level (``BASE_RATES``),
    and ``bias[(district, metric)]`` multiplies that district's rate for that metric
    (clipped to [0, 1]). Age band and gender are drawn independently of the outcomes.
    """
    bias = bias or {}
    rng = np.random.default_rng(seed)
    # age band and gender from their own stream, so the outcomes of a seed stay as they were
    demo = np.random.default_rng([seed, 1])
    rows: list[PersonOutcome] = []
    for i, district in enumerate(districts):
        mix = (need_mix or {}).get(district, DEFAULT_NEED_MIXES[i % len(DEFAULT_NEED_MIXES)])
        p = np.asarray(mix, dtype=float)
        levels = rng.choice(len(NEED_LEVELS), size=persons_per_district, p=p / p.sum())
        for j in range(persons_per_district):
            need = NEED_LEVELS[int(levels[j])]
            outcomes: dict[str, bool | None] = {}
            for metric in METRICS:
                factor = bias.get((district, metric), 1.0)
                rate = min(1.0, max(0.0, BASE_RATES[metric][need] * factor))
                eligible = rng.random() < ELIGIBILITY[metric]
                hit = bool(rng.random() < rate)
                outcomes[metric] = hit if eligible else None
            rows.append(
                PersonOutcome(
                    person=f"{district}-{j:05d}",
                    district=district,
                    need_level=need,
                    outcomes=outcomes,
                    age_band=SYNTHETIC_AGE_BANDS[int(demo.choice(len(SYNTHETIC_AGE_BANDS)))],
                    gender=GENDERS[int(demo.choice(len(GENDERS), p=GENDER_MIX))],
                )
            )
    return rows
