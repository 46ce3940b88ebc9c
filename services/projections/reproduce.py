"""Reproducible figures: a report's record (provenance + every figure) and its replay.

A report is made in one snapshot of the read models (`snapshot`): its figures and the
schema's provenance (`provenance.py`: the offsets per topic partition the figures were
folded from, a digest of the chain heads of the streams up to there, the replay cutoffs)
are read in one REPEATABLE READ transaction, so they match whatever the worker does
meanwhile. The record adds the code version, the reference-data version and every
parameter, including the instant the report was computed "as of" (the share of closed
cases not reopened within a year depends on it).

`reproduce` replays Kafka up to exactly those offsets (with the same cutoffs) into a fresh
schema, recomputes the report with the same parameters, compares every figure and the
chain-heads digest, and drops the schema. Numbers compare equal when they are the same
up to a relative 1e-9 (floating-point rounding of the statistics library); anything else,
a figure missing or new, is a difference.

Figures are a flat mapping `section/key.../field` -> value (`figures`); a section added to
the report adds its rows here and is compared like the rest. The overdue referrals and
follow-ups (`overdue.py`) are counted on the report's last day (or the as-of day, if that
is earlier), with the two day settings as parameters; a record made before they were
(no `answer_days` in its parameters) is reproduced without them.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from likvard.config import Settings
from likvard.db import check_schema_name
from likvard.districts import DistrictRegistry
from likvard.domain import CITY_TZ
from services.projections import provenance, stats
from services.projections.audit import AuditCell, AuditReport, FlagRule, audit_report, select
from services.projections.overdue import OverdueCounts, overdue_counts
from services.projections.replay import Replay, ReplayError, as_of_cutoff
from services.projections.reports import (
    TIME_ZONE,
    Period,
    ReportRow,
    Structure,
    _district_map,
    audit_rows,
    followup_report,
    wait_rows,
)

RECORD_VERSION = 1
RECORD_ID = "likvard-record"  # the id of the element holding the record in an HTML report
MIN_CELL = 5  # the suppression threshold of the follow-up report and the audit (defaults)
REL_TOL = 1e-9
_STRUCTURES: Mapping[str, Structure] = {"current": "current", "as-recorded": "as-recorded"}
_PERIODS: Mapping[str, Period] = {"month": "month", "year": "year"}
_FLAG_RULES: Mapping[str, FlagRule] = {"holm": "holm", "band": "band"}
ANSWER_DAYS = Settings.referral_answer_days  # the configured defaults (likvard.config)
WINDOW_DAYS = Settings.followup_window_days


class ReproduceError(ValueError):
    """A record that cannot be read or reproduced; the message says why."""


@dataclass(frozen=True)
class Parameters:
    """Everything besides the events that the report's figures depend on."""

    start: date
    end: date
    structure: str
    period: str
    as_of: datetime  # the instant "now" stood for (closed-not-reopened rule)
    min_cell: int = MIN_CELL
    flag_rule: str = "holm"  # the audit's published flag: Holm-adjusted p, or the band rule
    # Overdue: a referral unanswered for more than `answer_days`, a follow-up more than
    # `window_days` past due (LIKVARD_REFERRAL_ANSWER_DAYS, LIKVARD_FOLLOWUP_WINDOW_DAYS);
    # None: no overdue counts (a record made before they were reported).
    answer_days: int | None = ANSWER_DAYS
    window_days: int | None = WINDOW_DAYS

    def __post_init__(self) -> None:
        if self.structure not in _STRUCTURES:
            raise ValueError(
                f"structure must be 'current' or 'as-recorded', not {self.structure!r}"
            )
        if self.period not in _PERIODS:
            raise ValueError(f"period must be 'month' or 'year', not {self.period!r}")
        if self.flag_rule not in _FLAG_RULES:
            raise ValueError(f"flag rule must be 'holm' or 'band', not {self.flag_rule!r}")
        if self.end < self.start:
            raise ValueError("the last day (--to) is before the first (--from)")
        if self.as_of.tzinfo is None:
            raise ValueError("as_of needs a time zone")
        if (self.answer_days is None) != (self.window_days is None):
            raise ValueError("give both overdue day settings (answer and window), or neither")
        for days in (self.answer_days, self.window_days):
            if days is not None and not 0 <= days <= 3650:
                raise ValueError(f"overdue day settings must be 0-3650 days, not {days}")

    @property
    def overdue_day(self) -> date:
        """The day the overdue items are counted on: the report's last day, or the city's
        as-of day if that is earlier (an item is not overdue on a day still to come)."""
        return min(self.end, self.as_of.astimezone(CITY_TZ).date())

    def to_json(self) -> dict[str, Any]:
        return {
            "report": "followup+equal-access",
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "structure": self.structure,
            "period": self.period,
            "as_of": self.as_of.isoformat(),
            "min_cell": self.min_cell,
            "flag_rule": self.flag_rule,
            "time_zone": TIME_ZONE,
            "answer_days": self.answer_days,
            "window_days": self.window_days,
            "overdue_on": self.overdue_day.isoformat() if self.answer_days is not None else None,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Parameters:
        try:
            return cls(
                start=date.fromisoformat(value["from"]),
                end=date.fromisoformat(value["to"]),
                structure=str(value["structure"]),
                period=str(value["period"]),
                as_of=datetime.fromisoformat(value["as_of"]),
                min_cell=int(value.get("min_cell", MIN_CELL)),
                # a record made before the rule was a parameter flagged by the band
                flag_rule=str(value.get("flag_rule", "band")),
                # and one made before the overdue counts has none
                answer_days=_optional_int(value.get("answer_days")),
                window_days=_optional_int(value.get("window_days")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReproduceError(f"the record's parameters are not readable: {exc}") from exc


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"a number of days, not {value!r}")
    return value


@dataclass(frozen=True)
class Overdue:
    """The overdue counts on `day` (per district, then the city) and the rule's days."""

    day: date
    answer_days: int
    window_days: int
    counts: list[OverdueCounts]


def default_as_of(as_of: date | None = None, known_on: date | None = None) -> datetime:
    """The report's "now": the end of the earliest cutoff day, else this instant."""
    days = [d for d in (as_of, known_on) if d is not None]
    if days:
        return as_of_cutoff(min(days))
    return datetime.now(ZoneInfo(TIME_ZONE)).replace(microsecond=0)


def _flatten(section: str, keys: Sequence[str], items: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        row = dataclasses.asdict(item)
        prefix = "/".join([section, *(str(row[k]) for k in keys)])
        for name, value in row.items():
            if name not in keys:
                out[f"{prefix}/{name}"] = value
    return out


def figures(
    rows: Sequence[ReportRow],
    cells: Sequence[AuditCell],
    made: AuditReport | None = None,
    waits: stats.WaitReport | None = None,
    overdue: Overdue | None = None,
) -> dict[str, Any]:
    """Every figure of the report by a stable name, e.g. `followup/2024/city/persons`,
    `audit/timely_start/nordost/sr` (each cell's standardised ratio, funnel position, raw
    and Holm p, both flags), `audit/comparisons`, `funnel/timely_start/phi`,
    `waits/referral_to_start/nordost/median_days`, `overdue/city/referrals_overdue`
    (JSON-ready values; a wait's curve is not a figure: its medians, percentiles and
    comparison are)."""
    out = _flatten("followup", ("period", "district"), rows)
    out |= _flatten("audit", ("metric", "district"), cells)
    if made is not None:
        out["audit/comparisons"] = made.comparisons
        out["audit/flag_rule"] = made.flag_rule
        for metric, fun in sorted(made.funnels.items()):
            for name in ("target", "phi", "phi_p_value", "phi_applied"):
                out[f"funnel/{metric}/{name}"] = getattr(fun, name)
    if waits is not None:
        out["waits/comparisons"] = waits.comparisons
        for s in waits.summaries:
            for f in dataclasses.fields(s):
                if f.name not in ("wait", "district", "curve"):
                    out[f"waits/{s.wait}/{s.district}/{f.name}"] = getattr(s, f.name)
    if overdue is not None:
        for c in overdue.counts:
            out[f"overdue/{c.district}/referrals_overdue"] = c.referrals_overdue
            out[f"overdue/{c.district}/followups_overdue"] = c.followups_overdue
    plain: dict[str, Any] = json.loads(json.dumps(out, sort_keys=True))  # as a file holds it
    return plain


@dataclass(frozen=True)
class Report:
    """A report's data and its record, read in one snapshot."""

    rows: list[ReportRow]
    cells: list[AuditCell]
    record: dict[str, Any]
    audit: AuditReport | None = None
    waits: stats.WaitReport | None = None
    overdue: Overdue | None = None


@contextmanager
def snapshot_transaction(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """One REPEATABLE READ, read-only transaction: figures and provenance of one moment.
    `conn` must have no transaction in progress."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield


@dataclass(frozen=True)
class EqualAccessAsked:
    """What an equal-access audit is asked for (None: everyone), by the API or the console.
    `district` only narrows the cells shown: the Holm family is always every district."""

    structure: Structure = "current"
    district: str | None = None
    start: date | None = None
    end: date | None = None
    need_level: str | None = None
    gender: str | None = None
    age_band: str | None = None
    flag_rule: FlagRule = "holm"

    def given(self) -> dict[str, Any]:
        """The provenance parameters: the filters only when asked for, so a record made
        before they existed reads the same."""
        out: dict[str, Any] = {
            "report": "equal-access",
            "structure": self.structure,
            "district": self.district,
            "min_cell": MIN_CELL,
            "flag_rule": self.flag_rule,
        }
        dates = {"from": self.start, "to": self.end}
        out |= {k: v.isoformat() for k, v in dates.items() if v is not None}
        chosen = {"need_level": self.need_level, "gender": self.gender, "age_band": self.age_band}
        return out | {k: v for k, v in chosen.items() if v is not None}


def equal_access(
    conn: psycopg.Connection[Any],
    schema: str,
    registry: DistrictRegistry,
    asked: EqualAccessAsked,
) -> tuple[AuditReport, dict[str, Any]]:
    """The audit of the persons asked for and its provenance, in one snapshot (`conn` has
    no transaction in progress); every cell, whatever `asked.district`."""
    with snapshot_transaction(conn):
        rows = audit_rows(conn, schema, structure=asked.structure, registry=registry)
        chosen = select(
            rows,
            start=asked.start,
            end=asked.end,
            need_level=asked.need_level,
            gender=asked.gender,
            age_band=asked.age_band,
        )
        made = audit_report(chosen, flag_rule=asked.flag_rule)
        prov = provenance_of(conn, schema, asked.given())
    return made, prov


def provenance_header(prov: Mapping[str, Any]) -> str:
    """A provenance block as the `Likvard-Provenance` header carries it: compact ASCII JSON."""
    return json.dumps(prov, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def provenance_of(
    conn: psycopg.Connection[Any], schema: str, parameters: Mapping[str, Any]
) -> dict[str, Any]:
    """The provenance block of a report over `schema` (in the caller's snapshot)."""
    made = provenance.applied(conn, schema)
    return {
        "generated_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "schema": schema,
        "offsets": made.offsets_json(),
        "chain": {"streams": made.streams, "heads_sha256": made.heads_sha256},
        "code": provenance.code_version(),
        "reference": {"version": provenance.reference_version()},
        "parameters": {
            **parameters,
            "replay": {
                "as_of": made.cutoffs.get("as_of"),
                "as_known_on": made.cutoffs.get("as_known_on"),
            },
        },
    }


def snapshot(
    conn: psycopg.Connection[Any],
    schema: str,
    params: Parameters,
    registry: DistrictRegistry | None = None,
) -> Report:
    """The follow-up report, the audit (its funnels and Holm flags), the waits, the overdue
    counts and their record, in one snapshot of `schema`."""
    registry = registry or DistrictRegistry.load()
    check_schema_name(schema)
    with snapshot_transaction(conn):
        rows = followup_report(
            conn,
            schema,
            start=params.start,
            end=params.end,
            period=_PERIODS[params.period],
            structure=_STRUCTURES[params.structure],
            min_cell=params.min_cell,
            registry=registry,
            as_of=params.as_of,
        )
        structure = _STRUCTURES[params.structure]
        made = audit_report(
            audit_rows(conn, schema, structure=structure, registry=registry),
            min_cell=params.min_cell,
            flag_rule=_FLAG_RULES[params.flag_rule],
        )
        waits = stats.wait_report(
            wait_rows(conn, schema, structure=structure, registry=registry),
            as_of=params.as_of,
            min_cell=params.min_cell,
        )
        overdue = None
        if params.answer_days is not None and params.window_days is not None:
            day = params.overdue_day
            counts = overdue_counts(
                conn,
                schema,
                day,
                answer_days=params.answer_days,
                window_days=params.window_days,
                district_map=dict(_district_map(registry, structure)),
                min_cell=params.min_cell,
            )
            overdue = Overdue(day, params.answer_days, params.window_days, counts)
        prov = provenance_of(conn, schema, params.to_json())
    record = {"likvard_report_record": RECORD_VERSION, "provenance": prov}
    record["figures"] = figures(rows, made.cells, made, waits, overdue)
    return Report(rows, made.cells, record, made, waits, overdue)


def record_json(record: Mapping[str, Any]) -> str:
    """The record as JSON text (sorted keys, indented: an edited figure is one line)."""
    return json.dumps(record, sort_keys=True, indent=1, ensure_ascii=False)


_HTML_RECORD = re.compile(rf'<pre[^>]*\bid="{RECORD_ID}"[^>]*>(.*?)</pre>', re.DOTALL)


def read_record(path: Path) -> dict[str, Any]:
    """The record in a report file: an HTML report (its embedded record) or a JSON file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReproduceError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ReproduceError(f"{path} is not a Likvärd report (not UTF-8 text)") from exc
    found = _HTML_RECORD.search(text)
    body = html.unescape(found.group(1)) if found else text
    try:
        record = json.loads(body)
    except ValueError as exc:
        where = "its embedded record" if found else "it is neither an HTML report nor JSON"
        raise ReproduceError(f"{path} is not a readable Likvärd report: {where}") from exc
    if not (
        isinstance(record, dict)
        and record.get("likvard_report_record") == RECORD_VERSION
        and isinstance(record.get("provenance"), dict)
        and isinstance(record.get("figures"), dict)
    ):
        raise ReproduceError(f"{path} holds no Likvärd report record (provenance and figures)")
    return record


@dataclass(frozen=True)
class Difference:
    figure: str
    in_file: Any
    replayed: Any


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)
    return bool(a == b)


_MISSING = "(absent)"


def compare(in_file: Mapping[str, Any], replayed: Mapping[str, Any]) -> list[Difference]:
    """Every figure that is not the same in both, in name order (absent on one side too)."""
    out: list[Difference] = []
    for name in sorted(set(in_file) | set(replayed)):
        a, b = in_file.get(name, _MISSING), replayed.get(name, _MISSING)
        if name not in in_file or name not in replayed or not _same(a, b):
            out.append(Difference(name, a, b))
    return out


@dataclass
class Reproduction:
    """The outcome of `reproduce`: identical when no list holds anything."""

    schema: str
    figures: int = 0  # figures compared
    differences: list[Difference] = field(default_factory=list)
    provenance: list[Difference] = field(default_factory=list)  # offsets, chain heads
    notes: list[str] = field(default_factory=list)  # code or reference version changed
    breaks: int = 0  # hash-chain breaks in the replayed history

    @property
    def identical(self) -> bool:
        return not (self.differences or self.provenance or self.breaks)


def _cutoff(value: Any) -> date | None:
    return None if value in (None, "") else date.fromisoformat(str(value))


def check_reproducible(record: Mapping[str, Any]) -> None:
    """ReproduceError unless the record names offsets to replay up to (checked before any
    broker is asked)."""
    if not record["provenance"].get("offsets"):
        raise ReproduceError(
            "the report names no Kafka offsets: its read models were not folded from Kafka"
            " (or predate provenance), so it cannot be replayed"
        )


def reproduce(
    dsn: str,
    bootstrap: str,
    record: Mapping[str, Any],
    schema: str,
    *,
    settle: float = 1.0,
    registry: DistrictRegistry | None = None,
) -> Reproduction:
    """Replay up to the record's offsets into the fresh `schema`, recompute the report with
    the record's parameters, compare; the schema is dropped afterwards, whatever happens."""
    prov = record["provenance"]
    try:
        until = {(str(o["topic"]), int(o["partition"])): int(o["offset"]) for o in prov["offsets"]}
        params = Parameters.from_json(prov["parameters"])
        cutoffs = prov["parameters"].get("replay") or {}
        as_of, known_on = _cutoff(cutoffs.get("as_of")), _cutoff(cutoffs.get("as_known_on"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ReproduceError(f"the record's provenance is not readable: {exc}") from exc
    check_reproducible(record)
    out = Reproduction(schema=check_schema_name(schema))
    run = Replay(
        dsn,
        bootstrap,
        sorted({topic for topic, _ in until}),
        schema,
        as_of=as_of,
        known_on=known_on,
        until=until,
        settle=settle,
    )
    try:
        result = run.run()
        out.breaks = len(result.breaks)
        with psycopg.connect(dsn) as conn:
            again = snapshot(conn, schema, params, registry)
    finally:
        run.close()
        _drop(dsn, schema)
    theirs, ours = prov, again.record["provenance"]
    out.figures = len(record["figures"])
    out.differences = compare(record["figures"], again.record["figures"])
    for name, a, b in (
        ("offsets", theirs.get("offsets"), ours["offsets"]),
        (
            "chain heads (sha256)",
            (theirs.get("chain") or {}).get("heads_sha256"),
            ours["chain"]["heads_sha256"],
        ),
    ):
        if a != b:
            out.provenance.append(Difference(name, a, b))
    for name, a, b in (
        ("code version", theirs.get("code"), ours["code"]),
        ("reference-data version", theirs.get("reference"), ours["reference"]),
    ):
        if a != b:
            out.notes.append(f"{name}: the report's {a}, now {b}")
    return out


def _drop(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


__all__ = [
    "Difference",
    "Overdue",
    "Parameters",
    "ReplayError",
    "Report",
    "ReproduceError",
    "Reproduction",
    "check_reproducible",
    "compare",
    "default_as_of",
    "figures",
    "read_record",
    "record_json",
    "reproduce",
    "snapshot",
]
