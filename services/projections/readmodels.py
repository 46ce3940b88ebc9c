"""Read models folded from every topic: `case_facts` (one row per case), `timeline`, and
`access_log` (one row per CaseAccessed event of the access-log topic; `access_log.py`).

`apply` turns a batch of decoded events into a few set-based statements in the caller's
transaction: the event ids go into `processed` first (one statement, ON CONFLICT DO
NOTHING RETURNING), and only the events new there are projected, so re-delivery, a worker
killed mid-batch and a replay never count anything twice.

Events of different topics arrive in any order (a referral may come before its intake), so
every column of `case_facts` is merged with a commutative, idempotent-per-event operation:

* ``once``: the value of the one event that carries it (IntakeRegistered): COALESCE;
* ``sum``: counters add;
* ``min`` / ``max``: LEAST / GREATEST (first and last times);
* ``or``: booleans OR;
* ``latest``: the value of the event with the greatest key (occurred_at, or the intake
  stream version), ties broken by the value's text in byte order, so Python's fold of a
  batch and the SQL merge in ON CONFLICT agree.

The batch is grouped per case in Python (the same operations), then one upsert row per
case is written with one executemany of one statement, in case id order (stable lock order
for concurrent workers). Whatever the arrival order or batch split, the rows end identical;
`checksum` proves it by comparing live and replayed read models.

Each timeline row also keeps its record's link in its stream's hash chain (`stream_id`,
`prev_hash`, `hash`, and `hash_ok`: whether the hash recomputes from the record's bytes),
when the caller passes the records' links (`timeline_chain.link_of`: the live worker and
the replay do); `chain_status` tells each stream of a case verified or broken from them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

import psycopg
from psycopg import sql

from likvard.db import check_schema_name, may_migrate, require_relations
from likvard.domain import age_band, local_date
from likvard.inbox import Incoming
from likvard.policy import Transfer
from likvard.topics import ACCESS_LOG_TOPIC, SERVICE_TOPICS
from services.projections import access_log, provenance
from services.projections.timeline_chain import (
    ChainRow,
    Link,
    StreamChain as StreamChain,  # re-exported
    fold_chains,
)

# Every topic the read models are folded from (without the deployment's prefix): the live
# worker subscribes to them and a replay reads them all from offset 0, verifying each
# stream's hash chain, the access-log streams' too.
SOURCE_TOPICS: tuple[str, ...] = (*SERVICE_TOPICS.values(), ACCESS_LOG_TOPIC)


class Merge(Enum):
    ONCE = "once"
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    OR = "or"
    LATEST = "latest"
    KEY = "key"  # the ordering key of a LATEST column


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    merge: Merge
    key: str | None = None  # for LATEST: the column holding its ordering key


def _col(name: str, sql_type: str, merge: Merge, key: str | None = None) -> Column:
    return Column(name, sql_type, merge, key)


UA_ITEMS: tuple[str, ...] = (
    "contact_easy",
    "clear_information",
    "felt_understood",
    "influence",
    "whole_situation",
    "situation_improved",
)
"""The items of UserAssessmentRecorded (the national user survey), each rated YES, PARTLY,
NO or NO_ANSWER: `ua_<item>_yes` counts the YES, `ua_<item>_answered` every answer but
NO_ANSWER (the indicators' numerator and denominator)."""
ANSWERED = frozenset({"YES", "PARTLY", "NO"})

# The columns of case_facts after case_id, with how each merges.
FACTS: tuple[Column, ...] = (
    _col("person", "text", Merge.ONCE),
    _col("district_at_intake", "text", Merge.ONCE),
    _col("substances", "text[]", Merge.ONCE),
    _col("referral_source", "text", Merge.ONCE),
    _col("children_in_household", "text", Merge.ONCE),
    _col("age_band", "text", Merge.ONCE),  # a code: the birth year itself is sealed
    _col("archive_sample", "boolean", Merge.OR),  # kept from culling by the archive decision
    _col("intake_at", "timestamptz", Merge.MIN),
    _col("district_now", "text", Merge.LATEST, "district_now_version"),
    _col("district_now_version", "integer", Merge.KEY),
    _col("transfers", "integer", Merge.SUM),
    _col("status", "text", Merge.LATEST, "status_version"),
    _col("status_version", "integer", Merge.KEY),
    _col("closed_at", "timestamptz", Merge.MAX),
    _col("closings", "integer", Merge.SUM),
    _col("reopened", "integer", Merge.SUM),
    _col("assessments", "integer", Merge.SUM),
    _col("need_level", "text", Merge.LATEST, "need_level_at"),
    _col("need_level_at", "timestamptz", Merge.KEY),
    _col("referrals", "integer", Merge.SUM),
    _col("referrals_across", "integer", Merge.SUM),
    _col("referrals_accepted", "integer", Merge.SUM),
    _col("referrals_declined", "integer", Merge.SUM),
    _col("first_referral_at", "timestamptz", Merge.MIN),
    _col("interventions", "integer", Merge.SUM),
    _col("interventions_guideline_top", "integer", Merge.SUM),
    _col("interventions_ended", "integer", Merge.SUM),
    _col("first_intervention_at", "timestamptz", Merge.MIN),
    _col("family_members_engaged", "integer", Merge.SUM),
    _col("family_support_accepted", "integer", Merge.SUM),
    _col("child_engaged", "boolean", Merge.OR),
    _col("children_recorded", "integer", Merge.LATEST, "children_recorded_at"),
    _col("children_recorded_at", "timestamptz", Merge.KEY),
    _col("followups_scheduled", "integer", Merge.SUM),
    _col("followups_completed", "integer", Merge.SUM),
    _col("followups_missed", "integer", Merge.SUM),
    _col("goals_reached_yes", "integer", Merge.SUM),
    _col("situation_improved_better", "integer", Merge.SUM),
    _col("events", "integer", Merge.SUM),
    _col("first_event_at", "timestamptz", Merge.MIN),
    _col("last_event_at", "timestamptz", Merge.MAX),
    # The care chain of the national indicators (contract v3 of the intake and the events
    # added with it). Appended last: `migrate` adds them to older tables at the end, so a
    # live table and a replayed one list their columns in the same order.
    _col("gender", "text", Merge.ONCE),  # a code; null until the intake is seen
    _col("investigation_opened_at", "timestamptz", Merge.MIN),
    _col("investigation_decided_at", "timestamptz", Merge.MIN),  # the first decision
    _col("investigation_decision", "text", Merge.LATEST, "investigation_decision_at"),
    _col("investigation_decision_at", "timestamptz", Merge.KEY),
    _col("first_visit_at", "timestamptz", Merge.MIN),
    _col("sip_agreed_at", "timestamptz", Merge.MIN),
    _col("sip_followed_up_at", "timestamptz", Merge.MIN),
    _col("user_assessments", "integer", Merge.SUM),
    *(_col(f"ua_{item}_yes", "integer", Merge.SUM) for item in UA_ITEMS),
    *(_col(f"ua_{item}_answered", "integer", Merge.SUM) for item in UA_ITEMS),
)
FACT_NAMES = ("case_id", *(c.name for c in FACTS))
TABLES = {
    "case_facts": 'case_id COLLATE "C"',
    "timeline": "event_id",
    access_log.TABLE: "event_id",
}
# What the timeline shows of an event (the API's rows), then its record's chain link.
TIMELINE_COLUMNS = (
    "event_id",
    "case_id",
    "occurred_at",
    "recorded_at",
    "topic",
    "event_type",
    "stream_version",
    "district",
    "actor",
    "payload",
)
LINK_COLUMNS = ("stream_id", "prev_hash", "hash", "hash_ok")
# Columns `checksum` leaves out. The links are what a record's headers said, not what its
# event says: read models folded straight from events (no records) have none, and those
# projected before the columns existed have none for their older rows, while the replay's
# own chain check verifies every link on Kafka. So the checksum stays the checksum of the
# events' content, equal however they were fed, and equal to the one it was before.
UNCHECKED: dict[str, frozenset[str]] = {"timeline": frozenset(LINK_COLUMNS)}


def lock_key(schema: str) -> str:
    """The advisory lock of a read-model schema: live batches take it shared, migrations and
    a replay's swap exclusively (so a swap never lands in the middle of a batch)."""
    return f"proj.{schema}"


def migrate(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create the read models (idempotent); call it inside a transaction, which holds the
    schema's lock so processes starting at once do not race."""
    t = sql.Identifier(check_schema_name(schema))
    if not may_migrate(conn, schema):  # the projections role: `likvard db migrate` made them
        require_relations(conn, schema, ["processed", "case_facts", "timeline", access_log.TABLE])
        return
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (lock_key(schema),))
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(t))
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {}.processed (event_id uuid PRIMARY KEY)").format(t)
    )
    columns = []
    for c in FACTS:
        default = {Merge.SUM: " NOT NULL DEFAULT 0", Merge.OR: " NOT NULL DEFAULT false"}
        columns.append(f"{c.name} {c.sql_type}{default.get(c.merge, '')}")
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {}.case_facts (case_id text PRIMARY KEY, {})").format(
            t, sql.SQL(", ".join(columns))
        )
    )
    # Read models made by an older version gain the columns added since, at the end (the
    # age band, the archive sample, the care chain); those made before the age band held
    # the birth year in clear: drop it.
    conn.execute(
        sql.SQL("ALTER TABLE {}.case_facts {}, DROP COLUMN IF EXISTS birth_year").format(
            t, sql.SQL(", ".join(f"ADD COLUMN IF NOT EXISTS {c}" for c in columns))
        )
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.timeline (event_id uuid PRIMARY KEY,"
            " case_id text NOT NULL, occurred_at timestamptz NOT NULL,"
            " recorded_at timestamptz NOT NULL, topic text NOT NULL, event_type text NOT NULL,"
            " stream_version integer NOT NULL, district text, actor text, payload jsonb NOT NULL,"
            " stream_id text, prev_hash bytea, hash bytea, hash_ok boolean)"
        ).format(t)
    )
    # A timeline made before the chain links gains them, at the end as in a new one (its
    # older rows keep NULL: their streams show as unknown until a replay is swapped in).
    conn.execute(
        sql.SQL(
            "ALTER TABLE {}.timeline ADD COLUMN IF NOT EXISTS stream_id text,"
            " ADD COLUMN IF NOT EXISTS prev_hash bytea, ADD COLUMN IF NOT EXISTS hash bytea,"
            " ADD COLUMN IF NOT EXISTS hash_ok boolean"
        ).format(t)
    )
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS timeline_case ON {}.timeline"
            " (case_id, occurred_at, stream_version, event_id)"
        ).format(t)
    )
    access_log.migrate(conn, schema)
    provenance.migrate(conn, schema)  # what a report was computed up to


# --- the fold of one batch, per case (pure) ---------------------------------------------


_EMPTY: dict[str, Any] = {
    c.name: 0 if c.merge is Merge.SUM else False if c.merge is Merge.OR else None for c in FACTS
}


def _empty(case_id: str) -> dict[str, Any]:
    acc = dict(_EMPTY)  # a copy of the template: one per case of a batch, so it is hot
    acc["case_id"] = case_id
    return acc


def _latest(acc: dict[str, Any], name: str, key_name: str, value: Any, key: Any) -> None:
    """Keep the value with the greatest (key, text of value); same order as the SQL merge."""
    old_key = acc[key_name]
    if old_key is None or (key, str(value)) > (old_key, str(acc[name])):
        acc[name], acc[key_name] = value, key


def _least(acc: dict[str, Any], name: str, value: Any) -> None:
    if value is not None and (acc[name] is None or value < acc[name]):
        acc[name] = value


def _greatest(acc: dict[str, Any], name: str, value: Any) -> None:
    if value is not None and (acc[name] is None or value > acc[name]):
        acc[name] = value


def fold(acc: dict[str, Any], e: Incoming) -> None:
    """Add one event to a case's partial facts (every operation commutative)."""
    data, at, version = e.data, e.metadata["occurred_at"], int(e.metadata["stream_version"])
    if e.event_type == "PersonalDataErased":
        return  # an erasure is not an entry of the case: every count stays as it was
    acc["events"] += 1
    _least(acc, "first_event_at", at)
    _greatest(acc, "last_event_at", at)
    match e.event_type:
        case "IntakeRegistered":
            for name, value in (
                ("person", data["person"]),
                ("district_at_intake", data["district"]),
                ("substances", [str(s) for s in data["substances"]]),
                ("referral_source", data["referral_source"]),
                ("children_in_household", data["children_in_household"]),
                (
                    "age_band",
                    data.get("age_band") or age_band(data.get("birth_year"), local_date(at).year),
                ),
            ):
                if acc[name] is None:
                    acc[name] = value
            acc["archive_sample"] = acc["archive_sample"] or bool(data.get("archive_sample"))
            if acc["gender"] is None:  # v1 and v2 registrations decode as NOT_STATED
                acc["gender"] = str(data.get("gender") or "NOT_STATED")
            _least(acc, "intake_at", at)
            _latest(acc, "district_now", "district_now_version", data["district"], version)
            _latest(acc, "status", "status_version", "open", version)
        case "CaseTransferred":
            acc["transfers"] += 1
            _latest(acc, "district_now", "district_now_version", data["to_district"], version)
        case "CaseClosed":
            acc["closings"] += 1
            _greatest(acc, "closed_at", at)
            _latest(acc, "status", "status_version", "closed", version)
        case "CaseReopened":
            acc["reopened"] += 1
            _latest(acc, "status", "status_version", "open", version)
        case "AssessmentCompleted":
            acc["assessments"] += 1
            _latest(acc, "need_level", "need_level_at", data["need_level"], at)
        case "ReferralRequested":
            acc["referrals"] += 1
            _least(acc, "first_referral_at", at)
        case "ReferredAcrossDistrict":
            acc["referrals_across"] += 1
        case "ReferralAccepted":
            acc["referrals_accepted"] += 1
        case "ReferralDeclined":
            acc["referrals_declined"] += 1
        case "InterventionStarted":
            acc["interventions"] += 1
            priority = data.get("guideline_priority")
            if priority is not None and priority <= 2:
                acc["interventions_guideline_top"] += 1
            _least(acc, "first_intervention_at", at)
        case "InterventionEnded":
            acc["interventions_ended"] += 1
        case "FamilyMemberEngaged":
            acc["family_members_engaged"] += 1
            acc["family_support_accepted"] += 1 if data["accepted"] else 0
            acc["child_engaged"] = acc["child_engaged"] or bool(data["is_child"])
        case "ChildrenInHouseholdRecorded":
            _latest(
                acc, "children_recorded", "children_recorded_at", data["number_of_children"], at
            )
        case "FollowUpScheduled":
            acc["followups_scheduled"] += 1
        case "FollowUpCompleted":
            acc["followups_completed"] += 1
            acc["goals_reached_yes"] += 1 if data["goals_reached"] == "YES" else 0
            acc["situation_improved_better"] += 1 if data["situation_improved"] == "BETTER" else 0
        case "FollowUpMissed":
            acc["followups_missed"] += 1
        case "InvestigationOpened":
            _least(acc, "investigation_opened_at", at)
        case "InvestigationDecided":
            _least(acc, "investigation_decided_at", at)
            decision = data["decision"]
            _latest(acc, "investigation_decision", "investigation_decision_at", decision, at)
        case "FirstVisitHeld":
            _least(acc, "first_visit_at", at)
        case "CoordinatedPlanAgreed":
            _least(acc, "sip_agreed_at", at)
        case "CoordinatedPlanFollowedUp":
            _least(acc, "sip_followed_up_at", at)
        case "UserAssessmentRecorded":
            acc["user_assessments"] += 1
            for item in UA_ITEMS:
                rating = data[item]
                acc[f"ua_{item}_yes"] += 1 if rating == "YES" else 0
                acc[f"ua_{item}_answered"] += 1 if rating in ANSWERED else 0


def _merge_sql(c: Column) -> str:
    """How an upsert merges the stored value (t) with the batch's (excluded)."""
    old, new = f"t.{c.name}", f"excluded.{c.name}"
    match c.merge:
        case Merge.ONCE:
            return f"COALESCE({old}, {new})"
        case Merge.SUM:
            return f"{old} + {new}"
        case Merge.MIN:
            return f"LEAST({old}, {new})"
        case Merge.MAX | Merge.KEY:  # the winner of a LATEST pair has the greatest key
            return f"GREATEST({old}, {new})"
        case Merge.OR:
            return f"{old} OR {new}"
        case Merge.LATEST:
            k = c.key
            return (
                f"CASE WHEN excluded.{k} IS NOT NULL AND (t.{k} IS NULL OR"
                f' (excluded.{k}, {new}::text COLLATE "C") > (t.{k}, {old}::text COLLATE "C"))'
                f" THEN {new} ELSE {old} END"
            )


@functools.lru_cache(maxsize=64)
def _upsert(schema: str) -> sql.Composed:
    """One statement merging every case of a batch: a row per case from one array per
    column (unnest), in case id order (the lock order of concurrent workers). An array
    column travels as its literal text (an array of arrays would be two-dimensional)."""
    types = {"case_id": "text", **{c.name: c.sql_type for c in FACTS}}
    return sql.SQL(
        "INSERT INTO {}.case_facts AS t ({}) SELECT {} FROM unnest({}) AS u ({})"
        ' ORDER BY u.case_id COLLATE "C" ON CONFLICT (case_id) DO UPDATE SET {}'
    ).format(
        sql.Identifier(schema),
        sql.SQL(", ").join(sql.Identifier(n) for n in FACT_NAMES),
        sql.SQL(", ").join(
            sql.SQL("u.{}::{}").format(sql.Identifier(n), sql.SQL(types[n])) for n in FACT_NAMES
        ),
        sql.SQL(", ").join(
            sql.SQL("%b::{}[]").format(sql.SQL("text" if types[n].endswith("[]") else types[n]))
            for n in FACT_NAMES
        ),
        sql.SQL(", ").join(sql.Identifier(n) for n in FACT_NAMES),
        sql.SQL(", ".join(f"{c.name} = {_merge_sql(c)}" for c in FACTS)),
    )


_ARRAY_COLUMNS = frozenset(c.name for c in FACTS if c.sql_type.endswith("[]"))


def _array_literal(values: Sequence[Any] | None) -> str | None:
    """A text[] value as PostgreSQL's array literal, every element quoted."""
    if values is None:
        return None
    quoted = (str(v).replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'"{q}"' for q in quoted) + "}"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


_ENCODER = json.JSONEncoder(default=_json_default, sort_keys=True, separators=(",", ":"))
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, times in UTC: the same text for the same value, always (one
    encoder made once: `json.dumps` with these arguments builds the same one per call)."""
    return _ENCODER.encode(value)


def _uuid_key(text: str) -> str:
    """An event id in canonical form (the decoder gives it so already, nearly always)."""
    return text if _CANONICAL_UUID.fullmatch(text) else str(uuid.UUID(text))


def apply(
    conn: psycopg.Connection[Any],
    schema: str,
    events: Sequence[Incoming],
    links: Sequence[Link | None] | None = None,
) -> int:
    """Project a batch in the caller's transaction; returns how many events were new.

    `links`: each event's record's chain link (`timeline_chain.link_of`), in the order of
    `events`; without them (events not read from records) the timeline's links are NULL.
    The batch holds the schema's lock shared until the transaction ends: batches run side by
    side, and a replay's swap (which takes it exclusively) never lands in the middle of one."""
    t = sql.Identifier(check_schema_name(schema))
    if links is not None and len(links) != len(events):
        raise ValueError(f"{len(links)} links for {len(events)} events")
    unique: dict[str, Incoming] = {}
    kept_links: dict[str, Link] = {}  # of the copy kept: the first of each event id
    for n, e in enumerate(events):
        key = _uuid_key(e.event_id)
        if key in unique:
            continue
        unique[key] = e
        if links is not None and (link := links[n]) is not None:
            kept_links[e.event_id] = link
    if not unique:
        return 0
    conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext(%s))", (lock_key(schema),))
    rows = conn.execute(
        sql.SQL(
            "INSERT INTO {}.processed (event_id) SELECT * FROM unnest(%s::uuid[])"
            " ON CONFLICT (event_id) DO NOTHING RETURNING event_id::text"
        ).format(t),
        (sorted(unique),),
    ).fetchall()
    new = [unique[r[0]] for r in rows]
    if not new:
        return 0
    new.sort(key=lambda e: e.event_id)
    # Access-log entries are of no case's stream (their stream is the service's access
    # log): they go to their own table, never to the timeline or the case facts.
    access_log.copy(conn, schema, [e for e in new if access_log.is_access(e)])
    fresh = [e for e in new if not access_log.is_access(e)]
    if not fresh:
        return len(new)
    # COPY: the fresh events are new to the timeline by construction (their ids were just
    # recorded in `processed`), so no conflict handling is needed, and COPY is several times
    # faster than an INSERT of the same rows.
    with conn.cursor().copy(
        sql.SQL(
            "COPY {}.timeline (event_id, case_id, occurred_at, recorded_at, topic, event_type,"
            " stream_version, district, actor, payload, stream_id, prev_hash, hash, hash_ok)"
            " FROM STDIN"
        ).format(t)
    ) as copy:
        for e in fresh:
            m = e.metadata
            link = kept_links.get(e.event_id)
            copy.write_row(
                (
                    e.event_id,
                    e.case_id,
                    m["occurred_at"],
                    m.get("recorded_at", m["occurred_at"]),
                    e.topic,
                    e.event_type,
                    int(m["stream_version"]),
                    m.get("district"),
                    m.get("actor"),
                    canonical_json(e.data),
                    *(
                        (link.stream_id, link.prev_hash, link.hash, link.hash_ok)
                        if link is not None
                        else (None, None, None, None)
                    ),
                )
            )
    cases: dict[str, dict[str, Any]] = {}
    for e in fresh:
        acc = cases.get(e.case_id)
        if acc is None:
            acc = cases[e.case_id] = _empty(e.case_id)
        fold(acc, e)
    ordered = [cases[c] for c in sorted(cases)]
    conn.execute(
        _upsert(schema),
        [
            [_array_literal(acc[n]) for acc in ordered]
            if n in _ARRAY_COLUMNS
            else [acc[n] for acc in ordered]
            for n in FACT_NAMES
        ],
    )
    return len(new)


def processed_count(conn: psycopg.Connection[Any], schema: str) -> int:
    """How many distinct events the read models in `schema` have seen (0 before migration):
    what a watcher compares with the number of events it expects."""
    t = sql.Identifier(check_schema_name(schema))
    try:
        with conn.transaction():
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}.processed").format(t)).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


def case_facts(conn: psycopg.Connection[Any], schema: str, case_id: str) -> dict[str, Any] | None:
    """One case's facts as a dict (None if no event of it has been seen)."""
    cur = conn.execute(
        sql.SQL("SELECT * FROM {}.case_facts WHERE case_id = %s").format(
            sql.Identifier(check_schema_name(schema))
        ),
        (case_id,),
    )
    row = cur.fetchone()
    names = [d.name for d in cur.description or ()]
    return None if row is None else dict(zip(names, row, strict=True))


def case_scope(
    conn: psycopg.Connection[Any], schema: str, case_id: str
) -> tuple[str | None, tuple[Transfer, ...]]:
    """What the access policy needs of a case: its current district and its transfers.

    The district is the case facts' `district_now`; before the intake event has been
    projected (a referral's events may arrive first) it is the district of the case's
    latest event. None: no event of the case has been seen."""
    t = sql.Identifier(check_schema_name(schema))
    row = conn.execute(
        sql.SQL(
            "SELECT COALESCE((SELECT district_now FROM {t}.case_facts WHERE case_id = %(c)s),"
            " (SELECT district FROM {t}.timeline WHERE case_id = %(c)s AND district IS NOT NULL"
            "  ORDER BY occurred_at DESC, stream_version DESC, event_id DESC LIMIT 1))"
        ).format(t=t),
        {"c": case_id},
    ).fetchone()
    moves = conn.execute(
        sql.SQL(
            "SELECT payload->>'from_district', occurred_at FROM {}.timeline"
            " WHERE case_id = %s AND event_type = 'CaseTransferred'"
            " ORDER BY occurred_at, stream_version, event_id"
        ).format(t),
        (case_id,),
    ).fetchall()
    transfers = tuple(Transfer(str(d), at) for d, at in moves if d)
    return (row[0] if row else None), transfers


def timeline(conn: psycopg.Connection[Any], schema: str, case_id: str) -> list[dict[str, Any]]:
    """Every event of a case in occurrence order (stream version, then id, break ties)."""
    cur = conn.execute(
        sql.SQL(
            "SELECT {} FROM {}.timeline WHERE case_id = %s"
            " ORDER BY occurred_at, stream_version, event_id"
        ).format(
            sql.SQL(", ").join(sql.Identifier(c) for c in TIMELINE_COLUMNS),
            sql.Identifier(check_schema_name(schema)),
        ),
        (case_id,),
    )
    return [dict(zip(TIMELINE_COLUMNS, row, strict=True)) for row in cur.fetchall()]


def chain_status(conn: psycopg.Connection[Any], schema: str, case_id: str) -> list[StreamChain]:
    """The hash-chain status of each stream of a case, from the timeline's stored links
    (one query; `timeline_chain.fold_chains` judges them). [] if no event of it was seen."""
    rows = conn.execute(
        sql.SQL(
            "SELECT topic, stream_id, stream_version, prev_hash, hash, hash_ok"
            " FROM {}.timeline WHERE case_id = %s"
        ).format(sql.Identifier(check_schema_name(schema))),
        (case_id,),
    ).fetchall()
    return fold_chains(ChainRow(*r) for r in rows)


def checksum(conn: psycopg.Connection[Any], schema: str) -> dict[str, str]:
    """SHA-256 per read model over its rows in primary-key order, each row in a canonical
    text form (JSON, times in UTC), independent of the session's time zone; every column
    but those in UNCHECKED, in the table's order."""
    t = sql.Identifier(check_schema_name(schema))
    sums: dict[str, str] = {}
    for table, pk in TABLES.items():
        digest = hashlib.sha256()
        cur = conn.cursor()
        cur.execute(sql.SQL("SELECT * FROM {}.{} LIMIT 0").format(t, sql.Identifier(table)))
        skip = UNCHECKED.get(table, frozenset())
        names = [d.name for d in cur.description or () if d.name not in skip]
        cur.execute(
            sql.SQL("SELECT {} FROM {}.{} ORDER BY {}").format(
                sql.SQL(", ").join(sql.Identifier(n) for n in names),
                t,
                sql.Identifier(table),
                sql.SQL(pk),
            )
        )
        digest.update(canonical_json(names).encode())
        for row in cur:
            digest.update(b"\n" + canonical_json(list(row)).encode())
        sums[table] = digest.hexdigest()
    return sums
