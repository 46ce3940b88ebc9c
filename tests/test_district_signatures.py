"""District systems sign their records; the ingest path stores what the right district's
system signed and dead-letters the rest with its own code (stage `signature`).

The integration test runs the real broker, PostgreSQL and the three services' ingest
workers; the rest checks the key registry and the signing input without I/O."""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from collections import Counter
from pathlib import Path

import pytest

from likvard import dlq
from likvard.codec import Catalogue
from likvard.district_keys import (
    KEYS_DIR_ENV,
    SIGNATURE_HEADER,
    SYSTEMS_ENV,
    BadSignature,
    DistrictKeys,
    KeyRegistryError,
    Unsigned,
    sign,
    signing_input,
)
from likvard.districts import DistrictRegistry
from tests.district import (
    DistrictRecord,
    DistrictSystem,
    assessment,
    produce_all,
    referral_requested,
    registered,
    signed,
)
from tests.support import IngestStack, consume, wait_for

KEYS = DistrictKeys(districts=DistrictRegistry.load())
PACKAGED = Path(__file__).resolve().parent.parent / "likvard" / "reference"


def judged(stack: IngestStack) -> int:
    return sum(w.stats.judged for w in stack.workers.values())


# --- end to end --------------------------------------------------------------------------
@pytest.mark.integration
def test_only_the_right_districts_signed_records_are_stored(
    ingest_stack: IngestStack, catalogue: Catalogue
) -> None:
    stack = ingest_stack
    nordost = DistrictSystem(catalogue)  # nordost-treserva, signs with its own key
    angered = DistrictSystem(catalogue, district="angered")  # angered-procapita (RS256)
    hisingen = DistrictSystem(catalogue, district="hisingen")
    case, other, moved = (str(uuid.uuid4()) for _ in range(3))

    good = nordost.record("AssessmentCompleted", case, assessment())
    by_angered = angered.record("AssessmentCompleted", case, assessment(), district="nordost")
    as_angered = angered.record("AssessmentCompleted", case, assessment())  # "angered" case?
    unsigned = nordost.record("AssessmentCompleted", case, assessment(), signature="none")
    broken = nordost.record("AssessmentCompleted", case, assessment(), signature="broken")
    changed = nordost.record("AssessmentCompleted", case, assessment())
    changed = DistrictRecord(  # a header added after signing
        changed.key, changed.value, [*changed.headers, ("traceparent", b"00-x")], changed.event_id
    )
    by_centrum = nordost.record(  # Centrum's key over what says Nordost's system
        "AssessmentCompleted", case, assessment(), sign_as="centrum-treserva"
    )
    other_producer = nordost.record(
        "AssessmentCompleted", case, assessment(), producer="nordost-elsewhere"
    )
    registered_by_angered = angered.record(
        "IntakeRegistered", other, registered("cd", district="nordost")
    )
    referral_by_hisingen = hisingen.record(
        "ReferralRequested", case, referral_requested(str(uuid.uuid4()))
    )
    transferred = nordost.record(
        "CaseTransferred",
        moved,
        {"from_district": "nordost", "to_district": "hisingen", "reason": "PERSON_MOVED"},
    )
    after_by_nordost = nordost.record("AssessmentCompleted", moved, assessment())
    after_by_hisingen = hisingen.record("AssessmentCompleted", moved, assessment())
    records = [
        nordost.record("IntakeRegistered", case, registered()),
        good,
        by_angered,
        as_angered,
        unsigned,
        broken,
        changed,
        by_centrum,
        other_producer,
        registered_by_angered,
        referral_by_hisingen,
        nordost.record("IntakeRegistered", moved, registered("ef")),
        transferred,
        after_by_nordost,
        after_by_hisingen,
        nordost.record("CaseClosed", case, {"reason": "GOALS_REACHED"}),
    ]
    expected = {
        by_angered.event_id: "wrong-district",  # Angered's key, a Nordost event
        as_angered.event_id: "wrong-district",  # says "angered", but the case is Nordost's
        unsigned.event_id: "unsigned",
        broken.event_id: "bad-signature",
        changed.event_id: "bad-signature",
        by_centrum.event_id: "wrong-district",
        other_producer.event_id: "producer-not-signer",
        registered_by_angered.event_id: "wrong-district",  # a new case in another district
        referral_by_hisingen.event_id: "wrong-district",  # referral service: the known case
        after_by_nordost.event_id: "wrong-district",  # the case is Hisingen's now
    }
    produce_all(stack.settings.kafka_bootstrap or "", stack.ingest_topic, records)
    wait_for(lambda: judged(stack) >= len(records), 60, "every record to be judged")

    letters = consume(
        stack.settings.kafka_bootstrap or "", stack.dead_letter_topic, at_least=len(expected)
    )
    codes = {x.headers["event_id"].decode(): x.headers[dlq.CODE].decode() for x in letters}
    assert codes == expected
    assert {x.headers[dlq.STAGE] for x in letters} == {b"signature"}
    for x in letters:  # the record itself, unchanged, signature and all
        sent = next(r for r in records if r.event_id == x.headers["event_id"].decode())
        assert (x.key, x.value) == (sent.key, sent.value)
        assert (SIGNATURE_HEADER in x.headers) == (sent is not unsigned)
    assert Counter(codes.values()) == {
        "wrong-district": 6,
        "unsigned": 1,
        "bad-signature": 2,
        "producer-not-signer": 1,
    }
    referral = next(x for x in letters if x.headers["event_id"] == by_hisingen_id(records))
    assert referral.headers[dlq.SERVICE] == b"referral"

    intake = stack.stores["intake"]
    assert [str(e.event_id) for e in intake.read_stream(case)] == [
        records[0].event_id,
        good.event_id,  # the correctly signed one is stored
        records[-1].event_id,
    ]
    assert intake.read_stream(other) == []
    assert [str(e.event_id) for e in intake.read_stream(moved)] == [
        records[11].event_id,
        transferred.event_id,
        after_by_hisingen.event_id,  # the receiving district's system takes over
    ]
    stored = intake.read_stream(moved)[-1].metadata
    assert (stored["producer"], stored["district"]) == ("hisingen-treserva", "hisingen")
    assert list(stack.stores["referral"].read_all()) == []


def by_hisingen_id(records: list[DistrictRecord]) -> bytes:
    return next(r for r in records if r.event_type == "ReferralRequested").event_id.encode()


# --- the registry and the signing input (no I/O but the packaged files) ------------------
Headers = list[tuple[str, bytes | None]]


def record(system: str = "nordost-treserva") -> tuple[bytes, bytes, Headers]:
    """A record signed by `system`'s development key."""
    key, value = b"3f2c7a9e-5b1d-4c8e-9a6f-2d4b8e1c7f05", b"\xc3\x01" + bytes(range(200))
    headers = signed(key, value, [("event_type", b"CaseClosed"), ("event_id", b"e1")], system)
    return key, value, [(k, v.encode() if isinstance(v, str) else v) for k, v in headers]


def test_each_packaged_system_verifies_with_its_own_key_only() -> None:
    for system in KEYS.systems:
        key, value, headers = record(system.id)
        assert KEYS.verify(key, value, headers) is system
    nordost = KEYS.system("nordost-treserva")
    assert nordost is not None and nordost.district == "nordost"
    assert nordost.districts == {"nordost", "angered", "ostra-goteborg"}  # it took them over
    angered = KEYS.system("angered-procapita")
    assert angered is not None and angered.districts == {"angered"}


def test_the_signature_covers_key_value_and_every_header_but_its_own_and_dlq() -> None:
    key, value, headers = record()
    KEYS.verify(key, value, [*reversed(headers), ("dlq_retry_of", b"3:2")])  # order, retry
    spoiled = [
        (key + b"x", value, headers),
        (None, value, headers),
        (key, value[:-1], headers),
        (key, None, headers),
        (key, value, [*headers, ("traceparent", b"00-...")]),
        (key, value, [*headers, ("event_id", b"e1")]),  # a repeat counts
        (key, value, [("event_type", b"CaseClosed"), ("event_id", None), headers[-1]]),
        (key, value, [h for h in headers if h[0] != "event_id"]),
    ]
    for k, v, h in spoiled:
        with pytest.raises(BadSignature, match="does not verify"):
            KEYS.verify(k, v, h)


def test_malformed_and_foreign_signatures_are_bad_signatures() -> None:
    key, value, headers = record()
    rest = [h for h in headers if h[0] != SIGNATURE_HEADER]
    token = dict(headers)[SIGNATURE_HEADER]
    assert token is not None
    head, _, sig = token.decode().split(".")
    payload = base64.urlsafe_b64encode(signing_input(key, value, rest)).rstrip(b"=").decode()
    full = f"{head}.{payload}.{sig}"  # a valid JWS, but with the content attached
    cases = {
        "two": [*headers, (SIGNATURE_HEADER, token)],
        "garbage": [*rest, (SIGNATURE_HEADER, b"garbage")],
        "empty": [*rest, (SIGNATURE_HEADER, b"")],
        "null": [*rest, (SIGNATURE_HEADER, None)],
        "attached": [*rest, (SIGNATURE_HEADER, full.encode())],
        "not json": [*rest, (SIGNATURE_HEADER, f"bm90IGpzb24..{sig}".encode())],
    }
    for name, h in cases.items():
        with pytest.raises(BadSignature):
            KEYS.verify(key, value, h)
            pytest.fail(name)
    with pytest.raises(Unsigned):
        KEYS.verify(key, value, rest)


def _token(protected: dict[str, object], sig: str) -> bytes:
    raw = json.dumps(protected, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=") + b".." + sig.encode()


def test_the_protected_header_must_name_the_keys_system_alg_and_no_extensions() -> None:
    key, value, headers = record()
    rest = [h for h in headers if h[0] != SIGNATURE_HEADER]
    sig = (dict(headers)[SIGNATURE_HEADER] or b"").decode().split(".")[2]
    kid = "nordost-treserva-dev-1"
    cases: list[tuple[dict[str, object], str]] = [
        ({"alg": "ES256", "kid": "nobody", "likvard-system": "nordost-treserva"}, "kid"),
        ({"alg": "ES256", "kid": kid, "likvard-system": "centrum-treserva"}, "likvard-system"),
        ({"alg": "RS256", "kid": kid, "likvard-system": "nordost-treserva"}, "alg"),
        ({"alg": "none", "kid": kid, "likvard-system": "nordost-treserva"}, "alg"),
        ({"alg": "HS256", "kid": kid, "likvard-system": "nordost-treserva"}, "alg"),
        (
            {"alg": "ES256", "kid": kid, "likvard-system": "nordost-treserva", "b64": False},
            "crit|does not parse",
        ),
    ]
    for protected, reason in cases:
        with pytest.raises(BadSignature, match=reason):
            KEYS.verify(key, value, [*rest, (SIGNATURE_HEADER, _token(protected, sig))])


def test_a_reason_never_quotes_the_record() -> None:
    key, value, headers = record()
    for h in ([*headers[:2]], [*headers[:2], (SIGNATURE_HEADER, b"secret-ish..x")]):
        try:
            KEYS.verify(key, value + b"!", h)
        except (Unsigned, BadSignature) as exc:
            assert "secret" not in exc.reason and "3f2c7a9e" not in exc.reason


def test_the_signing_input_is_length_prefixed_and_sorted() -> None:
    a = signing_input(b"k", b"v", [("b", b"2"), ("a", None), ("b", b"1")])
    assert a == signing_input(b"k", b"v", [("b", b"1"), ("b", b"2"), ("a", None)])
    assert a.startswith(b"LIKVARD-RECORD-SIG-V1\x00\x00\x00\x01k\x00\x00\x00\x01v\x00\x00\x00\x03")
    assert a.endswith(
        b"\x00\x00\x00\x01a\xff\xff\xff\xff\x00\x00\x00\x01b\x00\x00\x00\x011"
        b"\x00\x00\x00\x01b\x00\x00\x00\x012"
    )
    # No two records share an input: absent differs from empty, boundaries are fixed.
    assert signing_input(None, b"", []) != signing_input(b"", b"", [])
    assert signing_input(b"ab", b"c", []) != signing_input(b"a", b"bc", [])
    assert signing_input(b"", b"", [("a", b"bc")]) != signing_input(b"", b"", [("ab", b"c")])


def test_a_city_replaces_the_packaged_keys_by_its_own(tmp_path: Path) -> None:
    """LIKVARD_DISTRICT_KEYS_DIR and LIKVARD_DISTRICT_SYSTEMS: the packaged development keys
    are gone, the city's verify; a kid added later is picked up (re-read on an unknown kid)."""
    from joserfc.jwk import ECKey

    city = ECKey.generate_key("P-256", {"kid": "nordost-2027-1", "alg": "ES256"}, private=True)
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    systems = {"systems": [{"id": "nordost-x", "district": "nordost", "jwks": "nordost-x.json"}]}
    (tmp_path / "systems.json").write_text(json.dumps(systems))
    (keys_dir / "nordost-x.json").write_text(json.dumps({"keys": [city.as_dict(private=False)]}))
    env = {SYSTEMS_ENV: str(tmp_path / "systems.json"), KEYS_DIR_ENV: str(keys_dir)}
    clock = [0.0]
    keys = DistrictKeys.from_env(DistrictRegistry.load(), env)
    keys._clock, keys._loaded_at = (lambda: clock[0]), 0.0  # the interval, without waiting

    k, v = b"case", b"value"
    token = sign(k, v, [], city, system="nordost-x")
    assert keys.verify(k, v, [(SIGNATURE_HEADER, token.encode())]).id == "nordost-x"
    _, _, dev_headers = record()
    with pytest.raises(BadSignature, match="kid"):  # the development key is not trusted
        keys.verify(*record()[:2], dev_headers)

    rolled = ECKey.generate_key("P-256", {"kid": "nordost-2027-2", "alg": "ES256"}, private=True)
    both = {"keys": [city.as_dict(private=False), rolled.as_dict(private=False)]}
    (keys_dir / "nordost-x.json").write_text(json.dumps(both))
    token = sign(k, v, [], rolled, system="nordost-x")
    with pytest.raises(BadSignature, match="kid"):  # read again at most every 30 s
        keys.verify(k, v, [(SIGNATURE_HEADER, token.encode())])
    clock[0] = 31.0
    assert keys.verify(k, v, [(SIGNATURE_HEADER, token.encode())]).id == "nordost-x"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda jwk: jwk.update(d="AAAA"), "private key"),
        (lambda jwk: jwk.pop("alg"), "algorithm"),
        (lambda jwk: jwk.update(alg="HS256"), "algorithm"),
        (lambda jwk: jwk.update(alg="RS256"), "not an RSA key"),
        (lambda jwk: jwk.pop("kid"), "no kid"),
        (lambda jwk: jwk.update(use="enc"), "signing key"),
    ],
)
def test_bad_key_files_stop_the_worker_at_start(
    tmp_path: Path, change: object, message: str
) -> None:
    shutil.copytree(PACKAGED / "district-keys", tmp_path / "keys")
    path = tmp_path / "keys" / "nordost-treserva.json"
    jwks = json.loads(path.read_text())
    change(jwks["keys"][0])  # type: ignore[operator]
    path.write_text(json.dumps(jwks))
    with pytest.raises(KeyRegistryError, match=message):
        DistrictKeys(keys_dir=tmp_path / "keys")


def test_no_private_key_ships_in_the_package() -> None:
    for path in (PACKAGED / "district-keys").glob("*.json"):
        for jwk in json.loads(path.read_text())["keys"]:
            assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk), path.name
    assert not list(PACKAGED.rglob("*private*"))


# --- verifying a batch (the ingest's path) --------------------------------------------------
def _outcome(keys: DistrictKeys, k: bytes | None, v: bytes | None, h: Headers) -> object:
    try:
        return keys.verify(k, v, h)
    except (Unsigned, BadSignature) as exc:
        return (type(exc), exc.reason)


def test_a_batch_is_judged_as_each_record_alone_on_the_thread_pool() -> None:
    """`verify_many` (threads, parsed headers kept) answers exactly as `verify` does, record
    by record, in the batch's order: a header seen before vouches for no other signature."""
    good = [record(s.id) for s in KEYS.systems]  # ES256 and RS256
    key, value, headers = good[0]
    rest = [h for h in headers if h[0] != SIGNATURE_HEADER]
    token = dict(headers)[SIGNATURE_HEADER] or b""
    head, _, sig = token.split(b".")
    other_sig = (dict(good[1][2])[SIGNATURE_HEADER] or b"").split(b".")[2]
    spoiled: list[tuple[bytes | None, bytes | None, Headers]] = [
        (key, value + b"!", headers),  # the same cached header, another record
        (key, value, [*rest, (SIGNATURE_HEADER, head + b".." + other_sig)]),
        (key, value, [*rest, (SIGNATURE_HEADER, head + b".." + sig[:-4])]),
        (key, value, [*rest, (SIGNATURE_HEADER, head + b"..@@@@")]),
        (key, value, [*rest, (SIGNATURE_HEADER, b"garbage")]),
        (key, value, [*rest, (SIGNATURE_HEADER, b"bm90IGpzb24.." + sig)]),
        (key, value, rest),
        (key, value, [*headers, (SIGNATURE_HEADER, token)]),
    ]
    batch = (good + spoiled) * 5
    assert len(batch) >= 32  # large enough for the pool
    found = KEYS.verify_many(batch)
    expected = [_outcome(KEYS, *r) for r in batch]
    assert [x if not isinstance(x, Exception) else (type(x), x.reason) for x in found] == expected
    assert sum(1 for x in found if not isinstance(x, Exception)) == len(good) * 5
    assert KEYS.verify_many([]) == []
