"""The intake store's personal data: every append seals the contract's personal fields
with the case's person's data key, and the service reveals what it stored where it must
compare (a district's re-delivered event is the same event as the stored, sealed one).

The person of a stream is the `person` of its IntakeRegistered: taken from the batch when
the registration is in it, else read once for all the batch's streams."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from psycopg import sql

from likvard.db import autocommit
from likvard.eventstore import EventStore, NewEvent, StoredEvent
from likvard.keys import KeyStore
from likvard.sealing import Sealer, ToOpen, ToSeal

REGISTERED = "IntakeRegistered"


class MissingPerson(ValueError):
    """An event with personal details on a stream with no registration (no person)."""


class IntakePersonalData:
    """`likvard.eventstore.PersonalData` for the intake event store."""

    def __init__(self, store: EventStore, keys: KeyStore) -> None:
        self.store = store
        self.keys = keys
        self.sealer = Sealer(store.catalogue, keys)

    def persons(self, stream_ids: Sequence[str]) -> dict[str, str]:
        """The person of each registered stream among these (one query)."""
        if not stream_ids:
            return {}
        query = sql.SQL(
            "SELECT stream_id, payload->>'person' FROM {}.events"
            " WHERE event_type = %s AND stream_id = ANY(%s)"
        ).format(sql.Identifier(self.store.schema))
        with autocommit(self.store.pool) as conn:
            rows = conn.execute(query, (REGISTERED, list(stream_ids))).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def seal(self, appends: Sequence[tuple[str, Sequence[NewEvent]]]) -> list[list[NewEvent]]:
        persons = {
            s: str(e.data["person"]) for s, es in appends for e in es if e.event_type == REGISTERED
        }
        needed = [
            s
            for s, es in appends
            if s not in persons and any(self.sealer.fields(e.event_type) for e in es)
        ]
        persons.update(self.persons(needed))
        items: list[ToSeal] = []
        for stream_id, events in appends:
            for e in events:
                person = persons.get(stream_id, "")
                if self.sealer.fields(e.event_type) and not person:
                    raise MissingPerson(f"stream {stream_id} has no registered person")
                items.append(ToSeal(e.event_type, str(e.event_id), e.data, person))
        sealed = iter(self.sealer.seal(items))
        return [[dataclasses.replace(e, data=next(sealed)) for e in es] for _, es in appends]

    def reveal(self, events: Sequence[StoredEvent]) -> list[dict[str, Any]]:
        """Each stored event's Avro record (without metadata), its personal fields opened."""
        records = []
        for e in events:
            record = dict(self.store.catalogue.decode(e.data).record)
            record.pop("metadata", None)
            records.append(ToOpen(e.event_type, str(e.event_id), record))
        return self.sealer.open(records, show=True)

    def close(self) -> None:
        self.keys.pool.close()

    def open_payloads(self, events: Sequence[StoredEvent], *, show: bool) -> list[dict[str, Any]]:
        """The events' JSON payloads as a reader sees them (opened only when `show`)."""
        return self.sealer.open(
            [ToOpen(e.event_type, str(e.event_id), e.payload) for e in events], show=show
        )


def keys_schema_for(schema: str) -> str:
    """The key store's schema beside an intake schema: `keys` for the service's own, one
    of its own for any other (a test's, a benchmark's), so erasing there erases nothing
    elsewhere."""
    return "keys" if schema == "intake" else f"{schema}_keys"


def attach(store: EventStore, keys: KeyStore) -> IntakePersonalData:
    """Make every append to the intake store seal personal details (returns the sealer)."""
    personal = IntakePersonalData(store, keys)
    store.personal = personal
    return personal
