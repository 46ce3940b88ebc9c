"""The referral service's consumer: learns cases from the intake topic (nothing else)."""

from __future__ import annotations

from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.eventstore import open_store
from likvard.inbox import InboxConsumer
from likvard.known_cases import CaseDirectory
from likvard.topics import SERVICE_TOPICS


def build(settings: Settings, schema: str = "referral") -> tuple[InboxConsumer, list[str]]:
    catalogue = Catalogue.load()
    directory = CaseDirectory(schema)
    store = open_store(settings, "referral", schema=schema, catalogue=catalogue, max_size=1)
    try:
        with store.pool.connection() as conn:
            directory.migrate(conn)
    finally:
        store.pool.close()
    inbox = InboxConsumer(settings.require_database(), schema, catalogue, directory.handle)
    return inbox, [settings.topic(SERVICE_TOPICS["intake"])]
