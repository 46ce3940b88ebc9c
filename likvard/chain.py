"""Verifying the per-stream hash chain from Kafka records alone (the auditor's replay).

Each record carries its link in headers (`stream_id`, `stream_version`, `prev_hash`,
`hash`; see `likvard.relay.event_headers`). A topic may hold a stream's events more than
once and, after a relay retry, a later version before an earlier one's re-send, so the
check reassembles each stream: contiguous versions are linked at once, early arrivals wait
until the gap fills, and a re-sent version must carry the same hash as the first copy.
Memory is one 32-byte hash per event, so a million events fit easily.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from likvard.eventstore import GENESIS_HASH, chain_hash

CHAIN_HEADERS = ("stream_id", "stream_version", "prev_hash", "hash")


@dataclass(frozen=True)
class RecordBreak:
    """A place where the records on Kafka do not form an intact hash chain."""

    topic: str
    partition: int
    offset: int
    stream_id: str | None
    stream_version: int | None
    reason: str


@dataclass(frozen=True)
class _Link:
    prev: bytes
    hash: bytes
    partition: int
    offset: int


@dataclass
class _Stream:
    hashes: list[bytes] = field(default_factory=list)  # hashes[v - 1] = hash of version v
    early: dict[int, _Link] = field(default_factory=dict)


@dataclass
class ChainCheck:
    """Feed every record with `add`, then call `finish` for the breaks found."""

    streams: dict[tuple[str, str], _Stream] = field(default_factory=dict)
    breaks: list[RecordBreak] = field(default_factory=list)
    records: int = 0
    duplicates: int = 0

    def add(
        self, topic: str, partition: int, offset: int, headers: Mapping[str, bytes], value: bytes
    ) -> None:
        self.records += 1
        try:
            stream_id = headers["stream_id"].decode()
            version = int(headers["stream_version"])
            prev, digest = (
                bytes.fromhex(headers["prev_hash"].decode()),
                bytes.fromhex(headers["hash"].decode()),
            )
        except (KeyError, ValueError, UnicodeDecodeError):
            missing = [h for h in CHAIN_HEADERS if h not in headers]
            why = f"missing {', '.join(missing)}" if missing else "malformed"
            self.breaks.append(
                RecordBreak(
                    topic, partition, offset, None, None, f"hash-chain headers {why}: unverifiable"
                )
            )
            return
        if version < 1 or len(prev) != 32 or len(digest) != 32:
            self.breaks.append(
                RecordBreak(topic, partition, offset, stream_id, version, "malformed chain link")
            )
            return
        if chain_hash(prev, value) != digest:
            self.breaks.append(
                RecordBreak(
                    topic,
                    partition,
                    offset,
                    stream_id,
                    version,
                    "the record's bytes do not match its hash (content changed)",
                )
            )
        stream = self.streams.setdefault((topic, stream_id), _Stream())
        link = _Link(prev, digest, partition, offset)
        if version <= len(stream.hashes):
            self._duplicate(topic, stream_id, version, stream.hashes[version - 1], link)
        elif version == len(stream.hashes) + 1:
            self._extend(topic, stream_id, stream, link)
            while len(stream.hashes) + 1 in stream.early:
                self._extend(topic, stream_id, stream, stream.early.pop(len(stream.hashes) + 1))
        elif version in stream.early:
            self._duplicate(topic, stream_id, version, stream.early[version].hash, link)
        else:
            stream.early[version] = link

    def _duplicate(
        self, topic: str, stream_id: str, version: int, first: bytes, link: _Link
    ) -> None:
        if first == link.hash:
            self.duplicates += 1  # a re-send of the same event: harmless
            return
        self.breaks.append(
            RecordBreak(
                topic,
                link.partition,
                link.offset,
                stream_id,
                version,
                "two different events claim this version of the stream",
            )
        )

    def _extend(self, topic: str, stream_id: str, stream: _Stream, link: _Link) -> None:
        expected = stream.hashes[-1] if stream.hashes else GENESIS_HASH
        if link.prev != expected:
            self.breaks.append(
                RecordBreak(
                    topic,
                    link.partition,
                    link.offset,
                    stream_id,
                    len(stream.hashes) + 1,
                    "previous-hash link does not match the hash of the preceding event",
                )
            )
        stream.hashes.append(link.hash)

    def finish(self) -> list[RecordBreak]:
        """The breaks found, including versions that never arrived (gaps)."""
        for (topic, stream_id), stream in sorted(self.streams.items()):
            if not stream.early:
                continue
            missing = len(stream.hashes) + 1
            first = min(stream.early)
            link = stream.early[first]
            self.breaks.append(
                RecordBreak(
                    topic,
                    link.partition,
                    link.offset,
                    stream_id,
                    missing,
                    f"version {missing} is missing (versions from {first} arrived)",
                )
            )
            stream.early.clear()
        return self.breaks

    @property
    def events(self) -> int:
        """Distinct events linked into their streams."""
        return sum(len(s.hashes) for s in self.streams.values())
