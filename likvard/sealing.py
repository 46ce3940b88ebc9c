"""Sealing an event's personal details with the person's data key, and opening them for
the readers whose role needs them.

The contract says which fields are personal: an event schema's `personal` field (a
`se.goteborg.likvard.Sealed` record) names them in its `likvard.personal` attribute. A
writer clears those fields (an empty list, or null) and puts their values, as one JSON
object, AES-256-GCM encrypted, into `personal`; the event id, the event type and the key id
are the associated data. A reader gets the fields back, with `personal` saying how:

- "open": decrypted, for a reader whose role needs the text;
- "withheld": the reader's role does not see personal text (the fields stay cleared);
- "erased": the person's key was destroyed (erasure or culling);
- "unreadable": the ciphertext does not open with its key (it was tampered with).

Events written before version 2 hold their details in clear and no `personal`; a reader
withholds them in the same way from roles that do not see personal text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from likvard.codec import Catalogue
from likvard.keys import NONCE_BYTES, DataKey, KeyStore

PERSONAL = "personal"
ATTRIBUTE = "likvard.personal"
ALGORITHM = "AES_256_GCM"
OPEN, WITHHELD, ERASED, UNREADABLE = "open", "withheld", "erased", "unreadable"


def personal_fields(catalogue: Catalogue, event_type: str) -> tuple[str, ...]:
    """The fields of an event type its newest schema seals ((): it holds none)."""
    for f in catalogue.schema(event_type)["fields"]:
        if f["name"] == PERSONAL:
            return tuple(f.get(ATTRIBUTE, ()))
    return ()


def _aad(event_type: str, event_id: str, key_id: str) -> bytes:
    return f"likvard/sealed/v1|{event_id}|{event_type}|{key_id}".encode()


def _blank(value: Any) -> Any:
    return [] if isinstance(value, list | tuple) else None


def _bytes(value: Any) -> bytes:
    """Bytes from an Avro record, or the hex the stored JSON copy keeps them as."""
    return bytes.fromhex(value) if isinstance(value, str) else bytes(value)


def seal_data(
    event_type: str,
    event_id: str,
    data: Mapping[str, Any],
    fields: Sequence[str],
    key: DataKey,
) -> dict[str, Any]:
    """The event's data with `fields` cleared and their values sealed in `personal`; no
    `personal` at all when every one of them is empty."""
    values = {f: data[f] for f in fields if data.get(f) not in (None, [], ())}
    out = {k: v for k, v in data.items() if k not in fields}
    for f in fields:
        out[f] = _blank(data.get(f))
    if not values:
        out[PERSONAL] = None
        return out
    plain = json.dumps(values, ensure_ascii=False, separators=(",", ":"), default=list)
    nonce = os.urandom(NONCE_BYTES)
    out[PERSONAL] = {
        "key_id": key.key_id,
        "algorithm": ALGORITHM,
        "nonce": nonce,
        "ciphertext": AESGCM(key.key).encrypt(
            nonce, plain.encode(), _aad(event_type, event_id, key.key_id)
        ),
    }
    return out


def sealed_key_id(payload: Mapping[str, Any]) -> str | None:
    sealed = payload.get(PERSONAL)
    return str(sealed["key_id"]) if isinstance(sealed, Mapping) else None


def open_data(
    event_type: str,
    event_id: str,
    payload: Mapping[str, Any],
    fields: Sequence[str],
    key: DataKey | None,
    *,
    show: bool,
) -> dict[str, Any]:
    """The payload as a reader sees it (see the module docstring for `personal`)."""
    out = dict(payload)
    sealed = payload.get(PERSONAL)
    if not fields:
        return out
    if not isinstance(sealed, Mapping):
        legacy = any(payload.get(f) not in (None, [], ()) for f in fields)
        if legacy and not show:
            for f in fields:
                out[f] = _blank(payload.get(f))
            out[PERSONAL] = WITHHELD
        else:
            out[PERSONAL] = OPEN if legacy else None
        return out
    if not show:
        out[PERSONAL] = WITHHELD
        return out
    if key is None:
        out[PERSONAL] = ERASED
        return out
    try:
        plain = AESGCM(key.key).decrypt(
            _bytes(sealed["nonce"]),
            _bytes(sealed["ciphertext"]),
            _aad(event_type, event_id, key.key_id),
        )
        values = json.loads(plain)
    except (InvalidTag, ValueError):
        out[PERSONAL] = UNREADABLE
        return out
    for f in fields:
        if f in values:
            out[f] = values[f]
    out[PERSONAL] = OPEN
    return out


@dataclass(frozen=True)
class ToSeal:
    event_type: str
    event_id: str
    data: Mapping[str, Any]
    person: str


@dataclass(frozen=True)
class ToOpen:
    event_type: str
    event_id: str
    payload: Mapping[str, Any]


class Sealer:
    """Seals and opens events in batches: one key-store round trip per batch. Without a
    key store (a reader not given the KEK) it opens nothing: every detail is withheld."""

    def __init__(self, catalogue: Catalogue, keys: KeyStore | None) -> None:
        self.catalogue = catalogue
        self.keys = keys
        self._fields: dict[str, tuple[str, ...]] = {}

    def fields(self, event_type: str) -> tuple[str, ...]:
        if event_type not in self._fields:
            self._fields[event_type] = personal_fields(self.catalogue, event_type)
        return self._fields[event_type]

    def seal(self, items: Sequence[ToSeal]) -> list[dict[str, Any]]:
        """Each item's data sealed with its person's key (created if the person has none)."""
        needed = {i.person for i in items if self.fields(i.event_type)}
        if needed and self.keys is None:
            raise ValueError("sealing needs a key store")
        keys = self.keys.keys_for(needed) if needed and self.keys is not None else {}
        return [
            seal_data(i.event_type, i.event_id, i.data, self.fields(i.event_type), keys[i.person])
            if self.fields(i.event_type)
            else dict(i.data)
            for i in items
        ]

    def open(self, items: Sequence[ToOpen], *, show: bool) -> list[dict[str, Any]]:
        """Each payload as the reader sees it; keys are looked up only when shown."""
        show = show and self.keys is not None
        ids = [sealed_key_id(i.payload) for i in items] if show else []
        keys = self.keys.open_keys(k for k in ids if k) if show and self.keys else {}
        out = []
        for i in items:
            key_id = sealed_key_id(i.payload)
            opened = open_data(
                i.event_type,
                i.event_id,
                i.payload,
                self.fields(i.event_type),
                keys.get(key_id or ""),
                show=show,
            )
            if show and key_id is not None and key_id not in keys:
                opened[PERSONAL] = UNREADABLE  # a key this store never held: not an erasure
            out.append(opened)
        return out
