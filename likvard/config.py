"""Settings read from the environment in one place, so every process agrees on them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

SERVICES = ("intake", "referral", "followup")
DEFAULT_PORTS = {"intake": 8001, "referral": 8002, "followup": 8003, "projections": 8004}


def service_port(service: str, env: dict[str, str] | None = None) -> int:
    """The service's port: LIKVARD_<SERVICE>_PORT, else the standard one."""
    e = os.environ if env is None else env
    value = e.get(f"LIKVARD_{service.upper()}_PORT")
    if value is None:
        return DEFAULT_PORTS[service]
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"LIKVARD_{service.upper()}_PORT must be a port number, not {value!r}")
    return int(value)


KAFKA_SETTING_PREFIX = "LIKVARD_KAFKA_"


def kafka_client_settings(env: dict[str, str] | None = None) -> dict[str, str]:
    """librdkafka settings for every Kafka client, from LIKVARD_KAFKA_<SETTING> variables
    (the setting's name with its dots as underscores): a managed Kafka's TLS and SASL, e.g.
    LIKVARD_KAFKA_SECURITY_PROTOCOL=SASL_SSL, LIKVARD_KAFKA_SASL_MECHANISM=SCRAM-SHA-512,
    LIKVARD_KAFKA_SASL_USERNAME, LIKVARD_KAFKA_SASL_PASSWORD,
    LIKVARD_KAFKA_SSL_CA_LOCATION=/etc/kafka/ca.pem."""
    e = os.environ if env is None else env
    return {
        key[len(KAFKA_SETTING_PREFIX) :].lower().replace("_", "."): value
        for key, value in e.items()
        if key.startswith(KAFKA_SETTING_PREFIX) and value
    }


def no_auto_create() -> dict[str, str]:
    """librdkafka settings that keep a client from creating topics: a producer (and an
    admin client, a producer inside) asks the broker to create a topic it does not know by
    default, and the broker then gives it its own default partition count (Tansu: 4), not
    the one of deploy/topics.toml. librdkafka applies it to producers and consumers alike
    (no configuration warning for either); a producer to a missing topic then fails its
    deliveries, so a process calls `likvard.topics.require_topics` before it starts."""
    return {"allow.auto.create.topics": "false"}


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the message says which and how to fix it."""


# A new user's first `likvard replay` or `report` usually runs beside `likvard up`: say how
# to reach that stack, not only which variable is missing.
_UP_EXPORTS = (
    "To use the stack `likvard up` runs on this machine, paste into this terminal the"
    " `export LIKVARD_DATABASE_URL=... KAFKA_BOOTSTRAP_SERVERS=...` line it prints when it"
    " is up (or run `likvard up` first: it starts an embedded PostgreSQL and a development"
    " broker)."
)


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    kafka_bootstrap: str | None = None
    pseudonym_secret: bytes | None = None
    topic_prefix: str = ""
    relay_batch_size: int = 500
    case_wait_seconds: float = 5.0
    max_request_bytes: int = 1024 * 1024
    extra: dict[str, str] = field(default_factory=dict)

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "LIKVARD_DATABASE_URL is not set: export it with your PostgreSQL (e.g."
                " export LIKVARD_DATABASE_URL=postgresql://user@host/dbname). " + _UP_EXPORTS
            )
        return self.database_url

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap:
            raise ConfigError(
                "KAFKA_BOOTSTRAP_SERVERS is not set: export it with your Kafka brokers (e.g."
                " export KAFKA_BOOTSTRAP_SERVERS=host:9092). " + _UP_EXPORTS
            )
        return self.kafka_bootstrap

    def require_pseudonym_secret(self) -> bytes:
        if not self.pseudonym_secret or len(self.pseudonym_secret) < 16:
            raise ConfigError(
                "LIKVARD_PSEUDONYM_SECRET must be set to at least 16 characters: it keys the"
                " person pseudonyms, so the same person gets the same pseudonym in every service."
            )
        return self.pseudonym_secret

    def topic(self, name: str) -> str:
        """Topic name with the optional prefix (tests isolate themselves with one)."""
        return f"{self.topic_prefix}{name}"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60:
        raise ConfigError(f"LIKVARD_CASE_WAIT_SECONDS must be 0-60 seconds, not {text!r}")
    return value


def load_settings(env: dict[str, str] | None = None) -> Settings:
    e = os.environ if env is None else env
    secret = e.get("LIKVARD_PSEUDONYM_SECRET")
    batch = e.get("LIKVARD_RELAY_BATCH_SIZE", "500")
    if not batch.isdigit() or int(batch) < 1:
        raise ConfigError(
            f"LIKVARD_RELAY_BATCH_SIZE must be a positive whole number, not {batch!r}"
        )
    max_request = e.get("LIKVARD_MAX_REQUEST_BYTES", str(1024 * 1024))
    if not re.fullmatch(r"[1-9][0-9]{0,11}", max_request):
        raise ConfigError(
            "LIKVARD_MAX_REQUEST_BYTES must be a positive whole number of bytes (the largest"
            f" request body the HTTP APIs read), not {max_request!r}"
        )
    return Settings(
        database_url=e.get("LIKVARD_DATABASE_URL") or None,
        kafka_bootstrap=e.get("KAFKA_BOOTSTRAP_SERVERS") or None,
        pseudonym_secret=secret.encode() if secret else None,
        topic_prefix=e.get("LIKVARD_TOPIC_PREFIX", ""),
        relay_batch_size=int(batch),
        case_wait_seconds=_seconds(e.get("LIKVARD_CASE_WAIT_SECONDS", "5")),
        max_request_bytes=int(max_request),
    )
