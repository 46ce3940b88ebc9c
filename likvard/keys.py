"""The persons' data keys: envelope encryption under a key-encryption key (KEK).

Each person has a data key (AES-256) of their own; their personal details are sealed with it
(`likvard.sealing`). The key store keeps each data key only wrapped by the KEK, in a
PostgreSQL schema of its own that only the key store's role can read. Destroying a person's
keys erases every detail sealed with them, in PostgreSQL and on Kafka alike, without
touching a single event: the history and its hash chain stay as they were.

The KEK comes from LIKVARD_KEK (32 random bytes, base64) named by LIKVARD_KEK_ID; a KMS or
Vault transit key plugs in as another `Kek` (docs/personal-data.md). Unwrapped keys live
only in memory, in a bounded cache; every read still asks the store whether a key was
destroyed, so an erasure in one process holds at once in every other.
"""

from __future__ import annotations

import base64
import binascii
import os
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from threading import Lock
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard import telemetry
from likvard.config import ConfigError, Settings
from likvard.db import autocommit, check_schema_name, make_pool, migrate

KEY_BYTES = 32
NONCE_BYTES = 12
DEFAULT_CACHE_SIZE = 10_000

_meter = telemetry.meter("likvard.keys")
_unwraps = _meter.create_counter(
    "likvard.keys.unwraps", unit="{key}", description="Data keys unwrapped with the KEK."
)
_destroyed = _meter.create_counter(
    "likvard.keys.destroyed", unit="{key}", description="Data keys destroyed (erasure)."
)


class KekError(Exception):
    """The KEK is missing, malformed, or does not open a wrapped key (the text says which,
    never a key or a person)."""


@dataclass(frozen=True)
class DataKey:
    """A person's data key, unwrapped: only ever in memory."""

    key_id: str
    key: bytes = b""

    def __repr__(self) -> str:  # never print the key
        return f"DataKey({self.key_id})"


class Kek(Protocol):
    """A key-encryption key: wraps data keys for the store, unwraps them for readers."""

    @property
    def kek_id(self) -> str: ...

    def wrap(self, key: bytes, key_id: str) -> bytes: ...

    def unwrap(self, wrapped: bytes, key_id: str) -> bytes: ...


def _aad(key_id: str, kek_id: str) -> bytes:
    return f"likvard/data-key/v1|{key_id}|{kek_id}".encode()


class LocalKek:
    """A KEK held by this process (from LIKVARD_KEK): AES-256-GCM key wrapping, the key id
    and the KEK id as associated data, so a wrapped key cannot be moved to another row."""

    def __init__(self, kek_id: str, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise KekError(f"a KEK must be {KEY_BYTES} bytes, not {len(key)}")
        if len(set(key)) < 16:
            raise KekError("the KEK is not random (too few distinct bytes): generate a new one")
        self._kek_id = kek_id
        self._aead = AESGCM(key)

    @property
    def kek_id(self) -> str:
        return self._kek_id

    def wrap(self, key: bytes, key_id: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, key, _aad(key_id, self._kek_id))

    def unwrap(self, wrapped: bytes, key_id: str) -> bytes:
        try:
            return self._aead.decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _aad(key_id, self._kek_id)
            )
        except InvalidTag:
            raise KekError(
                f"the KEK {self._kek_id!r} does not open data key {key_id}: wrong LIKVARD_KEK?"
            ) from None


GENERATE_KEK = (
    'python -c "import base64, secrets; print(base64.b64encode(secrets.token_bytes(32)).decode())"'
)


def parse_kek(kek_id: str, text: str) -> LocalKek:
    """A KEK from its base64 text (standard or URL-safe alphabet)."""
    try:
        raw = base64.b64decode(text.strip() + "=" * (-len(text.strip()) % 4), altchars=b"-_")
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ConfigError(
            f"LIKVARD_KEK must be {KEY_BYTES} random bytes in base64 (44 characters); make one"
            f" with: {GENERATE_KEK}"
        )
    try:
        return LocalKek(kek_id, raw)
    except KekError as exc:
        raise ConfigError(f"LIKVARD_KEK: {exc}; make one with: {GENERATE_KEK}") from None


class KekRing:
    """The current KEK (new keys are wrapped with it) and the earlier ones still needed to
    unwrap older keys until `rewrap` has moved them (KEK rotation)."""

    def __init__(self, current: Kek, previous: Sequence[Kek] = ()) -> None:
        self.current = current
        self._by_id: dict[str, Kek] = {k.kek_id: k for k in (*previous, current)}

    def get(self, kek_id: str) -> Kek:
        try:
            return self._by_id[kek_id]
        except KeyError:
            raise KekError(
                f"no KEK named {kek_id!r} is configured (LIKVARD_KEK_ID, LIKVARD_KEK_PREVIOUS)"
            ) from None


def kek_from_settings(settings: Settings) -> KekRing:
    """LIKVARD_KEK (named LIKVARD_KEK_ID), and LIKVARD_KEK_PREVIOUS (`id:base64,...`)
    during a rotation. ConfigError with the fix when unset or malformed."""
    if not settings.kek:
        raise ConfigError(
            "LIKVARD_KEK is not set: the persons' data keys are wrapped by it. Set it to 32"
            f" random bytes in base64 from your secret store (make one with: {GENERATE_KEK});"
            " `likvard up` makes a random one per run."
        )
    previous: list[Kek] = []
    for item in filter(None, (settings.kek_previous or "").split(",")):
        kek_id, _, text = item.partition(":")
        previous.append(parse_kek(kek_id.strip(), text))
    return KekRing(parse_kek(settings.kek_id, settings.kek), previous)


class _Cache:
    """A bounded LRU of unwrapped keys, in memory only."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = Lock()

    def get(self, key_id: str) -> bytes | None:
        with self._lock:
            key = self._items.get(key_id)
            if key is not None:
                self._items.move_to_end(key_id)
            return key

    def put(self, key_id: str, key: bytes) -> None:
        with self._lock:
            self._items[key_id] = key
            self._items.move_to_end(key_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def drop(self, key_ids: Iterable[str]) -> None:
        with self._lock:
            for key_id in key_ids:
                self._items.pop(key_id, None)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class KeyState:
    """What the store knows of one key (never the key)."""

    key_id: str
    person: str
    created_at: datetime
    destroyed_at: datetime | None
    legal_basis: str | None


_KEYS_FOR_SQL = """
WITH made AS (
    INSERT INTO {s}.data_keys (key_id, person, kek_id, wrapped)
    SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::bytea[])
    ON CONFLICT (person) WHERE destroyed_at IS NULL DO NOTHING
    RETURNING person, key_id::text, kek_id, wrapped
)
SELECT * FROM made
UNION ALL
SELECT person, key_id::text, kek_id, wrapped FROM {s}.data_keys
WHERE person = ANY(%s) AND destroyed_at IS NULL AND person NOT IN (SELECT person FROM made)
"""
"""The statement sees the table as it was when it started, so the keys it inserts come from
`made`, the others from the table."""


class KeyStore:
    """The data keys in their own schema (`keys`). Every method is one or two statements,
    whatever the number of persons or keys asked about."""

    def __init__(
        self,
        pool: ConnectionPool,
        kek: KekRing,
        *,
        schema: str = "keys",
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.pool = pool
        self.kek = kek
        self.schema = check_schema_name(schema)
        self._cache = _Cache(cache_size)
        self._t = sql.Identifier(schema)

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(s=self._t)

    def migrate(self) -> list[int]:
        with self.pool.connection() as conn:
            return migrate(conn, self.schema, "keys")

    def ping(self) -> None:
        with self.pool.connection() as conn:
            conn.execute(self._q("SELECT 1 FROM {s}.data_keys LIMIT 1")).fetchall()

    def _unwrap(self, key_id: str, kek_id: str, wrapped: bytes) -> bytes:
        key = self._cache.get(key_id)
        if key is None:
            key = self.kek.get(kek_id).unwrap(wrapped, key_id)
            _unwraps.add(1)
            self._cache.put(key_id, key)
        return key

    def keys_for(self, persons: Iterable[str]) -> dict[str, DataKey]:
        """Each person's live data key, created for those who have none (new details are
        sealed with it). Two writers creating one person's key at once get the same one."""
        wanted = sorted(set(persons))
        if not wanted:
            return {}
        kek = self.kek.current
        fresh = [(str(uuid.uuid4()), p, os.urandom(KEY_BYTES)) for p in wanted]
        params = (
            [k for k, _, _ in fresh],
            [p for _, p, _ in fresh],
            [kek.kek_id] * len(fresh),
            [kek.wrap(key, key_id) for key_id, _, key in fresh],
            wanted,
        )
        found: dict[str, tuple[str, str, bytes]] = {}
        # One statement: the keys it creates, and the live ones it did not have to. A key
        # another writer committed while this one ran is in neither: ask again for those.
        for _attempt in range(3):
            with autocommit(self.pool) as conn:  # one statement: one round trip, atomic
                rows = conn.execute(self._q(_KEYS_FOR_SQL), params).fetchall()
            found.update({p: (k, e, bytes(w)) for p, k, e, w in rows})
            if len(found) == len(wanted):
                break
        missing = set(wanted) - set(found)
        if missing:
            raise KekError(f"no live data key could be made for {len(missing)} person(s)")
        return {
            person: DataKey(key_id, self._unwrap(key_id, kek_id, wrapped))
            for person, (key_id, kek_id, wrapped) in found.items()
        }

    def key_for(self, person: str) -> DataKey:
        return self.keys_for([person])[person]

    def open_keys(self, key_ids: Iterable[str]) -> dict[str, DataKey | None]:
        """The keys with these ids; None for a destroyed one; an id this store does not
        hold is left out (a misconfigured store is not an erasure). Asks the store each
        time, so a key destroyed by another process is never used from a cache."""
        ids = sorted({k for k in key_ids if k})
        if not ids:
            return {}
        with autocommit(self.pool) as conn:
            rows = conn.execute(
                self._q(
                    "SELECT key_id::text, kek_id, wrapped FROM {s}.data_keys"
                    " WHERE key_id = ANY(%s::uuid[])"
                ),
                (ids,),
            ).fetchall()
        found: dict[str, DataKey | None] = {}
        gone: list[str] = []
        for key_id, kek_id, wrapped in rows:
            if wrapped is None:
                found[key_id] = None
                gone.append(key_id)
            else:
                found[key_id] = DataKey(key_id, self._unwrap(key_id, kek_id, bytes(wrapped)))
        self._cache.drop(gone)
        return found

    def destroy(self, person: str, legal_basis: str) -> list[str]:
        """Destroy every live key of the person (the wrapped key is overwritten with NULL);
        returns the ids destroyed now ([] if none was live: erasure is idempotent)."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                self._q(
                    "UPDATE {s}.data_keys SET wrapped = NULL, destroyed_at = now(),"
                    " legal_basis = %s WHERE person = %s AND destroyed_at IS NULL"
                    " RETURNING key_id::text"
                ),
                (legal_basis, person),
            ).fetchall()
        ids = sorted(r[0] for r in rows)
        self._cache.drop(ids)
        _destroyed.add(len(ids))
        return ids

    def states(self, persons: Sequence[str]) -> dict[str, list[KeyState]]:
        """Every key each person ever had, oldest first (none: an empty list)."""
        out: dict[str, list[KeyState]] = {p: [] for p in persons}
        if not out:
            return out
        with self.pool.connection() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT key_id::text, person, created_at, destroyed_at, legal_basis"
                    " FROM {s}.data_keys WHERE person = ANY(%s) ORDER BY created_at, key_id"
                ),
                (list(out),),
            ).fetchall()
        for row in rows:
            out[row[1]].append(KeyState(*row))
        return out

    def rewrap(self, batch_size: int = 500) -> int:
        """Re-wrap every live key not under the current KEK with it (KEK rotation); returns
        how many moved. Safe to re-run and to interrupt: each batch commits on its own."""
        kek = self.kek.current
        moved = 0
        while True:
            with self.pool.connection() as conn, conn.transaction():
                rows = conn.execute(
                    self._q(
                        "SELECT key_id::text, kek_id, wrapped FROM {s}.data_keys"
                        " WHERE destroyed_at IS NULL AND kek_id <> %s"
                        " ORDER BY key_id LIMIT %s FOR UPDATE SKIP LOCKED"
                    ),
                    (kek.kek_id, batch_size),
                ).fetchall()
                if not rows:
                    return moved
                updates: list[Any] = []
                for key_id, kek_id, wrapped in rows:
                    key = self.kek.get(kek_id).unwrap(bytes(wrapped), key_id)
                    updates.append((key_id, kek.wrap(key, key_id)))
                conn.execute(
                    self._q(
                        "UPDATE {s}.data_keys d SET kek_id = %s, wrapped = u.wrapped"
                        " FROM unnest(%s::uuid[], %s::bytea[]) AS u(key_id, wrapped)"
                        " WHERE d.key_id = u.key_id AND d.destroyed_at IS NULL"
                    ),
                    (kek.kek_id, [u[0] for u in updates], [u[1] for u in updates]),
                )
                moved += len(rows)


def open_key_store(settings: Settings, *, schema: str = "keys", max_size: int = 5) -> KeyStore:
    """The migrated key store on a pool of its own (LIKVARD_KEYS_DATABASE_URL); the caller
    closes it with `store.pool.close()`."""
    kek = kek_from_settings(settings)
    pool = make_pool(settings.require_keys_database(), max_size=max_size, name="likvard-keys")
    store = KeyStore(pool, kek, schema=schema)
    try:
        store.migrate()
    except Exception:
        pool.close()
        raise
    return store
