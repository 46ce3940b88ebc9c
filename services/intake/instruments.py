"""Assessment instruments, their score scales and valid ranges, as data.

A score outside its scale cannot come from a correctly administered instrument, so it is
rejected at the door rather than skewing reports later. The ranges follow from how each
instrument is built:

- AUDIT: 10 items scored 0-4, total 0-40.
- DUDIT: 11 items, 9 scored 0-4 and 2 scored 0, 2 or 4, total 0-44.
- PGSI: 9 items scored 0-3, total 0-27.
- NODS-PERC: 4 yes/no items, total 0-4.
- ASI (grund- and uppföljningsintervju): the interviewer's severity rating 0-9 per life
  area; an interview may rate only some areas, so at least one and each at most once.
- ADDIS: the count of DSM criteria met, for alcohol and for drugs, 0-11 each (at least one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Score:
    """One scale's value in a completed assessment (Avro record intake.Score)."""

    scale: str
    value: int


@dataclass(frozen=True)
class ScoreRange:
    minimum: int
    maximum: int

    def __contains__(self, value: object) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.minimum <= value <= self.maximum
        )


@dataclass(frozen=True)
class InstrumentSpec:
    """The scales an instrument may report; `required` ones must all be present."""

    code: str
    scales: Mapping[str, ScoreRange]
    required: frozenset[str]


def _total(code: str, maximum: int) -> InstrumentSpec:
    return InstrumentSpec(code, {"total": ScoreRange(0, maximum)}, frozenset({"total"}))


ASI_AREAS: tuple[str, ...] = (
    "alcohol",
    "drugs",
    "physical_health",
    "employment_support",
    "legal",
    "family_social",
    "psychiatric",
)
_ASI_SCALES = {area: ScoreRange(0, 9) for area in ASI_AREAS}
_ADDIS_SCALES = {"criteria_alcohol": ScoreRange(0, 11), "criteria_drugs": ScoreRange(0, 11)}

INSTRUMENTS: Mapping[str, InstrumentSpec] = {
    spec.code: spec
    for spec in (
        _total("AUDIT", 40),
        _total("DUDIT", 44),
        _total("PGSI", 27),
        _total("NODS_PERC", 4),
        InstrumentSpec("ASI_GRUND", _ASI_SCALES, frozenset()),
        InstrumentSpec("ASI_UPPFOLJNING", _ASI_SCALES, frozenset()),
        InstrumentSpec("ADDIS", _ADDIS_SCALES, frozenset()),
    )
}

GUIDELINE_PRIORITY: Mapping[str, int | None] = {
    "AUDIT": 1,
    "ASI_GRUND": 1,
    "ASI_UPPFOLJNING": 1,
    "DUDIT": 3,
    "ADDIS": None,
    "PGSI": None,
    "NODS_PERC": None,
}
"""National guideline priority (1 = highest, 10 = lowest) of each instrument for assessment.

From the design's domain facts: ASI and AUDIT priority 1, DUDIT 3 (the design does not
split the two ASI interviews, so both get 1). None means "not known here", never "no
priority": reports must show it as unknown rather than rank it.
"""


def guideline_priority(instrument: str) -> int | None:
    """The instrument's guideline priority, or None when unknown."""
    return GUIDELINE_PRIORITY.get(instrument)


def score_problems(instrument: str, scores: Iterable[Score]) -> list[str]:
    """Why these scores cannot come from this instrument; empty when they are valid.

    The sentences name scales and ranges, never the submitted values or unknown scale
    names: those are free text and could carry anything, personal data included.
    """
    spec = INSTRUMENTS.get(instrument)
    if spec is None:
        return ["the instrument is not one of " + ", ".join(sorted(INSTRUMENTS))]
    problems: list[str] = []
    seen: set[str] = set()
    listed = list(scores)
    if not listed:
        problems.append(f"{instrument} needs at least one score")
    for score in listed:
        scale = spec.scales.get(score.scale)
        if scale is None:
            problems.append(
                f"{instrument} has no such scale; its scales are " + ", ".join(spec.scales)
            )
            continue
        if score.scale in seen:
            problems.append(f"{instrument} scale {score.scale} is given more than once")
        seen.add(score.scale)
        if score.value not in scale:
            problems.append(
                f"{instrument} scale {score.scale} must be a whole number from "
                f"{scale.minimum} to {scale.maximum}"
            )
    missing = sorted(spec.required - seen)
    if missing:
        problems.append(f"{instrument} needs the scale(s) " + ", ".join(missing))
    return problems
