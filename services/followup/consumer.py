"""The follow-up service's consumer: learns cases from the intake topic and schedules
follow-ups from the referral topic (the process manager)."""

from __future__ import annotations

from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.eventstore import open_store
from likvard.inbox import InboxConsumer
from likvard.known_cases import CaseDirectory
from likvard.topics import SERVICE_TOPICS
from services.followup.process import make_handler
from services.followup.service import make_service, prepare


def build(settings: Settings, schema: str = "followup") -> tuple[InboxConsumer, list[str]]:
    catalogue = Catalogue.load()
    # The pool lives as long as the process: the scheduler appends through it.
    store = open_store(settings, "followup", schema=schema, catalogue=catalogue, max_size=4)
    directory = CaseDirectory(schema)
    with store.pool.connection() as conn:
        directory.migrate(conn)
        prepare(conn, schema)
    handler = make_handler(make_service(store), directory)
    topics = [settings.topic(SERVICE_TOPICS["intake"]), settings.topic(SERVICE_TOPICS["referral"])]
    return InboxConsumer(settings.require_database(), schema, catalogue, handler), topics
