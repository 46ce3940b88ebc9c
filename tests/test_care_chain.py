"""The care chain across all three services on real PostgreSQL and a real broker: a case
registered in one district is referred to a unit in another, accepted, given an
intervention; the follow-up service schedules its follow-ups exactly once."""

from __future__ import annotations

import threading
import uuid
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer
from psycopg_pool import ConnectionPool

from likvard.codec import Catalogue
from likvard.inbox import InboxConsumer, consumer_config
from likvard.known_cases import CaseDirectory
from likvard.relay import OutboxRelay
from likvard.republish import republish
from tests.support import RunningService, consume, wait_for

pytestmark = pytest.mark.integration

FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 200, "fetch.wait.max.ms": 10}


class Background:
    """Relays and consumers running in threads, stopped together."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=(*args, self.stop), daemon=True)
        t.start()
        self.threads.append(t)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_referral_across_districts_schedules_followups_exactly_once(
    intake: RunningService,
    referral: RunningService,
    followup: RunningService,
    database_url: str,
    kafka_bootstrap: str,
    catalogue: Catalogue,
    pool: ConnectionPool,
) -> None:
    from services.followup.process import make_handler
    from services.followup.service import make_service, prepare

    referral_inbox = InboxConsumer(
        database_url, referral.schema, catalogue, CaseDirectory(referral.schema).handle
    )
    directory = CaseDirectory(followup.schema)
    with pool.connection() as conn:
        directory.migrate(conn)
        prepare(conn, followup.schema)
    followup_inbox = InboxConsumer(
        database_url,
        followup.schema,
        catalogue,
        make_handler(make_service(followup.store), directory),
    )
    bg = Background()
    with ExitStack() as stack:
        stack.callback(bg.close)
        for svc in (intake, referral, followup):
            bg.start(OutboxRelay(database_url, svc.schema, kafka_bootstrap, idle_wait=0.2).run)
        group = f"t-{uuid.uuid4()}"
        bg.start(
            referral_inbox.run,
            Consumer(consumer_config(kafka_bootstrap, group + "-r", **FAST_GROUP)),
            [intake.topic],
        )
        bg.start(
            followup_inbox.run,
            Consumer(consumer_config(kafka_bootstrap, group + "-f", **FAST_GROUP)),
            [intake.topic, referral.topic],
        )

        http = httpx.Client(timeout=30, headers={"X-Actor": "cw-9"})
        r = http.post(
            f"{intake.base_url}/cases",
            json={
                "personal_identity_number": "19121212-1212",
                "district": "nordost",
                "substances": ["ALCOHOL"],
                "referral_source": "SELF",
                "children_in_household": "YES",
            },
        )
        assert r.status_code == 201, r.text
        case = r.json()["case_id"]

        def known_to_referral() -> bool:
            with pool.connection() as conn:
                return CaseDirectory(referral.schema).get(conn, case) is not None

        wait_for(known_to_referral, 60, "the referral service to learn the case from Kafka")

        from likvard.catalogue import ReferenceCatalogue

        unit = next(
            u
            for u in ReferenceCatalogue.load().units()
            if u.host_district == "hisingen" and u.recipient_kind == "CITY_SOCIAL_SERVICES"
        )
        r = http.post(
            f"{referral.base_url}/referrals",
            json={
                "case_id": case,
                "unit_id": unit.id,
                "intervention_code": sorted(unit.intervention_codes)[0],
            },
        )
        assert r.status_code == 201, r.text
        rid = r.json()["referral_id"]
        assert http.post(f"{referral.base_url}/referrals/{rid}/accept", json={}).status_code == 200
        started = http.post(f"{referral.base_url}/referrals/{rid}/interventions", json={})
        assert started.status_code == 201, started.text
        iid = started.json()["intervention_id"]
        ended = http.post(
            f"{referral.base_url}/interventions/{iid}/end",
            json={"outcome": "COMPLETED_AS_PLANNED"},
        )
        assert ended.status_code == 200, ended.text

        # ReferredAcrossDistrict is on Kafka, naming both districts, keyed by the case.
        records = consume(kafka_bootstrap, referral.topic, at_least=5)
        across = [
            catalogue.decode(x.value)
            for x in records
            if x.headers["event_type"] == b"ReferredAcrossDistrict"
        ]
        assert len(across) == 1
        assert (across[0].record["from_district"], across[0].record["to_district"]) == (
            "nordost",
            "hisingen",
        )
        assert {x.key for x in records} == {case.encode()}

        def scheduled() -> list[str]:
            return [
                e.payload["kind"]
                for e in followup.store.read_stream(case)
                if e.event_type == "FollowUpScheduled"
            ]

        # A same-day intervention: no interview (that needs more than 7 days), ASI at 6 and 12.
        wait_for(lambda: len(scheduled()) == 2, 60, "two follow-ups to be scheduled")
        assert sorted(scheduled()) == ["ASI_12_MONTHS", "ASI_6_MONTHS"]
        listed = http.get(f"{followup.base_url}/cases/{case}/followups")
        assert listed.status_code == 200 and len(listed.json()["followups"]) == 2

        # Every referral event delivered again: nothing more is scheduled.
        seen_before = followup_inbox.stats.duplicates
        assert republish(referral.store, kafka_bootstrap) == 5
        wait_for(
            lambda: followup_inbox.stats.duplicates >= seen_before + 5,
            60,
            "the re-delivered referral events to reach the follow-up service",
        )
        assert len(scheduled()) == 2
        assert followup.store.verify() == []
