"""Least privilege in PostgreSQL, on a real server: each service's role reads and appends to
its own schema and can do nothing else (rewrite or delete an event, switch off or drop the
append-only trigger, read the data keys or another service's schema); the key store's role
reads only the keys. The services' real paths run as those roles, proving the grants of
`likvard.db_roles.PARTS` are enough; the migrations run as the owner role.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool
from typer.testing import CliRunner

from likvard import db, db_roles
from likvard.cli import app
from likvard.cli.database import create_all_roles, run_migrations
from likvard.codec import Catalogue
from likvard.eventstore import EventStore
from likvard.inbox import InboxConsumer, decode_event
from likvard.keys import KekRing, KeyStore, parse_kek
from likvard.known_cases import CaseDirectory
from likvard.relay import OutboxRelay
from likvard.topics import SERVICE_TOPICS
from tests.support import closed, consume, intake_event, reopened

pytestmark = pytest.mark.integration

PASSWORD = "likvard-test-role-password"
ROLE_ENV = {db_roles.password_variable(r): PASSWORD for r in db_roles.roles()}
DENIED = (psycopg.errors.InsufficientPrivilege, psycopg.errors.RaiseException)


@pytest.fixture(scope="module")
def role_urls(database_url: str) -> dict[str, str]:
    """The roles on the test server (created as its superuser, like `likvard db roles` on
    one shared database): role -> its URL."""
    create_all_roles(database_url, per_service=False, env=ROLE_ENV, say=lambda _: None)
    return {r: make_conninfo(database_url, user=r, password=PASSWORD) for r in db_roles.roles()}


@pytest.fixture
def migrated(
    role_urls: dict[str, str], new_schema: Callable[[str], str]
) -> Callable[..., dict[str, str]]:
    """Migrate parts as the owner into fresh schemas: part -> its schema."""

    def make(*parts: str) -> dict[str, str]:
        schemas = {p: new_schema(p.replace("-", "_")) for p in parts}
        run_migrations(
            role_urls[db_roles.OWNER],
            [db_roles.PARTS[p] for p in parts],
            per_service=False,
            schemas=schemas,
            say=lambda _: None,
        )
        return schemas

    return make


@pytest.fixture
def as_role(role_urls: dict[str, str]) -> Iterator[Callable[[str], psycopg.Connection[object]]]:
    opened: list[psycopg.Connection[object]] = []

    def connect(role: str) -> psycopg.Connection[object]:
        conn: psycopg.Connection[object] = psycopg.connect(role_urls[role], autocommit=True)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


@pytest.fixture
def role_pool(role_urls: dict[str, str]) -> Iterator[Callable[[str], ConnectionPool]]:
    pools: list[ConnectionPool] = []

    def make(role: str) -> ConnectionPool:
        pool = ConnectionPool(role_urls[role], min_size=1, max_size=4, open=False)
        pool.open(wait=True, timeout=30)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def _store(pool: ConnectionPool, schema: str, catalogue: Catalogue, topic: str) -> EventStore:
    return EventStore(pool, schema, catalogue, producer="likvard-intake", topic=topic)


def _refused(conn: psycopg.Connection[object], statement: sql.Composed) -> str:
    """The statement fails for lack of privilege (or the append-only trigger): its error."""
    with pytest.raises(DENIED) as caught:
        conn.execute(statement)
    return str(caught.value)


def test_a_service_role_appends_and_reads_but_cannot_rewrite_history(
    migrated: Callable[..., dict[str, str]],
    role_pool: Callable[[str], ConnectionPool],
    as_role: Callable[[str], psycopg.Connection[object]],
    catalogue: Catalogue,
    topic_prefix: str,
) -> None:
    schema = migrated("intake")["intake"]
    store = _store(
        role_pool("likvard_intake"), schema, catalogue, topic_prefix + SERVICE_TOPICS["intake"]
    )
    assert store.migrate() == []  # current: nothing to apply, and no DDL tried
    case = str(uuid.uuid4())
    store.append(case, 0, [closed()])  # events without personal details: no key store here
    store.append(case, 1, [reopened()])
    assert [e.stream_version for e in store.read_stream(case)] == [1, 2]
    assert store.verify() == []

    conn = as_role("likvard_intake")
    events = sql.Identifier(schema, "events")
    s = sql.Identifier(schema)
    refusals = {
        "UPDATE": sql.SQL("UPDATE {} SET event_type = 'x'").format(events),
        "DELETE": sql.SQL("DELETE FROM {}").format(events),
        "TRUNCATE": sql.SQL("TRUNCATE {}").format(events),
        "DISABLE TRIGGER": sql.SQL("ALTER TABLE {} DISABLE TRIGGER events_append_only").format(
            events
        ),
        "DISABLE TRIGGER ALL": sql.SQL("ALTER TABLE {} DISABLE TRIGGER ALL").format(events),
        "DROP TRIGGER": sql.SQL("DROP TRIGGER events_append_only ON {}").format(events),
        "DROP FUNCTION": sql.SQL("DROP FUNCTION {}.refuse_event_change()").format(s),
        "DROP TABLE": sql.SQL("DROP TABLE {}").format(events),
        "CREATE TABLE": sql.SQL("CREATE TABLE {}.mine (x int)").format(s),
        "UPDATE outbox": sql.SQL("UPDATE {}.outbox SET topic = 'elsewhere'").format(s),
        "UPDATE migrations": sql.SQL("DELETE FROM {}.schema_migrations").format(s),
    }
    for what, statement in refusals.items():
        error = _refused(conn, statement)
        assert "permission denied" in error or "must be owner" in error, (what, error)
    assert store.count() == 2
    assert store.verify() == []


def test_the_relay_publishes_and_marks_as_the_services_role(
    migrated: Callable[..., dict[str, str]],
    role_pool: Callable[[str], ConnectionPool],
    role_urls: dict[str, str],
    catalogue: Catalogue,
    topic_prefix: str,
    kafka_bootstrap: str,
) -> None:
    schema = migrated("intake")["intake"]
    store = _store(
        role_pool("likvard_intake"), schema, catalogue, topic_prefix + SERVICE_TOPICS["intake"]
    )
    cases = [str(uuid.uuid4()) for _ in range(3)]
    for case in cases:
        store.append(case, 0, [closed()])
    relay = OutboxRelay(role_urls["likvard_intake"], schema, kafka_bootstrap)
    with psycopg.connect(role_urls["likvard_intake"]) as work:
        assert relay.run_once(work) == 3  # claimed FOR UPDATE, published, deleted
    assert store.outbox_depth() == 0
    records = consume(kafka_bootstrap, store.topic, at_least=3)
    assert {(r.key or b"").decode() for r in records} == set(cases)


def test_a_role_sees_no_other_schema_and_only_the_key_role_reads_the_keys(
    migrated: Callable[..., dict[str, str]],
    role_pool: Callable[[str], ConnectionPool],
    as_role: Callable[[str], psycopg.Connection[object]],
) -> None:
    schemas = migrated("intake", "keys", "referral")
    kek = KekRing(parse_kek("test-1", base64.b64encode(os.urandom(32)).decode()))
    keys = KeyStore(role_pool("likvard_keys"), kek, schema=schemas["keys"])
    assert keys.migrate() == []
    person = "cd" * 32
    key = keys.key_for(person)
    assert keys.open_keys([key.key_id])[key.key_id] == key
    assert keys.rewrap() == 0
    assert keys.destroy(person, "test erasure") == [key.key_id]
    assert keys.open_keys([key.key_id])[key.key_id] is None

    data_keys = sql.SQL("SELECT * FROM {}").format(sql.Identifier(schemas["keys"], "data_keys"))
    for role in ("likvard_intake", "likvard_referral", "likvard_projections"):
        assert "permission denied" in _refused(as_role(role), data_keys), role
    intake_events = sql.SQL("SELECT * FROM {}").format(sql.Identifier(schemas["intake"], "events"))
    for role in ("likvard_keys", "likvard_referral", "likvard_access_log"):
        assert "permission denied" in _refused(as_role(role), intake_events), role
    referral_events = sql.SQL("SELECT * FROM {}").format(
        sql.Identifier(schemas["referral"], "events")
    )
    assert "permission denied" in _refused(as_role("likvard_intake"), referral_events)
    # The key role may not rewrite a destroyed key back either (the trigger), nor delete.
    keys_conn = as_role("likvard_keys")
    table = sql.Identifier(schemas["keys"], "data_keys")
    _refused(keys_conn, sql.SQL("UPDATE {} SET destroyed_at = NULL, wrapped = ''").format(table))
    assert "permission denied" in _refused(keys_conn, sql.SQL("DELETE FROM {}").format(table))


def test_a_consuming_service_records_its_inbox_and_known_cases_as_its_role(
    migrated: Callable[..., dict[str, str]],
    role_urls: dict[str, str],
    catalogue: Catalogue,
) -> None:
    schema = migrated("referral")["referral"]
    directory = CaseDirectory(schema)
    inbox = InboxConsumer(role_urls["likvard_referral"], schema, catalogue, directory.handle)
    case = str(uuid.uuid4())
    events = [
        intake_event(case, "IntakeRegistered", {"district": "nordost"}, 1),
        intake_event(case, "CaseClosed", {"reason": "GOALS_REACHED"}, 2),
    ]
    with psycopg.connect(role_urls["likvard_referral"], autocommit=True) as conn:
        assert inbox.handle(conn, events[:1]) == 1
        assert inbox.handle(conn, events) == 1  # the first again: a duplicate, skipped
        known = directory.get(conn, case)
    assert known is not None and known.status == "closed" and known.district == "nordost"


def test_the_projections_role_folds_events_into_the_read_models(
    migrated: Callable[..., dict[str, str]],
    role_urls: dict[str, str],
    role_pool: Callable[[str], ConnectionPool],
    catalogue: Catalogue,
    topic_prefix: str,
) -> None:
    from services.projections import readmodels

    schemas = migrated("intake", "projections")
    store = _store(
        role_pool("likvard_intake"),
        schemas["intake"],
        catalogue,
        topic_prefix + SERVICE_TOPICS["intake"],
    )
    case = str(uuid.uuid4())
    stored = store.append(case, 0, [closed(), reopened()])
    incoming = [decode_event(catalogue, store.topic, 0, e.global_position, e.data) for e in stored]
    with psycopg.connect(role_urls["likvard_projections"]) as conn:
        with conn.transaction():
            assert readmodels.apply(conn, schemas["projections"], incoming) == 2
        with conn.transaction():
            assert readmodels.apply(conn, schemas["projections"], incoming) == 0
        facts = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(schemas["projections"], "case_facts")
            )
        ).fetchone()
    assert facts == (1,)


def test_a_service_role_never_migrates_and_says_how_to(
    migrated: Callable[..., dict[str, str]],
    role_pool: Callable[[str], ConnectionPool],
    new_schema: Callable[[str], str],
    database_url: str,
    catalogue: Catalogue,
) -> None:
    pool = role_pool("likvard_intake")
    fresh = new_schema("fresh")
    with pytest.raises(db.MigrationError, match="run `likvard db migrate`"):
        _store(pool, fresh, catalogue, "t").migrate()
    schema = migrated("intake")["intake"]
    with psycopg.connect(database_url, autocommit=True) as su:  # a release behind
        su.execute(
            sql.SQL("DELETE FROM {}.schema_migrations WHERE version = 2").format(
                sql.Identifier(schema)
            )
        )
    with pytest.raises(db.MigrationError, match=r"migrations 0002 .*likvard db migrate"):
        _store(pool, schema, catalogue, "t").migrate()


def test_migrate_off_keeps_even_the_superuser_from_migrating_at_start(
    pool: ConnectionPool, schema: str, catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(db.MIGRATE_ENV, "off")
    with pytest.raises(db.MigrationError, match="likvard db migrate"):
        _store(pool, schema, catalogue, "t").migrate()
    monkeypatch.setenv(db.MIGRATE_ENV, "sometimes")
    with pytest.raises(db.MigrationError, match=r"auto .* or off"):
        _store(pool, schema, catalogue, "t").migrate()
    monkeypatch.setenv(db.MIGRATE_ENV, "auto")
    assert _store(pool, schema, catalogue, "t").migrate() == [1, 2]  # the superuser may


def test_every_table_of_every_part_has_its_grants_decided(
    migrated: Callable[..., dict[str, str]], database_url: str
) -> None:
    schemas = migrated(*db_roles.PARTS)
    with psycopg.connect(database_url) as conn:
        for name, part in db_roles.PARTS.items():
            assert db_roles.ungoverned(conn, part, schemas[name]) == [], name
            present = set(db_roles._tables(conn, schemas[name]))
            assert set(part.tables) <= present, name
            owners = conn.execute(
                "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class"
                " WHERE relnamespace = to_regnamespace(%s)",
                (schemas[name],),
            ).fetchall()
            assert owners == [(db_roles.OWNER,)], name
            # The part's role owns nothing, and holds no privilege beyond its grants.
            granted = {
                (r[0], r[1])
                for r in conn.execute(
                    "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
                    " WHERE grantee = %s AND table_schema = %s",
                    (part.role, schemas[name]),
                ).fetchall()
            }
            expected = {(g.table, p) for g in part.grants for p in g.privileges if "(" not in p}
            assert granted == expected, name


def test_migrating_as_a_role_that_may_not_is_refused_with_the_fix(
    role_urls: dict[str, str],
) -> None:
    done = CliRunner().invoke(
        app, ["db", "migrate", "intake", "--url", role_urls["likvard_intake"]], env={}
    )
    assert done.exit_code == 1
    assert "likvard db roles" in done.output
    done = CliRunner().invoke(app, ["db", "migrate", "nope", "--url", "postgresql://x@/y"])
    assert done.exit_code == 2 and "unknown part nope" in done.output
