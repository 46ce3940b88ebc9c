"""The compiled fast reader of the codec decodes exactly as the generic path does: the same
records for every event type and sample, the same errors for bad uuids and bad bytes."""

from __future__ import annotations

import uuid

import pytest

from bench.bench_replay import records as chained_records
from likvard.codec import Catalogue, CodecError, MalformedValue
from tests.test_codec import PAYLOADS, event

FAST = Catalogue.load()
GENERIC = Catalogue.load()
GENERIC.fast = False


def both(data: bytes) -> tuple[object, object]:
    """What each path gives: the Decoded, or the error's type and message."""
    out: list[object] = []
    for cat in (FAST, GENERIC):
        try:
            out.append(cat.decode(data))
        except CodecError as exc:
            out.append((type(exc), str(exc)))
    return out[0], out[1]


@pytest.mark.parametrize("event_type", sorted(PAYLOADS))
def test_every_intake_sample_decodes_alike(event_type: str) -> None:
    data = FAST.encode(event_type, event(event_type))
    fast, generic = both(data)
    assert fast == generic
    assert FAST._fast[data[2:10]] is not None  # the fast path did decode it


def test_chained_care_chains_of_every_service_decode_alike() -> None:
    seen = set()
    for _topic, _key, value, _headers in chained_records(FAST, 400, "t."):
        fast, generic = both(value)
        assert fast == generic
        seen.add(value[2:10])
    assert len(seen) >= 10


def test_a_non_canonical_uuid_comes_back_canonical_on_both_paths() -> None:
    record = event("CaseClosed")
    upper = str(uuid.uuid4()).upper()
    record["metadata"]["event_id"] = upper
    fast, generic = both(FAST.encode("CaseClosed", record))
    assert fast == generic
    assert FAST.decode(FAST.encode("CaseClosed", record)).record["metadata"]["event_id"] == (
        upper.lower()
    )


def test_a_malformed_uuid_and_corrupt_bytes_raise_the_same_errors() -> None:
    data = FAST.encode("CaseClosed", event("CaseClosed"))
    good = str(FAST.decode(data).record["metadata"]["event_id"]).encode()
    bad = data.replace(good, b"z" * len(good), 1)
    fast, generic = both(bad)
    assert fast == generic
    assert isinstance(fast, tuple) and fast[0] is MalformedValue
    for broken in (data[:-3], data + b"\x00", data[:12] + b"\xff" * 40):
        fast, generic = both(broken)
        assert fast == generic
        assert isinstance(fast, tuple)
