"""Verifying the per-stream hash chain from Kafka records alone (the auditor's replay).

Each record carries its link in headers (`stream_id`, `stream_version`, `prev_hash`,
`hash`; see `likvard.relay.event_headers`). A topic may hold a stream's events more than
once and, after a relay retry, a later version before an earlier one's re-send, so the
check reassembles each stream: contiguous versions are linked at once, early arrivals wait
until the gap fills, and a re-sent version must carry the same hash as the first copy.

Memory: per stream one small entry, its versions' hashes packed into one bytearray (32
bytes a version, to tell a re-send from another event claiming an old version), and early
arrivals only while a gap is open: about 160 bytes per stream plus 32 per event, where a
list of hash objects per stream took about 110 per event and 500 per stream.
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


_H = 32  # bytes of a hash


@dataclass
class ChainCheck:
    """Feed every record with `add`, then call `finish` for the breaks found."""

    # per stream, the hashes of versions 1..n in order: streams[k][(v - 1) * 32 : v * 32]
    streams: dict[tuple[str, str], bytearray] = field(default_factory=dict)
    # per stream with a gap open: the versions that arrived early
    early: dict[tuple[str, str], dict[int, _Link]] = field(default_factory=dict)
    breaks: list[RecordBreak] = field(default_factory=list)
    records: int = 0
    duplicates: int = 0

    def add(
        self, topic: str, partition: int, offset: int, headers: Mapping[str, bytes], value: bytes
    ) -> bool | None:
        """Check one record; returns whether its bytes give its hash (None: no readable
        chain headers), so a caller needing it too does not hash the record again."""
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
            return None
        if len(prev) != _H or len(digest) != _H:
            self.breaks.append(
                RecordBreak(topic, partition, offset, stream_id, version, "malformed chain link")
            )
            return None
        ok = chain_hash(prev, value) == digest
        if version < 1:
            self.breaks.append(
                RecordBreak(topic, partition, offset, stream_id, version, "malformed chain link")
            )
            return ok
        if not ok:
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
        self._place(topic, stream_id, version, _Link(prev, digest, partition, offset))
        return ok

    def _place(self, topic: str, stream_id: str, version: int, link: _Link) -> None:
        """Put one verified link into its stream: extend it, keep it early, or compare it
        with the copy of its version already seen."""
        key = (topic, stream_id)
        hashes = self.streams.get(key)
        if hashes is None:
            hashes = self.streams[key] = bytearray()
        have = len(hashes) // _H
        early = self.early.get(key)
        if version <= have:
            first = bytes(hashes[(version - 1) * _H : version * _H])
            self._duplicate(topic, stream_id, version, first, link)
        elif version == have + 1:
            self._extend(topic, stream_id, hashes, link)
            if early is not None:
                while len(hashes) // _H + 1 in early:
                    self._extend(topic, stream_id, hashes, early.pop(len(hashes) // _H + 1))
                if not early:
                    del self.early[key]
        elif early is not None and version in early:
            self._duplicate(topic, stream_id, version, early[version].hash, link)
        else:
            self.early.setdefault(key, {})[version] = link

    def merge(self, other: ChainCheck) -> None:
        """Take in the check of other records (another process's partitions, `finish` not
        yet called on either): a stream only one of them saw is moved over as it is; the
        parts of a stream both saw are linked as if one check had seen every record (its
        versions from `other` without their offsets: -1)."""
        self.records += other.records
        self.duplicates += other.duplicates
        self.breaks += other.breaks
        for key, theirs in other.streams.items():
            early = other.early.get(key, {})
            if key not in self.streams:
                self.streams[key] = theirs
                if early:
                    self.early[key] = early
                continue
            topic, stream_id = key
            prev = GENESIS_HASH
            for n in range(len(theirs) // _H):
                digest = bytes(theirs[n * _H : (n + 1) * _H])
                self._place(topic, stream_id, n + 1, _Link(prev, digest, -1, -1))
                prev = digest
            for version, link in sorted(early.items()):
                self._place(topic, stream_id, version, link)

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

    def _extend(self, topic: str, stream_id: str, hashes: bytearray, link: _Link) -> None:
        expected = bytes(hashes[-_H:]) if hashes else GENESIS_HASH
        if link.prev != expected:
            self.breaks.append(
                RecordBreak(
                    topic,
                    link.partition,
                    link.offset,
                    stream_id,
                    len(hashes) // _H + 1,
                    "previous-hash link does not match the hash of the preceding event",
                )
            )
        hashes += link.hash

    def finish(self) -> list[RecordBreak]:
        """The breaks found, including versions that never arrived (gaps)."""
        for (topic, stream_id), early in sorted(self.early.items()):
            if not early:
                continue
            missing = len(self.streams[(topic, stream_id)]) // _H + 1
            first = min(early)
            link = early[first]
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
        self.early.clear()
        return self.breaks

    @property
    def events(self) -> int:
        """Distinct events linked into their streams."""
        return sum(len(h) for h in self.streams.values()) // _H
