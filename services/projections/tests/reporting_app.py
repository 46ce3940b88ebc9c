"""The reporting app (and its console) serving over read models folded from given events:
what the console's and the read-your-writes tests start."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg

from likvard.config import Settings
from likvard.inbox import Incoming
from services.projections import readmodels
from services.projections.api import create_app
from tests.support import serving


@contextmanager
def reporting_app(
    database_url: str, schema: str, log_schema: str, events: Sequence[Incoming]
) -> Iterator[str]:
    """Fold `events` into `schema`, then serve the app on it; yields its base URL (the
    access log goes to `log_schema`). Set LIKVARD_CONSOLE_SECRET first for the console."""
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, schema)
        readmodels.apply(conn, schema, events)
    app = create_app(
        Settings(database_url=database_url), schema=schema, access_log_schema=log_schema
    )
    with serving(app) as base:
        yield base
