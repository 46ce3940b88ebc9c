"""`likvard schemas`: the event contract for district producers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from likvard.cli.base import (
    app,
    console,
    fail,
    stdout,
)

if TYPE_CHECKING:
    pass

# --- the contract ------------------------------------------------------------------------
schemas_app = typer.Typer(
    help="The event contract (schemas/): fingerprints and standalone schemas for producers.",
    no_args_is_help=True,
)
app.add_typer(schemas_app, name="schemas")


@schemas_app.command("list")
def schemas_list() -> None:
    """Every event type and version with the fingerprint its records' header carries."""
    from rich.table import Table

    from likvard.codec import Catalogue

    catalogue = Catalogue.load()
    table = Table("event type", "version", "owner", "fingerprint (header bytes 3-10)", "file")
    for w in catalogue.writers():
        if w.primary:
            table.add_row(
                w.event_type,
                str(w.version),
                catalogue.owner(w.event_type),
                w.fingerprint.hex(" "),
                f"schemas/{w.path}",
            )
    stdout().print(table)


@schemas_app.command("export")
def schemas_export(
    out: Path = typer.Argument(..., help="Folder to write <EventType>.v<N>.avsc files into"),
) -> None:
    """Write every event version as one standalone schema (common types inlined): parsed
    by any Avro library, it gives the fingerprint Likvärd expects."""
    import json

    from likvard.codec import Catalogue

    catalogue = Catalogue.load()
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = 0
        for w in catalogue.writers():
            if w.primary:
                path = out / f"{w.event_type}.v{w.version}.avsc"
                path.write_text(
                    json.dumps(w.schema, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
                )
                written += 1
    except OSError as exc:
        raise fail(f"cannot write to {out}: {exc.strerror}") from exc
    console.print(f"wrote {written} schemas to {out}")
