"""One case as the reporting API and the console read it: the policy's view of the case
(its current district and transfers, as the read models know them) and its timeline with
the sealed personal details opened for those who see them. Both readers ask the same
functions so a page and an API answer can never disagree."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from likvard.identity import Principal, looks_like_identity_number
from likvard.policy import Action, CaseScope, Decision, sees_personal_text
from likvard.sealing import Sealer, ToOpen
from services.projections import readmodels


def not_a_case_id(case_id: str) -> bool:
    """An id no case can have: not a UUID and shaped like a personal identity number (it
    is never looked up, nor written to the access log)."""
    try:
        uuid.UUID(case_id)
    except ValueError:
        return looks_like_identity_number(case_id)
    return False


def scope(conn: psycopg.Connection[Any], schema: str, case_id: str) -> CaseScope:
    """The case as the policy sees it (district None: no event of it has been seen)."""
    district, transfers = readmodels.case_scope(conn, schema, case_id)
    return CaseScope(case_id, district, transfers)


def opened_timeline(
    conn: psycopg.Connection[Any],
    schema: str,
    case_id: str,
    sealer: Sealer,
    principal: Principal,
    decision: Decision,
) -> list[dict[str, Any]]:
    """The case's events in order, each payload as this reader may see it."""
    rows = readmodels.timeline(conn, schema, case_id)
    opened = sealer.open(
        [ToOpen(r["event_type"], str(r["event_id"]), r["payload"]) for r in rows],
        show=sees_personal_text(principal, Action.CASE_HISTORY, decision),
    )
    for row, payload in zip(rows, opened, strict=True):
        row["payload"] = payload
    return rows
