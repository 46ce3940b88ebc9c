"""A case worker's command, end to end: HTTP -> event store -> outbox relay -> Kafka."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from likvard.codec import Catalogue
from likvard.relay import OutboxRelay
from tests.identity import bearer
from tests.support import RunningService, consume

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def relay(intake: RunningService, database_url: str, kafka_bootstrap: str) -> Iterator[OutboxRelay]:
    r = OutboxRelay(database_url, intake.schema, kafka_bootstrap, idle_wait=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=r.run, args=(stop,))
    thread.start()
    try:
        yield r
    finally:
        stop.set()
        thread.join(30)


def test_registered_case_is_stored_published_and_decodable(
    intake: RunningService, relay: OutboxRelay, kafka_bootstrap: str, catalogue: Catalogue
) -> None:
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    r = httpx.post(
        f"{intake.base_url}/cases",
        timeout=30,
        headers={"traceparent": traceparent, **bearer("case-worker", districts=["sydvast"])},
        json={
            "personal_identity_number": "19121212-1212",
            "district": "sydvast",
            "substances": ["NARCOTICS"],
            "referral_source": "SELF",
            "children_in_household": "UNKNOWN",
        },
    )
    assert r.status_code == 201, r.text
    case_id = r.json()["case_id"]
    # the write's position token: its last event, for reading it back (?after=)
    assert r.headers["Likvard-Position"] == r.json()["events"][-1]["event_id"]

    stored = intake.store.read_stream(case_id)
    assert [e.event_type for e in stored] == ["IntakeRegistered"]

    records = consume(kafka_bootstrap, intake.topic, at_least=1)
    assert len(records) == 1
    record = records[0]
    assert record.key == case_id.encode()
    assert record.value == stored[0].data
    decoded = catalogue.decode(record.value)
    assert decoded.event_type == "IntakeRegistered"
    assert decoded.record["district"] == "sydvast"
    assert decoded.record["substances"] == ["NARCOTICS"]
    assert str(decoded.record["metadata"]["event_id"]) == record.headers["event_id"].decode()
    # One trace from the HTTP request, through the stored metadata, to the Kafka header.
    assert TRACE_ID in str(decoded.record["metadata"]["traceparent"])
    assert TRACE_ID in record.headers["traceparent"].decode()
    assert intake.store.outbox_depth() == 0
