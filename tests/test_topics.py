"""Topics have the partition counts of deploy/topics.toml or a process refuses to start: a
topic a client auto-created (the broker's default count) is a loud error naming the fix,
and with `no_auto_create` clients do not create topics at all. Retention is the
definition's, on a new topic and (`likvard topics`) on one that exists: the dead letters,
which hold refused records in full, are kept 30 days."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, re-exported
    AdminClient,
    ConfigResource,
    ResourceType,
)
from confluent_kafka.cimpl import NewTopic

from likvard.cli.devstack import TansuBroker
from likvard.config import no_auto_create
from likvard.topics import (
    TopicError,
    TopicSpec,
    config_changes,
    ensure_topics,
    load_topics,
    require_topics,
)
from tests.support import wait_for

pytestmark = pytest.mark.integration

INTAKE = "likvard.intake.v1"
DEAD_LETTER = "likvard.dead-letter.v1"
THIRTY_DAYS_MS = str(30 * 24 * 60 * 60 * 1000)


@pytest.fixture
def specs(topic_prefix: str) -> list[TopicSpec]:
    """The real definition under a prefix no topic exists with yet (the `topic_prefix`
    fixture has already created its own)."""
    return load_topics(prefix=f"{topic_prefix}own.")


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({**no_auto_create(), "bootstrap.servers": bootstrap})


def partitions(bootstrap: str) -> dict[str, int]:
    meta = admin(bootstrap).list_topics(timeout=10)
    return {name: len(t.partitions) for name, t in meta.topics.items() if t.error is None}


def create_by_hand(
    bootstrap: str, name: str, count: int, config: dict[str, str] | None = None
) -> None:
    client = admin(bootstrap)  # kept until the result is in: a dropped client cancels it
    topic = NewTopic(name, num_partitions=count, config=config or {})
    client.create_topics([topic])[name].result(10)


def retention(bootstrap: str, name: str) -> str | None:
    """The topic's retention.ms as the broker describes it (None if it shows none)."""
    client = admin(bootstrap)
    resource = ConfigResource(ResourceType.TOPIC, name)
    entries = client.describe_configs([resource], request_timeout=10)[resource].result(10)
    entry = entries.get("retention.ms")
    return None if entry is None else str(entry.value)


def spec(specs: list[TopicSpec], name: str) -> TopicSpec:
    return next(s for s in specs if s.name.endswith(name))


def test_missing_topics_get_the_specs_partition_count_and_a_second_call_changes_nothing(
    kafka_bootstrap: str, specs: list[TopicSpec]
) -> None:
    assert all(s.partitions == 6 for s in specs)  # deploy/topics.toml's default
    names = [spec(specs, INTAKE).name, spec(specs, DEAD_LETTER).name]
    assert require_topics(kafka_bootstrap, specs, names, timeout=10) == dict.fromkeys(
        names, "created"
    )
    assert {n: partitions(kafka_bootstrap).get(n) for n in names} == dict.fromkeys(names, 6)
    assert require_topics(kafka_bootstrap, specs, names, timeout=10) == dict.fromkeys(
        names, "exists"
    )
    outcome = ensure_topics(kafka_bootstrap, specs, timeout=10)
    assert outcome == {s.name: "exists" if s.name in names else "created" for s in specs}
    now = partitions(kafka_bootstrap)
    assert {s.name: now.get(s.name) for s in specs} == {s.name: 6 for s in specs}


def test_a_topic_with_too_few_partitions_is_an_error_that_names_the_fix(
    kafka_bootstrap: str, specs: list[TopicSpec]
) -> None:
    intake = spec(specs, INTAKE)
    create_by_hand(kafka_bootstrap, intake.name, 4)  # what an auto-creating client left
    with pytest.raises(TopicError) as raised:
        require_topics(kafka_bootstrap, specs, [intake.name], timeout=10)
    message = str(raised.value)
    assert f"topic {intake.name} has 4 partitions, deploy/topics.toml says 6" in message
    assert f"--alter --topic {intake.name} --partitions 6" in message
    assert f"--delete --topic {intake.name}" in message and "`likvard topics`" in message
    with pytest.raises(TopicError, match=f"{intake.name} has 4 partitions"):
        ensure_topics(kafka_bootstrap, specs, timeout=10)
    now = partitions(kafka_bootstrap)
    assert now[intake.name] == 4  # never altered silently
    assert all(now.get(s.name) == 6 for s in specs if s is not intake)  # the rest created

    client = admin(kafka_bootstrap)
    client.delete_topics([intake.name])[intake.name].result(10)
    wait_for(lambda: intake.name not in partitions(kafka_bootstrap), 10, "the topic deleted")
    assert require_topics(kafka_bootstrap, specs, [intake.name], timeout=10) == {
        intake.name: "created"
    }
    assert partitions(kafka_bootstrap)[intake.name] == 6


def test_a_topic_with_too_many_partitions_must_be_re_created(
    kafka_bootstrap: str, specs: list[TopicSpec]
) -> None:
    intake, dead = spec(specs, INTAKE), spec(specs, DEAD_LETTER)
    create_by_hand(kafka_bootstrap, intake.name, 8)
    create_by_hand(kafka_bootstrap, dead.name, 1)
    with pytest.raises(TopicError) as raised:
        require_topics(kafka_bootstrap, specs, [intake.name, dead.name], timeout=10)
    first, second = str(raised.value).splitlines()  # every wrong topic, one line each
    assert f"{intake.name} has 8 partitions" in first
    assert "--alter" not in first and f"--delete --topic {intake.name}" in first
    assert f"{dead.name} has 1 partitions" in second and "--alter" in second


def test_require_topics_refuses_a_topic_the_definition_does_not_have(
    kafka_bootstrap: str, specs: list[TopicSpec]
) -> None:
    name = f"{specs[0].name}.typo"
    with pytest.raises(TopicError, match=f"{name} not defined in .*topics.toml"):
        require_topics(kafka_bootstrap, specs, [name], timeout=10)
    assert name not in partitions(kafka_bootstrap)


def test_clients_with_no_auto_create_do_not_create_a_missing_topic(
    kafka_bootstrap: str, broker: TansuBroker | None
) -> None:
    missing = f"t{uuid.uuid4().hex[:10]}.missing"
    consumer = Consumer(
        {**no_auto_create(), "bootstrap.servers": kafka_bootstrap, "group.id": missing}
    )
    errors: list[KafkaError] = []
    try:
        consumer.subscribe([missing])

        def told_unknown() -> bool:
            msg = consumer.poll(0.2)
            err = msg.error() if msg is not None else None
            if err is not None:
                errors.append(err)
            return any(e.code() == KafkaError.UNKNOWN_TOPIC_OR_PART for e in errors)

        wait_for(told_unknown, 15, "the consumer to learn the topic does not exist")
    finally:
        consumer.close()
    assert missing not in partitions(kafka_bootstrap)

    reports: list[KafkaError | None] = []

    def report(err: KafkaError | None, _msg: Message) -> None:
        reports.append(err)

    producer = Producer(
        {**no_auto_create(), "bootstrap.servers": kafka_bootstrap, "message.timeout.ms": 1500}
    )
    producer.produce(missing, b"v", on_delivery=report)
    producer.flush(10)
    assert len(reports) == 1 and reports[0] is not None  # not delivered, and...
    assert missing not in partitions(kafka_bootstrap)  # ...not created either

    if broker is not None:  # the control: Tansu creates it for a default producer
        plain = Producer({"bootstrap.servers": kafka_bootstrap, "message.timeout.ms": 5000})
        plain.produce(missing, b"v", on_delivery=report)
        plain.flush(10)
        assert reports[-1] is None
        assert partitions(kafka_bootstrap)[missing] == 4  # the broker's default, not 6


def test_no_auto_create_gives_no_client_a_configuration_warning(kafka_bootstrap: str) -> None:
    """librdkafka warns (CONFWARN) when a consumer-only property reaches a producer; this
    one is for both, so it can go into every client's settings."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger(f"test-topics-{uuid.uuid4().hex[:6]}")
    logger.addHandler(Collect())
    logger.propagate = False
    base: dict[str, Any] = {"bootstrap.servers": kafka_bootstrap, "logger": logger}
    producer = Producer({**base, **no_auto_create()})
    AdminClient({**base, **no_auto_create()}).poll(0.5)
    consumer = Consumer({**base, **no_auto_create(), "group.id": "g"})
    consumer.poll(0.5)
    consumer.close()
    producer.flush(1)
    warned = Producer({**base, "enable.auto.commit": "false"})  # shows the check can fail
    warned.poll(0.5)
    assert [m for m in seen if "CONFWARN" in m] == [
        m for m in seen if "enable.auto.commit is a consumer property" in m
    ]
    assert any("enable.auto.commit" in m for m in seen)


# --- retention ---------------------------------------------------------------------------
def test_the_definition_keeps_dead_letters_30_days_and_the_history_forever() -> None:
    """The plan, pure: what the definition says, and what would be altered on a topic. The
    two topics that may hold personal details in clear (what districts send, and what was
    refused) keep 30 days; the history (sealed) is kept forever."""
    specs = {s.name: s for s in load_topics()}
    finite = {DEAD_LETTER, "likvard.district-ingest.v1"}
    assert all(specs[name].config["retention.ms"] == THIRTY_DAYS_MS for name in finite)
    assert all(s.config["retention.ms"] == "-1" for name, s in specs.items() if name not in finite)
    dead, intake = specs[DEAD_LETTER], specs[INTAKE]
    forever = {"retention.ms": "-1", "retention.bytes": "-1"}
    assert config_changes(dead, forever) == {"retention.ms": THIRTY_DAYS_MS}  # the old one
    assert config_changes(dead, {**forever, "retention.ms": THIRTY_DAYS_MS}) == {}
    assert config_changes(intake, forever) == {}
    # a broker that shows no value has its default (7 days on Apache Kafka): both differ
    assert config_changes(intake, {}) == forever
    assert config_changes(intake, {"retention.ms": "604800000", "retention.bytes": None}) == (
        forever
    )
    # only retention is aligned, never e.g. the cleanup policy
    assert config_changes(intake, {**forever, "cleanup.policy": "compact"}) == {}


def test_a_created_dead_letter_topic_has_the_finite_retention(
    kafka_bootstrap: str, specs: list[TopicSpec]
) -> None:
    dead, intake = spec(specs, DEAD_LETTER), spec(specs, INTAKE)
    assert ensure_topics(kafka_bootstrap, [dead, intake], timeout=10) == dict.fromkeys(
        [dead.name, intake.name], "created"
    )
    assert retention(kafka_bootstrap, dead.name) == THIRTY_DAYS_MS
    assert retention(kafka_bootstrap, intake.name) == "-1"


def test_an_existing_dead_letter_topic_kept_forever_is_altered_once_by_likvard_topics(
    kafka_bootstrap: str, specs: list[TopicSpec]
) -> None:
    """The dead-letter topic as the earlier definition made it (retention.ms -1): a process
    starting (require_topics) leaves it alone; `likvard topics` (ensure_topics) alters it,
    and a second run changes nothing."""
    dead = spec(specs, DEAD_LETTER)
    create_by_hand(kafka_bootstrap, dead.name, 6, {"retention.ms": "-1", "retention.bytes": "-1"})
    assert require_topics(kafka_bootstrap, specs, [dead.name], timeout=10) == {dead.name: "exists"}
    assert retention(kafka_bootstrap, dead.name) == "-1"
    first = ensure_topics(kafka_bootstrap, [dead], timeout=10)
    assert first == {dead.name: f"altered: retention.ms {THIRTY_DAYS_MS} (was -1)"}
    assert retention(kafka_bootstrap, dead.name) == THIRTY_DAYS_MS
    assert ensure_topics(kafka_bootstrap, [dead], timeout=10) == {dead.name: "exists"}
    assert retention(kafka_bootstrap, dead.name) == THIRTY_DAYS_MS


def test_a_topic_with_no_retention_set_gets_the_definitions(
    kafka_bootstrap: str, specs: list[TopicSpec]
) -> None:
    """A topic made with the broker's defaults (by hand, or a client before `likvard topics`
    ran): an event topic is set to keep everything, as the history must."""
    intake = spec(specs, INTAKE)
    create_by_hand(kafka_bootstrap, intake.name, 6)
    outcome = ensure_topics(kafka_bootstrap, [intake], timeout=10)
    assert outcome[intake.name].startswith("altered: retention.ms -1 (was ")
    assert retention(kafka_bootstrap, intake.name) == "-1"
