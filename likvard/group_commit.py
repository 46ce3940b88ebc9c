"""Group commit: concurrent commands on different streams share one transaction.

Each caller seals, encodes and chains its events in its own thread (`EventStore.prepare`),
then hands them to one committer thread and waits. The committer takes what is waiting
(up to `max_batch`, waiting at most `max_wait` for more), writes it in one statement and
one transaction (`EventStore.write`, heads checked per stream) and answers each caller
only after that commit: a stream that moved on fails alone (ConcurrencyError), the others
are stored; a batch whose transaction fails answers every caller in it with the error
(none of it was acknowledged, whatever the error). While one batch commits the next one
gathers, so under load the round trips are shared without waiting on a timer.
"""

from __future__ import annotations

import queue
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
    done: threading.Event = field(default_factory=threading.Event)
    result: list[StoredEvent] = field(default_factory=list)
    error: BaseException | None = None

    def answer(self, result: list[StoredEvent] | None, error: BaseException | None) -> None:
        self.result = result or []
        self.error = error
        self.done.set()


class GroupCommitter:
    """One committer thread for one event store; `append` is `EventStore.append` with the
    round trips shared among the threads appending at the same time."""

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
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="likvard-group-commit", daemon=True)
        self._thread.start()

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
        if self._closed:
            raise CommitterClosed("the group committer is closed")
        pending = _Pending(prepared[0])
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        carry: list[_Pending] = []
        stopping = False
        while True:
            if not carry:
                if stopping:
                    return
                first = self._queue.get()
                if first is None:
                    return
                carry = [first]
            batch, carry, stopping = self._gather(carry, stopping)
            self._commit(batch)

    def _gather(
        self, carry: list[_Pending], stopping: bool
    ) -> tuple[list[_Pending], list[_Pending], bool]:
        """The next batch (each stream once: a second append to a stream waits for the
        next batch, where it is checked against the first's result), and what is left."""
        batch: list[_Pending] = []
        later: list[_Pending] = []
        streams: set[str] = set()
        for p in carry:
            if p.prepared.stream_id in streams or len(batch) >= self.max_batch:
                later.append(p)
            else:
                batch.append(p)
                streams.add(p.prepared.stream_id)
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch and not stopping:
            try:
                left = deadline - time.monotonic()
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stopping = True
            elif item.prepared.stream_id in streams:
                later.append(item)
            else:
                batch.append(item)
                streams.add(item.prepared.stream_id)
        return batch, later, stopping

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
