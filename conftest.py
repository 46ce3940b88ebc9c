"""Real PostgreSQL and a real Kafka-protocol broker for the integration tests.

By default both are started here (embedded PostgreSQL, Tansu); LIKVARD_TEST_DATABASE_URL
and KAFKA_BOOTSTRAP_SERVERS point the tests at external servers instead. Every test gets
its own schema and topic prefix, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard.cli.devstack import TansuBroker, broker_from, postgres_from
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.eventstore import EventStore
from likvard.topics import SERVICE_TOPICS, ensure_topics, load_topics
from tests.identity import DevIdp, running_idp
from tests.support import (
    FAST_GROUP,
    TEST_KEK,
    Background,
    CareStack,
    IngestStack,
    RunningService,
    made_schemas,
    serving,
)


@pytest.fixture(scope="session", autouse=True)
def identity_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevIdp]:
    """The development OpenID provider as a real process for the whole session: its issuer
    and audience go into os.environ before any test builds an app (a Settings built in
    code takes them from there), and tests.identity makes tokens from it."""
    from tests import identity

    names = ("LIKVARD_OIDC_ISSUER", "LIKVARD_OIDC_AUDIENCE")
    before = {name: os.environ.get(name) for name in names}
    with running_idp(tmp_path_factory.mktemp("dev-idp")) as idp:
        os.environ["LIKVARD_OIDC_ISSUER"] = idp.issuer
        os.environ["LIKVARD_OIDC_AUDIENCE"] = idp.audience
        identity.SESSION = idp
        try:
            yield idp
        finally:
            identity.SESSION = None
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def key_encryption_key() -> Iterator[str]:
    """LIKVARD_KEK for the session, as an operator sets it: every Settings built in code,
    and every process a test starts, wraps its data keys with it."""
    before = os.environ.get("LIKVARD_KEK")
    os.environ["LIKVARD_KEK"] = TEST_KEK
    try:
        yield TEST_KEK
    finally:
        if before is None:
            os.environ.pop("LIKVARD_KEK", None)
        else:
            os.environ["LIKVARD_KEK"] = before


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
        for made in (name, f"{name}_keys"):  # and the key store beside an intake schema
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(made)))


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
    """An intake event store that seals personal details, as the intake service's does
    (its key store in `<schema>_keys`, on the same pool)."""
    from likvard.keys import KeyStore, kek_from_settings
    from services.intake.personal import attach, keys_schema_for

    s = EventStore(
        pool,
        schema,
        catalogue,
        producer="likvard-intake",
        topic=topic_prefix + SERVICE_TOPICS["intake"],
    )
    s.migrate()
    keys = KeyStore(pool, kek_from_settings(Settings()), schema=keys_schema_for(schema))
    keys.migrate()
    attach(s, keys)
    return s


TEST_SECRET = b"test-pseudonym-secret-0123456789"


@pytest.fixture
def intake(
    database_url: str, schema: str, topic_prefix: str, catalogue: Catalogue, pool: ConnectionPool
) -> Iterator[RunningService]:
    """The intake service on a real uvicorn server in this process, on its own schema."""
    settings = Settings(
        database_url=database_url, pseudonym_secret=TEST_SECRET, topic_prefix=topic_prefix
    )
    yield from _running("intake", schema, settings, catalogue, pool)


@pytest.fixture
def new_schema(database_url: str) -> Iterator[Callable[[str], str]]:
    """Makes more schemas for a test (each service has its own); all dropped afterwards."""
    yield from made_schemas(database_url)


def _running(
    service: str,
    schema: str,
    settings: Settings,
    catalogue: Catalogue,
    pool: ConnectionPool,
    **app_options: object,
) -> Iterator[RunningService]:
    """A write service's app on a real uvicorn server, on its own schema."""
    import importlib

    create_app = importlib.import_module(f"services.{service}.api").create_app
    app = create_app(settings, schema=schema, catalogue=catalogue, **app_options)
    topic = settings.topic(SERVICE_TOPICS[service])
    store = EventStore(pool, schema, catalogue, producer=f"likvard-{service}", topic=topic)
    with serving(app) as base_url:
        yield RunningService(base_url, schema, topic, store)


@pytest.fixture
def referral(
    database_url: str,
    new_schema: Callable[[str], str],
    topic_prefix: str,
    catalogue: Catalogue,
    pool: ConnectionPool,
) -> Iterator[RunningService]:
    settings = Settings(database_url=database_url, topic_prefix=topic_prefix)
    yield from _running("referral", new_schema("r"), settings, catalogue, pool, case_wait=0.5)


@pytest.fixture
def followup(
    database_url: str,
    new_schema: Callable[[str], str],
    topic_prefix: str,
    catalogue: Catalogue,
    pool: ConnectionPool,
) -> Iterator[RunningService]:
    settings = Settings(database_url=database_url, topic_prefix=topic_prefix)
    yield from _running("followup", new_schema("f"), settings, catalogue, pool, case_wait=0.5)


@pytest.fixture
def care_stack(
    intake: RunningService,
    referral: RunningService,
    followup: RunningService,
    database_url: str,
    kafka_bootstrap: str,
    catalogue: Catalogue,
    pool: ConnectionPool,
) -> Iterator[CareStack]:
    """The three services with their relays and consumers running in threads."""
    from confluent_kafka import Consumer

    from likvard.inbox import InboxConsumer, consumer_config
    from likvard.known_cases import CaseDirectory
    from likvard.relay import OutboxRelay
    from services.followup.process import make_handler
    from services.followup.service import make_service, prepare

    directory = CaseDirectory(followup.schema)
    with pool.connection() as conn:
        directory.migrate(conn)
        prepare(conn, followup.schema)
    referral_inbox = InboxConsumer(
        database_url, referral.schema, catalogue, CaseDirectory(referral.schema).handle
    )
    followup_inbox = InboxConsumer(
        database_url,
        followup.schema,
        catalogue,
        make_handler(make_service(followup.store), directory),
    )
    bg = Background()
    try:
        for svc in (intake, referral, followup):
            bg.start(OutboxRelay(database_url, svc.schema, kafka_bootstrap, idle_wait=0.2).run)
        group = f"t-{uuid.uuid4()}"
        bg.start(
            referral_inbox.run,
            Consumer(consumer_config(kafka_bootstrap, group + "-r", **FAST_GROUP)),
            [intake.topic],
        )
        bg.start(
            followup_inbox.run,
            Consumer(consumer_config(kafka_bootstrap, group + "-f", **FAST_GROUP)),
            [intake.topic, referral.topic],
        )
        yield CareStack(intake, referral, followup, followup_inbox)
    finally:
        bg.close()


@pytest.fixture
def ingest_stack(
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
    catalogue: Catalogue,
    pool: ConnectionPool,
) -> Iterator[IngestStack]:
    """The three services as district ingest needs them, each on its own schema: relays,
    the referral and follow-up consumers (cases learnt from intake), and an ingest worker
    per service in its own consumer group, counting into an in-memory metric reader."""
    from confluent_kafka import Consumer
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from likvard.inbox import InboxConsumer, consumer_config
    from likvard.ingest import (
        DEAD_LETTER_TOPIC,
        INGEST_TOPIC,
        DeadLetterSink,
        IngestMetrics,
        IngestWorker,
    )
    from likvard.known_cases import CaseDirectory
    from likvard.relay import OutboxRelay
    from services.followup import ingest as followup_ingest
    from services.followup.process import make_handler
    from services.followup.service import make_service
    from services.intake import ingest as intake_ingest
    from services.referral import ingest as referral_ingest

    settings = Settings(
        database_url=database_url,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        case_wait_seconds=15,
    )
    schemas = {s: new_schema(s[0]) for s in ("intake", "referral", "followup")}
    processors = {
        "intake": intake_ingest.build(settings, schemas["intake"]),
        "referral": referral_ingest.build(settings, schemas["referral"]),
        "followup": followup_ingest.build(settings, schemas["followup"]),
    }
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test-ingest")
    bg = Background()
    workers = {}
    try:
        group = f"t-{uuid.uuid4()}"
        for schema in schemas.values():
            bg.start(OutboxRelay(database_url, schema, kafka_bootstrap, idle_wait=0.2).run)
        topic = {s: settings.topic(SERVICE_TOPICS[s]) for s in schemas}
        referral_inbox = InboxConsumer(
            database_url,
            schemas["referral"],
            catalogue,
            CaseDirectory(schemas["referral"]).handle,
        )
        followup_store = processors["followup"].store
        followup_inbox = InboxConsumer(
            database_url,
            schemas["followup"],
            catalogue,
            make_handler(make_service(followup_store), CaseDirectory(schemas["followup"])),
        )
        bg.start(
            referral_inbox.run,
            Consumer(consumer_config(kafka_bootstrap, group + "-r", **FAST_GROUP)),
            [topic["intake"]],
        )
        bg.start(
            followup_inbox.run,
            Consumer(consumer_config(kafka_bootstrap, group + "-f", **FAST_GROUP)),
            [topic["intake"], topic["referral"]],
        )
        for service, processor in processors.items():
            worker = IngestWorker(
                processor,
                DeadLetterSink(kafka_bootstrap, settings.topic(DEAD_LETTER_TOPIC), service),
                batch_size=50,
                metrics_=IngestMetrics(meter, service),
            )
            workers[service] = worker
            bg.start(
                worker.run,
                Consumer(consumer_config(kafka_bootstrap, f"{group}-{service}-i", **FAST_GROUP)),
                settings.topic(INGEST_TOPIC),
            )
        yield IngestStack(
            settings,
            {s: p.store for s, p in processors.items()},
            workers,
            topic,
            settings.topic(INGEST_TOPIC),
            settings.topic(DEAD_LETTER_TOPIC),
            reader,
        )
    finally:
        bg.close()
        for processor in processors.values():
            processor.store.pool.close()
