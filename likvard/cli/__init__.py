"""The `likvard` command: entrypoints that wire the kernel and the services together.

The kernel (`likvard/` outside this package) imports no service; these modules may. One
module per command group; importing this package registers every command on `app`, in the
order `likvard --help` lists them."""

# isort: skip_file
from likvard.cli.base import APPS, CONSUMERS, INGESTERS, READ_APPS, app
from likvard.cli import (
    workers,
    history,
    audit,
    stack,
    dead_letters,
    contract,
    identity as identity,
    database as database,
    records as records,
    indicators as indicators,
)

__all__ = [
    "APPS",
    "CONSUMERS",
    "INGESTERS",
    "READ_APPS",
    "app",
    "audit",
    "contract",
    "dead_letters",
    "history",
    "stack",
    "workers",
]
