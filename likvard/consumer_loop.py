"""The one loop every Kafka consumer of Likvärd runs: inbox consumers, ingest workers and
the live projection worker.

Faults are normal, so the loop owns the rules that keep a consumer right through them:

* A batch's offsets are committed only after its effect is committed in PostgreSQL. A batch
  whose handler fails (the database restarted, a deadlock, a bug) is *rewound*: each of its
  partitions is sought back to the batch's first offset and read again after a backoff, so
  it is applied again, never skipped. Handlers are idempotent (event ids recorded in the
  same transaction), so what a failed attempt did commit is a duplicate the next time.
* A failed commit (the broker restarted and forgot the group: `UNKNOWN_MEMBER_ID`, a
  rebalance) is logged and counted, never fatal: the member rejoins and the batch comes
  again as duplicates.
* A fatal consumer error rebuilds the consumer (when the loop was given a factory).
* A lost assignment (the broker forgot the group: restarted, maybe empty), or a
  subscribed topic reported missing, makes the loop wait until its topics exist again and
  join anew. The member would rejoin by itself, but a join while the topics are still
  missing leaves it with no partitions for minutes, and a member that kept its fetch
  positions would skip what a wiped broker holds below them (the dev broker answers a
  fetch past the end with nothing, not OFFSET_OUT_OF_RANGE). A new member starts from the
  committed offsets, or from the earliest on a wiped broker: duplicates, never gaps.
* Progress is observable: the loop beats a heartbeat every turn, records when a batch last
  completed and whether it is failing, and reads the lag of its assigned partitions from
  fresh watermarks every few seconds. `Progress.stalled()` (no completed batch for
  LIKVARD_STALL_SECONDS while there is lag, or a batch failing that long) turns the
  worker's liveness probe unhealthy; readiness is what the loop last saw of its database
  and broker, so a probe never opens a connection of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from likvard import telemetry
from likvard.ops import Progress
from likvard.telemetry import ConsumerLag

log = logging.getLogger("likvard.consumer")

_meter = telemetry.meter("likvard.consumer")
_batch_failures = _meter.create_counter(
    "likvard.consumer.batch.failures",
    unit="{batch}",
    description="Batches whose handler failed; each is rewound and applied again.",
)
_rejoins = _meter.create_counter(
    "likvard.consumer.rejoins",
    unit="{rejoin}",
    description="Subscriptions made anew after the group lost its assignment"
    " (a restarted broker); reading resumes from the committed offsets.",
)
_commit_failures = _meter.create_counter(
    "likvard.consumer.commit.failures",
    unit="{commit}",
    description="Offset commits the broker refused (a rebalance or a restarted broker);"
    " the batch is read again as duplicates.",
)


@dataclass
class Backoff:
    """Exponential backoff between attempts: 0.5 s doubling to 10 s, reset on success."""

    first: float = 0.5
    limit: float = 10.0
    _next: float = field(default=0.0, init=False)

    def next(self) -> float:
        self._next = self.first if self._next == 0.0 else min(self._next * 2, self.limit)
        return self._next

    def reset(self) -> None:
        self._next = 0.0


def positions(messages: Sequence[Message], *, first: bool) -> list[TopicPartition]:
    """Per partition of a batch: its first offset (to rewind to), or one past its last (to
    commit)."""
    out: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (str(m.topic()), int(m.partition() or 0))
        offset = int(m.offset() or 0)
        current = out.get(key)
        if first:
            out[key] = offset if current is None else min(current, offset)
        else:
            out[key] = offset + 1 if current is None else max(current, offset + 1)
    return [TopicPartition(t, p, o) for (t, p), o in out.items()]


def is_database_error(exc: BaseException) -> bool:
    """A fault of the database connection (restart, network), as opposed to a bug."""
    import psycopg
    from psycopg_pool import PoolTimeout

    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | PoolTimeout)


ConsumerSource = Consumer | Callable[[], Consumer]
REJOIN_PAUSE = 2.0  # seconds between two rejoins, while a wiped broker's topics settle
JOIN_SECONDS = 30.0  # at most, for a join under way to complete before the loop rejoins
Handle = Callable[[list[Message]], None]


class BatchLoop:
    """Consume batches from `topics` and hand each to `handle` until it succeeds; commit
    its offsets only then."""

    def __init__(
        self,
        source: ConsumerSource,
        topics: list[str],
        handle: Handle,
        progress: Progress,
        *,
        batch_size: int = 500,
        poll_timeout: float = 0.2,
        lag: ConsumerLag | None = None,
        idle_check: Callable[[], None] | None = None,
        lag_interval: float = 5.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.source = source
        self.topics = topics
        self.handle = handle
        self.progress = progress
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.lag = lag
        self.idle_check = idle_check
        self.lag_interval = lag_interval
        self.backoff = backoff or Backoff()
        self._next_lag = 0.0
        self._next_idle_check = 0.0
        self.failures = 0
        self.commit_failures = 0
        self.rejoins = 0
        self._lost = False
        self._joined = False
        self._rejoined_at = float("-inf")

    def _consumer(self) -> Consumer:
        source = self.source
        consumer = source if isinstance(source, Consumer) else source()
        self._subscribe(consumer)
        return consumer

    def _subscribe(self, consumer: Consumer) -> None:
        self._lost = False
        self._joined = False
        consumer.subscribe(self.topics, on_assign=self._on_assign, on_lost=self._on_lost)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """librdkafka's callback (inside consume): a join completed (maybe with nothing)."""
        self._joined = True

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """librdkafka's callback (inside consume): the assignment is gone; the client
        unassigns it after this returns (and joins again by itself)."""
        self._lost = True
        self._joined = False

    def _settle(self, consumer: Consumer, stop: threading.Event) -> None:
        """Let the join under way complete before leaving the group: the dev broker keeps
        a member that leaves mid-join as a ghost, and the next member then gets no
        partitions for minutes. What is fetched meanwhile is dropped, never committed:
        the new subscription reads it again from the committed offsets."""
        deadline = time.monotonic() + JOIN_SECONDS
        while not self._joined and not stop.is_set() and time.monotonic() < deadline:
            self.progress.beat()
            consumer.consume(self.batch_size, timeout=self.poll_timeout)

    def _rejoin(self, consumer: Consumer, stop: threading.Event) -> Consumer:
        """Once every topic exists again, a new consumer (or, given one consumer, a new
        subscription: it may keep a stale view of the topics) joins the group; see the
        module's docstring."""
        name = self.progress.name
        log.warning("%s: assignment lost or a topic missing (a restarted broker?); rejoining", name)
        waited = False
        while not stop.is_set():
            missing = missing_topics(consumer, self.topics)
            if not missing:
                break
            if not waited:
                log.warning("%s: waiting for topics %s to exist", name, ", ".join(missing))
                waited = True
            self.progress.broker_ok = False
            self.progress.failed("topics missing")
            stop.wait(min(self.backoff.next(), 2.0))  # the operator re-creates them soon
        if stop.is_set():
            return consumer
        if time.monotonic() - self._rejoined_at < REJOIN_PAUSE:
            stop.wait(REJOIN_PAUSE)  # the topics were still settling at the last rejoin
        self._settle(consumer, stop)
        if isinstance(self.source, Consumer):
            consumer.unsubscribe()
            self._subscribe(consumer)
        else:
            _close(consumer)
            consumer = self._consumer()
        self.backoff.reset()
        self._rejoined_at = time.monotonic()
        self.rejoins += 1
        _rejoins.add(1, {"group": name})
        self.progress.recovered()
        return consumer

    def run(self, stop: threading.Event) -> None:
        consumer: Consumer | None = None
        try:
            while not stop.is_set():
                if consumer is None:
                    consumer = self._consumer()
                try:
                    self.turn(consumer, stop)
                    if self._lost:
                        consumer = self._rejoin(consumer, stop)
                except KafkaException as exc:
                    err = exc.args[0] if exc.args else None
                    fatal = isinstance(err, KafkaError) and err.fatal()
                    if not fatal or isinstance(self.source, Consumer):
                        raise
                    name = self.progress.name
                    log.warning("%s: fatal consumer error (%s); rebuilding", name, err)
                    self.progress.failed(f"consumer: {err}")
                    _close(consumer)
                    consumer = None
                    stop.wait(self.backoff.next())
        finally:
            if consumer is not None:
                _close(consumer)

    def turn(self, consumer: Consumer, stop: threading.Event) -> None:
        """One turn: consume, handle (or rewind), commit; and the lag now and then."""
        self.progress.beat()
        messages = consumer.consume(self.batch_size, timeout=self.poll_timeout)
        good: list[Message] = []
        for m in messages:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.fatal():
                raise KafkaException(err)
            else:
                self.progress.broker_ok = False
                log.warning("%s: consumer error: %s", self.progress.name, err)
                if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    # A subscribed topic is missing (a wiped broker): a join made now
                    # leaves the member without its partitions; rejoin once it is back.
                    self._lost = True
        busy = False
        if good:
            self.progress.broker_ok = True
            busy = self._handle(consumer, good, stop) and len(messages) >= self.batch_size
        else:
            self._when_idle()
        self._refresh_lag(consumer, cached=busy)

    def _handle(self, consumer: Consumer, messages: list[Message], stop: threading.Event) -> bool:
        """Handle a batch and commit its offsets; False when it failed (and was rewound)."""
        try:
            self.handle(messages)
        except Exception as exc:
            database = is_database_error(exc)
            self.failures += 1
            self.progress.failed(type(exc).__name__, database=database)
            _batch_failures.add(1, {"group": self.progress.name})
            wait = self.backoff.next()
            log.warning(
                "%s: a batch of %d failed (%s%s); reading it again in %.1fs",
                self.progress.name,
                len(messages),
                type(exc).__name__,
                ", the database" if database else "",
                wait,
            )
            rewind(consumer, messages)
            stop.wait(wait)
            return False
        self.backoff.reset()
        self.progress.completed()
        try:
            consumer.commit(offsets=positions(messages, first=False), asynchronous=False)
        except KafkaException as exc:
            self.commit_failures += 1
            _commit_failures.add(1, {"group": self.progress.name})
            log.warning(
                "%s: committing offsets failed (%s); the batch comes again as duplicates",
                self.progress.name,
                exc.args[0] if exc.args else exc,
            )
        return True

    def _when_idle(self) -> None:
        """With nothing to consume, check the database now and then, so readiness says
        what is true without a connection of the probe's own."""
        if self.idle_check is None or time.monotonic() < self._next_idle_check:
            return
        self._next_idle_check = time.monotonic() + self.lag_interval
        try:
            self.idle_check()
            self.progress.database_ok = True
        except Exception as exc:
            self.progress.database_ok = False
            log.info("%s: idle database check failed (%s)", self.progress.name, type(exc).__name__)

    def _refresh_lag(self, consumer: Consumer, *, cached: bool = False) -> None:
        """The lag every `lag_interval`: from watermarks asked of the broker, or, while full
        batches go through (`cached`), from those the fetches brought. Asking costs a round
        trip per assigned partition, which on the dev broker blocked the loop for seconds
        (issue 16: half the live projection's time); a busy loop is making progress anyway,
        and the next partial or failing batch asks again."""
        now = time.monotonic()
        if now < self._next_lag:
            return
        self._next_lag = now + self.lag_interval
        try:
            lags = fresh_lag(consumer, cached=cached)
        except KafkaException as exc:
            self.progress.broker_ok = False
            log.info("%s: could not read watermarks (%s)", self.progress.name, exc)
            return
        self.progress.broker_ok = True
        self.progress.set_lag(lags)
        if self.lag is not None:
            for (topic, partition), n in lags.items():
                self.lag.set(topic, partition, n)


def fresh_lag(
    consumer: Consumer, timeout: float = 2.0, *, cached: bool = False
) -> dict[tuple[str, int], int]:
    """Lag per assigned partition from watermarks asked of the broker now (or, `cached`,
    those its fetches last brought).

    The dev broker under-reports the high watermark after a multi-record batch (it says the
    last batch's base offset + 1), so a position past it counts as no lag; a partition not
    yet read counts from its low watermark."""
    assignment = consumer.assignment()
    if not assignment:
        return {}
    out: dict[tuple[str, int], int] = {}
    for tp in consumer.position(assignment):
        low, high = consumer.get_watermark_offsets(
            TopicPartition(tp.topic, tp.partition), timeout=timeout, cached=cached
        )
        position = tp.offset if tp.offset is not None and tp.offset >= 0 else low
        out[(tp.topic, tp.partition)] = max(0, high - max(position, low))
    return out


def missing_topics(consumer: Consumer, topics: Sequence[str], timeout: float = 5.0) -> list[str]:
    """The topics the broker does not have (every one, when it cannot be asked)."""
    try:
        known = consumer.list_topics(timeout=timeout).topics
    except KafkaException:
        return list(topics)
    return [t for t in topics if t not in known or known[t].error is not None]


def rewind(consumer: Consumer, messages: Sequence[Message]) -> None:
    """Seek each partition of a batch back to the batch's first offset."""
    for tp in positions(messages, first=True):
        try:
            consumer.seek(tp)
        except KafkaException as exc:  # no longer assigned: its new owner reads it
            log.info("could not rewind %s[%d]: %s", tp.topic, tp.partition, exc)


def _close(consumer: Consumer) -> None:
    try:
        consumer.close()
    except Exception:  # closing a consumer of a dead broker may fail; it is gone either way
        log.debug("closing the consumer failed", exc_info=True)
