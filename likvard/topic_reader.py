"""Reading whole topics from offset 0, knowing when everything has been read.

Used by the auditors' replay and by `likvard dlq`. No consumer group is joined and nothing
is committed (partitions are assigned at offset 0). When is everything read? A queried end
offset alone cannot say: the dev broker under-reports it (DESIGN.md), so the reader reads at
least up to the end offsets it was told, then until the broker has nothing more for
`settle` seconds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from likvard.config import kafka_client_settings


class TopicReadError(RuntimeError):
    """A topic is missing or could not be read; the message says what to do."""


class TopicReader:
    """Reads topics from offset 0 with assign(); knows when it has read everything."""

    def __init__(
        self,
        bootstrap: str,
        topics: Sequence[str],
        *,
        settle: float = 1.0,
        partitions: Callable[[int], bool] | None = None,
        start: Mapping[tuple[str, int], int] | None = None,
    ) -> None:
        """`partitions`: read only the partitions (by number, of every topic) it accepts
        (one process's share of a parallel replay); `start`: per topic partition the offset
        to read from (0 for the others)."""
        self.settle = settle
        self.consumer = Consumer(
            {
                **kafka_client_settings(),
                "bootstrap.servers": bootstrap,
                "group.id": f"likvard-reader-{uuid.uuid4()}",  # never joined or committed
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "fetch.wait.max.ms": 50,
                "queued.max.messages.kbytes": 65536,  # prefetch: the reader's largest memory
            }
        )
        meta = self.consumer.list_topics(timeout=15)
        self.partitions: list[TopicPartition] = []
        for topic in topics:
            info = meta.topics.get(topic)
            if info is None or info.error is not None:
                self.consumer.close()
                raise TopicReadError(
                    f"topic {topic} is not on the broker: run `likvard topics`, and"
                    " `likvard republish SERVICE` if the broker lost its data"
                )
            self.partitions += [
                TopicPartition(topic, p, (start or {}).get((topic, p), 0))
                for p in sorted(info.partitions)
                if partitions is None or partitions(p)
            ]
        self.ends: dict[tuple[str, int], int] = {}
        for tp in self.partitions:
            _low, high = self.consumer.get_watermark_offsets(tp, timeout=15)
            self.ends[(tp.topic, tp.partition)] = high
        self.next: dict[tuple[str, int], int] = {
            (tp.topic, tp.partition): tp.offset for tp in self.partitions
        }
        self.consumer.assign(self.partitions)

    @property
    def expected(self) -> int:
        """Records up to the end offsets the broker reported (a lower bound on the dev broker)."""
        return sum(self.ends.values())

    def _reached_ends(self) -> bool:
        return all(self.next[k] >= end for k, end in self.ends.items())

    def batches(self, size: int, *, within: float | None = None) -> Iterator[list[Message]]:
        """Yield lists of messages until the ends are reached and nothing more comes (or,
        with `within`, after that many seconds whatever still comes)."""
        quiet_since: float | None = None
        give_up = None if within is None else time.monotonic() + within
        while give_up is None or time.monotonic() < give_up:
            messages = self.consumer.consume(size, timeout=0.2)
            good: list[Message] = []
            for m in messages:
                err = m.error()
                if err is None:
                    good.append(m)
                    key = (str(m.topic()), int(m.partition() or 0))
                    self.next[key] = max(self.next[key], int(m.offset() or 0) + 1)
                elif err.code() != KafkaError._PARTITION_EOF:
                    raise TopicReadError(f"reading {m.topic()} failed: {err}")
            if good:
                quiet_since = None
                yield good
                continue
            if not self._reached_ends():
                continue
            now = time.monotonic()
            if quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= self.settle:
                return

    def close(self) -> None:
        self.consumer.close()


def record_headers(msg: Message) -> tuple[tuple[str, bytes | None], ...]:
    """A record's headers as (name, bytes or None) pairs, in order, repeats kept."""
    raw = msg.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else list(raw)
    return tuple(
        (str(k), v if v is None or isinstance(v, bytes) else str(v).encode()) for k, v in pairs
    )


def header_map(msg: Message) -> dict[str, bytes]:
    """A record's headers by name (the last of a repeated name; b"" for a null value): what
    `record_headers` gives as a dict, without building the pairs first (once per record on
    the replay's and the projection's hot path)."""
    raw = msg.headers()
    if not raw:
        return {}
    if isinstance(raw, list):
        out: dict[str, bytes] = {}
        for k, v in raw:
            out[k] = v if type(v) is bytes else b"" if v is None else _as_bytes(v)
        return out
    return {k: v or b"" for k, v in record_headers(msg)}


def _as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
