"""The thin service layer every write service shares: load a stream, decide, append.

A service supplies its pure decider (`decide`, `evolve`, `initial_state`); this module does
the I/O around it, so the optimistic-concurrency rule lives in one place: the decision is
appended at the version it was made on, or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from likvard.eventstore import GENESIS_HASH, ConcurrencyError, EventStore, NewEvent, StoredEvent
from likvard.group_commit import GroupCommitter
from likvard.http import RequestContext


class DomainEventLike(Protocol):
    @property
    def type(self) -> str: ...
    @property
    def data(self) -> dict[str, Any]: ...
    @property
    def occurred_at(self) -> datetime: ...


S = TypeVar("S")
C = TypeVar("C")
E = TypeVar("E", bound=DomainEventLike)


@dataclass(frozen=True)
class Decided(Generic[S]):
    state: S
    version: int
    stored: list[StoredEvent]


class StreamService(Generic[C, S, E]):
    committer: GroupCommitter | None
    """When set (the default), appends go through it: concurrent commands on other
    streams share one transaction, each answered only after that commit; a lone command
    commits at once on its own thread."""

    def __init__(
        self,
        store: EventStore,
        *,
        initial_state: Callable[[], S],
        evolve: Callable[[S, E], S],
        decide: Callable[[C, S], Sequence[E]],
        to_domain: Callable[[str, dict[str, Any], datetime], E],
        district_of: Callable[[S, E], str],
        group_commit: bool = True,
    ) -> None:
        self.store = store
        self.committer = GroupCommitter(store) if group_commit else None
        self._initial = initial_state
        self._evolve = evolve
        self._decide = decide
        self._to_domain = to_domain
        self._district_of = district_of

    def domain_event(self, stored: StoredEvent) -> E:
        """Decode the stored bytes with the newest reader schema (old events upcast)."""
        record = dict(self.store.catalogue.decode(stored.data).record)
        record.pop("metadata", None)
        return self._to_domain(stored.event_type, record, stored.occurred_at)

    def fold(self, events: Sequence[StoredEvent]) -> S:
        """The state a stream's stored events fold to."""
        state = self._initial()
        for e in events:
            state = self._evolve(state, self.domain_event(e))
        return state

    def evolve(self, state: S, event: E) -> S:
        return self._evolve(state, event)

    def district_of(self, state: S, event: E) -> str:
        """The district responsible after `event` (what goes into its metadata)."""
        return self._district_of(state, event)

    def load(self, stream_id: str) -> tuple[S, int, list[StoredEvent]]:
        """The stream's state, version and events, in one round trip (no transaction)."""
        events = self.store.read_stream(stream_id)
        return self.fold(events), len(events), events

    def execute(
        self,
        stream_id: str,
        command: C,
        expected_version: int | None,
        ctx: RequestContext,
        *,
        decide: Callable[[C, S], Sequence[E]] | None = None,
        district: str | None = None,
        case_id: str | None = None,
        causation_id: str | None = None,
    ) -> Decided[S]:
        """Decide on the current state and append at exactly the version decided on.

        `decide` replaces the service's decider for this call (when the decision needs facts
        the caller looked up first); `district`, `case_id` and `causation_id` (the event that
        caused this decision) go into the events' metadata. With `expected_version` 0 the
        stream is not read: the decision is made on the initial state and the append at
        version 0 is refused if the stream exists (one round trip in all)."""
        if expected_version == 0:
            # A new stream (a registration): nothing to read. If it exists after all, the
            # append at version 0 is refused with its actual version, as the read would.
            state, version, events = self._initial(), 0, list[StoredEvent]()
        else:
            state, version, events = self.load(stream_id)
        if expected_version is not None and expected_version != version:
            raise ConcurrencyError(stream_id, expected_version, version)
        new_events = list((decide or self._decide)(command, state))
        to_store: list[NewEvent] = []
        for event in new_events:
            state = self._evolve(state, event)
            to_store.append(
                NewEvent(
                    event_type=event.type,
                    data=event.data,
                    occurred_at=event.occurred_at,
                    district=district or self._district_of(state, event),
                    case_id=case_id,
                    causation_id=causation_id,
                    actor=ctx.actor,
                    correlation_id=ctx.correlation_id,
                    traceparent=ctx.traceparent,
                )
            )
        # The chain continues from the last event just read: the append is one round trip.
        last_hash = events[-1].hash if events else GENESIS_HASH
        if self.committer is not None:
            stored = self.committer.append(stream_id, version, to_store, last_hash=last_hash)
        else:
            stored = self.store.append(stream_id, version, to_store, last_hash=last_hash)
        return Decided(state, version + len(stored), stored)
