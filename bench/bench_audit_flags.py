"""False flags of the equal-access audit: over seeds of synthetic data with no disparity,
the share of seeds where the Holm rule (and, for comparison, the band rule) flags any
district x metric; and, with one planted disparity, whether each method finds it.

Run: .venv/bin/python -m bench.bench_audit_flags [--seeds 50] [--persons 400]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.projections.audit import audit_report, synthetic_rows

DISTRICTS = ("nordost", "centrum", "sydvast", "hisingen")
PLANTED = ("nordost", "specialist_access")


@dataclass(frozen=True)
class FlagRates:
    seeds: int
    comparisons: int
    holm_any: int  # seeds with any Holm flag
    band_any: int  # seeds with any band flag
    outside_998: int  # cells outside the 99.8 % funnel limits, over all seeds
    cells: int

    @property
    def holm_share(self) -> float:
        return self.holm_any / self.seeds


def false_flags(
    seeds: Sequence[int], persons: int = 400, districts: Sequence[str] = DISTRICTS
) -> FlagRates:
    """Audit each seed's synthetic city (no disparity) and count the seeds with flags."""
    holm_any = band_any = outside = cells = comparisons = 0
    for seed in seeds:
        report = audit_report(synthetic_rows(seed, persons, districts))
        comparisons = report.comparisons
        holm_any += any(c.holm_flagged for c in report.cells)
        band_any += any(c.band_flagged for c in report.cells)
        outside += sum(c.funnel_position in ("low_99.8", "high_99.8") for c in report.cells)
        cells += len(report.cells)
    return FlagRates(len(seeds), comparisons, holm_any, band_any, outside, cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--persons", type=int, default=400, help="persons per district")
    args = parser.parse_args()
    started = time.perf_counter()
    rates = false_flags(range(args.seeds), args.persons)
    print(
        f"no disparity, {rates.seeds} seeds x {rates.comparisons} comparisons"
        f" ({len(DISTRICTS)} districts x 5 metrics, {args.persons} persons each):"
    )
    print(f"  seeds with any Holm flag: {rates.holm_any} ({rates.holm_share:.1%})")
    print(f"  seeds with any band flag: {rates.band_any} ({rates.band_any / rates.seeds:.1%})")
    print(
        f"  cells outside the 99.8% funnel limits: {rates.outside_998} of {rates.cells}"
        f" ({rates.outside_998 / rates.cells:.2%})"
    )
    report = audit_report(synthetic_rows(0, args.persons, DISTRICTS, bias={PLANTED: 0.6}))
    (cell,) = [c for c in report.cells if (c.district, c.metric) == PLANTED]
    print(
        f"planted 0.6 x {PLANTED[1]} in {PLANTED[0]} (seed 0): SR {cell.sr:.2f}"
        f" [{cell.sr_low:.2f}, {cell.sr_high:.2f}], funnel {cell.funnel_position},"
        f" Holm p {cell.p_holm:.1e}, flagged {cell.holm_flagged}"
    )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
