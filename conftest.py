"""Real PostgreSQL and a real Kafka-protocol broker for the integration tests.

By default both are started here (embedded PostgreSQL, Tansu); LIKVARD_TEST_DATABASE_URL
and KAFKA_BOOTSTRAP_SERVERS point the tests at external servers instead. Every test gets
its own schema and topic prefix, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.devstack import TansuBroker, broker_from, postgres_from
from likvard.eventstore import EventStore
from likvard.topics import SERVICE_TOPICS, ensure_topics, load_topics
from tests.support import RunningService, serving


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with postgres_from("LIKVARD_TEST_DATABASE_URL") as url:
        yield url


@pytest.fixture(scope="session")
def broker() -> Iterator[TansuBroker | None]:
    """The test-owned broker (None when KAFKA_BOOTSTRAP_SERVERS names an external one)."""
    with broker_from() as b:
        yield b


@pytest.fixture(scope="session")
def kafka_bootstrap(broker: TansuBroker | None) -> str:
    return broker.bootstrap if broker is not None else os.environ["KAFKA_BOOTSTRAP_SERVERS"]


@pytest.fixture(scope="session")
def catalogue() -> Catalogue:
    return Catalogue.load()


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def topic_prefix(kafka_bootstrap: str) -> str:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(kafka_bootstrap, load_topics(prefix=prefix))
    return prefix


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    p = ConnectionPool(database_url, min_size=1, max_size=20, open=False)
    p.open(wait=True, timeout=30)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def store(pool: ConnectionPool, schema: str, catalogue: Catalogue, topic_prefix: str) -> EventStore:
    s = EventStore(
        pool,
        schema,
        catalogue,
        producer="likvard-intake",
        topic=topic_prefix + SERVICE_TOPICS["intake"],
    )
    s.migrate()
    return s


TEST_SECRET = b"test-pseudonym-secret-0123456789"


@pytest.fixture
def intake(
    database_url: str, schema: str, topic_prefix: str, catalogue: Catalogue, pool: ConnectionPool
) -> Iterator[RunningService]:
    """The intake service on a real uvicorn server in this process, on its own schema."""
    from services.intake.api import create_app

    settings = Settings(
        database_url=database_url, pseudonym_secret=TEST_SECRET, topic_prefix=topic_prefix
    )
    app = create_app(settings, schema=schema, catalogue=catalogue)
    topic = topic_prefix + SERVICE_TOPICS["intake"]
    store = EventStore(pool, schema, catalogue, producer="likvard-intake", topic=topic)
    with serving(app) as base_url:
        yield RunningService(base_url, schema, topic, store)


@pytest.fixture
def referral_schema(database_url: str) -> Iterator[str]:
    """The referral service's own schema (a service has one; tests need two at once)."""
    name = f"r_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def referral(
    database_url: str,
    referral_schema: str,
    topic_prefix: str,
    catalogue: Catalogue,
    pool: ConnectionPool,
) -> Iterator[RunningService]:
    """The referral service on a real uvicorn server, on its own schema."""
    from services.referral.api import create_app

    settings = Settings(database_url=database_url, topic_prefix=topic_prefix)
    app = create_app(settings, schema=referral_schema, catalogue=catalogue, case_wait=0.5)
    topic = topic_prefix + SERVICE_TOPICS["referral"]
    store = EventStore(pool, referral_schema, catalogue, producer="likvard-referral", topic=topic)
    with serving(app) as base_url:
        yield RunningService(base_url, referral_schema, topic, store)
