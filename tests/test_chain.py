"""The hash-chain check over Kafka records (pure): re-sends, late arrivals, gaps, tampering."""

from __future__ import annotations

from likvard.chain import ChainCheck
from likvard.eventstore import GENESIS_HASH, chain_hash

T = "likvard.intake.v1"


def stream(n: int, stream_id: str = "s1") -> list[tuple[dict[str, bytes], bytes]]:
    """n records of one stream with correct headers: (headers, value)."""
    out: list[tuple[dict[str, bytes], bytes]] = []
    prev = GENESIS_HASH
    for v in range(1, n + 1):
        value = f"{stream_id}-event-{v}".encode()
        digest = chain_hash(prev, value)
        headers = {
            "stream_id": stream_id.encode(),
            "stream_version": str(v).encode(),
            "prev_hash": prev.hex().encode(),
            "hash": digest.hex().encode(),
        }
        out.append((headers, value))
        prev = digest
    return out


def check(records: list[tuple[dict[str, bytes], bytes]]) -> ChainCheck:
    c = ChainCheck()
    for offset, (headers, value) in enumerate(records):
        c.add(T, 0, offset, headers, value)
    c.finish()
    return c


def test_an_intact_chain_has_no_breaks() -> None:
    c = check(stream(5) + stream(3, "s2"))
    assert c.breaks == []
    assert c.events == 8
    assert len(c.streams) == 2


def test_a_resent_event_is_a_harmless_duplicate() -> None:
    s = stream(3)
    c = check([s[0], s[1], s[1], s[2], s[0]])
    assert c.breaks == []
    assert c.duplicates == 2
    assert c.events == 3


def test_a_later_version_before_the_resend_of_an_earlier_one_is_reassembled() -> None:
    s = stream(4)  # a relay retry: v3 delivered early, then v2 and v3 again
    c = check([s[0], s[2], s[3], s[1], s[2]])
    assert c.breaks == []
    assert c.events == 4


def test_a_missing_version_is_a_break() -> None:
    s = stream(4)
    c = check([s[0], s[2], s[3]])
    assert len(c.breaks) == 1
    assert c.breaks[0].stream_version == 2
    assert "missing" in c.breaks[0].reason


def test_changed_bytes_are_a_break() -> None:
    s = stream(3)
    headers, value = s[1]
    c = check([s[0], (headers, value + b"x"), s[2]])
    assert [b.stream_version for b in c.breaks] == [2]
    assert "content changed" in c.breaks[0].reason


def relinked(
    after: tuple[dict[str, bytes], bytes], headers: dict[str, bytes], value: bytes
) -> tuple[dict[str, bytes], bytes]:
    """A record whose own hash is consistent with its bytes, chained after `after`."""
    prev = after[0]["hash"]
    digest = chain_hash(bytes.fromhex(prev.decode()), value)
    return dict(headers, prev_hash=prev, hash=digest.hex().encode()), value


def test_a_rewritten_event_with_a_consistent_hash_breaks_the_next_link() -> None:
    s = stream(3)
    c = check([s[0], relinked(s[0], s[1][0], b"forged"), s[2]])
    assert [b.stream_version for b in c.breaks] == [3]
    assert "previous-hash link" in c.breaks[0].reason


def test_two_different_events_at_one_version_are_a_break() -> None:
    a = stream(2)
    c = check([a[0], a[1], relinked(a[0], a[1][0], b"another event")])
    assert len(c.breaks) == 1
    assert "two different events" in c.breaks[0].reason


def test_a_record_without_chain_headers_is_unverifiable() -> None:
    s = stream(1)
    c = check([s[0], ({"event_type": b"X"}, b"bytes")])
    assert len(c.breaks) == 1
    assert "missing stream_id" in c.breaks[0].reason
    assert c.breaks[0].offset == 1
