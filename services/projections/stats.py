"""Statistics of the equal-access audit beyond a district-vs-rest ratio (pure: no I/O).

* Indirect standardisation: a district's observed count against the count expected if
  its persons had the city-wide rate of their stratum (need level x age band x gender),
  the standardised ratio O/E with a score interval (or an exact Poisson interval).
* Funnel plots (Spiegelhalter 2005): each district's standardised rate against its number
  of eligible persons, 95 % and 99.8 % limits around the city rate, with a multiplicative
  over-dispersion factor from winsorised z-scores.
* Multiplicity control by Holm across every comparison made.
* Waiting times as time-to-event: Kaplan-Meier medians and 90th percentiles with persons
  still waiting censored, and a need-adjusted comparison (log-rank stratified by need
  level, Cox model stratified by need level) of each district with the rest of the city.

The methods and their references are in ``services/projections/README.md`` ("Methods").
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import stats as sps
from statsmodels.duration.hazard_regression import PHReg
from statsmodels.duration.survfunc import SurvfuncRight, survdiff
from statsmodels.stats.multitest import multipletests

__all__ = [
    "CITY",
    "Funnel",
    "FunnelCurve",
    "FunnelPoint",
    "KaplanMeier",
    "Standardised",
    "WaitReport",
    "WaitRow",
    "WaitSummary",
    "binomial_limit",
    "exact_poisson_interval",
    "funnel",
    "holm",
    "indirect_standardisation",
    "kaplan_meier",
    "overdispersion",
    "two_sided_p",
    "wait_report",
]

CITY = "city"
LEVELS = {"95": 0.975, "99.8": 0.999}  # the funnel's two limits as one-sided probabilities

# --- indirect standardisation ------------------------------------------------------------


@dataclass(frozen=True)
class Standardised:
    """One unit's observed and expected counts and its standardised ratio O/E.

    ``variance`` is the variance of O - E under the null that the unit's persons have the
    city-wide rates of their strata, with the unit itself part of the city (the
    Cochran-Mantel-Haenszel hypergeometric variance); ``z`` is (O - E) / sqrt(variance).
    """

    unit: str
    persons: int
    observed: int
    expected: float
    variance: float
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    z: float | None


def exact_poisson_interval(observed: int, alpha: float = 0.05) -> tuple[float, float]:
    """Garwood's exact (central) interval for a Poisson mean given one observed count."""
    low = 0.0 if observed == 0 else float(sps.chi2.ppf(alpha / 2, 2 * observed)) / 2
    high = float(sps.chi2.ppf(1 - alpha / 2, 2 * observed + 2)) / 2
    return low, high


def _score_interval(
    observed: int, expected: float, e_w: float, q_w: float, alpha: float
) -> tuple[float | None, float | None]:
    """Score interval for theta in P(outcome) = theta * p_i: the roots of
    (O - theta E)^2 = z^2 (theta E_w - theta^2 Q_w), a quadratic (Wilson's interval when
    every p_i is equal and the reference is external)."""
    z2 = float(sps.norm.ppf(1 - alpha / 2)) ** 2
    a = expected**2 + z2 * q_w
    b = 2 * observed * expected + z2 * e_w
    c = float(observed) ** 2
    disc = b * b - 4 * a * c
    if a <= 0 or disc < 0:
        return None, None
    root = math.sqrt(disc)
    return max(0.0, (b - root) / (2 * a)), (b + root) / (2 * a)


def indirect_standardisation(
    units: Sequence[str],
    strata: Sequence[Hashable],
    outcome: Sequence[bool],
    *,
    alpha: float = 0.05,
    method: Literal["score", "exact"] = "score",
) -> dict[str, Standardised]:
    """Observed vs expected per unit, expected from the pooled (city-wide) rate of each
    stratum. ``method="score"`` (default) gives the score interval with the hypergeometric
    variance, so it excludes 1 exactly when |z| > z_(1-alpha/2); ``"exact"`` gives Garwood's
    exact Poisson interval for O divided by E, which is conservative for common outcomes
    (a binary count varies less than a Poisson one)."""
    if not len(units) == len(strata) == len(outcome):
        raise ValueError("units, strata and outcome must have the same length")
    n_s: Counter[Hashable] = Counter(strata)
    o_s: Counter[Hashable] = Counter(s for s, o in zip(strata, outcome, strict=True) if o)
    by_unit: dict[str, Counter[Hashable]] = defaultdict(Counter)
    observed: Counter[str] = Counter()
    for u, s, o in zip(units, strata, outcome, strict=True):
        by_unit[u][s] += 1
        observed[u] += 1 if o else 0
    out: dict[str, Standardised] = {}
    for unit in sorted(by_unit):
        expected = variance = e_w = q_w = 0.0
        for s, n_ds in by_unit[unit].items():
            p = o_s[s] / n_s[s]
            expected += n_ds * p
            if n_s[s] > 1:
                c = (n_s[s] - n_ds) / (n_s[s] - 1)  # n_rest / (n - 1)
                variance += c * n_ds * p * (1 - p)
                e_w += c * n_ds * p
                q_w += c * n_ds * p * p
        count = observed[unit]
        persons = sum(by_unit[unit].values())
        ratio = count / expected if expected > 0 else None
        low: float | None
        high: float | None
        if expected <= 0:
            low = high = None
        elif method == "exact":
            lo, hi = exact_poisson_interval(count, alpha)
            low, high = lo / expected, hi / expected
        elif method == "score":
            low, high = _score_interval(count, expected, e_w, q_w, alpha)
        else:
            raise ValueError(f"method must be 'score' or 'exact', not {method!r}")
        z = (count - expected) / math.sqrt(variance) if variance > 1e-12 else None
        out[unit] = Standardised(unit, persons, count, expected, variance, ratio, low, high, z)
    return out


# --- funnel plots ------------------------------------------------------------------------

Position = Literal["low_99.8", "low_95", "inside", "high_95", "high_99.8"]


@dataclass(frozen=True)
class FunnelPoint:
    """A district on the funnel: its standardised rate ``rate`` = (O/E) x city rate at
    ``persons`` eligible, the limits at that size and where the point lies."""

    unit: str
    persons: int
    rate: float
    crude_rate: float
    z: float | None  # (O - E) / sqrt(variance), before any over-dispersion factor
    z_adjusted: float | None  # z / sqrt(phi) when the factor is applied, else z
    low_95: float
    high_95: float
    low_998: float
    high_998: float
    position: Position


@dataclass(frozen=True)
class FunnelCurve:
    """The control limits as curves over the number of eligible persons (for a chart)."""

    persons: tuple[int, ...]
    low_95: tuple[float, ...]
    high_95: tuple[float, ...]
    low_998: tuple[float, ...]
    high_998: tuple[float, ...]


@dataclass(frozen=True)
class Funnel:
    target: float  # the city rate
    phi: float | None  # the estimated over-dispersion factor (None: too few units)
    phi_p_value: float | None
    phi_applied: bool
    note: str | None
    points: tuple[FunnelPoint, ...]
    curve: FunnelCurve


def binomial_limit(target: float, n: int, prob: float) -> float:
    """The exact binomial control limit for a proportion at ``n`` with the interpolation
    of Spiegelhalter (2005, appendix A.1.1), so the curve is smooth in ``n``."""
    if n < 1:
        raise ValueError("n must be at least 1")
    return float(_binomial_limits(target, np.asarray([n]), prob)[0])


def _binomial_limits(target: float, n: npt.NDArray[np.int_], prob: float) -> npt.NDArray[Any]:
    """``binomial_limit`` over an array of sizes (one scipy call per step, not per size)."""
    if target <= 0 or target >= 1:
        return np.full(n.shape, target, dtype=float)
    r = sps.binom.ppf(prob, n, target)
    f_r = sps.binom.cdf(r, n, target)
    f_below = np.where(r > 0, sps.binom.cdf(r - 1, n, target), 0.0)
    gap = f_r - f_below
    a = np.where(gap > 0, (f_r - prob) / np.where(gap > 0, gap, 1.0), 0.0)
    out: npt.NDArray[Any] = np.clip((r - a) / n, 0.0, 1.0)
    return out


def _limit_arrays(target: float, n: npt.NDArray[np.int_], phi: float) -> list[npt.NDArray[Any]]:
    """[low 95, high 95, low 99.8, high 99.8] at each size: exact binomial, or the normal
    approximation inflated by ``phi`` when over-dispersion is allowed for."""
    out: list[npt.NDArray[Any]] = []
    for prob in (LEVELS["95"], LEVELS["99.8"]):
        if phi > 1:
            half = float(sps.norm.ppf(prob)) * np.sqrt(phi * target * (1 - target) / n)
            out += [np.maximum(0.0, target - half), np.minimum(1.0, target + half)]
        else:
            out += [_binomial_limits(target, n, 1 - prob), _binomial_limits(target, n, prob)]
    return out


def _limits(target: float, n: int, phi: float) -> tuple[float, float, float, float]:
    low95, high95, low998, high998 = (
        float(a[0]) for a in _limit_arrays(target, np.asarray([n]), phi)
    )
    return low95, high95, low998, high998


def overdispersion(z: Sequence[float], winsor: float = 0.1) -> tuple[float, float]:
    """phi = mean of the squared z-scores after winsorising ``winsor`` at each end
    (Spiegelhalter 2005b), and the p-value of I x phi against chi-square with I - 1
    degrees of freedom (the target is estimated from the same units)."""
    arr = np.asarray(z, dtype=float)
    if arr.size < 2:
        raise ValueError("over-dispersion needs at least two units")
    low, high = np.percentile(arr, [100 * winsor, 100 * (1 - winsor)])
    phi = float(np.mean(np.clip(arr, low, high) ** 2))
    p = float(sps.chi2.sf(arr.size * phi, arr.size - 1))
    return phi, p


def _position(rate: float, limits: tuple[float, float, float, float]) -> Position:
    low95, high95, low998, high998 = limits
    if rate < low998:
        return "low_99.8"
    if rate > high998:
        return "high_99.8"
    if rate < low95:
        return "low_95"
    if rate > high95:
        return "high_95"
    return "inside"


def funnel(
    standardised: Sequence[Standardised],
    target: float,
    *,
    min_units_for_phi: int = 10,
    phi_alpha: float = 0.05,
    winsor: float = 0.1,
    curve_points: int = 60,
) -> Funnel:
    """The funnel of the given units around ``target`` (the city rate).

    Over-dispersion is estimated from the units' z-scores and applied (limits widened by
    sqrt(phi), z divided by it) when phi > 1 and the chi-square test rejects at
    ``phi_alpha``, but only with at least ``min_units_for_phi`` units: with fewer, one
    genuinely deviant district is indistinguishable from over-dispersion (winsorising 10 %
    at each end trims nobody below ten units) and the factor would hide it.
    """
    units = [s for s in standardised if s.persons > 0 and s.expected > 0]
    zs = [s.z for s in units if s.z is not None]
    phi: float | None = None
    phi_p: float | None = None
    applied = False
    note: str | None = None
    if len(zs) >= 2:
        phi, phi_p = overdispersion(zs, winsor)
        if len(zs) < min_units_for_phi:
            note = f"over-dispersion not applied: fewer than {min_units_for_phi} units"
        else:
            applied = phi > 1 and phi_p < phi_alpha
    factor = phi if applied and phi is not None else 1.0
    points: list[FunnelPoint] = []
    for s in units:
        rate = min(1.0, s.observed / s.expected * target)
        limits = _limits(target, s.persons, factor)
        z_adj = s.z / math.sqrt(factor) if s.z is not None else None
        points.append(
            FunnelPoint(
                s.unit,
                s.persons,
                rate,
                s.observed / s.persons,
                s.z,
                z_adj,
                *limits,
                _position(rate, limits),
            )
        )
    top = max([s.persons for s in units] + [10])
    grid = sorted(
        {round(float(v)) for v in np.geomspace(5, top * 1.2, curve_points)}
        | {s.persons for s in units}
    )
    low95, high95, low998, high998 = (
        tuple(float(v) for v in a) for a in _limit_arrays(target, np.asarray(grid), factor)
    )
    curve = FunnelCurve(tuple(grid), low95, high95, low998, high998)
    return Funnel(target, phi, phi_p, applied, note, tuple(points), curve)


# --- multiplicity --------------------------------------------------------------------------


def two_sided_p(z: float | None) -> float | None:
    return None if z is None else float(2 * sps.norm.sf(abs(z)))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values over the non-missing ones (the family is those tested)."""
    present = [p for p in p_values if p is not None]
    if not present:
        return [None for _ in p_values]
    adjusted = iter(multipletests(present, method="holm")[1])
    return [None if p is None else float(next(adjusted)) for p in p_values]


# --- waiting times ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WaitRow:
    """One person's wait: it starts at ``start`` and ends at ``end`` (None: still waiting).
    ``censored_at``, when set, is when observation stopped without the end (e.g. the case
    closed); otherwise a wait with no end is censored at the report's as-of time."""

    start: datetime
    end: datetime | None
    district: str
    need_level: str
    censored_at: datetime | None = None


@dataclass(frozen=True)
class KaplanMeier:
    """The Kaplan-Meier curve: S(t) just after each distinct event time ``times``."""

    times: tuple[float, ...]
    survival: tuple[float, ...]
    persons: int
    events: int

    def quantile(self, p: float) -> float | None:
        """The p-quantile of the wait: the first time with S(t) <= 1 - p (None if the curve
        never gets that low because too many are still waiting)."""
        for t, s in zip(self.times, self.survival, strict=True):
            if s <= 1 - p + 1e-12:
                return t
        return None


def kaplan_meier(durations: Sequence[float], events: Sequence[bool]) -> KaplanMeier:
    """The product-limit estimate (statsmodels ``SurvfuncRight``), ties as usual: at each
    event time t, S *= 1 - d_t / n_t with n_t those still at risk (censored at t count)."""
    if len(durations) != len(events):
        raise ValueError("durations and events must have the same length")
    n_events = sum(1 for e in events if e)
    if n_events == 0:
        return KaplanMeier((), (), len(durations), 0)
    sf = SurvfuncRight(np.asarray(durations, float), np.asarray(events, float))
    return KaplanMeier(
        tuple(float(t) for t in sf.surv_times),
        tuple(float(s) for s in sf.surv_prob),
        len(durations),
        n_events,
    )


@dataclass(frozen=True)
class WaitSummary:
    """One district (or the city) on one wait; all numbers None when suppressed.

    ``hazard_ratio`` is the district's rate of ending the wait relative to the rest of the
    city, need level as strata (Cox): below 1 means its persons wait longer.
    """

    wait: str
    district: str
    suppressed: bool
    persons: int | None
    events: int | None
    censored: int | None
    median_days: float | None
    p90_days: float | None
    hazard_ratio: float | None = None
    hr_low: float | None = None
    hr_high: float | None = None
    logrank_p: float | None = None
    p_holm: float | None = None
    flagged: bool = False
    curve: tuple[tuple[float, float], ...] = ()
    note: str | None = None


@dataclass(frozen=True)
class WaitReport:
    summaries: tuple[WaitSummary, ...]
    comparisons: int  # the number of district-vs-rest tests Holm controlled over
    alpha: float


def _durations(
    rows: Sequence[WaitRow], as_of: datetime
) -> tuple[list[float], list[bool], list[str], list[str]]:
    days: list[float] = []
    events: list[bool] = []
    districts: list[str] = []
    needs: list[str] = []
    for r in sorted(rows, key=lambda r: (r.district, r.need_level, r.start, str(r.end))):
        if r.start > as_of:
            continue  # not yet waiting at the as-of time
        stop = min(as_of, r.censored_at) if r.censored_at is not None else as_of
        ended = r.end is not None and r.end <= stop
        until = r.end if ended and r.end is not None else stop
        days.append(max(0.0, (until - r.start).total_seconds() / 86400.0))
        events.append(ended)
        districts.append(r.district)
        needs.append(r.need_level)
    return days, events, districts, needs


def _compare(
    days: Sequence[float],
    events: Sequence[bool],
    in_district: Sequence[bool],
    needs: Sequence[str],
    alpha: float,
) -> tuple[float | None, float | None, float | None, float | None, str | None]:
    """Stratified log-rank p and the stratified Cox hazard ratio with its interval."""
    t = np.asarray(days, float)
    d = np.asarray(events, float)
    g = np.asarray(in_district, int)
    s = np.asarray(needs)
    if g.all() or not g.any():
        return None, None, None, None, "no rest of the city to compare with"
    try:
        _, p = survdiff(t, d, g, strata=s)
        fit = PHReg(t, g.reshape(-1, 1).astype(float), status=d, strata=s, ties="breslow").fit()
        beta = float(fit.params[0])
        low, high = (float(v) for v in fit.conf_int(alpha=alpha)[0])
    except Exception as exc:  # degenerate data: report, do not crash the report
        return None, None, None, None, f"comparison could not be computed: {type(exc).__name__}"
    vals = [math.exp(v) for v in (beta, low, high)]
    if not all(math.isfinite(v) for v in vals) or not math.isfinite(float(p)):
        return None, None, None, None, "comparison is not finite"
    return float(p), vals[0], vals[1], vals[2], None


def wait_report(
    waits: Mapping[str, Sequence[WaitRow]],
    *,
    as_of: datetime,
    min_cell: int = 5,
    alpha: float = 0.05,
) -> WaitReport:
    """Per wait: the city and each district's Kaplan-Meier median and 90th percentile (in
    days), and each district against the rest of the city with need level as strata;
    flags by Holm over every district x wait compared. A district with fewer than
    ``min_cell`` persons, or fewer than ``min_cell`` ended waits, is suppressed."""
    if min_cell < 1:
        raise ValueError("min_cell must be at least 1")
    summaries: list[WaitSummary] = []
    for wait in sorted(waits):
        days, events, districts, needs = _durations(waits[wait], as_of)
        for unit in [CITY, *sorted(set(districts))]:
            idx = [i for i, x in enumerate(districts) if unit in (CITY, x)]
            ev = sum(1 for i in idx if events[i])
            if len(idx) < min_cell or ev < min_cell:
                summaries.append(
                    WaitSummary(wait, unit, True, None, None, None, None, None, note="suppressed")
                )
                continue
            km = kaplan_meier([days[i] for i in idx], [events[i] for i in idx])
            p = hr = lo = hi = None
            note = None
            if unit != CITY:
                p, hr, lo, hi, note = _compare(
                    days, events, [x == unit for x in districts], needs, alpha
                )
            summaries.append(
                WaitSummary(
                    wait,
                    unit,
                    False,
                    len(idx),
                    ev,
                    len(idx) - ev,
                    km.quantile(0.5),
                    km.quantile(0.9),
                    hr,
                    lo,
                    hi,
                    p,
                    curve=tuple(zip(km.times, km.survival, strict=True)),
                    note=note,
                )
            )
    adjusted = holm([s.logrank_p for s in summaries])
    final = tuple(
        s if q is None else _with_holm(s, q, alpha)
        for s, q in zip(summaries, adjusted, strict=True)
    )
    comparisons = sum(1 for q in adjusted if q is not None)
    return WaitReport(final, comparisons, alpha)


def _with_holm(s: WaitSummary, q: float, alpha: float) -> WaitSummary:
    return replace(s, p_holm=q, flagged=q < alpha)
