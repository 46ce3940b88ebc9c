"""District ingest: events that district systems produce straight to Kafka.

A district system produces any event of the catalogue to `likvard.district-ingest.v1`
(Avro single-object encoding, key = case id, headers `event_type` and `event_id`). Each
write service runs an ingest worker that judges the records whose event type it owns, and
either appends the event to its own event store (from where its relay publishes it on the
service's topic like any other) or copies the record to `likvard.dead-letter.v1` with the
reason (`likvard.dlq`). The stages of refusal:

- signature: the record is not signed by a district system Likvärd knows (`unsigned`,
  `bad-signature`: checked first, over the raw bytes, before anything is decoded), or its
  signer may not write it: the event's metadata.district, or the district Likvärd knows
  the case is in, is not the signer's (`wrong-district`), or metadata.producer is not the
  signer's id (`producer-not-signer`). See `likvard.district_keys`;
- decode: not Avro single-object encoded, or a body that does not decode;
- schema: a writer schema that is not in `schemas/`, or a key, headers or metadata that
  break the contract (key = case id, headers repeat the event, pseudonymous actor ...);
- rule: the owning service's decider refuses it against the current state of the case,
  with the same rules as its HTTP API (`IngestRules` maps the event to the command);
- internal: Likvärd failed while checking it (a bug): kept, to retry after the fix.

Which worker judges a record: the owner of its event type, known from the fingerprint, else
from the `event_type` header, else intake. Every worker reads every record and judges only
its own, so each record is counted and dead-lettered by exactly one service.

Exactly once in effect: the event keeps the district system's event id, so one already in
the store (or earlier in the batch) is a duplicate and skipped. Offsets are committed only
after every record of a batch is stored, skipped or acknowledged by the dead-letter topic;
after a crash the batch comes again, and what was stored is then a duplicate.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import psycopg
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from opentelemetry import metrics, trace

from likvard import dlq, telemetry
from likvard.codec import (
    HEADER_SIZE,
    SINGLE_OBJECT_MARKER,
    Catalogue,
    CodecError,
    CorruptRecord,
    EncodeError,
    IncompatibleSchema,
    MalformedValue,
    NotSingleObjectEncoded,
    UnknownFingerprint,
)
from likvard.consumer_loop import BatchLoop, ConsumerSource
from likvard.district_keys import DistrictKeys, DistrictSystem, SignatureError, Unsigned
from likvard.domain import DomainError
from likvard.eventstore import ConcurrencyError, NewEvent, StoredEvent
from likvard.faults import fault_point
from likvard.inbox import Incoming
from likvard.known_cases import CaseDirectory, KnownCase
from likvard.ops import Heartbeat, Progress
from likvard.pseudonym import InvalidIdentityNumber, normalise
from likvard.relay import Deliveries, produce, producer_config
from likvard.service import DomainEventLike, StreamService
from likvard.telemetry import ConsumerLag
from likvard.topic_reader import record_headers

log = logging.getLogger("likvard.ingest")

INGEST_TOPIC = "likvard.district-ingest.v1"
DEAD_LETTER_TOPIC = "likvard.dead-letter.v1"
DEFAULT_OWNER = "intake"
"""Judges records whose event type cannot be told (random bytes, an unknown schema), and
those of event types no district system may send."""
INGEST_SERVICES = frozenset({"intake", "referral", "followup"})
"""The services with an ingest worker: district systems send only their event types (the
access log's `CaseAccessed` is Likvärd's own record of a read)."""
FUTURE_TOLERANCE = timedelta(minutes=5)
"""How far ahead of Likvärd's clock `occurred_at` may be (the district system's clock may
run a little fast); further is refused, as the HTTP API refuses a time in the future."""
DERIVED_NAMESPACE = uuid.UUID("5b0e4c8e-55f4-5d0a-9f0e-6f1c0d1e2a3b")
"""Namespace of the ids of events Likvärd derives from an ingested one. Never change it."""
STREAM_ATTEMPTS = 5

Stage = Literal["signature", "decode", "schema", "rule", "internal"]
Status = Literal["accepted", "duplicate", "dead-lettered"]

_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
"""Both used with fullmatch (`$` would let a trailing newline through)."""


# --- records and refusals ----------------------------------------------------------------
@dataclass(frozen=True)
class SourceRecord:
    """A record as it came from the ingest topic, before anything is trusted."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @classmethod
    def from_message(cls, msg: Message) -> SourceRecord:
        headers = record_headers(msg)
        return cls(
            str(msg.topic()),
            int(msg.partition() or 0),
            int(msg.offset() or 0),
            msg.key(),
            msg.value(),
            headers,
        )

    def header_values(self, name: str) -> list[bytes | None]:
        return [v for k, v in self.headers if k == name]


class Rejected(Exception):
    """A record refused at a stage; `reason` is for people and never quotes its values."""

    def __init__(self, stage: Stage, code: str, reason: str) -> None:
        super().__init__(f"{stage}/{code}: {reason}")
        self.stage: Stage = stage
        self.code = code
        self.reason = reason


def _internal(exc: BaseException) -> Rejected:
    """A fault of Likvärd's while judging a record: logged with where it happened (not its
    text, which may quote values), kept as a dead letter to retry after the fix."""
    log.error(
        "internal error while judging a record (%s); where:\n%s",
        type(exc).__name__,
        "".join(traceback.format_tb(exc.__traceback__)),
    )
    return Rejected(
        "internal",
        "internal-error",
        f"Likvärd failed while checking this record ({type(exc).__name__}); it is not"
        " necessarily wrong. Operations: see the ingest worker's log, then retry it.",
    )


# --- the signature stage (pure, given the keys) -------------------------------------------
def check_signature(record: SourceRecord, keys: DistrictKeys) -> DistrictSystem:
    """The district system that signed the record; raises Rejected if none did."""
    try:
        return keys.verify(record.key, record.value, record.headers)
    except SignatureError as exc:
        raise _signature_refused(exc) from None


def check_signatures(
    records: Sequence[SourceRecord], keys: DistrictKeys
) -> list[DistrictSystem | Rejected]:
    """`check_signature` for a batch (verified in parallel): each record's signer, or the
    Rejected it gets. A fault of Likvärd's on one record (a bug) is that record's internal
    error, as in `check_signature`, never the whole batch's."""
    try:
        found = keys.verify_many([(r.key, r.value, r.headers) for r in records])
    except Exception:
        return [_checked_alone(r, keys) for r in records]
    return [_signature_refused(x) if isinstance(x, SignatureError) else x for x in found]


def _checked_alone(record: SourceRecord, keys: DistrictKeys) -> DistrictSystem | Rejected:
    try:
        return check_signature(record, keys)
    except Rejected as rejected:
        return rejected
    except Exception as exc:
        return _internal(exc)


def _signature_refused(exc: SignatureError) -> Rejected:
    if isinstance(exc, Unsigned):
        return Rejected("signature", "unsigned", exc.reason)
    return Rejected("signature", "bad-signature", exc.reason)


def _wrong_district(what: str) -> Rejected:
    return Rejected(
        "signature",
        "wrong-district",
        f"{what} is not the district of the system that signed the record (nor one it"
        " took over): a district system writes only its own district's cases.",
    )


def check_signer(event: Incoming, signer: DistrictSystem) -> None:
    """The signer may send this event: its district and producer are the signer's."""
    if not signer.may_write_for(event.metadata["district"]):
        raise _wrong_district("The event's metadata.district")
    if event.metadata["producer"] != signer.id:
        raise Rejected(
            "signature",
            "producer-not-signer",
            "metadata.producer is not the id of the district system that signed the record.",
        )


# --- the envelope: decode and schema stages (pure) ---------------------------------------
def ingest_owners(catalogue: Catalogue) -> dict[str, str]:
    """Event type -> the service whose ingest worker judges it (DEFAULT_OWNER for a type
    whose owner has none, which refuses it)."""
    owners = {t: catalogue.owner(t) for t in catalogue.event_types()}
    return {t: o if o in INGEST_SERVICES else DEFAULT_OWNER for t, o in owners.items()}


def owner_of(record: SourceRecord, catalogue: Catalogue, owners: Mapping[str, str]) -> str:
    """The service whose worker judges this record (see the module doc)."""
    value = record.value or b""
    if len(value) >= HEADER_SIZE and value[:2] == SINGLE_OBJECT_MARKER:
        writer = catalogue.writer_for(value[2:HEADER_SIZE])
        if writer is not None:
            return owners[writer.event_type]
    for header in record.header_values("event_type"):
        name = (header or b"").decode("utf-8", errors="replace")
        if name in owners:
            return owners[name]
    return DEFAULT_OWNER


def _decode(record: SourceRecord, catalogue: Catalogue) -> Incoming:
    if not record.value:
        raise Rejected(
            "decode",
            "empty-record",
            "The record has no value: an event must be the Avro single-object encoding of"
            " one of Likvärd's event schemas.",
        )
    try:
        decoded = catalogue.decode(record.value)
    except UnknownFingerprint as exc:
        raise Rejected("schema", "unknown-schema", str(exc)) from None
    except IncompatibleSchema as exc:
        raise Rejected("schema", "incompatible-schema", str(exc)) from None
    except MalformedValue as exc:
        raise Rejected("schema", "malformed-value", str(exc)) from None
    except NotSingleObjectEncoded as exc:
        raise Rejected("decode", "not-single-object", str(exc)) from None
    except CorruptRecord as exc:
        raise Rejected("decode", "corrupt-body", str(exc)) from None
    except CodecError as exc:
        raise Rejected("decode", "undecodable", str(exc)) from None
    body = dict(decoded.record)
    metadata = body.pop("metadata")
    return Incoming(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        event_id=str(metadata["event_id"]),
        event_type=decoded.event_type,
        case_id=str(metadata["case_id"]),
        metadata=metadata,
        data=body,
    )


def _schema(reason: str, code: str) -> Rejected:
    return Rejected("schema", code, reason)


def _same(name: str, raw: bytes | None, expected: str) -> bool:
    """A header equals the event's value; an event id in upper case is the same id (Avro
    reads uuids in lowercase)."""
    if raw is None:
        return False
    text = raw.decode("utf-8", errors="replace")
    return (text.lower() if name == "event_id" else text) == expected


def _one_header(record: SourceRecord, name: str, expected: str) -> None:
    values = record.header_values(name)
    if not values:
        raise _schema(
            f"The record has no '{name}' header: every record must repeat its event's"
            f" {name} in a header of that name.",
            "header-missing",
        )
    if not all(_same(name, v, expected) for v in values):
        raise _schema(
            f"The '{name}' header does not equal the event's {name} in its metadata.",
            "header-mismatch",
        )


def _check_id(value: str, what: str, code: str) -> None:
    if not _ID.fullmatch(value):
        raise _schema(
            f"metadata.{what} must be 1 to 64 letters, digits or . _ : - (a pseudonymous id,"
            " never a name).",
            code,
        )


def _length_ok(text: str) -> bool:
    return 1 <= len(text) <= 128


def _is_identity_number(text: str) -> bool:
    try:
        normalise(text)
    except InvalidIdentityNumber:
        return False
    return True


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def open_envelope(
    record: SourceRecord,
    catalogue: Catalogue,
    is_district: Callable[[str], bool],
    now: datetime,
) -> Incoming:
    """The event in a record, if the record keeps the contract; raises Rejected."""
    event = _decode(record, catalogue)
    if catalogue.owner(event.event_type) not in INGEST_SERVICES:
        raise _schema(
            f"{event.event_type} is recorded by Likvärd itself: district systems never send it.",
            "not-a-district-event",
        )
    meta = event.metadata
    if meta["event_type"] != event.event_type:
        raise _schema(
            f"metadata.event_type does not name the schema the event was written with"
            f" ({event.event_type}).",
            "event-type-mismatch",
        )
    _one_header(record, "event_type", event.event_type)
    _one_header(record, "event_id", event.event_id)
    try:
        canonical = str(uuid.UUID(event.case_id)) == event.case_id
    except ValueError:
        canonical = False
    if not canonical:
        raise _schema(
            "metadata.case_id must be the case's UUID in canonical form (lowercase, with hyphens).",
            "case-id-not-uuid",
        )
    if record.key is None:
        raise _schema(
            "The record has no key: records must be keyed by case id, so that a case's"
            " events stay in order.",
            "key-missing",
        )
    if record.key != event.case_id.encode():
        raise _schema(
            "The record's key is not its event's case id (metadata.case_id): records must be"
            " keyed by case id, so that a case's events stay in order.",
            "key-mismatch",
        )
    _check_id(meta["producer"], "producer", "producer-invalid")
    if meta["producer"].lower().startswith("likvard"):
        raise _schema(
            "metadata.producer names a Likvärd service; a district system gives its own id"
            " (for example nordost-treserva).",
            "producer-reserved",
        )
    _check_id(meta["actor"], "actor", "actor-invalid")
    if _is_identity_number(meta["actor"]):
        raise _schema(
            "metadata.actor is a personal identity number; give the case worker's"
            " pseudonymous staff id.",
            "actor-is-identity-number",
        )
    if not _length_ok(meta["correlation_id"]):
        raise _schema(
            "metadata.correlation_id must be 1 to 128 characters.", "correlation-id-invalid"
        )
    if meta.get("causation_id") is not None and not _length_ok(meta["causation_id"]):
        raise _schema("metadata.causation_id must be 1 to 128 characters.", "causation-id-invalid")
    if _has_nul(meta) or _has_nul(event.data):
        raise _schema(
            "A text field holds the NUL character (code 0), which no Likvärd text may hold.",
            "nul-character",
        )
    traceparent = meta.get("traceparent")
    if traceparent is not None and not _TRACEPARENT.fullmatch(traceparent):
        raise _schema(
            "metadata.traceparent must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"
            " or null.",
            "traceparent-invalid",
        )
    if not is_district(meta["district"]):
        raise Rejected(
            "rule",
            "unknown-district",
            "metadata.district is not a known district code (see the districts of the"
            " city's reference data).",
        )
    if meta["occurred_at"] > now + FUTURE_TOLERANCE:
        raise Rejected(
            "rule",
            "occurred-in-future",
            "metadata.occurred_at is in the future: an event records what has happened.",
        )
    return event


# --- the rule stage: one service's rules ------------------------------------------------
@dataclass(frozen=True)
class StreamView:
    """A stream as the rules see it: its folded state, its version, and the case its events
    belong to (None for a stream not yet started)."""

    state: Any
    version: int
    case_id: str | None


class IngestRules(Protocol):
    """What a service supplies to judge its district events (`services/*/ingest.py`)."""

    @property
    def service(self) -> str: ...

    def stream_id(self, event: Incoming) -> str:
        """The stream the event belongs to; raises DomainError if it names none."""
        ...

    def needs_case(self, event: Incoming) -> bool:
        """Whether deciding needs what the service knows of the case (from intake)."""
        ...

    def decide(
        self, event: Incoming, stream: StreamView, case: KnownCase | None
    ) -> Sequence[DomainEventLike]:
        """The events the service's decider makes of it: the event itself first, then any
        Likvärd derives; [] if it changes nothing (a repeat). Raises DomainError."""
        ...

    def district(self, event: Incoming, state: Any, case: KnownCase | None) -> str | None:
        """The district responsible (for the metadata), None for the service's default."""
        ...


def derived_event_id(event_id: str, index: int, event_type: str) -> uuid.UUID:
    """The id of the index-th event Likvärd derives from an ingested one (deterministic)."""
    return uuid.uuid5(DERIVED_NAMESPACE, f"{event_id}:{index}:{event_type}")


def check_matches(
    event: Incoming, decided: Sequence[DomainEventLike], optional: frozenset[str] = frozenset()
) -> None:
    """The decider must make exactly the event the district system sent: fields Likvärd
    derives (a transfer's from_district, a referral's districts ...) must agree. Those in
    `optional` the district may leave null (an age band Likvärd derives from the birth year;
    `personal`, which Likvärd's store seals)."""
    if not decided:
        return
    first = decided[0]
    if first.type != event.event_type:
        raise RuntimeError(f"the rules made a {first.type} of a {event.event_type}")
    differ = sorted(
        name
        for name in set(first.data) | set(event.data)
        if first.data.get(name) != event.data.get(name)
        and not (name in optional and event.data.get(name) is None)
    )
    if differ:
        raise Rejected(
            "rule",
            "derived-fields-differ",
            f"The field(s) {', '.join(differ)} of this {event.event_type} do not match what"
            " Likvärd derives from the case's history and the city's reference data.",
        )


def judge(
    rules: IngestRules, event: Incoming, stream: StreamView, case: KnownCase | None
) -> list[DomainEventLike]:
    """The events a service makes of a district event on this stream: decided by its rules
    and checked to be the event sent. Raises Rejected (stage rule) if it is refused."""
    try:
        decided = list(rules.decide(event, stream, case))
    except DomainError as exc:
        raise Rejected("rule", exc.code, exc.detail) from None
    check_matches(event, decided, getattr(rules, "optional_fields", frozenset()))
    return decided


# --- outcomes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What became of one record: stored, skipped as a duplicate, or dead-lettered."""

    record: SourceRecord
    status: Status
    event_id: str | None = None
    event_type: str | None = None
    rejection: Rejected | None = None
    stored: int = 0
    """Events appended (an accepted ReferralRequested may bring ReferredAcrossDistrict)."""


@dataclass(frozen=True)
class BatchResult:
    outcomes: list[Outcome]
    """One per record this service judged, in the batch's order."""
    skipped: int
    """Records other services judge."""

    @property
    def dead_letters(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "dead-lettered"]

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes if o.status == status)


_Comparable = tuple[str, str, datetime, dict[str, Any]]
"""(event type, case id, when it occurred, payload): what makes two events with one id the
same event. Who recorded it and the tracing ids may differ between a send and a resend."""


@dataclass
class _Pending:
    index: int
    record: SourceRecord
    event: Incoming
    signer: DistrictSystem
    own_stream: bool
    """The stream is the case's own (intake's): what it recorded is the case's district."""


# --- the processor: one batch, no Kafka --------------------------------------------------
class IngestProcessor:
    """Judges batches of ingest records for one service and stores the accepted events.

    It touches PostgreSQL only (the service's event store and what it knows of cases); the
    worker around it reads Kafka and writes the dead letters."""

    def __init__(
        self,
        streams: StreamService[Any, Any, Any],
        rules: IngestRules,
        catalogue: Catalogue,
        is_district: Callable[[str], bool],
        *,
        keys: DistrictKeys,
        directory: CaseDirectory | None = None,
        case_wait: float = 5.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.streams = streams
        self.store = streams.store
        self.rules = rules
        self.service = rules.service
        self.catalogue = catalogue
        self.is_district = is_district
        self.keys = keys
        self.directory = directory
        self.case_wait = case_wait
        self.clock = clock
        self.owners = ingest_owners(catalogue)
        self._tracer = telemetry.tracer("likvard.ingest")

    def owns(self, record: SourceRecord) -> bool:
        return owner_of(record, self.catalogue, self.owners) == self.service

    def process(self, records: Sequence[SourceRecord]) -> BatchResult:
        """Judge a batch; stores what is accepted. Raises only on an outage (database),
        after which the whole batch may be judged again safely."""
        now = self.clock()
        outcomes: dict[int, Outcome] = {}
        pending: dict[str, list[_Pending]] = {}
        owned = [(index, r) for index, r in enumerate(records) if self.owns(r)]
        skipped = len(records) - len(owned)
        signers = check_signatures([r for _, r in owned], self.keys)
        for (index, record), signer in zip(owned, signers, strict=True):
            try:
                if isinstance(signer, Rejected):
                    raise signer
                event = open_envelope(record, self.catalogue, self.is_district, now)
                check_signer(event, signer)
                stream_id = self.rules.stream_id(event)
            except Rejected as rejected:
                outcomes[index] = _dead(record, rejected)
                continue
            except DomainError as exc:
                outcomes[index] = _dead(record, Rejected("rule", exc.code, exc.detail))
                continue
            except Exception as exc:  # a bug must not stop the partition or lose the record
                outcomes[index] = _dead(record, _internal(exc))
                continue
            pending.setdefault(stream_id, []).append(
                _Pending(index, record, event, signer, stream_id == event.case_id)
            )
        if pending:
            outcomes.update(self._judge(pending))
        return BatchResult([outcomes[i] for i in sorted(outcomes)], skipped)

    def _judge(self, pending: dict[str, list[_Pending]]) -> dict[int, Outcome]:
        """Decide every stream of the batch, then store them all in one transaction; if
        that meets a concurrent writer (or something that cannot be stored), decide and
        store stream by stream instead, each on its current state."""
        items = [p for ps in pending.values() for p in ps]
        ids = {uuid.UUID(p.event.event_id) for p in items}
        seen = self._comparables(self.store.find_events(list(ids)))
        cases = self._cases(
            sorted({p.event.case_id for p in items if self.rules.needs_case(p.event)}),
            sorted({p.event.case_id for p in items}),
        )
        stored = self.store.read_streams(list(pending))
        batch_seen = dict(seen)
        outcomes: dict[int, Outcome] = {}
        appends: list[tuple[str, int, list[NewEvent]]] = []
        for stream_id, stream_items in pending.items():
            new_events, decided, accepted = self._decide(
                stream_items, stored[stream_id], batch_seen, cases
            )
            batch_seen.update(accepted)
            outcomes.update(decided)
            appends.append((stream_id, len(stored[stream_id]), new_events))
        try:
            self.store.append_many(appends)
        except (
            ConcurrencyError,
            EncodeError,
            psycopg.DataError,
            psycopg.errors.UniqueViolation,
            psycopg.errors.DeadlockDetected,
        ):
            outcomes = {}
            for stream_id, stream_items in pending.items():
                latest = self.store.read_stream(stream_id)
                outcomes.update(self._stream(stream_id, stream_items, latest, seen, cases))
        return outcomes

    def _comparables(self, stored: Mapping[uuid.UUID, StoredEvent]) -> dict[str, _Comparable]:
        """The stored events as their district sent them: with the personal details the
        store sealed opened again (one key-store round trip), so a re-delivery compares
        equal. Only this comparison sees them; nothing here is logged."""
        events = list(stored.values())
        if self.store.personal is not None:
            records = self.store.personal.reveal(events)
        else:
            records = [dict(self.catalogue.decode(e.data).record) for e in events]
        out: dict[str, _Comparable] = {}
        for e, record in zip(events, records, strict=True):
            metadata = e.metadata
            record.pop("metadata", None)
            case_id = str(metadata.get("case_id") or e.stream_id)
            occurred = e.occurred_at
            out[str(e.event_id)] = (e.event_type, case_id, occurred, record)
        return out

    def _same(self, stored: _Comparable, sent: _Comparable) -> bool:
        """Whether a stored event is the event sent again (the rules may ignore what the
        store derives or sealed: see `optional_fields`, `personal`)."""
        if stored[:3] != sent[:3]:
            return False
        same = getattr(self.rules, "same_data", None)
        return bool(same(sent[3], stored[3])) if same is not None else stored[3] == sent[3]

    def _cases(self, needed: list[str], every: list[str]) -> dict[str, KnownCase]:
        """What the service knows of the batch's cases, waiting (once for the whole batch) up
        to `case_wait` seconds for any of those `needed` whose intake event is still on its
        way; the others as known now (their district checks the signer's)."""
        if not every or self.directory is None:
            return {}
        cases = {}
        rest = sorted(set(every) - set(needed))
        if rest:
            with self.store.pool.connection() as conn:
                cases = self.directory.get_many(conn, rest)
        if needed:
            cases.update(self.directory.wait_for_many(self.store.pool, needed, self.case_wait))
        return cases

    def _stream(
        self,
        stream_id: str,
        items: list[_Pending],
        stored: list[StoredEvent],
        seen: dict[str, _Comparable],
        cases: Mapping[str, KnownCase],
    ) -> dict[int, Outcome]:
        """Decide a stream's records in order on its state, then append what is accepted at
        the version decided on; on a concurrent write, decide again on the new state."""
        for _attempt in range(STREAM_ATTEMPTS):
            new_events, outcomes, accepted = self._decide(items, stored, seen, cases)
            try:
                if new_events:
                    self.store.append(stream_id, len(stored), new_events)
            except ConcurrencyError:
                stored = self.store.read_stream(stream_id)
                continue
            except psycopg.errors.UniqueViolation:
                # Another worker stored one of these event ids meanwhile: they are repeats.
                ids = [uuid.UUID(p.event.event_id) for p in items]
                found = self.store.find_events(ids)
                seen.update(self._comparables(found))
                stored = self.store.read_stream(stream_id)
                continue
            except (EncodeError, psycopg.DataError) as exc:
                # Something accepted cannot be stored: find which, without losing the rest.
                return self._one_by_one(stream_id, items, seen, cases, exc)
            seen.update(accepted)
            return outcomes
        raise RuntimeError(f"stream {stream_id} kept changing while its events were ingested")

    def _one_by_one(
        self,
        stream_id: str,
        items: list[_Pending],
        seen: dict[str, _Comparable],
        cases: Mapping[str, KnownCase],
        exc: Exception,
    ) -> dict[int, Outcome]:
        if len(items) == 1:
            return {items[0].index: _dead(items[0].record, _internal(exc), items[0].event)}
        outcomes: dict[int, Outcome] = {}
        for p in items:
            stored = self.store.read_stream(stream_id)
            outcomes.update(self._stream(stream_id, [p], stored, seen, cases))
        return outcomes

    def _decide(
        self,
        items: list[_Pending],
        stored: list[StoredEvent],
        seen: Mapping[str, _Comparable],
        cases: Mapping[str, KnownCase],
    ) -> tuple[list[NewEvent], dict[int, Outcome], dict[str, _Comparable]]:
        state = self.streams.fold(stored)
        case_id = str(stored[0].metadata["case_id"]) if stored else None
        recorded = str(stored[-1].metadata["district"]) if stored else None
        """The district Likvärd last recorded as responsible on this stream."""
        new_events: list[NewEvent] = []
        outcomes: dict[int, Outcome] = {}
        accepted: dict[str, _Comparable] = {}
        for p in items:
            event, meta = p.event, p.event.metadata
            this: _Comparable = (event.event_type, event.case_id, meta["occurred_at"], event.data)
            prior = accepted.get(event.event_id) or seen.get(event.event_id)
            if prior is not None:
                outcomes[p.index] = (
                    Outcome(p.record, "duplicate", event.event_id, event.event_type)
                    if self._same(prior, this)
                    else _dead(p.record, _reused_id(), event)
                )
                continue
            case = cases.get(event.case_id)
            known = case.district if case is not None and case.district else None
            if known is None and p.own_stream:
                known = recorded
            if known is not None and not p.signer.may_write_for(known):
                outcomes[p.index] = _dead(p.record, _wrong_district("The case's district"), event)
                continue
            parent = telemetry.context_from_traceparent(_traceparent(p.record, meta))
            with self._tracer.start_as_current_span(
                f"ingest {event.event_type}",
                context=parent,
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.source.name": p.record.topic,
                    "messaging.kafka.partition": p.record.partition,
                    "messaging.kafka.offset": p.record.offset,
                    "likvard.event_type": event.event_type,
                    "likvard.event_id": event.event_id,
                },
            ) as span:
                try:
                    view = StreamView(state, len(stored) + len(new_events), case_id)
                    decided = judge(self.rules, event, view, case)
                except Rejected as rejected:
                    outcomes[p.index] = _dead(p.record, rejected, event)
                    span.set_attribute("likvard.outcome", f"dead-lettered:{rejected.code}")
                    continue
                except Exception as exc:
                    outcomes[p.index] = _dead(p.record, _internal(exc), event)
                    span.set_attribute("likvard.outcome", "dead-lettered:internal-error")
                    continue
                traceparent = telemetry.current_traceparent()
                span.set_attribute("likvard.outcome", "accepted" if decided else "duplicate")
            if not decided:  # the decider's own idempotency: nothing new
                outcomes[p.index] = Outcome(p.record, "duplicate", event.event_id, event.event_type)
                continue
            staged: list[tuple[DomainEventLike, str]] = []
            after = state
            for domain_event in decided:
                after = self.streams.evolve(after, domain_event)
                district = self.rules.district(event, after, case)
                staged.append(
                    (domain_event, district or self.streams.district_of(after, domain_event))
                )
            if known is None and p.own_stream and not p.signer.may_write_for(staged[0][1]):
                # a new case: the district it is registered in must be the signer's
                outcomes[p.index] = _dead(p.record, _wrong_district("The case's district"), event)
                continue
            state = after
            for n, (domain_event, district) in enumerate(staged):
                recorded = district
                new_events.append(
                    NewEvent(
                        event_type=domain_event.type,
                        data=domain_event.data,
                        occurred_at=domain_event.occurred_at,
                        district=district,
                        actor=meta["actor"],
                        correlation_id=meta["correlation_id"],
                        causation_id=meta.get("causation_id") if n == 0 else event.event_id,
                        traceparent=traceparent,
                        case_id=event.case_id,
                        event_id=(
                            uuid.UUID(event.event_id)
                            if n == 0
                            else derived_event_id(event.event_id, n, domain_event.type)
                        ),
                        producer=meta["producer"],
                    )
                )
            case_id = case_id or event.case_id
            accepted[event.event_id] = this
            outcomes[p.index] = Outcome(
                p.record, "accepted", event.event_id, event.event_type, stored=len(decided)
            )
        return new_events, outcomes, accepted


def _traceparent(record: SourceRecord, meta: Mapping[str, Any]) -> str | None:
    """The sender's trace: the record's traceparent header, else the event's metadata."""
    for value in record.header_values("traceparent"):
        text = (value or b"").decode("utf-8", errors="replace")
        if _TRACEPARENT.fullmatch(text):
            return text
    found = meta.get("traceparent")
    return found if isinstance(found, str) else None


def _reused_id() -> Rejected:
    return Rejected(
        "rule",
        "event-id-reused",
        "Another event with this event id is already stored (of another type or case, or"
        " with another occurred_at or payload): every event needs an id of its own, and a"
        " repeat must carry the same event.",
    )


def _dead(record: SourceRecord, rejected: Rejected, event: Incoming | None = None) -> Outcome:
    return Outcome(
        record,
        "dead-lettered",
        event.event_id if event else None,
        event.event_type if event else None,
        rejection=rejected,
    )


# --- counting ---------------------------------------------------------------------------
@dataclass
class IngestStats:
    accepted: int = 0
    duplicates: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    """By stage."""
    skipped: int = 0
    stored_events: int = 0
    batches: int = 0
    failures: int = 0

    @property
    def judged(self) -> int:
        return self.accepted + self.duplicates + sum(self.dead_lettered.values())


class IngestMetrics:
    """The OpenTelemetry instruments of an ingest worker."""

    def __init__(self, meter: metrics.Meter, service: str) -> None:
        self.service = service
        self.records = meter.create_counter(
            "likvard.ingest.records",
            unit="{record}",
            description="District records judged by the ingest worker, by outcome"
            " (accepted, duplicate, dead_lettered) and, for dead letters, stage.",
        )

    def count(self, result: BatchResult) -> None:
        counts: Counter[tuple[str, str]] = Counter(
            (o.status.replace("-", "_"), o.rejection.stage if o.rejection else "")
            for o in result.outcomes
        )
        for (outcome, stage), n in counts.items():
            attributes = {"service": self.service, "outcome": outcome}
            if stage:
                attributes["stage"] = stage
            self.records.add(n, attributes)


# --- the worker: Kafka around the processor ----------------------------------------------
class DeadLetterSink:
    """Writes dead letters and waits for the broker's acknowledgement of every one.

    A dead letter never blocks its partition: a copy over the producer's size limit goes as
    a summary (`dlq.summary_letter`); a copy the broker refuses for good (`dlq.REFUSALS`) is
    sent again on its own (a record batch is refused whole), then as a summary; a summary
    refused too is counted (`likvard.ingest.dead_letters_refused`), logged with where the
    record is and given up, so the offset moves on. Anything that may pass (a broker away,
    a timeout) raises DeadLetterError and the batch is retried: nothing is lost."""

    LEARNT_LIMIT_MARGIN = 64
    """How far below a copy the broker refused as too large the limit goes: the next copy
    of the same record may be a little smaller (`dlq_failed_at` varies in length)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        service: str,
        *,
        producer_overrides: Mapping[str, Any] | None = None,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
        flush_timeout: float = 20.0,
        meter: metrics.Meter | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.service = service
        self.overrides = dict(producer_overrides or {})
        self.factory = producer_factory
        self.flush_timeout = flush_timeout
        self.limit = dlq.max_message_bytes(producer_config(bootstrap, **self.overrides))
        """The largest dead letter sent as a copy; lowered below what the broker refused."""
        self.stats = dlq.SinkStats()
        self._producer: Producer | None = None
        meter = meter or telemetry.meter("likvard.ingest")
        self._summarised = meter.create_counter(
            "likvard.ingest.dead_letters_summarised",
            unit="{record}",
            description="Dead letters sent as a summary: the record's copy was too large"
            " or refused by the broker.",
        )
        self._refused = meter.create_counter(
            "likvard.ingest.dead_letters_refused",
            unit="{record}",
            description="Dead letters the broker refused for good, even as a summary: given"
            " up (the log names the record's coordinates), so the partition moves on.",
        )

    def _get(self) -> Producer:
        if self._producer is None:
            self._producer = self.factory(producer_config(self.bootstrap, **self.overrides))
        return self._producer

    def letter(
        self, outcome: Outcome, failed_at: datetime, refusal: KafkaError | None = None
    ) -> dlq.Letter:
        """The record's copy with the dlq headers, or its summary if the copy is over the
        limit or was refused (`refusal`)."""
        assert outcome.rejection is not None
        r, rejected = outcome.record, outcome.rejection
        judgement: dict[str, Any] = {
            "stage": rejected.stage,
            "code": rejected.code,
            "reason": rejected.reason,
            "service": self.service,
            "source": (r.topic, r.partition, r.offset),
            "failed_at": failed_at,
        }
        headers = dlq.dead_letter_headers(r.headers, **judgement)
        if refusal is None and dlq.record_size(r.key, r.value, headers) <= self.limit:
            return dlq.Letter(r.key, r.value, headers)
        return dlq.summary_letter(
            r.key, r.value, r.headers, limit=self.limit, refusal=refusal, **judgement
        )

    def send(self, outcomes: Sequence[Outcome]) -> None:
        """Returns once every dead letter is acknowledged or given up as refused; raises
        DeadLetterError if any failed otherwise (the producer is rebuilt then: an
        idempotent producer stalls after a broker restart)."""
        if not outcomes:
            return
        failed_at = datetime.now(UTC)
        first = {n: self.letter(o, failed_at) for n, o in enumerate(outcomes)}
        sent: dict[int, dlq.Letter | None] = dict(first)
        for n in self._produce(first):
            sent[n] = self._resend(outcomes[n], first[n], failed_at)
        for n, x in sent.items():
            if x is not None and x.summary:
                self._summarised_one(outcomes[n])

    def _resend(
        self, outcome: Outcome, letter: dlq.Letter, failed_at: datetime
    ) -> dlq.Letter | None:
        """A letter the broker refused for good in its batch: sent on its own (a batch is
        refused whole), then as a summary. Returns what was acknowledged, None if nothing
        was (counted and logged)."""
        refused = self._produce({0: letter}).get(0)
        if refused is None:
            return letter
        if not letter.summary:
            if refused.code() in dlq.SIZE_ERRORS:  # the broker's limit is below ours
                size = dlq.record_size(letter.key, letter.value, letter.headers)
                self.limit = min(self.limit, size - self.LEARNT_LIMIT_MARGIN)
            letter = self.letter(outcome, failed_at, refused)
            refused = self._produce({0: letter}).get(0)
            if refused is None:
                return letter
        self._give_up(outcome, refused)
        return None

    def _produce(self, letters: Mapping[int, dlq.Letter]) -> dict[int, KafkaError]:
        """Produce and wait for every report: returns the letters the broker refused for
        good, with its error; raises DeadLetterError if any failed in another way."""
        producer = self._get()
        deliveries = Deliveries()
        refused: dict[int, KafkaError] = {}
        try:
            for n, x in letters.items():
                try:
                    produce(
                        producer, self.topic, x.key, x.value, x.headers, deliveries.report_to(n)
                    )
                except KafkaException as exc:  # refused before it was queued
                    err = exc.args[0]
                    if not isinstance(err, KafkaError) or err.code() not in dlq.REFUSALS:
                        raise
                    refused[n] = err
            producer.flush(self.flush_timeout)
        except KafkaException as exc:  # fatal, e.g. an idempotent producer fenced
            self.close(purge=True)
            raise dlq.DeadLetterError(f"the dead-letter producer failed: {exc.args[0]}") from exc
        failed = deliveries.failed(n for n in letters if n not in refused)
        errors = {n: deliveries.results.get(n) for n in failed}
        passing = {n: e for n, e in errors.items() if e is None or e.code() not in dlq.REFUSALS}
        if passing:
            self.close(purge=True)
            raise dlq.DeadLetterError(
                f"{len(passing)} of {len(letters)} dead letters were not acknowledged"
                f" ({next(iter(passing.values())) or 'no delivery report'})"
            )
        refused.update({n: e for n, e in errors.items() if e is not None})
        if refused:  # a refused batch leaves an idempotent producer's sequence with a gap
            self.close()
        return refused

    def _summarised_one(self, outcome: Outcome) -> None:
        r = outcome.record
        self.stats.summarised += 1
        self._summarised.add(1, {"service": self.service})
        log.warning(
            "dead-lettered %s[%d]@%d as a summary (the record has %d bytes; a copy may have %d)",
            r.topic,
            r.partition,
            r.offset,
            dlq.record_size(r.key, r.value, r.headers),
            self.limit,
        )

    def _give_up(self, outcome: Outcome, refusal: KafkaError) -> None:
        assert outcome.rejection is not None
        r = outcome.record
        self.stats.refused += 1
        self._refused.add(1, {"service": self.service})
        log.error(
            "the broker refused the dead letter of %s[%d]@%d (%s/%s) for good, even as a"
            " summary (%s): it is given up, the record stays on its topic there",
            r.topic,
            r.partition,
            r.offset,
            outcome.rejection.stage,
            outcome.rejection.code,
            refusal.name(),
        )

    def close(self, *, purge: bool = False) -> None:
        old, self._producer = self._producer, None
        if old is None:
            return
        try:
            if purge:
                old.purge()
            old.flush(0 if purge else 5)
        except Exception:  # the producer is being thrown away either way
            log.debug("closing the dead-letter producer failed", exc_info=True)


class IngestWorker:
    """Consumes the ingest topic as one member of the service's consumer group."""

    def __init__(
        self,
        processor: IngestProcessor,
        sink: DeadLetterSink,
        *,
        batch_size: int = 500,
        metrics_: IngestMetrics | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.heartbeat = heartbeat or Heartbeat()
        self.progress = Progress(f"{processor.service}-ingest", heartbeat=self.heartbeat)
        self.processor = processor
        self.sink = sink
        self.batch_size = batch_size
        self.metrics = metrics_
        self.stats = IngestStats()
        self._lock = threading.Lock()

    def handle(self, records: Sequence[SourceRecord]) -> BatchResult:
        """Judge a batch and write its dead letters; raises if either fails (the caller
        must then not commit the batch's offsets)."""
        result = self.processor.process(records)
        fault_point("ingest.after_store")
        self.sink.send(result.dead_letters)
        fault_point("ingest.before_commit")
        self._count(result)
        for o in result.dead_letters:
            assert o.rejection is not None
            log.warning(
                "dead-lettered %s[%d]@%d (%s, %s/%s)",
                o.record.topic,
                o.record.partition,
                o.record.offset,
                o.event_type or "unknown type",
                o.rejection.stage,
                o.rejection.code,
            )
        return result

    def _count(self, result: BatchResult) -> None:
        with self._lock:
            s = self.stats
            s.batches += 1
            s.skipped += result.skipped
            s.accepted += result.count("accepted")
            s.duplicates += result.count("duplicate")
            s.stored_events += sum(o.stored for o in result.outcomes)
            for o in result.dead_letters:
                assert o.rejection is not None
                s.dead_lettered[o.rejection.stage] += 1
        if self.metrics is not None:
            self.metrics.count(result)

    def handle_messages(self, messages: list[Message]) -> None:
        try:
            self.handle([SourceRecord.from_message(m) for m in messages])
        except Exception:
            with self._lock:
                self.stats.failures += 1
            raise

    def ping(self) -> None:
        with self.processor.store.pool.connection(timeout=5) as conn:
            conn.execute("SELECT 1")

    def run(
        self,
        consumer: ConsumerSource,
        topic: str,
        stop: threading.Event,
        lag: ConsumerLag | None = None,
    ) -> None:
        """Consume until `stop` is set. A batch's offsets are committed only after it is
        stored and its dead letters acknowledged; a failed batch is read again after a
        pause (what it stored is then a duplicate): `likvard.consumer_loop`."""
        loop = BatchLoop(
            consumer,
            [topic],
            self.handle_messages,
            self.progress,
            batch_size=self.batch_size,
            lag=lag,
            idle_check=self.ping,
        )
        try:
            loop.run(stop)
        finally:
            self.sink.close()


__all__ = [
    "DEAD_LETTER_TOPIC",
    "INGEST_SERVICES",
    "INGEST_TOPIC",
    "BatchResult",
    "DeadLetterSink",
    "IngestMetrics",
    "IngestProcessor",
    "IngestRules",
    "IngestStats",
    "IngestWorker",
    "Outcome",
    "Rejected",
    "SourceRecord",
    "StreamView",
    "check_signature",
    "check_signatures",
    "check_signer",
    "ingest_owners",
    "open_envelope",
    "owner_of",
]
