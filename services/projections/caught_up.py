"""Read your writes: a reader passes the position tokens its writes answered with
(`Likvard-Position`), as `?after=TOKEN` or the `Likvard-After` header (several: comma
separated), and the reporting API and the console wait, up to a bound, until the read
models have folded those events, then answer. Past the bound: 503 with `Retry-After`, so
a script never mistakes "not projected yet" for "not there" (a 404)."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import psycopg
from fastapi import Request
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard.db import check_schema_name
from likvard.http import AFTER_HEADER, ProblemError

MAX_TOKENS = 20
POLL_SECONDS = (0.01, 0.2)  # the first wait between looks, growing to the last
# Routes whose `after` is their own page cursor: the header is the way there.
QUERY_EXEMPT = frozenset({"/access-log", "/console/access-log"})
WAIT_ENV = "LIKVARD_READ_WAIT_SECONDS"


def wait_bound() -> float:
    """How long a read waits for its writes (LIKVARD_READ_WAIT_SECONDS, default 10)."""
    text = os.environ.get(WAIT_ENV) or "10"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 120:
        raise ValueError(f"{WAIT_ENV} must be 0-120 seconds, not {text!r}")
    return value


def parse_tokens(*given: str | None) -> list[uuid.UUID]:
    """The event ids of the tokens given (query and header); 400 for a malformed one."""
    texts = [t.strip() for g in given if g for t in g.split(",") if t.strip()]
    if len(texts) > MAX_TOKENS:
        raise ProblemError(
            400, "too-many-positions", "Too many positions", f"At most {MAX_TOKENS} tokens."
        )
    try:
        return [uuid.UUID(t) for t in texts]
    except ValueError:
        raise ProblemError(
            400,
            "bad-position",
            "Bad position token",
            "A position token is the `Likvard-Position` header of a write's answer.",
        ) from None


def missing(conn: psycopg.Connection[Any], schema: str, ids: list[uuid.UUID]) -> int:
    """How many of the events the read models have not folded yet."""
    t = sql.Identifier(check_schema_name(schema))
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {}.processed WHERE event_id = ANY(%s)").format(t), (ids,)
    ).fetchone()
    return len(set(ids)) - (int(row[0]) if row else 0)


def wait_until_projected(
    pool: ConnectionPool, schema: str, ids: list[uuid.UUID], bound: float
) -> bool:
    """True once every event is in the read models, False when `bound` seconds passed."""
    deadline = time.monotonic() + bound
    pause = POLL_SECONDS[0]
    while True:
        with pool.connection() as conn:
            if missing(conn, schema, ids) == 0:
                return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, POLL_SECONDS[1])


def caught_up_dependency(schema: str) -> Any:
    """A dependency for every reporting route: wait for the tokens asked for, if any."""

    def caught_up(request: Request) -> None:
        # Read from the request, not declared as parameters: every route takes them, and
        # the route's own `after` (a page cursor) must stay its own in the API document.
        header = request.headers.get(AFTER_HEADER)
        query = None if request.url.path in QUERY_EXEMPT else request.query_params.get("after")
        ids = parse_tokens(query, header)
        if not ids:
            return
        bound = wait_bound()
        if not wait_until_projected(request.app.state.pool, schema, ids, bound):
            raise ProblemError(
                503,
                "not-yet-projected",
                "Not projected yet",
                f"The read models have not caught up with the writes asked for within {bound:g}"
                " s; retry shortly.",
                headers={"Retry-After": "1"},
            )

    return caught_up
