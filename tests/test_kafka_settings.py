"""A managed Kafka's TLS and SASL reach every client: librdkafka's settings as given
(the projection worker is a confluent-kafka consumer too)."""

from __future__ import annotations

import pytest

from likvard.config import kafka_client_settings
from likvard.inbox import consumer_config
from likvard.relay import producer_config

SASL = {
    "LIKVARD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "LIKVARD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "LIKVARD_KAFKA_SASL_USERNAME": "likvard",
    "LIKVARD_KAFKA_SASL_PASSWORD": "s3cret",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9093",
    "LIKVARD_KAFKA_EMPTY": "",
}


def test_likvard_kafka_variables_become_librdkafka_settings() -> None:
    assert kafka_client_settings(SASL) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "likvard",
        "sasl.password": "s3cret",
    }


def test_every_confluent_client_gets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SASL.items():
        monkeypatch.setenv(key, value)
    for config in (producer_config("kafka-1:9093"), consumer_config("kafka-1:9093", "g")):
        assert config["security.protocol"] == "SASL_SSL"
        assert config["sasl.username"] == "likvard"
        assert config["bootstrap.servers"] == "kafka-1:9093"  # never overridden by them
