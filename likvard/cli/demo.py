"""Synthetic demo data: realistic care chains for the city's districts, with optional
planted disparities, so the reports and the equal-access audit have something to find.

Three layers, so each can be tested on its own:

* `plan` is pure: from a seed it draws persons and their dated steps (intake with gender
  and birth year, assessment, care plan, consents, referrals, interventions, family work,
  follow-ups, transfers, closing and reopening, and the care chain: an investigation and
  its decision, the first personal visit, a coordinated plan (SIP) and its follow-up, the
  person's own assessment at follow-up). Outcome probabilities are the audit's
  `BASE_RATES` by need level, times a `Bias` factor for a district and metric (clipped to
  [0, 1]); the wait to the first visit depends on need level, times a `first_visit` bias
  factor. So a planted disparity is the only difference between districts the audit (and
  the need-stratified wait comparison) should find; districts still differ crudely, by
  their need mix. Steps that would lie in the future are left out: the APIs refuse a
  future `occurred_at`.
* `run` sends the plans through the public HTTP APIs of the intake, referral and follow-up
  services (persons in parallel, each person's steps in order), signed in as the staff
  who would do each step, with tokens of the development OpenID provider: the case worker
  of the case's current district (after a transfer, the receiving one's), the staff of the
  unit a referral is addressed to for accepting, declining, starting and ending it. The
  services' relays put the events on Kafka. It waits, with a deadline, for what a service
  learns through Kafka (a just-registered case, a consent, scheduled follow-ups, a
  transfer) and re-reads the version on 409.
* `to_events` builds the decoded events the services would emit for the same plans,
  without HTTP, so tests can project them straight into the read models.

No personal identity number is ever logged or printed: `PersonPlan` keeps it out of its
repr, and errors are counted by step and problem code only.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time as dtime, timedelta
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from likvard.catalogue import ReferenceCatalogue, SpecialistUnit
from likvard.codec import Catalogue
from likvard.districts import DistrictRegistry
from likvard.domain import CITY_TZ, age_band, local_date
from likvard.inbox import Incoming, decode_event
from likvard.pseudonym import luhn_check_digit, pseudonymise
from services.followup import domain as followup_domain
from services.followup.scheduling import (
    followup_id as derived_followup_id,
    followups_for_intervention_end,
)
from services.projections.audit import BASE_RATES, DEFAULT_NEED_MIXES, METRICS, NEED_LEVELS

__all__ = [
    "DISTRICT_WEIGHTS",
    "Bias",
    "DemoFailed",
    "DemoStats",
    "DemoUrls",
    "PersonPlan",
    "SignInFailed",
    "Step",
    "main",
    "parse_bias",
    "parse_biases",
    "plan",
    "run",
    "to_events",
]

DISTRICT_WEIGHTS: Mapping[str, float] = {
    "nordost": 0.25,
    "centrum": 0.29,
    "sydvast": 0.20,
    "hisingen": 0.26,
}
"""Share of intakes per current district: roughly the areas' populations (Centrum and
Hisingen largest), with Nordost weighted up for its higher rate of addiction care."""

TOPICS = {
    "intake": "likvard.intake.v1",
    "referral": "likvard.referral.v1",
    "followup": "likvard.followup.v1",
}
DEMO_NAMESPACE = uuid.UUID("5d1f0c4e-7a43-4c8e-9d56-1c0de5ea7d01")
"""Namespace of the ids `to_events` derives, so the same plans give the same events."""
DEMO_SECRET = b"likvard-demo-pseudonym-secret-0001"
"""Pseudonym key of the direct path only (the services use their own secret; `run` sends
identity numbers to the intake API, which pseudonymises them)."""

FAILURE_LIMIT = 0.01
"""A demo with more than this share of failed (or skipped) steps raises `DemoFailed`."""

# Which service takes each step.
SERVICE_OF: Mapping[str, str] = {
    "intake": "intake",
    "assessment": "intake",
    "care_plan": "intake",
    "consent": "intake",
    "withdraw_consent": "intake",
    "transfer": "intake",
    "close": "intake",
    "reopen": "intake",
    "referral": "referral",
    "accept": "referral",
    "decline": "referral",
    "start": "referral",
    "end": "referral",
    "children": "followup",
    "family": "followup",
    "followup_completed": "followup",
    "followup_missed": "followup",
    "investigation": "intake",
    "decision": "intake",
    "first_visit": "intake",
    "sip": "intake",
    "sip_followup": "intake",
    "user_assessment": "followup",
}


# --- biases ----------------------------------------------------------------------------


WAIT_METRICS: tuple[str, ...] = ("first_visit",)
"""Biasable waits besides the audit's `METRICS`: the factor multiplies the days (2 is
twice as long a wait), where for a metric it multiplies a probability."""


@dataclass(frozen=True)
class Bias:
    """A planted disparity: `district`'s probability for `metric` is multiplied by
    `factor` (then clipped to [0, 1]); for a wait in `WAIT_METRICS`, its days are."""

    district: str
    metric: str
    factor: float


def parse_bias(
    text: str, *, registry: DistrictRegistry | None = None, on: date | None = None
) -> Bias:
    """`"nordost:specialist_access:0.5"` -> Bias; ValueError saying what is wrong."""
    parts = [p.strip() for p in text.split(":")]
    if len(parts) != 3 or not all(parts):
        raise ValueError(
            f"bias {text!r} must be DISTRICT:metric:factor, e.g. nordost:specialist_access:0.5"
        )
    district, metric, factor_text = parts[0].lower(), parts[1].lower(), parts[2]
    if metric not in METRICS + WAIT_METRICS:
        known = ", ".join(METRICS + WAIT_METRICS)
        raise ValueError(f"unknown metric {metric!r} in bias; known metrics: {known}")
    registry = registry or DistrictRegistry.load()
    day = on or datetime.now(UTC).date()
    current = ", ".join(d.code for d in registry.current(day))
    found = registry.get(district)
    if found is None:
        raise ValueError(f"unknown district {district!r} in bias; current districts: {current}")
    if not found.valid_on(day):
        raise ValueError(
            f"district {district!r} is not in operation on {day.isoformat()}"
            f" (valid {found.valid_from.isoformat()} to "
            f"{found.valid_to.isoformat() if found.valid_to else 'now'});"
            f" current districts: {current}"
        )
    try:
        factor = float(factor_text)
    except ValueError:
        factor = math.nan
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"bias factor {factor_text!r} must be a positive number, e.g. 0.5")
    return Bias(district, metric, factor)


def parse_biases(
    texts: Sequence[str], *, registry: DistrictRegistry | None = None, on: date | None = None
) -> list[Bias]:
    """Every `--bias`; a district and metric may be biased only once."""
    registry = registry or DistrictRegistry.load()
    biases = [parse_bias(t, registry=registry, on=on) for t in texts]
    seen: set[tuple[str, str]] = set()
    for b in biases:
        if (b.district, b.metric) in seen:
            raise ValueError(f"bias for {b.district}:{b.metric} is given more than once")
        seen.add((b.district, b.metric))
    return biases


# --- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One dated action on a person's case.

    `body` is the HTTP body without `occurred_at` (dates as `date`); `ref` names the
    referral (for referral and follow-up steps) or consent (for consent steps) it concerns,
    as an index within the person's plan: real ids exist only once the services made them.
    """

    at: datetime
    action: str
    body: Mapping[str, Any] = field(default_factory=dict)
    ref: int | None = None

    @property
    def service(self) -> str:
        return SERVICE_OF[self.action]


@dataclass(frozen=True)
class PersonPlan:
    """One person's case: the district and need level drawn for them, and their steps in
    time order. The identity number is synthetic and kept out of the repr."""

    key: str
    district: str
    need_level: str
    personal_identity_number: str = field(repr=False)
    steps: tuple[Step, ...]


def _identity_number(rng: random.Random, birth_year: int, taken: set[str]) -> str:
    """A synthetic Swedish personal identity number (YYYYMMDD-NNNC, correct check digit),
    distinct within the plan so every person is counted once."""
    while True:
        born = date(birth_year, rng.randint(1, 12), rng.randint(1, 28))
        serial = f"{rng.randint(0, 999):03d}"
        nine = born.strftime("%y%m%d") + serial
        number = f"{born:%Y%m%d}-{serial}{luhn_check_digit(nine)}"
        if number not in taken:
            taken.add(number)
            return number


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def _local(day: date, hour: float) -> datetime:
    """A moment on a local calendar day, in UTC."""
    moment = datetime.combine(day, dtime(0), tzinfo=CITY_TZ) + timedelta(hours=hour)
    return moment.astimezone(UTC)


SUBSTANCE_WEIGHTS = {"ALCOHOL": 0.58, "NARCOTICS": 0.25, "PHARMACEUTICALS": 0.09, "GAMBLING": 0.08}
REFERRAL_SOURCES = {
    "SELF": 0.35,
    "RELATIVE": 0.08,
    "HEALTHCARE": 0.22,
    "POLICE": 0.08,
    "PRISON_PROBATION": 0.07,
    "NON_PROFIT": 0.05,
    "OTHER": 0.15,
}
CHILDREN = {"YES": 0.35, "NO": 0.55, "UNKNOWN": 0.10}
GOALS = (
    "Minska mitt drickande",
    "Vara drogfri",
    "Sluta spela om pengar",
    "Få ett eget boende",
    "Börja arbeta eller studera igen",
    "Ha en bättre relation med mina barn",
    "Må bättre psykiskt",
    "Ha en meningsfull fritid",
)
# Score ranges per instrument and need level (within the instruments' valid ranges).
TOTAL_SCORES: Mapping[str, Mapping[str, tuple[int, int]]] = {
    "AUDIT": {"LOW": (8, 15), "MODERATE": (16, 19), "HIGH": (20, 40)},
    "DUDIT": {"LOW": (6, 14), "MODERATE": (15, 24), "HIGH": (25, 44)},
    "PGSI": {"LOW": (3, 7), "MODERATE": (8, 12), "HIGH": (13, 27)},
}
ASI_SEVERITY = {"LOW": (2, 4), "MODERATE": (4, 6), "HIGH": (6, 9)}
ASI_OTHER_AREAS = ("physical_health", "employment_support", "legal", "family_social", "psychiatric")
OVERRIDE_FOR = {
    "HEALTHCARE": "RISK_TO_LIFE_OR_HEALTH",
    "PRISON_PROBATION": "COURT_OR_AUTHORITY_DECISION",
    "NON_PROFIT": "OTHER",
}


def _assessment(rng: random.Random, primary: str, need: str) -> dict[str, Any]:
    """An assessment with the instrument for the primary problem and scores inside the
    instrument's valid range, higher for a higher need level."""
    if primary != "GAMBLING" and rng.random() < 0.25:
        low, high = ASI_SEVERITY[need]
        area = "alcohol" if primary == "ALCOHOL" else "drugs"
        scores = [{"scale": area, "value": rng.randint(low, high)}]
        for other in rng.sample(ASI_OTHER_AREAS, rng.randint(1, 3)):
            scores.append({"scale": other, "value": rng.randint(0, 7)})
        return {"instrument": "ASI_GRUND", "scores": scores, "need_level": need}
    instrument = {"ALCOHOL": "AUDIT", "GAMBLING": "PGSI"}.get(primary, "DUDIT")
    low, high = TOTAL_SCORES[instrument][need]
    return {
        "instrument": instrument,
        "scores": [{"scale": "total", "value": rng.randint(low, high)}],
        "need_level": need,
    }


@dataclass(frozen=True)
class _Offer:
    unit: SpecialistUnit
    code: str
    top: bool  # a verified guideline priority of 1 or 2: counts as guideline adherence
    substances: frozenset[str]


def _offers(reference: ReferenceCatalogue) -> list[_Offer]:
    offers: list[_Offer] = []
    for unit in sorted(reference.units(), key=lambda u: u.id):
        for code in sorted(unit.intervention_codes):
            iv = reference.intervention(code)
            if iv is None:
                continue
            top = iv.verified and iv.guideline_priority is not None and iv.guideline_priority <= 2
            offers.append(_Offer(unit, code, top, iv.substances))
    return offers


GENDER_WEIGHTS = {"MAN": 0.70, "WOMAN": 0.28, "OTHER": 0.01, "NOT_STATED": 0.01}
"""Roughly the shares in the city's adult addiction care (about seven in ten are men)."""
INVESTIGATION_BASES = {"APPLICATION": 0.75, "REPORT_OF_CONCERN": 0.2, "OTHER": 0.05}
INTERVENTION_KINDS = {
    "OUTPATIENT": 0.5,
    "SUPPORT_CONTACT": 0.2,
    "RESIDENTIAL": 0.15,
    "HOUSING": 0.1,
}
SIP_PARTIES = ("PRIMARY_CARE", "PSYCHIATRY", "ADDICTION_CARE", "OTHER_REGION")
FIRST_VISIT_DAYS = {"LOW": 10.0, "MODERATE": 7.0, "HIGH": 4.0}
"""Median days from intake to the first personal visit by need level (sooner for higher
need), the same in every district: only a `first_visit` bias makes a district differ."""
RATINGS = {"YES": 0.62, "PARTLY": 0.22, "NO": 0.1, "NO_ANSWER": 0.06}
IMPROVED_RATINGS: Mapping[str, Mapping[str, float]] = {
    "BETTER": {"YES": 0.75, "PARTLY": 0.2, "NO": 0.02, "NO_ANSWER": 0.03},
    "SAME": {"YES": 0.05, "PARTLY": 0.45, "NO": 0.45, "NO_ANSWER": 0.05},
    "WORSE": {"YES": 0.02, "PARTLY": 0.08, "NO": 0.85, "NO_ANSWER": 0.05},
}
"""The user assessment's "situation improved" follows the follow-up's own answer."""
USER_ITEMS = (
    "contact_easy",
    "clear_information",
    "felt_understood",
    "influence",
    "whole_situation",
)


CHILD_ENGAGEMENTS: tuple[dict[str, Any], ...] = (
    {"relation": "CHILD", "is_child": True, "support_offered": ["CHILD_SUPPORT_GROUP"]},
    {"relation": "PARTNER", "is_child": False, "support_offered": ["INFORMATION", "CRAFT"]},
    {"relation": "CHILD", "is_child": True, "support_offered": ["INFORMATION", "COUNSELLING"]},
)


class _PersonDraw:
    """Draws one person's steps. Outcomes are drawn first (from the audit's rates), then
    the dated steps that produce them, so each metric's rate is the intended one."""

    def __init__(self, planner: _Planner, key: str) -> None:
        self.p = planner
        self.key = key
        self.rng = random.Random(f"likvard-demo:{key}")
        # The care chain draws from its own stream, so the other steps of a seed stay as
        # they were before it existed (the audit tests' seed notes still hold).
        self.care = random.Random(f"likvard-demo-care:{key}")
        span = (planner.now - planner.start).total_seconds()
        self.t0 = planner.start + timedelta(seconds=self.rng.uniform(0, span))
        self.steps: list[Step] = []
        self.consents = 0
        self.referrals = 0

    def add(
        self, days: float, action: str, body: Mapping[str, Any], ref: int | None = None
    ) -> None:
        self.steps.append(Step(self.t0 + timedelta(days=days), action, dict(body), ref))

    def refer(self, offer: _Offer, day: float) -> int:
        """A referral, with the consent (or, sometimes, the override) a unit outside the
        social services needs recorded just before it."""
        rng = self.rng
        body: dict[str, Any] = {"unit_id": offer.unit.id, "intervention_code": offer.code}
        kind = offer.unit.recipient_kind
        if kind != "CITY_SOCIAL_SERVICES":
            if rng.random() < 0.9:
                recipients = [kind]
                if kind != "NON_PROFIT" and rng.random() < 0.2:
                    recipients.append("NON_PROFIT")
                valid_until = None
                if rng.random() < 0.3:
                    valid_until = local_date(self.t0 + timedelta(days=day + 365))
                body["consent"] = self.consents
                self.add(
                    day - rng.uniform(0.01, 0.1),
                    "consent",
                    {"recipients": recipients, "valid_until": valid_until},
                    self.consents,
                )
                self.consents += 1
            else:
                body["consent_override"] = OVERRIDE_FOR[kind]
        self.add(day, "referral", body, self.referrals)
        self.referrals += 1
        return self.referrals - 1

    def choose(self, want_top: bool, substances: Sequence[str], district: str) -> _Offer:
        """A unit and intervention for the person's substances; the home district's unit
        most of the time, another district's sometimes (a referral across districts)."""
        fits = [o for o in self.p.offers if o.top == want_top and o.substances & set(substances)]
        fits = fits or [o for o in self.p.offers if o.top == want_top]
        home = [o for o in fits if o.unit.host_district == district]
        return self.rng.choice(home if home and self.rng.random() < 0.7 else fits)

    def draw(self, taken: set[str]) -> PersonPlan:
        rng, p = self.rng, self.p
        district = _pick(rng, p.weights)
        need = _pick(rng, p.need_mix[district])
        code = p.recorded_code(rng, district, local_date(self.t0))

        def hit(metric: str) -> bool:
            return rng.random() < p.rate(district, metric, need)

        access, timely = hit("specialist_access"), hit("timely_start")
        top = hit("guideline_adherence")
        children = _pick(rng, CHILDREN)
        family, followups_done = hit("family_engagement"), hit("followup_completion")

        primary = _pick(rng, SUBSTANCE_WEIGHTS)
        substances = [primary]
        if rng.random() < 0.25:
            others = {k: v for k, v in SUBSTANCE_WEIGHTS.items() if k != primary}
            substances.append(_pick(rng, others))
        if access and top and "ALCOHOL" not in substances:
            substances.append("ALCOHOL")  # the catalogue's top-priority care is for alcohol

        birth_year = rng.randint(max(1940, self.t0.year - 75), self.t0.year - 19)
        intake = {
            "district": code,
            "substances": substances,
            "referral_source": _pick(rng, REFERRAL_SOURCES),
            "children_in_household": children,
            "birth_year": birth_year if rng.random() < 0.9 else None,
            "gender": _pick(self.care, GENDER_WEIGHTS),  # the age band follows the birth year
        }
        self.add(0, "intake", intake)
        day = rng.uniform(0.2, 4)
        self.add(day, "assessment", _assessment(rng, primary, need))
        day += rng.uniform(0.1, 2)
        review = local_date(self.t0 + timedelta(days=day + 90)) if rng.random() < 0.6 else None
        care_plan = {
            "goals": rng.sample(GOALS, rng.randint(1, 3)),
            "person_participated": rng.random() < 0.9,
            "review_on": review,
        }
        self.add(day, "care_plan", care_plan)

        last_referral = day
        end_day: float | None = None
        if access:
            if rng.random() < 0.15:  # a first unit declines, another accepts
                day += rng.uniform(0.1, 2)
                first = self.refer(self.choose(rng.random() < 0.5, substances, district), day)
                day += rng.uniform(0.5, 4)
                reason = rng.choice(["LACK_OF_CAPACITY", "NOT_THE_RIGHT_INTERVENTION"])
                self.add(day, "decline", {"reason": reason}, first)
            day += rng.uniform(0.1, 2)
            ref = self.refer(self.choose(top, substances, district), day)
            last_referral = day
            day += rng.uniform(0.5, 4)
            # timely: first intervention within 30 days of intake (the audit's TIMELY_DAYS)
            start = rng.uniform(day + 0.3, 29.5) if timely else rng.uniform(31, 150)
            start = max(start, day + 0.3)
            planned = local_date(self.t0 + timedelta(days=start)) if rng.random() < 0.5 else None
            self.add(day, "accept", {"planned_start": planned}, ref)
            self.add(start, "start", {}, ref)
            end_day = start + (rng.uniform(1, 6.5) if rng.random() < 0.12 else rng.uniform(14, 200))
            outcome = rng.choice(
                ["COMPLETED_AS_PLANNED"] * 3 + ["DROPPED_OUT", "NO_LONGER_NEEDED", "MOVED"]
            )
            self.add(end_day, "end", {"outcome": outcome}, ref)
            self.followups(ref, start, end_day, followups_done)
        elif rng.random() < 0.35:  # referred, but the unit declines
            day += rng.uniform(0.1, 2)
            ref = self.refer(self.choose(rng.random() < 0.5, substances, district), day)
            last_referral = day
            day += rng.uniform(0.5, 4)
            reason = rng.choice(["LACK_OF_CAPACITY", "PERSON_DECLINED", "UNABLE_TO_CONTACT"])
            self.add(day, "decline", {"reason": reason}, ref)

        consent_steps = [s for s in self.steps if s.action == "consent"]
        if consent_steps and consent_steps[-1].body["valid_until"] is None and rng.random() < 0.1:
            self.add(last_referral + rng.uniform(5, 100), "withdraw_consent", {}, self.consents - 1)

        self.family(children, family)

        close_day: float | None = None
        if rng.random() < 0.7:
            close_day = (end_day if end_day is not None else day) + rng.uniform(7, 120)
            reason = rng.choice(["GOALS_REACHED", "PLANNED_END", "PERSON_DECLINED", "NO_CONTACT"])
            self.add(close_day, "close", {"reason": reason})
            if rng.random() < 0.15:
                reopen = close_day + rng.uniform(20, 500)
                self.add(reopen, "reopen", {"reason": rng.choice(["RELAPSE", "NEW_NEED"])})
                if rng.random() < 0.5:
                    self.add(reopen + rng.uniform(30, 200), "close", {"reason": "PLANNED_END"})
        if rng.random() < 0.05:  # moved within the city: after every referral, while open
            low = last_referral + 1
            high = close_day - 1 if close_day is not None else low + 365
            if high > low:
                moved = rng.uniform(low, high)
                on = local_date(self.t0 + timedelta(days=moved))
                targets = [
                    d.code
                    for d in p.registry.current(on)
                    if p.registry.successor_of(d.code) != district
                ]
                self.add(
                    moved,
                    "transfer",
                    {"to_district": rng.choice(targets), "reason": "PERSON_MOVED"},
                )

        self.care_chain(district, need, access, close_day)
        number = _identity_number(rng, birth_year, taken)
        due = sorted((s for s in self.steps if s.at < p.now), key=lambda s: s.at)
        return PersonPlan(self.key, code, need, number, tuple(due))

    def _day(self, step: Step) -> float:
        return (step.at - self.t0).total_seconds() / 86400

    def care_chain(self, district: str, need: str, access: bool, close_day: float | None) -> None:
        """The investigation and its decision, the first personal visit, a coordinated plan
        with the region where a consent covers healthcare, and the person's own assessment
        at completed follow-ups. Intake's steps fall while the case is still open (before
        its first closing); a first visit that would come later is never held (censored)."""
        rng = self.care
        last = close_day - 0.05 if close_day is not None else math.inf  # still open

        opened = rng.uniform(0.3, 3)
        self.add(opened, "investigation", {"basis": _pick(rng, INVESTIGATION_BASES)})
        decided = opened + rng.uniform(14, 70)  # some weeks later
        if decided >= last:
            decided = rng.uniform((opened + last) / 2, last)
        if access or rng.random() < 0.6:
            decision = "GRANTED" if rng.random() < 0.8 else "PARTLY_GRANTED"
            kinds = sorted({_pick(rng, INTERVENTION_KINDS) for _ in range(rng.choice([1, 1, 2]))})
        else:
            decision, kinds = "REFUSED", []
        self.add(decided, "decision", {"decision": decision, "intervention_kinds": kinds})

        factor = self.p.days_factor(district, "first_visit")
        visit = FIRST_VISIT_DAYS[need] * math.exp(rng.gauss(0, 0.6)) * factor
        if rng.random() < 0.95 and visit < last:
            self.add(max(visit, 0.05), "first_visit", {})

        healthcare = [
            s for s in self.steps if s.action == "consent" and "HEALTHCARE" in s.body["recipients"]
        ]
        if healthcare and rng.random() < 0.5:
            consent = healthcare[0]
            withdrawn = [
                self._day(s)
                for s in self.steps
                if s.action == "withdraw_consent" and s.ref == consent.ref
            ]
            agreed = self._day(consent) + rng.uniform(1, 40)
            if agreed < min([last, *withdrawn]):
                others = rng.sample(SIP_PARTIES, rng.choice([1, 1, 2]))
                lead = "SOCIAL_SERVICES" if rng.random() < 0.5 else others[0]
                follow_up_on = local_date(self.t0 + timedelta(days=agreed + rng.uniform(60, 120)))
                sip = {
                    "parties": ["SOCIAL_SERVICES", *others],
                    "lead": lead,
                    "follow_up_on": follow_up_on,
                    "consent": consent.ref,
                }
                self.add(agreed, "sip", sip, 0)
                held = _local(follow_up_on, rng.uniform(8, 16)) + timedelta(
                    days=rng.uniform(-7, 14)
                )
                followed = max((held - self.t0).total_seconds() / 86400, agreed + 1)
                if rng.random() < 0.8 and followed < last:
                    self.add(followed, "sip_followup", {}, 0)

        for s in [s for s in self.steps if s.action == "followup_completed"]:
            if rng.random() < 0.7:
                body = {item: _pick(rng, RATINGS) for item in USER_ITEMS}
                body["situation_improved"] = _pick(
                    rng, IMPROVED_RATINGS[str(s.body["situation_improved"])]
                )
                self.add(self._day(s) + rng.uniform(0.001, 0.02), "user_assessment", body)

    def family(self, children: str, engaged: bool) -> None:
        """Children recorded and family members engaged (family engagement counts only
        where the intake said there are children in the household)."""
        rng = self.rng
        if children == "YES":
            number = rng.choice([1, 1, 1, 2, 2, 3])
            youngest = rng.randint(0, 17) if rng.random() < 0.9 else None
            self.add(
                rng.uniform(1, 20),
                "children",
                {"number_of_children": number, "youngest_age": youngest},
            )
            if engaged:
                for _ in range(rng.choice([1, 1, 2])):
                    body = dict(rng.choice(CHILD_ENGAGEMENTS))
                    body["accepted"] = rng.random() < 0.8
                    self.add(rng.uniform(2, 90), "family", body)
        elif children == "NO":
            if rng.random() < 0.3:
                self.add(
                    rng.uniform(1, 20), "children", {"number_of_children": 0, "youngest_age": None}
                )
            if rng.random() < 0.15:
                relation = rng.choice(["PARTNER", "PARENT", "SIBLING"])
                self.add(
                    rng.uniform(2, 90),
                    "family",
                    {
                        "relation": relation,
                        "is_child": False,
                        "support_offered": ["INFORMATION"],
                        "accepted": rng.random() < 0.7,
                    },
                )

    def followups(self, ref: int, start: float, end: float, done: bool) -> None:
        """Complete or miss the follow-ups the service will schedule (the same rule), each
        around its due date. `done`: at least the first is completed; otherwise they are
        missed, or (sometimes) never recorded."""
        rng = self.rng
        ended = self.t0 + timedelta(days=end)
        scheduled = followups_for_intervention_end(
            {
                "intervention_id": str(uuid.UUID(int=0)),
                "started_at": self.t0 + timedelta(days=start),
            },
            ended,
            "demo",
            "demo",
        )
        for i, f in enumerate(sorted(scheduled, key=lambda f: f.due_on)):
            at = _local(f.due_on, rng.uniform(8, 16)) + timedelta(days=rng.uniform(-5, 10))
            at = max(at, ended + timedelta(hours=rng.uniform(1, 48)))
            days = (at - self.t0).total_seconds() / 86400
            if done and (i == 0 or rng.random() < 0.75):
                self.add(
                    days,
                    "followup_completed",
                    {
                        "kind": f.kind,
                        "days_of_use_last_30": rng.randint(0, 30) if rng.random() < 0.8 else None,
                        "housing": rng.choice(["OWN_HOME"] * 4 + ["SUPPORTED_HOUSING", "HOMELESS"]),
                        "occupation": rng.choice(
                            ["EMPLOYED", "UNEMPLOYED", "SICK_LEAVE_OR_PENSION", "STUDYING"]
                        ),
                        "self_rated_health": rng.randint(1, 5) if rng.random() < 0.8 else None,
                        "goals_reached": rng.choice(["YES", "PARTLY", "NO"]),
                        "situation_improved": rng.choice(["BETTER", "BETTER", "SAME", "WORSE"]),
                    },
                    ref,
                )
            elif done or rng.random() < 0.85:
                reason = rng.choice(["NO_CONTACT", "DECLINED", "MOVED"])
                self.add(days, "followup_missed", {"kind": f.kind, "reason": reason}, ref)


class _Planner:
    """What every person's draw shares: reference data, rates, the time window."""

    def __init__(
        self,
        registry: DistrictRegistry,
        reference: ReferenceCatalogue,
        biases: Sequence[Bias],
        start: datetime,
        now: datetime,
    ) -> None:
        self.registry = registry
        self.offers = _offers(reference)
        self.factors = {(b.district, b.metric): b.factor for b in biases}
        self.start, self.now = start, now
        current = [d.code for d in registry.current(local_date(now))]
        self.weights = {c: DISTRICT_WEIGHTS.get(c, 0.2) for c in current}
        mixes = DEFAULT_NEED_MIXES
        self.need_mix = {
            c: dict(zip(NEED_LEVELS, mixes[i % len(mixes)], strict=True))
            for i, c in enumerate(current)
        }

    def days_factor(self, district: str, wait: str) -> float:
        return self.factors.get((district, wait), 1.0)

    def rate(self, district: str, metric: str, need: str) -> float:
        factor = self.factors.get((district, metric), 1.0)
        return min(1.0, max(0.0, BASE_RATES[metric][need] * factor))

    def recorded_code(self, rng: random.Random, district: str, day: date) -> str:
        """The code valid on `day` that `district` continues (an old district committee
        before the 2021 reorganisation)."""
        if self.registry.valid_on(district, day):
            return district
        older = sorted(
            d.code
            for d in self.registry
            if d.valid_on(day) and self.registry.successor_of(d.code) == district
        )
        if not older:
            raise ValueError(f"no district continues into {district!r} on {day.isoformat()}")
        return rng.choice(older)


def _years_before(moment: datetime, years: int) -> datetime:
    try:
        return moment.replace(year=moment.year - years)
    except ValueError:  # 29 February
        return moment.replace(year=moment.year - years, day=28)


def plan(
    seed: int,
    persons: int,
    years: int,
    biases: Sequence[Bias],
    today: datetime | date,
) -> list[PersonPlan]:
    """Deterministic plans for `persons` persons with intakes spread over the `years`
    before `today` (a datetime: that moment is "now"; a date: its start, UTC). Same
    arguments, same plans; a person's plan depends only on the seed and their index."""
    if persons < 0:
        raise ValueError("persons must be zero or more")
    if years < 1:
        raise ValueError("years must be at least 1")
    now = today if isinstance(today, datetime) else datetime.combine(today, dtime(0), UTC)
    if now.tzinfo is None:
        raise ValueError("today needs a time zone")
    now = now.astimezone(UTC)
    start = _years_before(now, years)
    registry = DistrictRegistry.load()
    earliest = min(d.valid_from for d in registry)
    if local_date(start) < earliest:
        raise ValueError(f"years reaches before {earliest.isoformat()}, the first district data")
    known = {d.code for d in registry.current(local_date(now))}
    for b in biases:
        if b.district not in known:
            raise ValueError(f"bias district {b.district!r} is not a current district")
    planner = _Planner(registry, ReferenceCatalogue.load(), biases, start, now)
    taken: set[str] = set()
    return [_PersonDraw(planner, f"{seed}:{i}").draw(taken) for i in range(persons)]


# --- the direct path: the events the services would emit ----------------------------------


def _id(*parts: object) -> str:
    return str(uuid.uuid5(DEMO_NAMESPACE, ":".join(str(p) for p in parts)))


class _Emitter:
    """Encodes events like the services' event stores (Avro, validated against schemas/)
    and decodes them like a consumer, so they are exactly what a projection would see."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.offsets: Counter[str] = Counter()
        self.events: list[Incoming] = []

    def emit(
        self,
        service: str,
        stream: str,
        version: int,
        case_id: str,
        event_type: str,
        data: Mapping[str, Any],
        at: datetime,
        district: str,
        actor: str,
        causation: str | None = None,
    ) -> str:
        event_id = _id("event", service, stream, version)
        metadata = {
            "event_id": event_id,
            "event_type": event_type,
            "case_id": case_id,
            "stream_version": version,
            "occurred_at": at,
            "recorded_at": at,
            "producer": f"likvard-{service}",
            "district": district,
            "actor": actor,
            "correlation_id": causation or event_id,
            "causation_id": causation,
            "traceparent": None,
        }
        topic = TOPICS[service]
        encoded = self.catalogue.encode(event_type, {"metadata": metadata, **data})
        self.events.append(decode_event(self.catalogue, topic, 0, self.offsets[topic], encoded))
        self.offsets[topic] += 1
        return event_id


def _simulate(plan: PersonPlan, out: _Emitter, reference: ReferenceCatalogue) -> None:
    """One person's events, decided as the three services decide them."""
    key = plan.key
    case_id = _id("case", key)
    actor = f"demo-cw-{plan.district}"
    district = plan.district
    versions: Counter[str] = Counter()
    person_district: dict[int, str] = {}
    started: dict[int, datetime] = {}

    def emit(
        service: str,
        stream: str,
        event_type: str,
        data: Mapping[str, Any],
        at: datetime,
        where: str,
        who: str = actor,
        causation: str | None = None,
    ) -> str:
        versions[stream] += 1
        name = f"{case_id}:{stream}"  # unique per person: event ids derive from it
        return out.emit(
            service, name, versions[stream], case_id, event_type, data, at, where, who, causation
        )

    for n, step in enumerate(plan.steps):
        b, at, ref = step.body, step.at, step.ref
        rid = _id("referral", key, ref)
        iid = _id("intervention", key, ref)
        match step.action:
            case "intake":
                # The direct path stands for what the intake service stores, not for a
                # district system (which asks POST /pseudonyms and never holds a secret):
                # `pseudonymise` is intake's own function, keyed here with the demo's key.
                data = {
                    "person": pseudonymise(plan.personal_identity_number, DEMO_SECRET),
                    "district": b["district"],
                    "substances": list(b["substances"]),
                    "referral_source": b["referral_source"],
                    "children_in_household": b["children_in_household"],
                    "birth_year": b["birth_year"],
                    "age_band": age_band(b["birth_year"], local_date(at).year),
                    "gender": b["gender"],
                }
                emit("intake", "case", "IntakeRegistered", data, at, district)
            case "assessment":
                data = {"assessment_id": _id("assessment", key, n), **b}
                emit("intake", "case", "AssessmentCompleted", data, at, district)
            case "care_plan":
                data = {"plan_id": _id("plan", key, n), **b}
                emit("intake", "case", "CarePlanAgreed", data, at, district)
            case "consent":
                data = {"consent_id": _id("consent", key, ref), **b}
                emit("intake", "case", "ConsentRecorded", data, at, district)
            case "withdraw_consent":
                data = {"consent_id": _id("consent", key, ref)}
                emit("intake", "case", "ConsentWithdrawn", data, at, district)
            case "transfer":
                data = {
                    "from_district": district,
                    "to_district": b["to_district"],
                    "reason": b["reason"],
                }
                district = b["to_district"]
                emit("intake", "case", "CaseTransferred", data, at, district)
            case "close":
                emit("intake", "case", "CaseClosed", dict(b), at, district)
            case "reopen":
                emit("intake", "case", "CaseReopened", dict(b), at, district)
            case "referral":
                unit = reference.unit(b["unit_id"])
                assert unit is not None
                person_district[ref or 0] = district
                consent = b.get("consent")
                data = {
                    "referral_id": rid,
                    "unit_id": unit.id,
                    "intervention_code": b["intervention_code"],
                    "person_district": district,
                    "unit_district": unit.host_district,
                    "recipient_kind": unit.recipient_kind,
                    "consent_id": None if consent is None else _id("consent", key, consent),
                    "consent_override": b.get("consent_override"),
                }
                emit("referral", rid, "ReferralRequested", data, at, district)
                if unit.host_district != district:
                    across = {
                        "referral_id": rid,
                        "unit_id": unit.id,
                        "from_district": district,
                        "to_district": unit.host_district,
                    }
                    emit("referral", rid, "ReferredAcrossDistrict", across, at, district)
            case "accept":
                data = {"referral_id": rid, "planned_start": b["planned_start"]}
                emit("referral", rid, "ReferralAccepted", data, at, person_district[ref or 0])
            case "decline":
                data = {"referral_id": rid, "reason": b["reason"]}
                emit("referral", rid, "ReferralDeclined", data, at, person_district[ref or 0])
            case "start":
                requested = _requested(plan, ref)
                unit = reference.unit(requested["unit_id"])
                iv = reference.intervention(requested["intervention_code"])
                assert unit is not None and iv is not None
                started[ref or 0] = at
                data = {
                    "intervention_id": iid,
                    "referral_id": rid,
                    "intervention_code": iv.code,
                    "unit_id": unit.id,
                    "guideline_priority": iv.guideline_priority if iv.verified else None,
                }
                emit("referral", rid, "InterventionStarted", data, at, person_district[ref or 0])
            case "end":
                where = person_district[ref or 0]
                data = {
                    "intervention_id": iid,
                    "referral_id": rid,
                    "intervention_code": _requested(plan, ref)["intervention_code"],
                    "started_at": started[ref or 0],
                    "outcome": b["outcome"],
                }
                ended_id = emit("referral", rid, "InterventionEnded", data, at, where)
                for c in followups_for_intervention_end(data, at, where, case_id):
                    # the follow-up decider makes the payload, exactly as the service does
                    for e in followup_domain.decide(c, followup_domain.initial_state()):
                        emit(
                            "followup",
                            "followup",
                            e.type,
                            e.data,
                            e.occurred_at,
                            c.district,
                            "likvard-followup-scheduler",
                            ended_id,
                        )
            case "investigation":
                data = {"investigation_id": _id("investigation", key), **b}
                emit("intake", "case", "InvestigationOpened", data, at, district)
            case "decision":
                data = {"investigation_id": _id("investigation", key), **b}
                emit("intake", "case", "InvestigationDecided", data, at, district)
            case "first_visit":
                emit(
                    "intake",
                    "case",
                    "FirstVisitHeld",
                    {"visit_id": _id("visit", key)},
                    at,
                    district,
                )
            case "sip":
                data = {
                    "plan_id": _id("sip", key, ref),
                    "parties": list(b["parties"]),
                    "lead": b["lead"],
                    "follow_up_on": b["follow_up_on"],
                    "consent_id": _id("consent", key, b["consent"]),
                }
                emit("intake", "case", "CoordinatedPlanAgreed", data, at, district)
            case "sip_followup":
                data = {"plan_id": _id("sip", key, ref)}
                emit("intake", "case", "CoordinatedPlanFollowedUp", data, at, district)
            case "user_assessment":
                data = {"assessment_id": _id("user-assessment", key, n), **b}
                emit("followup", "followup", "UserAssessmentRecorded", data, at, district)
            case "children":
                emit("followup", "followup", "ChildrenInHouseholdRecorded", dict(b), at, district)
            case "family":
                data = {"member_id": _id("member", key, n), **b}
                emit("followup", "followup", "FamilyMemberEngaged", data, at, district)
            case "followup_completed" | "followup_missed":
                data = {"followup_id": derived_followup_id(iid, b["kind"]), **b}
                event_type = (
                    "FollowUpCompleted" if step.action == "followup_completed" else "FollowUpMissed"
                )
                emit("followup", "followup", event_type, data, at, district)
            case other:
                raise ValueError(f"unknown step action {other!r}")


def _requested(plan: PersonPlan, ref: int | None) -> Mapping[str, Any]:
    return next(s.body for s in plan.steps if s.action == "referral" and s.ref == ref)


def to_events(plans: Sequence[PersonPlan]) -> list[Incoming]:
    """The decoded events the services would emit for these plans (follow-ups scheduled
    by the follow-up service's rule), with deterministic ids, in each person's order."""
    out = _Emitter(Catalogue.load())
    reference = ReferenceCatalogue.load()
    for p in plans:
        _simulate(p, out, reference)
    return out.events


# --- the executor over the public HTTP APIs --------------------------------------------------


@dataclass(frozen=True)
class DemoUrls:
    """Where the write services answer, and the development OpenID provider that signs
    the demo's staff in (default LIKVARD_OIDC_ISSUER, else the one `likvard up` starts)."""

    intake: str = "http://127.0.0.1:8001"
    referral: str = "http://127.0.0.1:8002"
    followup: str = "http://127.0.0.1:8003"
    issuer: str = field(
        default_factory=lambda: os.environ.get("LIKVARD_OIDC_ISSUER") or "http://127.0.0.1:8009"
    )


class SignInFailed(RuntimeError):
    """The development OpenID provider gave the demo no token (not running, or not the
    development provider); the text says which issuer, never a token."""


# The development provider's dev client, which may name a token's claims (development
# only: see likvard/cli/devidp.py) and the password of its ready-made users.
_DEV_CLIENT = {"client_id": "likvard-dev", "client_secret": "dev"}
_DEV_PASSWORD = "dev"


class _Tokens:
    """Access tokens of the demo's staff, fetched from the provider once and again when
    one nears its expiry. A case worker of a district also holds the district codes of the
    earlier structure it succeeded (the demo's older cases keep the codes of their day)."""

    def __init__(self, client: httpx.AsyncClient, issuer: str) -> None:
        self.client, self.issuer = client, issuer.rstrip("/")
        self.registry = DistrictRegistry.load()
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def owner(self, district: str) -> str:
        """The district of today whose case workers handle cases of `district`."""
        return self.registry.successor_of(district)

    async def header(self, who: tuple[str, str]) -> dict[str, str]:
        cached = self._cache.get(who)
        if cached is None or cached[1] - time.monotonic() < 60:
            lock = self._locks.setdefault(who, asyncio.Lock())
            async with lock:
                cached = self._cache.get(who)
                if cached is None or cached[1] - time.monotonic() < 60:
                    cached = self._cache[who] = await self._fetch(who)
        return {"Authorization": f"Bearer {cached[0]}"}

    def forget(self, who: tuple[str, str]) -> None:
        self._cache.pop(who, None)

    async def _fetch(self, who: tuple[str, str]) -> tuple[str, float]:
        kind, code = who
        form: dict[str, Any]
        if kind == "unit":
            form = {"grant_type": "password", "username": f"unit-staff-{code}"}
            form["password"] = _DEV_PASSWORD
        else:
            older = [d.code for d in self.registry if d.code != code and self.owner(d.code) == code]
            form = {"grant_type": "client_credentials", **_DEV_CLIENT, "role": "case-worker"}
            form |= {"district": [code, *older], "subject": f"dev-cw-{code}"}
        try:
            r = await self.client.post(f"{self.issuer}/token", data=form, timeout=10)
            r.raise_for_status()
            body = r.json()
            return str(body["access_token"]), time.monotonic() + float(body["expires_in"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise SignInFailed(
                f"no token from the development OpenID provider at {self.issuer}"
                f" ({type(exc).__name__}): start the stack with `likvard up`, or set"
                " LIKVARD_OIDC_ISSUER to the provider it started"
            ) from exc


@dataclass
class DemoStats:
    """What a run did. `errors` counts failed steps by "action status problem-code" (never
    a submitted value); `skipped` are the later steps of a person whose step failed."""

    persons: int = 0
    steps: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    retries: int = 0
    conflicts: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def failure_share(self) -> float:
        return (self.failed + self.skipped) / self.steps if self.steps else 0.0

    def summary(self) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        text = (
            f"{self.persons} persons, {self.done}/{self.steps} steps done in {self.seconds:.1f} s"
            f" ({rate:.0f} steps/s); {self.failed} failed, {self.skipped} skipped,"
            f" {self.retries} retries, {self.conflicts} version conflicts"
        )
        if self.errors:
            text += "; errors: " + ", ".join(f"{k} x{v}" for k, v in self.errors.most_common(10))
        return text


class DemoFailed(RuntimeError):
    """More than `FAILURE_LIMIT` of the steps failed; `stats` says which."""

    def __init__(self, stats: DemoStats) -> None:
        super().__init__(
            f"demo failed: {stats.failure_share:.1%} of steps failed; {stats.summary()}"
        )
        self.stats = stats


class _StepFailed(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


# Answers that mean "learnt through Kafka, not yet": retried until the deadline.
_NOT_YET = {
    ("referral", 422, "case-not-found"),
    ("referral", 422, "consent-not-in-force"),
    ("followup", 404, "case-not-known"),
}
_PATHS = {
    "assessment": "assessments",
    "care_plan": "care-plan",
    "consent": "consents",
    "transfer": "transfer",
    "close": "close",
    "reopen": "reopen",
    "children": "children",
    "family": "family",
    "first_visit": "first-visit",
    "user_assessment": "user-assessments",
}


def _json(body: Mapping[str, Any], at: datetime) -> dict[str, Any]:
    out = {k: v.isoformat() if isinstance(v, date) else v for k, v in body.items()}
    out["occurred_at"] = at.isoformat()
    return out


def _problem_code(response: httpx.Response) -> str:
    try:
        return str(response.json().get("type", "")).rsplit("/", 1)[-1] or "-"
    except (ValueError, AttributeError):
        return "-"


class _PersonRun:
    """One person's steps, in order, against the services; ids learnt on the way."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        urls: DemoUrls,
        plan: PersonPlan,
        stats: DemoStats,
        wait: float,
        tokens: _Tokens,
    ) -> None:
        self.client, self.urls, self.plan, self.stats, self.wait = client, urls, plan, stats, wait
        self.tokens = tokens
        self.district = plan.district  # the case's current district (a transfer moves it)
        self.moved = False  # the other services learn of a transfer through Kafka
        self.units: dict[int | None, str] = {}  # ref -> the unit the referral is addressed to
        self.who = ("district", tokens.owner(plan.district))  # who signs the step in
        self.case_id = ""
        self.case_version = 0
        self.referrals: dict[int | None, tuple[str, int]] = {}  # ref -> (id, version)
        self.interventions: dict[int | None, str] = {}
        self.consents: dict[int | None, str] = {}
        self.investigation = ""
        self.plans: dict[int | None, str] = {}  # ref -> coordinated plan id

    def signer(self, action: str, ref: int | None) -> tuple[str, str]:
        """Who does the step: the unit's staff answer a referral, the case worker of the
        case's current district does everything else."""
        if action in ("accept", "decline", "start", "end"):
            return ("unit", self.units[ref])
        return ("district", self.tokens.owner(self.district))

    async def send(
        self,
        action: str,
        service: str,
        path: str,
        body: Mapping[str, Any] | None,
        version: int | None = None,
    ) -> httpx.Response:
        """POST (or GET without body) with retries: connection refused and 5xx, and what
        the service learns through Kafka, until the deadline; 409 with the ETag's version;
        401 once with a new token."""
        base = getattr(self.urls, service)
        deadline = time.monotonic() + self.wait
        pause = 0.05
        conflicts = 0
        renewed = False
        who = self.who
        while True:
            headers = await self.tokens.header(who)
            if version is not None:
                headers["If-Match"] = f'"{version}"'
            try:
                if body is None:
                    r = await self.client.get(base + path, headers=headers)
                else:
                    r = await self.client.post(base + path, json=body, headers=headers)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
                # Not connected: nothing was sent. A dropped connection may have carried a
                # POST that was stored, so only a read is repeated then.
                sent = isinstance(exc, httpx.RemoteProtocolError) and body is not None
                if not sent and time.monotonic() < deadline:
                    self.stats.retries += 1
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                raise _StepFailed(f"{action} {type(exc).__name__}") from exc
            if r.status_code < 300:
                return r
            code = _problem_code(r)
            if r.status_code == 401 and not renewed:
                renewed = True
                self.tokens.forget(who)
                continue
            if r.status_code == 409 and "etag" in r.headers and conflicts < 10:
                conflicts += 1
                self.stats.conflicts += 1
                version = int(r.headers["etag"].strip('W/"'))
                continue
            retryable = (service, r.status_code, code) in _NOT_YET or r.status_code >= 500
            # After a transfer, referral and follow-up learn the new district through Kafka.
            retryable |= self.moved and service != "intake" and r.status_code == 403
            if retryable and time.monotonic() < deadline:
                self.stats.retries += 1
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            raise _StepFailed(f"{action} {r.status_code} {code}")

    async def step(self, s: Step) -> None:
        body = _json(s.body, s.at)
        ref = s.ref
        self.who = self.signer(s.action, ref)
        match s.action:
            case "intake":
                body["personal_identity_number"] = self.plan.personal_identity_number
                r = await self.send("intake", "intake", "/cases", body)
                self.case_id, self.case_version = r.json()["case_id"], r.json()["version"]
            case "assessment" | "care_plan" | "transfer" | "close" | "reopen" | "first_visit":
                path = f"/cases/{self.case_id}/{_PATHS[s.action]}"
                r = await self.send(s.action, "intake", path, body, self.case_version)
                self.case_version = r.json()["version"]
                if s.action == "transfer":
                    self.district, self.moved = str(s.body["to_district"]), True
            case "investigation" | "decision" | "sip" | "sip_followup":
                await self.care_chain(s.action, body, ref)
            case "consent":
                path = f"/cases/{self.case_id}/consents"
                r = await self.send(s.action, "intake", path, body, self.case_version)
                self.case_version = r.json()["version"]
                # The answer names the event, not the consent id: read it from the event
                # (the case view lists only consents in force today, not expired ones).
                stored = {e["event_id"] for e in r.json()["events"]}
                listed = await self.send(s.action, "intake", f"/cases/{self.case_id}/events", None)
                found = [
                    e["payload"]["consent_id"] for e in listed.json() if e["event_id"] in stored
                ]
                if len(found) != 1:
                    raise _StepFailed("consent id-not-found")
                self.consents[ref] = str(found[0])
            case "withdraw_consent":
                path = f"/cases/{self.case_id}/consents/{self.consents[ref]}/withdraw"
                r = await self.send(s.action, "intake", path, body, self.case_version)
                self.case_version = r.json()["version"]
            case "referral":
                consent = body.pop("consent", None)
                if consent is not None:
                    body["consent_id"] = self.consents[consent]
                body["case_id"] = self.case_id
                self.units[ref] = str(body["unit_id"])
                r = await self.send(s.action, "referral", "/referrals", body)
                self.referrals[ref] = (r.json()["referral_id"], r.json()["version"])
            case "accept" | "decline" | "start":
                rid, version = self.referrals[ref]
                tail = "interventions" if s.action == "start" else s.action
                r = await self.send(s.action, "referral", f"/referrals/{rid}/{tail}", body, version)
                self.referrals[ref] = (rid, r.json()["version"])
                if s.action == "start":
                    self.interventions[ref] = r.json()["intervention_id"]
            case "end":
                rid, version = self.referrals[ref]
                path = f"/interventions/{self.interventions[ref]}/end"
                r = await self.send(s.action, "referral", path, body, version)
                self.referrals[ref] = (rid, r.json()["version"])
            case "children" | "family" | "user_assessment":
                path = f"/cases/{self.case_id}/{_PATHS[s.action]}"
                await self.send(s.action, "followup", path, body)
            case "followup_completed" | "followup_missed":
                fid, version = await self.scheduled(s.action, ref, str(s.body["kind"]))
                body.pop("kind")
                verb = "complete" if s.action == "followup_completed" else "missed"
                await self.send(s.action, "followup", f"/followups/{fid}/{verb}", body, version)
            case other:
                raise _StepFailed(f"{other} unknown-action")

    async def care_chain(self, action: str, body: dict[str, Any], ref: int | None) -> None:
        """An investigation (its id from the answer) and its decision, a coordinated plan
        (on the consent recorded earlier; its id from the answer) and its follow-up."""
        case = f"/cases/{self.case_id}"
        match action:
            case "investigation":
                path = f"{case}/investigations"
            case "decision":
                path = f"{case}/investigations/{self.investigation}/decision"
            case "sip":
                body["consent_id"] = self.consents[body.pop("consent")]
                path = f"{case}/coordinated-plans"
            case _:
                path = f"{case}/coordinated-plans/{self.plans[ref]}/follow-up"
        r = await self.send(action, "intake", path, body, self.case_version)
        self.case_version = r.json()["version"]
        if action == "investigation":
            self.investigation = str(r.json()["investigation_id"])
        elif action == "sip":
            self.plans[ref] = str(r.json()["plan_id"])

    async def scheduled(self, action: str, ref: int | None, kind: str) -> tuple[str, int]:
        """The follow-up's id once the service has scheduled it (it learns of the ended
        intervention through Kafka), and the case's follow-up stream version."""
        fid = derived_followup_id(self.interventions[ref], kind)
        deadline = time.monotonic() + self.wait
        pause = 0.05
        while True:
            r = await self.send(action, "followup", f"/cases/{self.case_id}/followups", None)
            if any(f["followup_id"] == fid for f in r.json()["followups"]):
                return fid, int(r.json()["version"])
            if time.monotonic() >= deadline:
                raise _StepFailed(f"{action} followup-not-scheduled")
            self.stats.retries += 1
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def run(self, progress: Callable[[int], None]) -> None:
        steps = self.plan.steps
        for i, s in enumerate(steps):
            try:
                await self.step(s)
            except _StepFailed as exc:
                left = len(steps) - i - 1
                self.stats.failed += 1
                self.stats.skipped += left
                self.stats.errors[exc.key] += 1
                progress(1 + left)
                return
            except (httpx.HTTPError, KeyError, ValueError) as exc:  # an answer we cannot use
                left = len(steps) - i - 1
                self.stats.failed += 1
                self.stats.skipped += left
                self.stats.errors[f"{s.action} {type(exc).__name__}"] += 1
                progress(1 + left)
                return
            self.stats.done += 1
            progress(1)


async def _run_all(
    plans: Sequence[PersonPlan],
    urls: DemoUrls,
    concurrency: int,
    progress: Callable[[int], None],
    stats: DemoStats,
    wait: float,
) -> None:
    limits = httpx.Limits(
        max_connections=concurrency * 3, max_keepalive_connections=concurrency * 3
    )
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        tokens = _Tokens(client, urls.issuer)
        # Sign in once before anything is sent: a provider that does not answer stops the
        # demo at once, with the fix, instead of failing every person.
        if plans:
            await tokens.header(("district", tokens.owner(plans[0].district)))

        async def one(p: PersonPlan) -> None:
            async with gate:
                await _PersonRun(client, urls, p, stats, wait, tokens).run(progress)

        await asyncio.gather(*(one(p) for p in plans))


def run(
    plans: Sequence[PersonPlan],
    urls: DemoUrls,
    *,
    concurrency: int = 16,
    progress: Callable[[int], None] | None = None,
    wait_seconds: float = 60.0,
) -> DemoStats:
    """Send every plan's steps to the services (persons in parallel, each in order).
    `progress(n)` is told of every n steps finished. Raises DemoFailed when more than 1% of
    the steps failed or were skipped after a failure, SignInFailed when the development
    OpenID provider gives no token."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    stats = DemoStats(persons=len(plans), steps=sum(len(p.steps) for p in plans))
    started = time.monotonic()
    asyncio.run(
        _run_all(plans, urls, concurrency, progress or (lambda n: None), stats, wait_seconds)
    )
    stats.seconds = time.monotonic() - started
    if stats.failure_share > FAILURE_LIMIT:
        raise DemoFailed(stats)
    return stats


def main(
    persons: int,
    years: int,
    biases: list[str],
    seed: int,
    urls: DemoUrls,
    console: Console,
) -> DemoStats:
    """`likvard demo`: plan, run with a progress bar, print the summary (never a person)."""
    now = datetime.now(UTC)
    parsed = parse_biases(biases, on=local_date(now))
    plans = plan(seed, persons, years, parsed, now)
    total = sum(len(p.steps) for p in plans)
    planted = ", ".join(f"{b.district}:{b.metric}x{b.factor:g}" for b in parsed) or "none"
    console.print(
        f"Demo: {persons} persons, {years} years, seed {seed}, {total} steps; bias: {planted}"
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("steps", total=total)
        try:
            stats = run(plans, urls, progress=lambda n: bar.advance(task, n))
        except DemoFailed as exc:
            console.print(f"[red]{exc.stats.summary()}[/red]")
            raise
    console.print(stats.summary())
    return stats
