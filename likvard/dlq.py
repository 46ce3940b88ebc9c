"""The dead-letter topic `likvard.dead-letter.v1`: what goes in, and how operations read it.

A record the ingest path refuses is copied there unchanged (key, value and its own headers)
with headers that say why: `dlq_reason` (a sentence a person understands), `dlq_stage`
(decode, schema, rule, or internal for a fault of Likvärd's), `dlq_code` (stable, for
machines), `dlq_service` (whose worker judged it), `dlq_failed_at`, and where it came from:
`dlq_source_topic`, `dlq_source_partition`, `dlq_source_offset`.

`likvard dlq list|show|retry` reads the topic from offset 0 (dead letters are few) and
re-submits chosen records to the ingest topic after a fix, marked `dlq_retry_of`; the ingest
path judges a retried record like any other, so a fixed one is stored and one still wrong
comes back as a new dead letter that names the one it retries.

Reasons never quote record values (events hold personal data), so they are safe to print.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from confluent_kafka import Message, Producer

from likvard.relay import Deliveries, Headers, produce, producer_config
from likvard.topic_reader import TopicReader, TopicReadError, record_headers

STAGES = ("decode", "schema", "rule", "internal")
"""decode: not an Avro single-object encoded record (or its body does not decode);
schema: encoded with a schema that is not in the contract, or breaking the contract's rules
for keys, headers and metadata; rule: refused by the owning service's rules (the same as
its HTTP API); internal: Likvärd failed while checking it (a bug: retry after the fix)."""

REASON = "dlq_reason"
STAGE = "dlq_stage"
CODE = "dlq_code"
SERVICE = "dlq_service"
FAILED_AT = "dlq_failed_at"
SOURCE_TOPIC = "dlq_source_topic"
SOURCE_PARTITION = "dlq_source_partition"
SOURCE_OFFSET = "dlq_source_offset"
RETRY_OF = "dlq_retry_of"
"""On a record re-submitted by `likvard dlq retry`: the id of the dead letter it retries."""

_PREFIX = "dlq_"
_ID = re.compile(r"^(\d+):(\d+)$")


class DeadLetterError(RuntimeError):
    """Dead letters could not be written or read; the message says what to do."""


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def own_headers(headers: Iterable[tuple[str, str | bytes | None]]) -> Headers:
    """A record's headers without any dead-letter headers (a retry's `dlq_retry_of` stays:
    it links the new judgement to the dead letter it retries)."""
    return [(k, v) for k, v in headers if not k.startswith(_PREFIX) or k == RETRY_OF]


def dead_letter_headers(
    headers: Iterable[tuple[str, str | bytes | None]],
    *,
    stage: str,
    code: str,
    reason: str,
    service: str,
    source: tuple[str, int, int],
    failed_at: datetime,
) -> Headers:
    """The dead letter's headers: the record's own, then why and where it came from."""
    topic, partition, offset = source
    return [
        *own_headers(headers),
        (REASON, reason.encode()),
        (STAGE, stage.encode()),
        (CODE, code.encode()),
        (SERVICE, service.encode()),
        (FAILED_AT, failed_at.isoformat().encode()),
        (SOURCE_TOPIC, topic.encode()),
        (SOURCE_PARTITION, str(partition).encode()),
        (SOURCE_OFFSET, str(offset).encode()),
    ]


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic. Its id is `<partition>:<offset>` there."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    def header(self, name: str) -> str:
        """The header's last value as text ('' if absent)."""
        found = [v for k, v in self.headers if k == name]
        return _text(found[-1]) if found else ""

    @property
    def stage(self) -> str:
        return self.header(STAGE)

    @property
    def code(self) -> str:
        return self.header(CODE)

    @property
    def reason(self) -> str:
        return self.header(REASON)

    @property
    def service(self) -> str:
        return self.header(SERVICE)

    @property
    def failed_at(self) -> str:
        return self.header(FAILED_AT)

    @property
    def event_type(self) -> str:
        return self.header("event_type")

    @property
    def event_id(self) -> str:
        return self.header("event_id")

    @property
    def retry_of(self) -> str:
        return self.header(RETRY_OF)

    @property
    def source(self) -> tuple[str, int, int] | None:
        """(topic, partition, offset) of the refused record, None if the headers lack it."""
        partition, offset = self.header(SOURCE_PARTITION), self.header(SOURCE_OFFSET)
        if not (partition.isdigit() and offset.isdigit()):
            return None
        return self.header(SOURCE_TOPIC), int(partition), int(offset)

    @classmethod
    def from_message(cls, msg: Message) -> DeadLetter:
        headers = record_headers(msg)
        return cls(
            int(msg.partition() or 0), int(msg.offset() or 0), msg.key(), msg.value(), headers
        )


def parse_id(text: str) -> tuple[int, int]:
    """`<partition>:<offset>` -> (partition, offset); ValueError says the expected form."""
    m = _ID.match(text.strip())
    if m is None:
        raise ValueError(
            f"{text!r} is not a dead-letter id: ids are <partition>:<offset>, as"
            " `likvard dlq list` shows them (e.g. 0:17)"
        )
    return int(m.group(1)), int(m.group(2))


def read_all(bootstrap: str, topic: str, *, settle: float = 1.0) -> list[DeadLetter]:
    """Every dead letter, oldest first per partition. A record dead-lettered twice (its
    worker stopped after writing the dead letter but before committing its offset) is
    listed once: the first copy counts."""
    try:
        reader = TopicReader(bootstrap, [topic], settle=settle)
    except TopicReadError as exc:
        raise DeadLetterError(str(exc)) from exc
    letters: list[DeadLetter] = []
    seen: set[tuple[str, int, int]] = set()
    try:
        for batch in reader.batches(1000):
            for msg in batch:
                letter = DeadLetter.from_message(msg)
                source = letter.source
                if source is not None and source in seen:
                    continue
                if source is not None:
                    seen.add(source)
                letters.append(letter)
    except TopicReadError as exc:
        raise DeadLetterError(str(exc)) from exc
    finally:
        reader.close()
    return sorted(letters, key=lambda x: (x.failed_at, x.partition, x.offset))


def select(
    letters: Sequence[DeadLetter],
    *,
    stage: str | None = None,
    code: str | None = None,
    service: str | None = None,
    event_type: str | None = None,
) -> list[DeadLetter]:
    """The dead letters that match every filter given."""
    return [
        x
        for x in letters
        if (stage is None or x.stage == stage)
        and (code is None or x.code == code)
        and (service is None or x.service == service)
        and (event_type is None or x.event_type == event_type)
    ]


def retried_by(letters: Sequence[DeadLetter]) -> dict[str, list[str]]:
    """Dead letter id -> ids of the dead letters its retries became (failed again)."""
    out: dict[str, list[str]] = {}
    for x in letters:
        if x.retry_of:
            out.setdefault(x.retry_of, []).append(x.id)
    return out


def retry(
    bootstrap: str,
    ingest_topic: str,
    letters: Sequence[DeadLetter],
    *,
    producer_factory: Callable[[dict[str, object]], Producer] = Producer,
    timeout: float = 30.0,
) -> int:
    """Re-submit dead letters to the ingest topic, unchanged but for `dlq_retry_of`;
    returns how many the broker acknowledged (raises if any was not)."""
    producer = producer_factory(producer_config(bootstrap))
    deliveries = Deliveries()
    for n, x in enumerate(letters):
        headers = own_headers((k, v) for k, v in x.headers if k != RETRY_OF)
        headers.append((RETRY_OF, x.id.encode()))
        produce(producer, ingest_topic, x.key, x.value, headers, deliveries.report_to(n))
    producer.flush(timeout)
    acknowledged = len(letters) - len(deliveries.failed(range(len(letters))))
    if acknowledged != len(letters):
        raise DeadLetterError(
            f"only {acknowledged} of {len(letters)} records were re-submitted"
            f" ({deliveries.first_error()}); retrying the same ids again is safe: events"
            " already stored are skipped"
        )
    return acknowledged


def find(letters: Sequence[DeadLetter], ids: Sequence[str]) -> list[DeadLetter]:
    """The dead letters with these ids, in the order given; ValueError names unknown ones."""
    by_id = {x.id: x for x in letters}
    missing = []
    for i in ids:
        parse_id(i)
        if i.strip() not in by_id:
            missing.append(i)
    if missing:
        raise ValueError(f"no dead letter has the id(s) {', '.join(missing)}")
    return [by_id[i.strip()] for i in ids]
