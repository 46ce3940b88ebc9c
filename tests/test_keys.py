"""The data-key store on a real PostgreSQL: envelope encryption, destruction, rotation."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from likvard.config import ConfigError, Settings
from likvard.keys import KekError, KekRing, KeyStore, LocalKek, kek_from_settings, parse_kek

pytestmark = pytest.mark.integration


def _kek(kek_id: str = "k1") -> LocalKek:
    return LocalKek(kek_id, os.urandom(32))


@pytest.fixture
def keys(pool: ConnectionPool, schema: str) -> Iterator[KeyStore]:
    store = KeyStore(pool, KekRing(_kek()), schema=schema, cache_size=4)
    store.migrate()
    yield store


def test_a_person_keeps_one_live_key_and_it_is_stored_only_wrapped(
    keys: KeyStore, pool: ConnectionPool, schema: str
) -> None:
    first = keys.key_for("p1")
    assert keys.key_for("p1") == first and keys.key_for("p2").key_id != first.key_id
    with pool.connection() as conn:
        rows = conn.execute(f"SELECT wrapped FROM {schema}.data_keys").fetchall()
    assert len(rows) == 2
    assert all(first.key not in bytes(r[0]) for r in rows)
    assert "DataKey(" in repr(first) and first.key.hex() not in repr(first)


def test_destroyed_keys_never_open_again_even_from_another_process_cache(
    keys: KeyStore, pool: ConnectionPool, schema: str
) -> None:
    other = KeyStore(pool, keys.kek, schema=schema)  # another process, with its own cache
    k = keys.key_for("p1")
    assert other.open_keys([k.key_id])[k.key_id] == k
    assert keys.destroy("p1", "ERASURE_REQUEST") == [k.key_id]
    assert other.open_keys([k.key_id]) == {k.key_id: None}
    assert keys.destroy("p1", "ERASURE_REQUEST") == []  # idempotent
    [state] = keys.states(["p1"])["p1"]
    assert state.destroyed_at is not None and state.legal_basis == "ERASURE_REQUEST"
    assert keys.key_for("p1").key_id != k.key_id  # new details get a new key
    with pool.connection() as conn, pytest.raises(psycopg.errors.RaiseException):
        conn.execute(
            f"UPDATE {schema}.data_keys SET wrapped = '\\x00', destroyed_at = NULL"
            " WHERE key_id = %s",
            (k.key_id,),
        )


def test_the_cache_is_bounded(keys: KeyStore) -> None:
    ids = [keys.key_for(f"p{i}").key_id for i in range(10)]
    keys.open_keys(ids)
    assert len(keys._cache) == 4


def test_a_wrong_kek_is_refused_clearly(keys: KeyStore, pool: ConnectionPool, schema: str) -> None:
    k = keys.key_for("p1")
    stranger = KeyStore(pool, KekRing(_kek("k1")), schema=schema)
    with pytest.raises(KekError, match="does not open"):
        stranger.open_keys([k.key_id])


def test_rotation_rewraps_every_live_key_under_the_new_kek(
    keys: KeyStore, pool: ConnectionPool, schema: str
) -> None:
    old = keys.kek.current
    k1, k2 = keys.key_for("p1"), keys.key_for("p2")
    keys.destroy("p2", "RETENTION_PERIOD_ENDED")
    rotated = KeyStore(pool, KekRing(_kek("k2"), [old]), schema=schema)
    assert rotated.rewrap(batch_size=1) == 1 and rotated.rewrap() == 0
    only_new = KeyStore(pool, KekRing(rotated.kek.current), schema=schema)
    assert only_new.open_keys([k1.key_id, k2.key_id]) == {k1.key_id: k1, k2.key_id: None}


def test_the_kek_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="LIKVARD_KEK is not set"):
        kek_from_settings(Settings(kek=None))
    with pytest.raises(ConfigError, match="32 random bytes"):
        parse_kek("k", base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="not random"):
        parse_kek("k", base64.b64encode(b"a" * 32).decode())
    good = base64.b64encode(os.urandom(32)).decode()
    ring = kek_from_settings(Settings(kek=good, kek_id="2026-12"))
    assert ring.current.kek_id == "2026-12"


def test_sealed_text_opens_until_the_key_is_destroyed_and_a_foreign_key_is_unreadable(
    keys: KeyStore, pool: ConnectionPool, new_schema: object
) -> None:
    import uuid

    from likvard.codec import Catalogue
    from likvard.sealing import ERASED, OPEN, UNREADABLE, Sealer, ToOpen, ToSeal

    sealer = Sealer(Catalogue.load(), keys)
    event_id = str(uuid.uuid4())
    data = {"plan_id": event_id, "goals": ["Träffa barnen varje vecka"], "review_on": None}
    (sealed,) = sealer.seal([ToSeal("CarePlanAgreed", event_id, data, "p1")])
    item = ToOpen("CarePlanAgreed", event_id, sealed)
    (opened,) = sealer.open([item], show=True)
    assert opened["goals"] == data["goals"] and opened["personal"] == OPEN
    # Another key store (another city, a misconfigured service) never held the key.
    assert callable(new_schema)
    other = KeyStore(pool, keys.kek, schema=new_schema("k"))
    other.migrate()
    assert Sealer(Catalogue.load(), other).open([item], show=True)[0]["personal"] == UNREADABLE
    assert other.open_keys([sealed["personal"]["key_id"]]) == {}
    keys.destroy("p1", "ERASURE_REQUEST")
    (gone,) = sealer.open([item], show=True)
    assert gone["goals"] == [] and gone["personal"] == ERASED


def test_writers_making_one_persons_key_at_once_all_get_the_same_key(keys: KeyStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    people = [f"p-{i}" for i in range(20)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: keys.keys_for(people), range(16)))
    assert all(a == answers[0] for a in answers) and set(answers[0]) == set(people)
    states = keys.states(people)
    assert all(len(s) == 1 for s in states.values())  # one key each, none made twice
