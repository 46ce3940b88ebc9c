"""A dead letter never blocks: a record whose dead-letter copy is over the size limit is
dead-lettered as a summary (its size, SHA-256, judgement and where it is), a copy the
broker refuses is sent alone and then summarised, one refused even so is counted and given
up; only what may pass (a broker away) makes the batch be tried again."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from likvard import dlq
from likvard.codec import Catalogue
from likvard.ingest import DeadLetterSink, Outcome, Rejected, SourceRecord
from likvard.relay import Headers
from tests.district import DistrictRecord, DistrictSystem, assessment, registered
from tests.support import IngestStack, wait_for

FAILED_AT = datetime(2026, 12, 1, 21, 16, 5, tzinfo=UTC)
SOURCE = ("likvard.district-ingest.v1", 3, 17)
JUDGEMENT: dict[str, Any] = {
    "stage": "decode",
    "code": "not-single-object",
    "reason": "The record does not start with the single-object marker.",
    "service": "intake",
    "source": SOURCE,
    "failed_at": FAILED_AT,
}


# --- the size of a record, and the summary (no broker) -------------------------------------
def librdkafka_accepts(producer: Producer, key: bytes, value_size: int, headers: Headers) -> bool:
    """Whether librdkafka queues the record or refuses it as over `message.max.bytes`."""
    try:
        producer.produce("t", key=key, value=b"x" * value_size, headers=headers)
    except KafkaException as exc:
        assert exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
        return False
    return True


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("event_type", b"AssessmentCompleted"), ("event_id", str(uuid.uuid4()).encode())],
        [(f"h{i}", b"v" * (i * 40)) for i in range(30)] + [("empty", None), ("text", "å")],
    ],
)
def test_record_size_never_says_a_record_fits_that_librdkafka_refuses(headers: Headers) -> None:
    limit = 50_000
    key = str(uuid.uuid4()).encode()
    producer = Producer(
        {"bootstrap.servers": "127.0.0.1:9", "message.max.bytes": limit, "log_level": 0}
    )
    try:
        fits = limit - dlq.record_size(key, b"", headers)  # the largest value said to fit
        assert librdkafka_accepts(producer, key, fits, headers)
        lo, hi = fits, limit  # librdkafka's own largest value, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if librdkafka_accepts(producer, key, mid, headers) else (lo, mid - 1)
        slack = dlq.RECORD_OVERHEAD + dlq.HEADER_OVERHEAD * len(headers)
        assert 0 < lo - fits <= slack  # over-counted on purpose, but not by much
    finally:
        producer.purge()


def as_read(letter: dlq.Letter, partition: int = 0, offset: int = 0) -> dlq.DeadLetter:
    """The dead letter as `likvard dlq` reads it back from the topic."""
    headers = tuple(
        (name, value.encode() if isinstance(value, str) else value)
        for name, value in letter.headers
    )
    return dlq.DeadLetter(partition, offset, letter.key, letter.value, headers)


def big_record() -> tuple[bytes, bytes, Headers]:
    key = str(uuid.uuid4()).encode()
    value = bytes(range(256)) * 8_000  # 2,048,000 bytes, not single-object encoded
    headers: Headers = [
        ("event_type", b"AssessmentCompleted"),
        ("blob", b"b" * 20_000),  # does not fit in a summary
        ("event_id", str(uuid.uuid4()).encode()),
        (dlq.REASON, b"an earlier judgement"),  # a retried record's: never copied twice
        (dlq.RETRY_OF, b"0:4"),
    ]
    return key, value, headers


def test_a_summary_keeps_the_judgement_size_digest_and_the_headers_that_fit() -> None:
    key, value, headers = big_record()
    letter = dlq.summary_letter(key, value, headers, limit=1_000_000, **JUDGEMENT)
    assert letter.summary and letter.value is None and letter.key == key
    size = dlq.record_size(key, value, dlq.own_headers(headers))
    assert size > 2_048_000
    assert dlq.record_size(letter.key, letter.value, letter.headers) <= dlq.SUMMARY_BYTES
    names = [name for name, _ in letter.headers]
    assert names[:3] == ["event_type", "event_id", dlq.RETRY_OF]  # own, in order, as fit
    assert "blob" not in names and names.count(dlq.REASON) == 1

    x = as_read(letter)
    assert (x.code, x.stage, x.service) == (dlq.TOO_LARGE, "decode", "intake")
    assert x.is_summary and x.original_size == size
    assert x.original_sha256 == hashlib.sha256(value).hexdigest()
    assert x.header(dlq.ORIGINAL_CODE) == "not-single-object"
    assert x.header(dlq.HEADERS_DROPPED) == "1"
    assert x.source == SOURCE and x.failed_at == FAILED_AT.isoformat()
    assert x.event_type == "AssessmentCompleted" and x.retry_of == "0:4"
    assert x.reason.startswith(JUDGEMENT["reason"])
    assert f"{size:,} bytes" in x.reason and "1,000,000 bytes" in x.reason

    copy = as_read(dlq.Letter(key, value, dlq.dead_letter_headers(headers, **JUDGEMENT)))
    assert not copy.is_summary and copy.original_size is None and copy.original_sha256 == ""


def test_a_summary_of_a_refused_copy_names_the_brokers_error() -> None:
    key = b"k" * (dlq.KEPT_KEY_BYTES + 1)  # not a case id: not kept either
    refused = dlq.summary_letter(
        key, b"v", [], limit=1_000_000, refusal=KafkaError(KafkaError.INVALID_RECORD), **JUDGEMENT
    )
    x = as_read(refused)
    assert refused.key is None and x.code == dlq.REFUSED and "INVALID_RECORD" in x.reason
    too_large = dlq.summary_letter(
        b"k", b"v", [], limit=9, refusal=KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), **JUDGEMENT
    )
    assert dict(too_large.headers)[dlq.CODE] == dlq.TOO_LARGE.encode()
    assert dlq.HEADERS_DROPPED not in dict(too_large.headers)


def test_a_summary_is_never_re_submitted() -> None:
    key, value, headers = big_record()
    letter = dlq.summary_letter(key, value, headers, limit=1_000_000, **JUDGEMENT)
    x = as_read(letter, 2, 5)

    def no_producer(_config: dict[str, object]) -> Producer:
        raise AssertionError("nothing may be produced")

    with pytest.raises(dlq.DeadLetterError, match="2:5 are summaries"):
        dlq.retry("127.0.0.1:9", "ingest", [x], producer_factory=no_producer)


# --- the sink against the broker ---------------------------------------------------------
def outcome(offset: int, value: bytes, key: bytes | None = b"case") -> Outcome:
    record = SourceRecord("ingest", 0, offset, key, value, (("event_type", b"CaseClosed"),))
    rejected = Rejected("decode", "not-single-object", "Not single-object encoded.")
    return Outcome(record, "dead-lettered", rejection=rejected)


Refuse = Callable[[bytes | None, bytes | None, Headers], int | None]


class RefusingBroker:
    """A real producer to the test broker, behind a refusal Tansu cannot be made to give (it
    has no size limit): records `refuse` gives an error code are reported refused with it,
    and a size refusal refuses every record of the flush, as a broker refuses a batch."""

    def __init__(self, config: dict[str, Any], refuse: Refuse) -> None:
        self.inner = Producer(config)
        self.refuse = refuse
        self.queued: list[tuple[str, bytes | None, bytes | None, Headers, Any]] = []

    def produce(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Headers | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        self.queued.append((topic, key, value, headers or [], on_delivery))

    def flush(self, timeout: float = -1) -> int:
        batch, self.queued = self.queued, []
        codes = [self.refuse(key, value, headers) for _, key, value, headers, _ in batch]
        if any(c in dlq.SIZE_ERRORS for c in codes):
            codes = [KafkaError.MSG_SIZE_TOO_LARGE] * len(batch)
        for (topic, key, value, headers, report), code in zip(batch, codes, strict=True):
            if code is None:
                self.inner.produce(topic, key=key, value=value, headers=headers, on_delivery=report)
            else:
                report(KafkaError(code), cast(Message, None))
        return self.inner.flush(timeout)

    def poll(self, timeout: float = 0) -> int:
        return self.inner.poll(timeout)

    def purge(self) -> None:
        self.inner.purge()


def sink_with(
    bootstrap: str, topic: str, refuse: Refuse
) -> tuple[DeadLetterSink, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    sink = DeadLetterSink(
        bootstrap,
        topic,
        "intake",
        producer_factory=lambda config: cast(Producer, RefusingBroker(config, refuse)),
        meter=MeterProvider(metric_readers=[reader]).get_meter("test"),
    )
    return sink, reader


def counted(reader: InMemoryMetricReader, name: str) -> dict[str, int]:
    data = reader.get_metrics_data()
    out: dict[str, int] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        service = str((point.attributes or {})["service"])
                        out[service] = int(point.value)  # type: ignore[union-attr]
    return out


@pytest.mark.integration
def test_a_copy_over_the_brokers_limit_is_sent_alone_then_summarised(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}likvard.dead-letter.v1"

    def limit(_key: bytes | None, value: bytes | None, _headers: Headers) -> int | None:
        return KafkaError.MSG_SIZE_TOO_LARGE if len(value or b"") > 20_000 else None

    sink, reader = sink_with(kafka_bootstrap, topic, limit)
    assert sink.limit == dlq.DEFAULT_MAX_MESSAGE_BYTES  # the producer's own
    big = b"\x00" * 50_000
    sink.send([outcome(1, b"small"), outcome(2, big), outcome(3, b"tiny")])
    assert sink.stats == dlq.SinkStats(summarised=1, refused=0)
    assert sink.letter(outcome(2, big), FAILED_AT).summary  # learnt: next time at once
    assert not sink.letter(outcome(4, b"\x00" * 19_000), FAILED_AT).summary
    assert counted(reader, "likvard.ingest.dead_letters_summarised") == {"intake": 1}

    letters = {x.source[2]: x for x in dlq.read_all(kafka_bootstrap, topic) if x.source}
    assert sorted(letters) == [1, 2, 3]  # the batch-mates refused with it went alone, whole
    assert (letters[1].value, letters[3].value) == (b"small", b"tiny")
    assert not letters[1].is_summary
    summary = letters[2]
    assert summary.code == dlq.TOO_LARGE and not summary.value
    assert "MSG_SIZE_TOO_LARGE" in summary.reason
    assert summary.original_sha256 == hashlib.sha256(big).hexdigest()


@pytest.mark.integration
def test_a_dead_letter_refused_even_as_a_summary_is_counted_and_given_up(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"{topic_prefix}likvard.dead-letter.v1"

    def invalid(_key: bytes | None, _value: bytes | None, headers: Headers) -> int | None:
        offset = dict(headers).get(dlq.SOURCE_OFFSET)
        return KafkaError.INVALID_RECORD if offset == b"8" else None

    sink, reader = sink_with(kafka_bootstrap, topic, invalid)
    with caplog.at_level(logging.ERROR, logger="likvard.ingest"):
        sink.send([outcome(7, b"before"), outcome(8, b"secret value"), outcome(9, b"after")])
    assert sink.stats == dlq.SinkStats(summarised=0, refused=1)
    assert counted(reader, "likvard.ingest.dead_letters_refused") == {"intake": 1}
    (line,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert "ingest[0]@8" in line and "INVALID_RECORD" in line and "secret" not in line
    offsets = sorted(x.source[2] for x in dlq.read_all(kafka_bootstrap, topic) if x.source)
    assert offsets == [7, 9]


@pytest.mark.integration
def test_a_failure_that_may_pass_makes_the_batch_be_tried_again(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}likvard.dead-letter.v1"
    sink, _reader = sink_with(kafka_bootstrap, topic, lambda *_: KafkaError._MSG_TIMED_OUT)
    with pytest.raises(dlq.DeadLetterError, match="2 of 2 dead letters were not acknowledged"):
        sink.send([outcome(1, b"a"), outcome(2, b"b")])
    assert sink.stats == dlq.SinkStats()


# --- the whole ingest path ------------------------------------------------------------------
def produce_in_order(bootstrap: str, topic: str, records: list[DistrictRecord]) -> list[int]:
    """Produce with a limit above the broker's default (Tansu takes records of 60 MB);
    returns each record's partition."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "message.max.bytes": 5_000_000, "enable.idempotence": True}
    )
    partitions: dict[int, int] = {}

    def report(n: int) -> Callable[[KafkaError | None, Message], None]:
        def callback(err: KafkaError | None, msg: Message) -> None:
            assert err is None, err
            partitions[n] = int(msg.partition() or 0)

        return callback

    for n, r in enumerate(records):
        producer.produce(topic, key=r.key, value=r.value, headers=r.headers, on_delivery=report(n))
    assert producer.flush(30) == 0
    return [partitions[n] for n in range(len(records))]


@pytest.mark.integration
def test_an_over_size_record_and_the_thousand_behind_it_are_all_judged(
    ingest_stack: IngestStack, catalogue: Catalogue
) -> None:
    stack = ingest_stack
    district = DistrictSystem(catalogue)
    case = str(uuid.uuid4())
    big = district.raw(
        case.encode(),
        bytes(range(256)) * 4_700,  # 1,203,200 bytes: over the dead-letter producer's limit
        [("event_type", b"AssessmentCompleted"), ("event_id", str(uuid.uuid4()).encode())],
    )
    behind = [district.record("IntakeRegistered", case, registered())]
    for n in range(999):
        if n % 3 == 0:
            garbage = bytes([0, n % 251, 2, 3]) * 20  # not single-object encoded
            behind.append(district.raw(case.encode(), garbage, [("event_type", b"CaseClosed")]))
        else:
            behind.append(district.record("AssessmentCompleted", case, assessment()))
    records = [big, *behind]
    valid = [r for r in behind if r.event_id]
    partitions = produce_in_order(stack.settings.kafka_bootstrap or "", stack.ingest_topic, records)
    assert len(set(partitions)) == 1  # one key, one partition: the big one is in front

    intake = stack.workers["intake"]
    wait_for(
        lambda: sum(w.stats.judged for w in stack.workers.values()) >= len(records),
        90,
        "all 1,001 records to be judged",
    )
    assert intake.stats.judged == len(records) == 1_001
    assert intake.stats.accepted == len(valid) == 667
    assert intake.stats.dead_lettered == {"decode": len(records) - len(valid)}
    assert intake.stats.failures == 0  # not one batch had to be tried again
    assert intake.sink.stats == dlq.SinkStats(summarised=1, refused=0)
    stored = [e for e in stack.stores["intake"].read_all() if e.stream_id == case]
    assert len(stored) == len(valid)

    letters = dlq.read_all(stack.settings.kafka_bootstrap or "", stack.dead_letter_topic)
    assert len(letters) == len(records) - len(valid)
    (summary,) = [x for x in letters if x.is_summary]
    assert summary.source == (stack.ingest_topic, partitions[0], 0)
    assert (summary.code, summary.stage) == (dlq.TOO_LARGE, "decode")
    assert summary.header(dlq.ORIGINAL_CODE) == "not-single-object"
    assert summary.original_size == dlq.record_size(big.key, big.value, big.headers)
    assert summary.original_sha256 == hashlib.sha256(big.value or b"").hexdigest()
    assert summary.key == big.key and not summary.value
    assert summary.event_type == "AssessmentCompleted"  # its own headers kept
    copies = [x for x in letters if not x.is_summary]
    assert all(x.value and len(x.value) == 80 for x in copies)  # the small ones, whole
