"""Merging the chain checks of two processes' partitions (the parallel replay) finds what
one check over every record finds."""

from __future__ import annotations

from likvard.chain import ChainCheck
from tests.test_chain import T, relinked, stream


def merged(*parts: list[tuple[dict[str, bytes], bytes]]) -> ChainCheck:
    checks = []
    for part in parts:
        c = ChainCheck()
        for offset, (headers, value) in enumerate(part):
            c.add(T, 0, offset, headers, value)
        checks.append(c)
    first = checks[0]
    for other in checks[1:]:
        first.merge(other)
    first.finish()
    return first


def test_streams_of_different_partitions_merge_without_breaks() -> None:
    c = merged(stream(4, "a"), stream(3, "b"))
    assert c.breaks == []
    assert c.events == 7
    assert len(c.streams) == 2
    assert c.records == 7


def test_one_stream_split_across_both_is_linked_whole() -> None:
    s = stream(6)
    for parts in ((s[:3], s[3:]), (s[3:], s[:3]), (s[::2], s[1::2]), (s, s[2:4])):
        c = merged(*parts)
        assert c.breaks == [], parts
        assert c.events == 6


def test_a_gap_left_by_both_and_a_second_claim_are_breaks() -> None:
    s = stream(5)
    c = merged([s[0], s[1]], [s[3], s[4]])
    assert [b.stream_version for b in c.breaks] == [3]
    assert "missing" in c.breaks[0].reason
    other = relinked(s[0], s[1][0], b"another event")
    c = merged([s[0], s[1], s[2]], [other])
    assert len(c.breaks) == 1
    assert "two different events" in c.breaks[0].reason
