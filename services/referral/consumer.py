"""The referral service's consumer: learns cases from the intake topic (nothing else)."""

from __future__ import annotations

from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.db import make_pool
from likvard.inbox import InboxConsumer
from likvard.known_cases import CaseDirectory
from likvard.topics import SERVICE_TOPICS


def build(settings: Settings, schema: str = "referral") -> tuple[InboxConsumer, list[str]]:
    dsn = settings.require_database()
    directory = CaseDirectory(schema)
    pool = make_pool(dsn, max_size=2, name="likvard-referral-consumer")
    try:
        from likvard.eventstore import EventStore

        EventStore(pool, schema, Catalogue.load(), producer="likvard-referral", topic="").migrate()
        with pool.connection() as conn:
            directory.migrate(conn)
    finally:
        pool.close()
    inbox = InboxConsumer(dsn, schema, Catalogue.load(), directory.handle)
    return inbox, [settings.topic(SERVICE_TOPICS["intake"])]
