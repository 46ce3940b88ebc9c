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
* ``flagged``: the interval excludes 1 *and* the adjusted ratio is outside
  ``ratio_band`` (0.8-1.25 by default);
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
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from statsmodels.genmod.families import Poisson
from statsmodels.genmod.generalized_linear_model import GLM
from statsmodels.stats.contingency_tables import StratifiedTable
from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

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
    eligible for that metric.
    """

    person: str
    district: str
    need_level: str
    outcomes: Mapping[str, bool | None] = field(default_factory=dict)


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


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _canonical(rows: Sequence[PersonOutcome]) -> list[PersonOutcome]:
    return sorted(rows, key=lambda r: (r.person, r.district, r.need_level))


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
    )


def audit(
    rows: Sequence[PersonOutcome],
    *,
    min_cell: int = 5,
    alpha: float = 0.05,
    ratio_band: tuple[float, float] = (0.8, 1.25),
) -> list[AuditCell]:
    """Audit every (district, metric) pair found in ``rows``; sorted by district, metric."""
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
    for metric in metrics:
        eligible: list[tuple[str, str, bool]] = []
        for r in ordered:
            value = r.outcomes.get(metric)
            if value is not None:
                eligible.append((r.district, r.need_level, bool(value)))
        for district in districts:
            cells.append(
                _cell(
                    district,
                    metric,
                    eligible,
                    min_cell=min_cell,
                    alpha=alpha,
                    ratio_band=ratio_band,
                )
            )
    cells.sort(key=lambda c: (c.district, c.metric))
    return cells


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
    (clipped to [0, 1]).
    """
    bias = bias or {}
    rng = np.random.default_rng(seed)
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
                )
            )
    return rows
