"""Kafka topics from the one definition in deploy/topics.toml, created idempotently."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from likvard.config import kafka_client_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE_TOPICS = {
    "intake": "likvard.intake.v1",
    "referral": "likvard.referral.v1",
    "followup": "likvard.followup.v1",
}


class TopicError(RuntimeError):
    """Topics could not be created or the definition is wrong; the message says which."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    owner: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)


def topics_file() -> Path:
    return Path(os.environ.get("LIKVARD_TOPICS_FILE", REPO_ROOT / "deploy" / "topics.toml"))


def load_topics(path: Path | None = None, prefix: str = "") -> list[TopicSpec]:
    """Read the topic definition; a prefix (used by tests) is put before every name."""
    path = path or topics_file()
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TopicError(f"topic definition not found at {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TopicError(f"topic definition {path} is not valid TOML: {exc}") from exc
    defaults = doc.get("defaults", {})
    replication = int(
        os.environ.get("LIKVARD_TOPIC_REPLICATION", defaults.get("replication_factor", 1))
    )
    specs = []
    for t in doc.get("topic", []):
        try:
            specs.append(
                TopicSpec(
                    name=prefix + t["name"],
                    partitions=int(t.get("partitions", defaults.get("partitions", 1))),
                    replication_factor=int(t.get("replication_factor", replication)),
                    owner=t["owner"],
                    description=t.get("description", ""),
                    config={k: str(v) for k, v in t.get("config", {}).items()},
                )
            )
        except KeyError as exc:
            raise TopicError(f"a topic in {path} lacks the key {exc}") from exc
    return specs


def ensure_topics(bootstrap: str, specs: list[TopicSpec], timeout: float = 30.0) -> dict[str, str]:
    """Create missing topics; existing ones are left as they are. Returns name -> outcome."""
    admin = AdminClient({**kafka_client_settings(), "bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=s.replication_factor,
                config=s.config,
            )
            for s in specs
        ],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    outcome: dict[str, str] = {}
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout)
            outcome[name] = "created"
        except KafkaException as exc:
            err = exc.args[0]
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                outcome[name] = "exists"
            else:
                raise TopicError(f"could not create topic {name}: {err}") from exc
    return outcome
