"""Refill Kafka from an event store, e.g. after the development broker lost its memory.

Every stored event is produced again, in global order, with the same bytes and headers as
the relay uses; consumers de-duplicate by event id, so republishing onto a topic that still
has the events only adds duplicates, never changes history.
"""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import KafkaError, Message, Producer

from likvard.eventstore import EventStore
from likvard.relay import OutboxRow, event_headers, produce, producer_config


class RepublishError(RuntimeError):
    """Some events could not be delivered; rerun republish (duplicates are harmless)."""


def republish(
    store: EventStore,
    bootstrap: str,
    *,
    batch_size: int = 2000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Produce every event of `store` to its topic; returns the number delivered."""
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 20}))
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    sent = 0
    pending = 0
    for event in store.read_all(batch_size=batch_size):
        row = OutboxRow(
            id=event.global_position,
            stream_id=event.stream_id,
            stream_version=event.stream_version,
            key=str(event.metadata["case_id"]),
            event_id=str(event.event_id),
            event_type=event.event_type,
            topic=store.topic,
            value=event.data,
            traceparent=event.metadata.get("traceparent"),
            prev_hash=event.prev_hash,
            hash=event.hash,
        )
        produce(
            producer,
            row.topic,
            row.key.encode(),
            row.value,
            event_headers(row, row.traceparent),
            on_delivery,
        )
        pending += 1
        if pending >= batch_size:
            sent += _flush(producer, pending, errors)
            pending = 0
            if progress:
                progress(sent)
    sent += _flush(producer, pending, errors)
    if progress:
        progress(sent)
    return sent


def _flush(producer: Producer, pending: int, errors: list[KafkaError]) -> int:
    remaining = producer.flush(60)
    if remaining or errors:
        raise RepublishError(
            f"{remaining} events undelivered and {len(errors)} failed"
            f" (first error: {errors[0] if errors else 'timeout'}); run republish again"
        )
    return pending
