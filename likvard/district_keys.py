"""District systems' signing keys: who they are, what a signature covers, and checking one.

A district system signs every record it produces to `likvard.district-ingest.v1` with its
own private key: a JWS (RFC 7515) in compact serialisation with *detached* content
(Appendix F: `<protected>..<signature>`, the middle part empty) in the Kafka header
`likvard-signature`. Its payload is the record's canonical signing input
(`signing_input`): the key, the value and every other header, length-prefixed so no two
records share one. The protected header names the key (`kid`), the algorithm (`alg`: ES256
or RS256, the key's own) and the system (`likvard-system`).

Which systems exist, and the district each writes for, is reference data
(`reference/district-systems.json`, or the file `LIKVARD_DISTRICT_SYSTEMS` names); each
system's public keys are a JWKS file it names, in `reference/district-keys/` or the folder
`LIKVARD_DISTRICT_KEYS_DIR` names (a real deployment mounts the city's files there; the
packaged ones are development keys whose private halves are in the repository's tests).
Keys are parsed once; a `kid` nobody knows makes the registry re-read its files (at most
every `RELOAD_INTERVAL` seconds), so a new key is picked up without a restart.

Verifying is the ingest's costliest step per record, so it does no more than it must: a
protected header is parsed and checked once per distinct header (a system signs every
record with the same one), and `verify_many` checks a batch's signatures on a small thread
pool (cryptography releases the GIL while OpenSSL verifies).

A system may write for its own district and for the former districts that it took over
(whose successor chain in the district reference data leads to it): Nordost's system may
write for a case still recorded under Angered, Angered's for Angered's only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc._rfc7515.compact import decode_header
from joserfc._rfc7515.model import JWSAlgModel
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey
from joserfc.registry import HeaderParameter
from joserfc.util import urlsafe_b64decode

from likvard.districts import DistrictRegistry

__all__ = [
    "ALGORITHMS",
    "KEYS_DIR_ENV",
    "SIGNATURE_HEADER",
    "SYSTEMS_ENV",
    "SYSTEM_PARAM",
    "BadSignature",
    "DistrictKeys",
    "DistrictSystem",
    "KeyRegistryError",
    "SignatureError",
    "Unsigned",
    "sign",
    "signed_headers",
    "signing_input",
]

SIGNATURE_HEADER = "likvard-signature"
SYSTEM_PARAM = "likvard-system"
"""The protected header parameter naming the district system (its id in the registry)."""
ALGORITHMS = ("ES256", "RS256")
UNSIGNED_PREFIX = "dlq_"
"""Headers Likvärd itself adds to a record it re-submits (`likvard dlq retry` adds
`dlq_retry_of`): left out of the signing input, so a retried record still verifies."""
MAGIC = b"LIKVARD-RECORD-SIG-V1"
"""The first bytes of every signing input: a signature over a record is never one over
anything else (or over a later version of this format)."""
NULL = 0xFFFFFFFF
"""The length written for an absent key, value or header value (not the same as empty)."""

PACKAGE_REFERENCE = Path(__file__).resolve().parent / "reference"
DEFAULT_SYSTEMS = PACKAGE_REFERENCE / "district-systems.json"
DEFAULT_KEYS_DIR = PACKAGE_REFERENCE / "district-keys"
SYSTEMS_ENV = "LIKVARD_DISTRICT_SYSTEMS"
KEYS_DIR_ENV = "LIKVARD_DISTRICT_KEYS_DIR"
RELOAD_INTERVAL = 30.0

Headers = Sequence[tuple[str, str | bytes | None]]


class _Registry(jws.JWSRegistry):
    """ES256 and RS256 only (never `none` or HS*), our header parameter, and a payload as
    large as a record may be (the default stops at 128 kB)."""

    max_payload_length = 8_000_000
    max_header_length = 1024


_JWS = _Registry(
    header_registry={SYSTEM_PARAM: HeaderParameter("Likvärd district system id", "str", True)},
    algorithms=ALGORITHMS,
)
HEADER_CACHE_SIZE = 4096
"""Distinct protected headers kept parsed (about one per key in use; cleared when full)."""
PARALLEL_FROM = 32
"""A batch with at least this many signatures is verified on the thread pool."""
VERIFY_THREADS = max(1, min(4, os.cpu_count() or 1))


# --- the signing input (pure) --------------------------------------------------------------
def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode("utf-8") if isinstance(value, str) else value


def _field(value: bytes | None) -> bytes:
    if value is None:
        return struct.pack(">I", NULL)
    return struct.pack(">I", len(value)) + value


def signed_headers(headers: Headers) -> list[tuple[bytes, bytes | None]]:
    """The headers a signature covers, in signing order: all but `likvard-signature` and
    `dlq_*`, as (UTF-8 name, value) sorted by name, then value (bytes compared unsigned,
    an absent value before any other)."""
    chosen = [
        (name.encode("utf-8"), _bytes(value))
        for name, value in headers
        if name != SIGNATURE_HEADER and not name.startswith(UNSIGNED_PREFIX)
    ]
    chosen.sort(key=lambda h: (h[0], h[1] is not None, h[1] or b""))
    return chosen


def signing_input(key: bytes | None, value: bytes | None, headers: Headers) -> bytes:
    """The bytes a record's signature is over (docs/district-integration.md, "Signing"):
    MAGIC, the key, the value, the number of signed headers, then each header's name and
    value; every field as a 4-byte big-endian length and its bytes (FFFFFFFF if absent)."""
    chosen = signed_headers(headers)
    parts = [MAGIC, _field(key), _field(value), struct.pack(">I", len(chosen))]
    for name, header in chosen:
        parts.append(_field(name))
        parts.append(_field(header))
    return b"".join(parts)


def sign(
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    private_key: ECKey | RSAKey,
    *,
    system: str,
) -> str:
    """The `likvard-signature` header value for a record (what a district system does;
    Likvärd itself only verifies). The key's `kid` and `alg` go into the protected header."""
    alg = private_key.alg or ("ES256" if isinstance(private_key, ECKey) else "RS256")
    protected = {"alg": alg, "kid": private_key.kid, SYSTEM_PARAM: system}
    token = jws.serialize_compact(
        protected, signing_input(key, value, headers), private_key, registry=_JWS
    )
    head, _, signature = token.split(".")
    return f"{head}..{signature}"


# --- refusals ------------------------------------------------------------------------------
class SignatureError(Exception):
    """A record whose signature does not name a district system; `reason` is for people and
    quotes nothing of the record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unsigned(SignatureError):
    """No `likvard-signature` header at all."""


class BadSignature(SignatureError):
    """A signature that is malformed, names an unknown key or system, or does not verify."""


class KeyRegistryError(ValueError):
    """The district systems' reference data or key files are unreadable or contradict
    themselves (raised when they are loaded, so a worker does not start on them)."""


# --- the registry --------------------------------------------------------------------------
@dataclass(frozen=True)
class DistrictSystem:
    """A district system: its id, its district, and every district code it may write for
    (its own and those it took over)."""

    id: str
    district: str
    jwks: str
    districts: frozenset[str]

    def may_write_for(self, district: str | None) -> bool:
        return district is not None and district in self.districts


@dataclass(frozen=True)
class _Entry:
    system: DistrictSystem
    key: ECKey | RSAKey
    alg: str
    usable: bool = True
    """joserfc's check of the key for its algorithm (use, type, alg), done once at load."""


def _usable(key: ECKey | RSAKey, alg: str) -> bool:
    try:
        _JWS.get_alg(alg).check_key(key)
    except (JoseError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class _Header:
    """A protected header as parsed once: its parameters, or why it is refused.
    `checked` is joserfc's registry check (a failure there reads as "does not verify")."""

    protected: Mapping[str, Any] | None
    checked: bool


@dataclass(frozen=True)
class _Check:
    """One signature ready for the cryptographic check (everything else already passed)."""

    entry: _Entry
    alg: JWSAlgModel
    message: bytes
    signature: bytes


def _parse_header(segment: bytes) -> _Header:
    """What joserfc's `extract_compact` and `validate_compact` check of a protected header
    (its size, base64url JSON with an alg, the registry's parameters), once per header."""
    try:
        _JWS.validate_header_size(segment)
        protected = decode_header(segment)
    except (JoseError, ValueError, TypeError):
        return _Header(None, False)
    try:
        _JWS.check_header(protected)
    except (JoseError, ValueError, TypeError):
        return _Header(protected, False)
    return _Header(protected, True)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _cryptographic(check: _Check) -> bool:
    """OpenSSL's verification of one signature (releases the GIL)."""
    try:
        return bool(check.alg.verify(check.message, check.signature, check.entry.key))
    except (JoseError, ValueError, TypeError):
        return False


def _covered(district: str, registry: DistrictRegistry | None) -> frozenset[str]:
    """`district` and every code whose successor chain passes through it."""
    if registry is None:
        return frozenset({district})
    found = {district}
    for d in registry:
        seen: set[str] = set()
        code: str | None = d.code
        while code is not None and code not in seen:
            if code == district:
                found.add(d.code)
                break
            seen.add(code)
            known = registry.get(code)
            code = known.successor if known else None
    return frozenset(found)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KeyRegistryError(f"The {what} {path} is unreadable or not JSON: {exc}") from exc


def _public_key(data: Mapping[str, Any], path: Path) -> tuple[ECKey | RSAKey, str, str]:
    """A JWK of a district system's JWKS: public, for signing, with its kid and alg."""
    kid, alg = data.get("kid"), data.get("alg")
    if not isinstance(kid, str) or not kid:
        raise KeyRegistryError(f"A key in {path} has no kid.")
    if alg not in ALGORITHMS:
        raise KeyRegistryError(
            f"The key {kid} in {path} must name its algorithm, one of {', '.join(ALGORITHMS)}."
        )
    if data.get("use", "sig") != "sig":
        raise KeyRegistryError(f"The key {kid} in {path} is not a signing key (use).")
    if "d" in data:
        raise KeyRegistryError(
            f"The key {kid} in {path} holds a private key: a JWKS file holds public keys only."
        )
    expected = {"ES256": "EC", "RS256": "RSA"}[alg]
    if data.get("kty") != expected:
        raise KeyRegistryError(f"The key {kid} in {path} is not an {expected} key for {alg}.")
    try:
        key = KeySet.import_key_set({"keys": [dict(data)]}).keys[0]
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise KeyRegistryError(f"The key {kid} in {path} does not parse: {exc}") from exc
    if isinstance(key, ECKey) and key.curve_name != "P-256":
        raise KeyRegistryError(f"The key {kid} in {path} is not on P-256, as ES256 needs.")
    if not isinstance(key, ECKey | RSAKey):
        raise KeyRegistryError(f"The key {kid} in {path} is neither EC nor RSA.")
    return key, kid, alg


def _load(
    systems_path: Path, keys_dir: Path, districts: DistrictRegistry | None
) -> tuple[list[DistrictSystem], dict[str, _Entry]]:
    doc = _read_json(systems_path, "district systems' reference data")
    try:
        listed = list(doc["systems"])
    except (KeyError, TypeError) as exc:
        raise KeyRegistryError(f"{systems_path} has no list of systems.") from exc
    systems: list[DistrictSystem] = []
    entries: dict[str, _Entry] = {}
    for item in listed:
        try:
            sid, district, jwks = str(item["id"]), str(item["district"]), str(item["jwks"])
        except (KeyError, TypeError) as exc:
            raise KeyRegistryError(
                f"Each system in {systems_path} needs an id, a district and a jwks file."
            ) from exc
        if any(s.id == sid for s in systems):
            raise KeyRegistryError(f"The district system {sid} is listed twice.")
        if districts is not None and not districts.is_known(district):
            raise KeyRegistryError(f"The district system {sid} names the unknown district.")
        if Path(jwks).name != jwks:
            raise KeyRegistryError(f"The JWKS file of {sid} must be a file name, not a path.")
        system = DistrictSystem(sid, district, jwks, _covered(district, districts))
        systems.append(system)
        path = keys_dir / jwks
        keyset = _read_json(path, f"JWKS file of {sid}")
        keys = keyset.get("keys") if isinstance(keyset, dict) else None
        if not isinstance(keys, list) or not keys:
            raise KeyRegistryError(f"The JWKS file {path} has no keys.")
        for data in keys:
            key, kid, alg = _public_key(data, path)
            if kid in entries:
                raise KeyRegistryError(f"The kid {kid} is used by more than one key.")
            entries[kid] = _Entry(system, key, alg, _usable(key, alg))
    return systems, entries


class DistrictKeys:
    """The district systems and their public keys, parsed once; verifies records."""

    def __init__(
        self,
        systems_path: Path = DEFAULT_SYSTEMS,
        keys_dir: Path = DEFAULT_KEYS_DIR,
        districts: DistrictRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.systems_path = systems_path
        self.keys_dir = keys_dir
        self._districts = districts
        self._clock = clock
        self._lock = threading.Lock()
        self.systems, self._entries = _load(systems_path, keys_dir, districts)
        self._loaded_at = clock()
        self._headers: dict[bytes, _Header] = {}
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_env(
        cls, districts: DistrictRegistry | None = None, env: Mapping[str, str] | None = None
    ) -> DistrictKeys:
        """The registry the environment names (LIKVARD_DISTRICT_SYSTEMS for the systems'
        file, LIKVARD_DISTRICT_KEYS_DIR for the JWKS folder), else the packaged one."""
        env = os.environ if env is None else env
        systems = env.get(SYSTEMS_ENV) or str(DEFAULT_SYSTEMS)
        keys_dir = env.get(KEYS_DIR_ENV) or str(DEFAULT_KEYS_DIR)
        return cls(Path(systems), Path(keys_dir), districts)

    def system(self, system_id: str) -> DistrictSystem | None:
        return next((s for s in self.systems if s.id == system_id), None)

    def _entry(self, kid: str) -> _Entry | None:
        entry = self._entries.get(kid)
        if entry is not None:
            return entry
        with self._lock:  # an unknown kid: a key added since? re-read, rate-limited
            if self._clock() - self._loaded_at >= RELOAD_INTERVAL:
                self._loaded_at = self._clock()
                # If the files are broken meanwhile, keep the keys we have.
                with contextlib.suppress(KeyRegistryError):
                    self.systems, self._entries = _load(
                        self.systems_path, self.keys_dir, self._districts
                    )
        return self._entries.get(kid)

    def verify(self, key: bytes | None, value: bytes | None, headers: Headers) -> DistrictSystem:
        """The district system whose key signed this record; raises Unsigned or
        BadSignature."""
        check = self._prepare(key, value, headers)
        if not _cryptographic(check):
            raise _does_not_verify()
        return check.entry.system

    def verify_many(
        self, records: Sequence[tuple[bytes | None, bytes | None, Headers]]
    ) -> list[DistrictSystem | SignatureError]:
        """`verify` for a batch of (key, value, headers): for each record its signer, or
        the Unsigned/BadSignature it would raise. The cryptographic checks of a large
        batch run on a thread pool."""
        out: list[DistrictSystem | SignatureError] = []
        ready: list[tuple[int, _Check]] = []
        for n, (key, value, headers) in enumerate(records):
            try:
                ready.append((n, self._prepare(key, value, headers)))
                out.append(_PENDING)
            except SignatureError as exc:
                out.append(exc)
        checks = [c for _, c in ready]
        if len(checks) >= PARALLEL_FROM and VERIFY_THREADS > 1:
            size = -(-len(checks) // VERIFY_THREADS)
            chunks = [checks[i : i + size] for i in range(0, len(checks), size)]
            results = [r for part in self._threads().map(_verify_chunk, chunks) for r in part]
        else:
            results = _verify_chunk(checks)
        for (n, check), valid in zip(ready, results, strict=True):
            out[n] = check.entry.system if valid else _does_not_verify()
        return out

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="verify")
            return self._pool

    def _header(self, segment: bytes) -> _Header:
        found = self._headers.get(segment)
        if found is None:
            found = _parse_header(segment)
            if len(self._headers) >= HEADER_CACHE_SIZE:
                self._headers.clear()  # garbage headers must not grow it without bound
            self._headers[segment] = found
        return found

    def _prepare(self, key: bytes | None, value: bytes | None, headers: Headers) -> _Check:
        """Every check but the cryptographic one, in the order of the refusals' reasons;
        raises Unsigned or BadSignature."""
        tokens = [v for k, v in headers if k == SIGNATURE_HEADER]
        if not tokens:
            raise Unsigned(
                f"The record has no '{SIGNATURE_HEADER}' header: every record must be signed"
                " with its district system's key."
            )
        if len(tokens) > 1:
            raise BadSignature(f"The record has more than one '{SIGNATURE_HEADER}' header.")
        token = _bytes(tokens[0]) or b""
        parts = token.split(b".")
        if len(parts) != 3 or parts[1] != b"" or not parts[0] or not parts[2]:
            raise BadSignature(
                f"The '{SIGNATURE_HEADER}' header is not a JWS in compact serialisation with"
                " detached content (<protected header>..<signature>)."
            )
        segment, _, signature_segment = parts
        header = self._header(segment)
        try:
            _JWS.validate_compact_value_size(token)
            _JWS.validate_signature_size(signature_segment)
        except (JoseError, ValueError, TypeError):
            header = _Header(None, False)
        protected = header.protected
        if protected is None:
            raise BadSignature(
                f"The '{SIGNATURE_HEADER}' header's protected header does not parse."
            )
        if "crit" in protected or "b64" in protected:
            raise BadSignature(
                "The signature's protected header has 'crit' or 'b64': sign the"
                " base64url-encoded signing input (RFC 7515), with no extensions."
            )
        kid = protected.get("kid")
        entry = self._entry(kid) if isinstance(kid, str) else None
        if entry is None:
            raise BadSignature(
                "The signature's kid names no key of a district system Likvärd knows (see"
                " the city's district-systems reference data and JWKS files)."
            )
        if protected.get(SYSTEM_PARAM) != entry.system.id:
            raise BadSignature(
                f"The signature's '{SYSTEM_PARAM}' is not the system that owns its key."
            )
        if protected.get("alg") != entry.alg:
            raise BadSignature("The signature's alg is not the algorithm of its key.")
        if not header.checked or not entry.usable:
            raise _does_not_verify()
        try:
            signature = urlsafe_b64decode(signature_segment)
        except (binascii.Error, ValueError, TypeError):
            raise _does_not_verify() from None
        message = segment + b"." + _b64(signing_input(key, value, headers))
        return _Check(entry, _JWS.get_alg(entry.alg), message, signature)


_PENDING = BadSignature("not checked yet")
"""A placeholder in `verify_many`'s answer, replaced before it returns."""


def _verify_chunk(checks: Sequence[_Check]) -> list[bool]:
    return [_cryptographic(c) for c in checks]


def _does_not_verify() -> BadSignature:
    return BadSignature(
        "The signature does not verify with its key over this record's key, value"
        " and headers (changed after signing, or signed over other bytes)."
    )


def load_private_key(path: Path) -> ECKey | RSAKey:
    """A private JWK from a file (tests' and the demo's district producers)."""
    data = _read_json(path, "private key")
    key = KeySet.import_key_set({"keys": [data]}).keys[0]
    if not isinstance(key, ECKey | RSAKey) or not key.is_private:
        raise KeyRegistryError(f"{path} is not a private EC or RSA key.")
    return key
