"""`python -m likvard.cli`: the `likvard` command."""

from likvard.cli import app

app()
