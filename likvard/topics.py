"""Kafka topics from the one definition in deploy/topics.toml, created idempotently."""

from __future__ import annotations

import logging
import os
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, re-exported
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from confluent_kafka.cimpl import NewTopic

from likvard.config import kafka_client_settings, no_auto_create

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE_TOPICS = {
    "intake": "likvard.intake.v1",
    "referral": "likvard.referral.v1",
    "followup": "likvard.followup.v1",
}
ACCESS_LOG_TOPIC = "likvard.access-log.v1"
"""`CaseAccessed` events of every service's access-log stream (likvard.access_log)."""
RECONCILED_CONFIG = ("retention.ms", "retention.bytes")
"""The settings of a topic that exists already which `ensure_topics` brings to the
definition's: how long its records are kept. A dead letter holds a refused record in full
(personal data included), so the dead-letter topic's finite retention must reach a topic
created before it was set; an event topic found with a finite one (made by hand, or by a
client with the broker's default of 7 days) would lose history. Partition counts are never
altered (see `_partition_problem`), nor other settings."""

log = logging.getLogger("likvard.topics")


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


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient(
        {**no_auto_create(), **kafka_client_settings(), "bootstrap.servers": bootstrap}
    )


def ensure_topics(
    bootstrap: str, specs: list[TopicSpec], timeout: float = 30.0, *, align_config: bool = True
) -> dict[str, str]:
    """Create missing topics, bring the retention of existing ones to their spec's
    (`RECONCILED_CONFIG`, unless `align_config` is False), then check that every topic has
    the partition count of its spec: a client may have auto-created one with the broker's
    default before this ran, and keys would then map to other partitions than everywhere
    else. Returns name -> outcome ("created", "exists", or what was altered or could not be
    checked); raises TopicError naming the fix of a wrong partition count."""
    admin = _admin(bootstrap)
    outcome = _create_missing(admin, specs, timeout)
    if align_config:
        existing = [s for s in specs if outcome.get(s.name) == "exists"]
        outcome.update(_align_config(admin, existing, timeout))
    _check_partitions(admin, bootstrap, specs, timeout)
    return outcome


def require_topics(
    bootstrap: str, specs: list[TopicSpec], names: Sequence[str], timeout: float = 30.0
) -> dict[str, str]:
    """What a process calls before it produces to or consumes `names` (full names, with any
    prefix): the missing ones are created from their specs, and a wrong partition count is
    a TopicError. Clients must not create topics themselves (`no_auto_create`)."""
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise TopicError(
            f"{', '.join(unknown)} not defined in {topics_file()}: add the topic there (or"
            " check LIKVARD_TOPIC_PREFIX)"
        )
    # Settings of existing topics are `likvard topics`'s to align: a process under Kafka
    # ACLs may describe its topics but not their configuration.
    return ensure_topics(
        bootstrap, [by_name[n] for n in dict.fromkeys(names)], timeout, align_config=False
    )


def _create_missing(admin: AdminClient, specs: list[TopicSpec], timeout: float) -> dict[str, str]:
    """Create only the topics the cluster's metadata lacks: under Kafka ACLs a process may
    describe its topics but not create them, and asking to create one that exists would be
    refused as unauthorised rather than answered 'exists'."""
    try:
        present = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise TopicError(f"could not read the cluster's topics: {exc.args[0]}") from exc
    outcome: dict[str, str] = {s.name: "exists" for s in specs if s.name in present}
    specs = [s for s in specs if s.name not in present]
    if not specs:
        return outcome
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


def _partition_counts(admin: AdminClient, names: set[str], timeout: float) -> dict[str, int | None]:
    """Partitions per topic as the broker's metadata has them; a just created topic may
    take a moment to appear there (None if it never did before the deadline)."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int | None] = {}
    while True:
        try:
            meta = admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))
        except KafkaException as exc:
            raise TopicError(f"could not read the topics' metadata: {exc.args[0]}") from exc
        for name in names:
            info = meta.topics.get(name)
            if info is not None and info.partitions:
                counts[name] = len(info.partitions)
        if len(counts) == len(names) or time.monotonic() >= deadline:
            return {name: counts.get(name) for name in names}
        time.sleep(0.1)


def _check_partitions(
    admin: AdminClient, bootstrap: str, specs: list[TopicSpec], timeout: float
) -> None:
    counts = _partition_counts(admin, {s.name for s in specs}, timeout)
    problems = [
        _partition_problem(s, counts[s.name], bootstrap)
        for s in specs
        if counts[s.name] != s.partitions
    ]
    if problems:
        raise TopicError("\n".join(problems))


def _partition_problem(spec: TopicSpec, actual: int | None, bootstrap: str) -> str:
    """The loud message for a topic whose partition count is not its spec's, with the fix.
    Nothing is altered here: either fix moves keys to other partitions or drops records."""
    path = topics_file()
    where = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    if actual is None:
        return (
            f"topic {spec.name} was created but the broker's metadata does not show it:"
            " check the broker, then run `likvard topics` again"
        )
    delete = (
        f"delete and re-create it (kafka-topics --bootstrap-server {bootstrap} --delete"
        f" --topic {spec.name}, then `likvard topics`; refill a service topic with"
        " `likvard republish SERVICE`: its records are lost with the topic)"
    )
    fix = delete
    if actual < spec.partitions:
        fix = (
            f"increase it (kafka-topics --bootstrap-server {bootstrap} --alter --topic"
            f" {spec.name} --partitions {spec.partitions}; the cases on it then move to"
            " other partitions, so do it while nothing produces) or " + delete
        )
    return (
        f"topic {spec.name} has {actual} partitions, {where} says {spec.partitions}"
        f" (a client created it before `likvard topics` ran?): {fix}"
    )


# --- retention of existing topics -----------------------------------------------------------
def config_changes(spec: TopicSpec, current: Mapping[str, str | None]) -> dict[str, str]:
    """The settings of `RECONCILED_CONFIG` whose value on the broker (`current`, None or
    absent if the broker shows none) is not the spec's: what `ensure_topics` alters. Pure."""
    return {
        name: spec.config[name]
        for name in RECONCILED_CONFIG
        if name in spec.config and current.get(name) != spec.config[name]
    }


def _align_config(admin: AdminClient, specs: list[TopicSpec], timeout: float) -> dict[str, str]:
    """Alter the retention of existing topics whose broker value differs from the spec's
    (idempotent: an aligned topic is not touched). Tolerant: a broker that cannot describe
    or alter configurations, or a principal not allowed to, leaves the topic as it is with
    a warning and an outcome saying so; it never stops a process from starting."""
    wanted = [s for s in specs if any(k in s.config for k in RECONCILED_CONFIG)]
    if not wanted:
        return {}
    outcome: dict[str, str] = {}
    try:
        current = _describe_configs(admin, [s.name for s in wanted], timeout)
    except KafkaException as exc:
        why = _error_name(exc)
        log.warning("could not read the topics' configuration (%s): retention not checked", why)
        return {s.name: f"exists (retention not checked: {why})" for s in wanted}
    changes = {s.name: config_changes(s, current.get(s.name, {})) for s in wanted}
    changes = {name: change for name, change in changes.items() if change}
    if not changes:
        return outcome
    resources = [
        ConfigResource(
            ResourceType.TOPIC,
            name,
            incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                for k, v in change.items()
            ],
        )
        for name, change in changes.items()
    ]
    try:
        futures = admin.incremental_alter_configs(resources, request_timeout=timeout)
    except KafkaException as exc:
        why = _error_name(exc)
        log.warning("could not alter the topics' retention (%s)", why)
        return {name: f"exists (retention not altered: {why})" for name in changes}
    for resource, fut in futures.items():
        name = resource.name
        was = current.get(name, {})
        done = ", ".join(f"{k} {v} (was {was.get(k) or 'unset'})" for k, v in changes[name].items())
        try:
            fut.result(timeout=timeout)
        except KafkaException as exc:
            why = _error_name(exc)
            log.warning("could not alter %s to %s: %s", name, done, why)
            outcome[name] = f"exists (not altered to {done}: {why})"
            continue
        log.info("altered %s: %s", name, done)
        outcome[name] = f"altered: {done}"
    return outcome


def _describe_configs(
    admin: AdminClient, names: list[str], timeout: float
) -> dict[str, dict[str, str | None]]:
    """The broker's values of `RECONCILED_CONFIG` per topic (a broker may show only what
    was set on the topic, so an absent setting is the broker's default: it differs)."""
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
    futures = admin.describe_configs(resources, request_timeout=timeout)
    found: dict[str, dict[str, str | None]] = {}
    for resource, fut in futures.items():
        entries = fut.result(timeout=timeout)
        found[resource.name] = {k: entries[k].value for k in RECONCILED_CONFIG if k in entries}
    return found


def _error_name(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else exc
    return err.name() if isinstance(err, KafkaError) else str(err)
