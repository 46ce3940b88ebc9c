"""A managed Kafka's TLS and SASL reach every client: librdkafka's settings as given,
and their faust (aiokafka) form for the projection worker."""

from __future__ import annotations

import ssl
from pathlib import Path

import faust
import pytest

from likvard.config import kafka_client_settings
from likvard.inbox import consumer_config
from likvard.relay import producer_config
from services.projections.worker import faust_credentials

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


def test_faust_gets_the_same_credentials(tmp_path: Path) -> None:
    assert faust_credentials({}) is None
    assert faust_credentials({"security.protocol": "plaintext"}) is None
    sasl = faust_credentials(kafka_client_settings(SASL))
    assert isinstance(sasl, faust.SASLCredentials)
    assert (sasl.username, sasl.password) == ("likvard", "s3cret")
    assert str(sasl.mechanism.value) == "SCRAM-SHA-512"
    assert isinstance(sasl.ssl_context, ssl.SSLContext)
    tls = faust_credentials({"security.protocol": "SSL"})
    assert isinstance(tls, faust.SSLCredentials)
    with pytest.raises(ValueError, match="KERBEROS_ONLY"):
        faust_credentials({"security.protocol": "kerberos_only"})
