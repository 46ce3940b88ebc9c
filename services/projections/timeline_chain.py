"""The hash-chain status of a case's streams, told from the timeline alone (pure).

Every record carries its link in its stream's hash chain in headers (`stream_id`,
`prev_hash`, `hash`; `likvard.relay.event_headers`). The projection keeps each timeline
row's link (`link_of`): the two hashes, and whether the record's hash recomputes from its
own bytes (`eventstore.chain_hash`), which only the projection can tell, since the bytes
are not kept. `fold_chains` then walks each stream's rows by version: versions 1..N
without a gap, each row's hash good, each prev_hash the previous version's hash
(GENESIS_HASH for version 1).

The timeline holds one row per event id, the first copy projected (a re-send is dropped
by `processed`), so the status is that of the records whose content the timeline shows.
A stream's missing tail (versions never delivered after the last one seen) cannot be
told from the timeline; the replay's chain check over Kafka is the full audit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby
from typing import Literal

from likvard.eventstore import GENESIS_HASH, chain_hash

Status = Literal["verified", "broken", "unknown"]

# The reasons a stream is broken (at its first bad version), and why one is unknown.
MISSING = "missing version"
TWICE = "version claimed twice"  # two different events at one version
HASH_MISMATCH = "hash mismatch"  # the record's bytes do not give its hash
LINK_MISMATCH = "link mismatch"  # prev_hash is not the previous version's hash
MALFORMED = "malformed chain headers"
NO_HEADERS = "no chain headers"  # older records: nothing to verify


@dataclass(frozen=True)
class Link:
    """A record's link as its headers gave it; `hash_ok` None when it carried no hashes."""

    stream_id: str | None
    prev_hash: bytes | None
    hash: bytes | None
    hash_ok: bool | None


def _hash(raw: bytes | None) -> bytes | None:
    """A 32-byte hash from its hex header, None if absent or malformed."""
    if raw is None:
        return None
    try:
        value = bytes.fromhex(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if len(value) == 32 else None


def link_of(
    headers: Mapping[str, bytes], value: bytes, verified: bool | None = None
) -> Link | None:
    """The link of a record (its headers, its value's bytes); None without chain headers.

    Hashes present but unreadable keep `hash_ok` False, so the stream shows as broken
    rather than unknown: a record that claims a link and cannot show it is suspect.
    `verified`: whether its bytes give its hash, when the caller hashed them already (the
    replay's `ChainCheck.add` says so), so it is not hashed twice."""
    raw_id = headers.get("stream_id")
    stream_id = raw_id.decode("utf-8", errors="replace") if raw_id else None
    raw_prev, raw_hash = headers.get("prev_hash"), headers.get("hash")
    if raw_prev is None and raw_hash is None:
        return None if stream_id is None else Link(stream_id, None, None, None)
    prev, digest = _hash(raw_prev), _hash(raw_hash)
    if prev is None or digest is None:
        return Link(stream_id, prev, digest, False)
    ok = verified if verified is not None else chain_hash(prev, value) == digest
    return Link(stream_id, prev, digest, ok)


@dataclass(frozen=True)
class ChainRow:
    """What the timeline stores of one event's link."""

    topic: str
    stream_id: str | None
    stream_version: int
    prev_hash: bytes | None
    hash: bytes | None
    hash_ok: bool | None


@dataclass(frozen=True)
class StreamChain:
    """One stream of a case: "verified", "broken" at a version (with the reason), or
    "unknown" (some record had no chain headers, and nothing is broken)."""

    stream_id: str | None  # None: records without a stream_id header, per topic
    topic: str
    versions: int  # the stream's events in the timeline
    status: Status
    broken_at: int | None
    reason: str | None


def _walk(rows: list[ChainRow]) -> tuple[Status, int | None, str | None]:
    """The status of one stream's rows, sorted by version: the first break wins."""
    if rows[0].stream_id is None:
        return "unknown", None, NO_HEADERS  # no stream to follow
    unknown = False
    prev: bytes | None = GENESIS_HASH  # None after a row without hashes: no link to check
    for n, row in enumerate(rows):
        version = n + 1
        if row.stream_version != version:  # sorted and at most one per version so far
            return "broken", version, MISSING
        if n + 1 < len(rows) and rows[n + 1].stream_version == version:
            return "broken", version, TWICE
        if row.hash_ok is None:
            unknown, prev = True, None
            continue
        if row.prev_hash is None or row.hash is None:
            return "broken", version, MALFORMED
        if not row.hash_ok:
            return "broken", version, HASH_MISMATCH
        if prev is not None and row.prev_hash != prev:
            return "broken", version, LINK_MISMATCH
        prev = row.hash
    return ("unknown", None, NO_HEADERS) if unknown else ("verified", None, None)


def fold_chains(rows: Iterable[ChainRow]) -> list[StreamChain]:
    """Each stream's status, streams in (topic, stream_id) order, unnamed ones last."""

    def stream(r: ChainRow) -> tuple[str, bool, str]:
        return r.topic, r.stream_id is None, r.stream_id or ""

    out = []
    ordered = sorted(rows, key=lambda r: (*stream(r), r.stream_version))
    for (topic, unnamed, stream_id), group in groupby(ordered, key=stream):
        members = list(group)
        status, at, reason = _walk(members)
        out.append(
            StreamChain(None if unnamed else stream_id, topic, len(members), status, at, reason)
        )
    return out
