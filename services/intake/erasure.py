"""Erasing a person's personal data by destroying their data keys (crypto-shredding), for
a records officer's decision (`POST /persons/{pseudonym}/erasure`) and for culling
(`likvard retention run`).

The key goes first, then each of the person's cases gets a `PersonalDataErased`. Both steps
are idempotent, so an erasure cut short (a crash, a database restart) is finished by asking
again: the keys already destroyed are found in the key store and recorded on the cases that
do not record them yet. Nothing else of a case changes: its counts, its hash chain (which
covers the ciphertext, not the text) and its other events stay as they were."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from psycopg import sql

from likvard.http import RequestContext
from likvard.keys import KeyStore
from services.intake import domain as d
from services.intake.personal import REGISTERED
from services.intake.service import IntakeService

# The API's legal-basis codes (kebab-case, like every code in responses) and the contract's.
LEGAL_BASES: dict[str, str] = {
    "retention-period-ended": "RETENTION_PERIOD_ENDED",
    "erasure-request": "ERASURE_REQUEST",
    "wrongly-recorded": "WRONGLY_RECORDED",
    "authority-decision": "AUTHORITY_DECISION",
}


@dataclass(frozen=True)
class Erasure:
    """What an erasure did: the keys destroyed now, every destroyed key of the person,
    the person's cases, and those that got a PersonalDataErased now."""

    destroyed_now: tuple[str, ...]
    key_ids: tuple[str, ...]
    cases: tuple[str, ...]
    recorded: tuple[str, ...]


def cases_of(svc: IntakeService, persons: list[str]) -> dict[str, list[str]]:
    """Each person's cases (stream ids), from the registrations (one query)."""
    out: dict[str, list[str]] = {p: [] for p in persons}
    if not persons:
        return out
    store = svc.store
    query = sql.SQL(
        "SELECT payload->>'person', stream_id FROM {}.events"
        " WHERE event_type = %s AND payload->>'person' = ANY(%s) ORDER BY stream_id"
    ).format(sql.Identifier(store.schema))
    with store.pool.connection() as conn:
        for person, stream_id in conn.execute(query, (REGISTERED, persons)).fetchall():
            out[str(person)].append(str(stream_id))
    return out


def erase_person(
    svc: IntakeService,
    keys: KeyStore,
    person: str,
    legal_basis: str,
    ctx: RequestContext,
    *,
    now: datetime | None = None,
) -> Erasure:
    """Destroy the person's keys, then record the erasure on each of their cases.
    `legal_basis` is the contract's symbol (see LEGAL_BASES)."""
    if legal_basis not in d.LEGAL_BASES:
        raise d.RuleViolation("unknown-legal-basis", "The legal basis is not on the fixed list.")
    cases = cases_of(svc, [person])[person]
    destroyed = keys.destroy(person, legal_basis)
    key_ids = tuple(
        sorted(k.key_id for k in keys.states([person])[person] if k.destroyed_at is not None)
    )
    at = now or datetime.now(UTC)
    recorded = []
    for case_id in cases:
        command = d.ErasePersonalData(case_id, at, legal_basis, key_ids)
        decided = svc.execute(case_id, command, None, ctx)
        if decided.stored:
            recorded.append(case_id)
    return Erasure(tuple(destroyed), key_ids, tuple(cases), tuple(recorded))
