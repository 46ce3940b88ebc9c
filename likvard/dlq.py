"""The dead-letter topic `likvard.dead-letter.v1`: what goes in, and how operations read it.

A record the ingest path refuses is copied there unchanged (key, value and its own headers)
with headers that say why: `dlq_reason` (a sentence a person understands), `dlq_stage`
(signature, decode, schema, rule, or internal for a fault of Likvärd's), `dlq_code` (stable, for
machines), `dlq_service` (whose worker judged it), `dlq_failed_at`, and where it came from:
`dlq_source_topic`, `dlq_source_partition`, `dlq_source_offset`.

A record whose copy would be over the producer's size limit (`message.max.bytes`; its
copy is larger than the record by the headers added), or that the broker refuses for good,
is dead-lettered as a summary instead: no value, code `record-too-large` (or
`record-refused`), `dlq_original_code` for the judgement, `dlq_original_size` and
`dlq_original_sha256` (of the value), and the record's own headers as far as they fit. The
record itself stays on the ingest topic (kept forever) at its `dlq_source_*` coordinates.

`likvard dlq list|show|retry` reads the topic from offset 0 (dead letters are few) and
re-submits chosen records to the ingest topic after a fix, marked `dlq_retry_of`; the ingest
path judges a retried record like any other, so a fixed one is stored and one still wrong
comes back as a new dead letter that names the one it retries.

A refused record may hold personal data (free text, an identity number where an id
belongs), so the dlq headers never carry a value of it: reasons are Likvärd's own sentences
naming codes, field names, sizes and offsets, and `dead_letter_headers` enforces it where
they are written (an identity-number-shaped run is removed, codes keep their alphabet, a
reason its length). The record's own headers are copied unchanged (its signature covers
them, and a retry must re-submit it as it was); `shown_header` and the `event_type` and
`event_id` properties show them only when they have the shape of an id. The topic keeps
dead letters 30 days (deploy/topics.toml), and only an auditor may read a payload
(`likvard dlq show --payload`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from likvard.identity import looks_like_identity_number
from likvard.relay import Deliveries, Headers, produce, producer_config
from likvard.topic_reader import TopicReader, TopicReadError, record_headers

STAGES = ("signature", "decode", "schema", "rule", "internal")
"""signature: not signed by a district system Likvärd knows, or signed by one that may not
write it (another district's case); decode: not an Avro single-object encoded record (or
its body does not decode);
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
ORIGINAL_CODE = "dlq_original_code"
ORIGINAL_SIZE = "dlq_original_size"
ORIGINAL_SHA256 = "dlq_original_sha256"
HEADERS_DROPPED = "dlq_headers_dropped"
"""On a summary: the judgement's own code, the record's size in bytes (key, value and
headers), the SHA-256 of its value (hex), and how many of its headers did not fit."""

TOO_LARGE = "record-too-large"
REFUSED = "record-refused"
"""Codes of summaries: the copy was over a size limit; the broker refused it otherwise."""
SIZE_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
REFUSALS = SIZE_ERRORS | {KafkaError.INVALID_RECORD, KafkaError.INVALID_TIMESTAMP}
"""Delivery errors that refuse one record for good: sending it again cannot help. Anything
else (a timeout, a broker away, a missing topic, authorisation) may pass, or concerns every
record, so the batch is retried rather than its dead letters given up."""

DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
"""librdkafka's default `message.max.bytes`."""
RECORD_OVERHEAD = 100
HEADER_OVERHEAD = 10
"""Bytes a record takes beyond its key, value and header names and values: librdkafka
counts 36 for the record and 2 a header (varints of 1 to 5 bytes); a broker also counts
the record batch's 61. Over-estimated on purpose: a copy judged to fit must fit."""
KEPT_KEY_BYTES = 256
"""A summary keeps the key up to this size (a case id is 36)."""
SUMMARY_BYTES = 16_384
"""A summary is at most this big, whatever the limit: the dlq headers and what fits."""

_PREFIX = "dlq_"
_ID = re.compile(r"^(\d+):(\d+)$")
MAX_REASON_CHARS = 1000
"""A reason is a few sentences; one longer is cut here, so it never carries a whole text."""
REMOVED = "(removed: shaped like an identity number)"
INVALID_CODE = "invalid-code"
_CODE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9]{6,8}[-+]?[0-9]{4}(?![0-9])")
_SHOWN = re.compile(r"[A-Za-z0-9._:-]{1,1024}")
_EVENT_TYPE = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
"""All used with fullmatch."""


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


def safe_reason(reason: str) -> str:
    """A reason as a dead letter may carry it: runs of digits shaped like a personal or
    coordination number removed, control characters made spaces, at most
    MAX_REASON_CHARS. Reasons never quote values by construction; this is the check at
    the one place they are written, so a mistake in a rule's sentence cannot leak one."""
    text = _DIGIT_RUN.sub(
        lambda m: REMOVED if looks_like_identity_number(m.group()) else m.group(), reason
    )
    text = "".join(" " if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def safe_code(code: str) -> str:
    """A stage or code as a dead letter may carry it: kebab-case of its alphabet, else
    INVALID_CODE (a code is Likvärd's, never a value)."""
    return code if _CODE.fullmatch(code) else INVALID_CODE


def shown_header(name: str, value: str | bytes | None) -> str:
    """A dead letter's header as `likvard dlq show` prints it without `--payload`: the dlq
    headers (Likvärd's) as they are; the record's own only if an id's alphabet and not an
    identity number (event_type, event_id, traceparent, the signature), else their size."""
    text = _text(value)
    if name.startswith(_PREFIX) and name != RETRY_OF:
        return text
    if (_SHOWN.fullmatch(text) and not looks_like_identity_number(text)) or not text:
        return text
    return f"({len(_bytes(value))} bytes, not shown: not an id; --payload shows it)"


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
    """The dead letter's headers: the record's own, then why and where it came from (codes,
    a sentence, coordinates: never a value of the record, see `safe_reason`)."""
    topic, partition, offset = source
    return [
        *own_headers(headers),
        (REASON, safe_reason(reason).encode()),
        (STAGE, safe_code(stage).encode()),
        (CODE, safe_code(code).encode()),
        (SERVICE, service.encode()),
        (FAILED_AT, failed_at.isoformat().encode()),
        (SOURCE_TOPIC, topic.encode()),
        (SOURCE_PARTITION, str(partition).encode()),
        (SOURCE_OFFSET, str(offset).encode()),
    ]


def record_size(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, str | bytes | None]]
) -> int:
    """A record's size as producers and brokers count it against their limits (at most
    RECORD_OVERHEAD + HEADER_OVERHEAD a header more than the truth, never less)."""
    size = RECORD_OVERHEAD + len(key or b"") + len(value or b"")
    for name, header in headers:
        size += HEADER_OVERHEAD + len(name.encode()) + len(_bytes(header))
    return size


def max_message_bytes(config: Mapping[str, Any]) -> int:
    """The largest record a producer with this librdkafka configuration sends."""
    return int(config.get("message.max.bytes", DEFAULT_MAX_MESSAGE_BYTES))


def _bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else value


@dataclass(frozen=True)
class Letter:
    """A dead letter ready to produce: the copy of the record, or its summary."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    summary: bool = False


def summary_letter(
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, str | bytes | None]],
    *,
    stage: str,
    code: str,
    reason: str,
    service: str,
    source: tuple[str, int, int],
    failed_at: datetime,
    limit: int,
    refusal: KafkaError | None = None,
) -> Letter:
    """What is dead-lettered when the copy cannot be: no value, the record's size and the
    SHA-256 of its value, the judgement (its code as `dlq_original_code`), and the record's
    own headers in order as far as they fit (`dlq_headers_dropped` counts the rest).
    `refusal` names the broker's error if it refused the copy, else the copy was too large."""
    own = own_headers(headers)
    size = record_size(key, value, own)
    if refusal is None or refusal.code() in SIZE_ERRORS:
        summary_code = TOO_LARGE
        why = (
            f" The record is {size:,} bytes with its key and headers, more than its dead-letter"
            f" copy may be ({limit:,} bytes"
            + (f"; the broker said {refusal.name()}" if refusal else "")
            + "), so this is a summary of it without its value."
        )
    else:
        summary_code = REFUSED
        why = (
            f" The broker refused its copy ({refusal.name()}), so this is a summary of it"
            " without its value."
        )
    why += (
        " The record is kept on the ingest topic at dlq_source_topic/partition/offset;"
        " dlq_original_sha256 is the SHA-256 of its value."
    )
    kept_key = key if key is not None and len(key) <= KEPT_KEY_BYTES else None
    tail = [
        *dead_letter_headers(
            [],
            stage=stage,
            code=summary_code,
            reason=reason + why,
            service=service,
            source=source,
            failed_at=failed_at,
        ),
        (ORIGINAL_CODE, safe_code(code).encode()),
        (ORIGINAL_SIZE, str(size).encode()),
        (ORIGINAL_SHA256, hashlib.sha256(value or b"").hexdigest().encode()),
    ]
    budget = min(limit, SUMMARY_BYTES) - record_size(kept_key, None, tail)
    budget -= record_size(None, None, [(HEADERS_DROPPED, str(len(own)))]) - RECORD_OVERHEAD
    kept: Headers = []
    for name, header in own:
        cost = record_size(None, None, [(name, header)]) - RECORD_OVERHEAD
        if cost <= budget:
            kept.append((name, header))
            budget -= cost
    if len(kept) < len(own):
        tail.append((HEADERS_DROPPED, str(len(own) - len(kept)).encode()))
    return Letter(kept_key, None, [*kept, *tail], summary=True)


@dataclass
class SinkStats:
    """What a dead-letter sink did besides copying records."""

    summarised: int = 0
    """Dead-lettered as a summary (too large, or the copy refused)."""
    refused: int = 0
    """Refused by the broker even as a summary: logged with coordinates, not retried."""


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
        """The record's `event_type` header if it is shaped like one ('' if not: the
        district system wrote it, and it is listed to operations)."""
        text = self.header("event_type")
        return text if _EVENT_TYPE.fullmatch(text) else ""

    @property
    def event_id(self) -> str:
        """The record's `event_id` header if it is a UUID ('' if not)."""
        text = self.header("event_id")
        return text if _UUID.fullmatch(text) else ""

    @property
    def retry_of(self) -> str:
        text = self.header(RETRY_OF)
        return text if _ID.fullmatch(text) else ""

    @property
    def is_summary(self) -> bool:
        """A summary holds no record (`record-too-large`, `record-refused`): nothing to retry."""
        return bool(self.header(ORIGINAL_SHA256))

    @property
    def original_size(self) -> int | None:
        """A summary's record size in bytes (key, value and headers)."""
        text = self.header(ORIGINAL_SIZE)
        return int(text) if text.isdigit() else None

    @property
    def original_sha256(self) -> str:
        """A summary's SHA-256 of the record's value, hex ('' if not a summary)."""
        return self.header(ORIGINAL_SHA256)

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
    returns how many the broker acknowledged (raises if any was not). A summary holds no
    record to re-submit: asking for one is refused before anything is sent."""
    summaries = [x.id for x in letters if x.is_summary]
    if summaries:
        raise DeadLetterError(
            f"dead letter(s) {', '.join(summaries)} are summaries ({TOO_LARGE} or {REFUSED}):"
            " they hold no record to re-submit. The record is on the ingest topic where"
            " `likvard dlq show` says; the district system must send it again, smaller"
        )
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
