"""A district system, as the integration guide tells one to be: it encodes events with its
own Avro library (here plain fastavro, not Likvärd's codec) from the standalone schemas
`likvard schemas export` writes, signs each record with its system's private key (the
development keys of tests/district_keys/), and produces them with a plain Kafka producer.

`DistrictSystem(...).record(...)` signs by default with the key of the district's system;
`signature="none"` leaves the record unsigned, `"broken"` spoils the signature, and
`sign_as="angered-procapita"` signs with another system's key."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import KafkaError, Message, Producer
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from joserfc.jwk import ECKey, RSAKey

from likvard import district_keys
from likvard.codec import Catalogue

PRODUCER = "nordost-treserva"
KEYS_DIR = Path(__file__).resolve().parent / "district_keys"
"""The private development keys of the reference district systems (never in the package)."""
Signature = Literal["valid", "none", "broken"]


@cache
def private_key(system: str) -> ECKey | RSAKey:
    return district_keys.load_private_key(KEYS_DIR / f"{system}.private.json")


@cache
def system_of(district: str) -> str:
    """The id of the reference district system of a district (tests' default signer)."""
    keys = district_keys.DistrictKeys()
    found = next((s.id for s in keys.systems if s.district == district), None)
    if found is None:
        raise LookupError(f"no reference district system for {district!r}")
    return found


def signed(
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, str | bytes | None]],
    system: str,
    signature: Signature = "valid",
) -> list[tuple[str, str | bytes | None]]:
    """The headers with `likvard-signature` by `system`'s key (any old one replaced)."""
    rest = [(k, v) for k, v in headers if k != district_keys.SIGNATURE_HEADER]
    if signature == "none":
        return rest
    token = district_keys.sign(key, value, rest, private_key(system), system=system)
    if signature == "broken":
        head, _, sig = token.split(".")
        i = len(sig) // 2
        token = f"{head}..{sig[:i]}{'A' if sig[i] != 'A' else 'B'}{sig[i + 1 :]}"
    return [*rest, (district_keys.SIGNATURE_HEADER, token.encode())]


def single_object(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    """Avro single-object encoding: C3 01, the CRC-64-AVRO fingerprint, the body."""
    parsed = parse_schema(schema)
    header = b"\xc3\x01" + bytes.fromhex(
        fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
    )
    body = io.BytesIO()
    schemaless_writer(body, parsed, record)
    return header + body.getvalue()


@dataclass(frozen=True)
class DistrictRecord:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, str | bytes | None]] = field(default_factory=list)
    event_id: str = ""
    event_type: str = ""


@dataclass
class DistrictSystem:
    """Builds records of one district system; `schemas` are the exported standalone ones."""

    catalogue: Catalogue
    district: str = "nordost"
    producer: str = ""
    """metadata.producer; default: the id of the system that signs."""
    actor: str = "cw-4711"
    sign_as: str = ""
    """The system whose key signs; default: the reference system of `district`."""
    signature: Signature = "valid"

    def __post_init__(self) -> None:
        self.sign_as = self.sign_as or system_of(self.district)
        self.producer = self.producer or self.sign_as

    def raw(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> DistrictRecord:
        """Any bytes, signed as this system signs (to reach the stages after the signature)."""
        signed_headers = signed(key, value, list(headers or []), self.sign_as, self.signature)
        return DistrictRecord(key, value, signed_headers)

    def record(
        self,
        event_type: str,
        case_id: str,
        payload: dict[str, Any],
        *,
        event_id: str | None = None,
        occurred_at: datetime | None = None,
        schema: dict[str, Any] | None = None,
        sign_as: str | None = None,
        signature: Signature | None = None,
        **metadata: Any,
    ) -> DistrictRecord:
        event_id = event_id or str(uuid.uuid4())
        meta: dict[str, Any] = {
            "event_id": event_id,
            "event_type": event_type,
            "case_id": case_id,
            "stream_version": 0,
            "occurred_at": occurred_at or datetime.now(UTC),
            "recorded_at": datetime.now(UTC),
            "producer": self.producer,
            "district": self.district,
            "actor": self.actor,
            "correlation_id": str(uuid.uuid4()),
            "causation_id": None,
            "traceparent": None,
        }
        meta.update(metadata)
        value = single_object(
            schema or self.catalogue.schema(event_type), {"metadata": meta, **payload}
        )
        headers: list[tuple[str, str | bytes | None]] = [
            ("event_type", event_type.encode()),
            ("event_id", event_id.encode()),
        ]
        key = case_id.encode()
        headers = signed(key, value, headers, sign_as or self.sign_as, signature or self.signature)
        return DistrictRecord(key, value, headers, event_id, event_type)


def registered(person_byte: str = "ab", district: str = "nordost") -> dict[str, Any]:
    return {
        "person": person_byte * 32,
        "district": district,
        "substances": ["ALCOHOL"],
        "referral_source": "SELF",
        "children_in_household": "YES",
        "birth_year": 1980,
    }


def referral_requested(referral_id: str, unit_id: str = "centrum-beroendeteam") -> dict[str, Any]:
    """A ReferralRequested payload of a Nordost case to a social services unit in Centrum
    (as Likvärd derives it: across districts, no consent needed)."""
    return {
        "referral_id": referral_id,
        "unit_id": unit_id,
        "intervention_code": "relapse-prevention-alcohol",
        "person_district": "nordost",
        "unit_district": "centrum",
        "recipient_kind": "CITY_SOCIAL_SERVICES",
        "consent_id": None,
        "consent_override": None,
    }


def assessment(assessment_id: str | None = None) -> dict[str, Any]:
    return {
        "assessment_id": assessment_id or str(uuid.uuid4()),
        "instrument": "AUDIT",
        "scores": [{"scale": "total", "value": 21}],
        "need_level": "HIGH",
    }


def produce_all(bootstrap: str, topic: str, records: list[DistrictRecord]) -> list[tuple[int, int]]:
    """Produce as an outside system would (a plain producer); returns (partition, offset)
    of each record, in order."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    where: dict[int, tuple[int, int]] = {}

    def on_delivery(n: int) -> Any:
        def callback(err: KafkaError | None, msg: Message) -> None:
            assert err is None, err
            where[n] = (int(msg.partition() or 0), int(msg.offset() or 0))

        return callback

    for n, r in enumerate(records):
        producer.produce(
            topic, key=r.key, value=r.value, headers=r.headers, on_delivery=on_delivery(n)
        )
    assert producer.flush(30) == 0
    return [where[n] for n in range(len(records))]
