"""Group commit: concurrent commands on different streams share one transaction.

Each caller seals, encodes and chains its events in its own thread (`EventStore.prepare`),
then queues them. A caller that finds no commit under way becomes the leader: it takes what
is queued (up to `max_batch`, each stream once, waiting at most `max_wait` for more), writes
it in one statement and one transaction (`EventStore.write`, heads checked per stream) and
answers each caller only after that commit: a stream that moved on fails alone
(ConcurrencyError), the others are stored; a batch whose transaction fails answers every
caller in it with the error (none of it was acknowledged, whatever the error). Then the
first caller still queued leads the next batch, which gathered while this one committed.
Alone, a caller commits its own append at once on its own thread (no hand-off to another
thread, which cost a lone caller a fifth of its rate); under load the round trips are
shared without waiting on a timer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from likvard import telemetry
from likvard.eventstore import EventStore, NewEvent, PreparedAppend, StoredEvent, append_error

_meter = telemetry.meter("likvard.group_commit")
_batch_size = _meter.create_histogram(
    "likvard.group_commit.batch_size",
    unit="{stream}",
    description="Streams appended in one group-commit transaction.",
)


class CommitterClosed(RuntimeError):
    """The committer was closed before this append was written: nothing was stored."""


@dataclass
class _Pending:
    prepared: PreparedAppend
    wake: threading.Event = field(default_factory=threading.Event)
    answered: bool = False
    lead: bool = False
    result: list[StoredEvent] = field(default_factory=list)
    error: BaseException | None = None

    def answer(self, result: list[StoredEvent] | None, error: BaseException | None) -> None:
        self.result = result or []
        self.error = error
        self.answered = True
        self.wake.set()


class GroupCommitter:
    """Group commit for one event store; `append` is `EventStore.append` with the round
    trips shared among the threads appending at the same time."""

    def __init__(
        self,
        store: EventStore,
        *,
        max_batch: int = 64,
        max_wait: float = 0.0,
        before_commit: Callable[[psycopg.Connection[Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._before_commit = before_commit
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queue: list[_Pending] = []
        self._leading = False
        self._closed = False

    def append(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[NewEvent],
        *,
        last_hash: bytes | None = None,
    ) -> list[StoredEvent]:
        """Append as `EventStore.append` does, answered after the batch's commit."""
        heads = None if last_hash is None else {stream_id: last_hash}
        prepared = self.store.prepare([(stream_id, expected_version, events)], heads=heads)
        if not prepared:
            return []
        pending = _Pending(prepared[0])
        with self._lock:
            if self._closed:
                raise CommitterClosed("the group committer is closed")
            self._queue.append(pending)
            self._arrived.notify_all()
            if not self._leading:
                self._leading = pending.lead = True
        while not pending.answered:
            if pending.lead:
                pending.lead = False
                self._lead()
                continue
            pending.wake.wait()
            pending.wake.clear()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def close(self) -> None:
        """Refuse new appends; those queued are still written by their leaders."""
        with self._lock:
            self._closed = True

    def _lead(self) -> None:
        """Commit one batch, then hand the lead to the first caller still queued."""
        try:
            self._commit(self._gather())
        finally:  # whatever happened, the next caller must not wait for a leader that left
            with self._lock:
                if self._queue:
                    successor = self._queue[0]
                    successor.lead = True
                    successor.wake.set()
                else:
                    self._leading = False

    def _gather(self) -> list[_Pending]:
        """The next batch, taken off the queue: each stream once (a second append to a
        stream waits for the next batch, where it is checked against the first's result),
        at most `max_batch`, waiting up to `max_wait` for it to fill."""
        deadline = time.monotonic() + self.max_wait
        with self._lock:
            while True:
                batch: list[_Pending] = []
                streams: set[str] = set()
                for p in self._queue:
                    if len(batch) < self.max_batch and p.prepared.stream_id not in streams:
                        batch.append(p)
                        streams.add(p.prepared.stream_id)
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self._closed:
                    break
                self._arrived.wait(left)
            taken = {id(p) for p in batch}
            self._queue = [p for p in self._queue if id(p) not in taken]
            return batch

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            stored, failed = self.store.write(
                [p.prepared for p in batch], all_or_none=False, before_commit=self._before_commit
            )
        except psycopg.errors.TransactionRollback as exc:
            # A deadlock or serialization failure: the server rolled the batch back, so
            # trying each append alone is safe (and only the one in the way fails).
            self._each_alone(batch, exc)
            return
        except (psycopg.OperationalError, PoolTimeout) as exc:
            # The connection or the server failed: the batch's outcome is unknown to it,
            # so no caller is told its append was stored.
            for p in batch:
                p.answer(None, exc)
            return
        except Exception as exc:
            # One append may be the cause (a duplicate event id): each alone, so only the
            # guilty one fails.
            self._each_alone(batch, exc)
            return
        _batch_size.record(len(batch), {"service": self.store.producer})
        by_stream: dict[str, list[StoredEvent]] = {}
        for e in stored:
            by_stream.setdefault(e.stream_id, []).append(e)
        for p in batch:
            sid = p.prepared.stream_id
            if sid in failed:
                p.answer(None, append_error(sid, p.prepared.expected, failed[sid]))
            else:
                p.answer(by_stream.get(sid, []), None)

    def _each_alone(self, batch: list[_Pending], exc: BaseException) -> None:
        if len(batch) == 1:
            batch[0].answer(None, exc)
            return
        for p in batch:
            self._commit([p])
