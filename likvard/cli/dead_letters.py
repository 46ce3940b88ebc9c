"""`likvard dlq`: read the dead-letter topic and re-submit records after a fix.

A dead letter holds a district's refused record in full, personal data included. Operations
(`list`, `show`, `retry`) see why it was refused, its codes, coordinates and the names of its
fields; the values of the record (`show --payload`) only an auditor sees: the operator's
verified token (LIKVARD_TOKEN) must allow `PAYLOAD_ACTION`, and the read is recorded in the
access log before anything is shown, like every command-line read
(`likvard.cli.operator.record_read`)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import typer

from likvard.cli.base import (
    app,
    console,
    fail,
    settings_or_exit,
    stdout,
)
from likvard.config import ConfigError, Settings
from likvard.policy import Action

if TYPE_CHECKING:
    from likvard import dlq
    from likvard.codec import Decoded

PAYLOAD_ACTION = Action.REPLAY
"""What reading a dead letter's values takes: the auditor's read of records straight from
the log (`likvard replay`), the nearest of the policy's actions; operations' `OPS_READ`
does not reach personal data."""
PAYLOAD_REFUSED = (
    "--payload prints the district's refused record, which may hold personal data: only an"
    " auditor may read it. Set LIKVARD_TOKEN to an auditor's token (`likvard dlq show`"
    " without --payload shows why it was refused, its codes and field names)"
)

# --- dead letters -------------------------------------------------------------------------
dlq_app = typer.Typer(
    help="Read the dead-letter topic (district records the ingest path refused) and"
    " re-submit records after a fix.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")


def _dead_letters(settings: Settings) -> list[dlq.DeadLetter]:
    from likvard import dlq
    from likvard.ingest import DEAD_LETTER_TOPIC

    try:
        return dlq.read_all(settings.require_kafka(), settings.topic(DEAD_LETTER_TOPIC))
    except (ConfigError, dlq.DeadLetterError) as exc:
        raise fail(str(exc)) from exc


def _source(letter: dlq.DeadLetter) -> str:
    source = letter.source
    return "?" if source is None else f"{source[0]}[{source[1]}]@{source[2]}"


@dlq_app.command("list")
def dlq_list(
    stage: str = typer.Option(None, help="Only this stage: decode | schema | rule | internal"),
    code: str = typer.Option(None, help="Only this code, e.g. case-closed"),
    service: str = typer.Option(None, help="Only those judged by this service"),
    event_type: str = typer.Option(None, "--event-type", help="Only this event type"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line"),
) -> None:
    """List the dead letters, oldest first, with why each was refused."""
    import json

    from rich.table import Table

    from likvard import dlq

    if stage is not None and stage not in dlq.STAGES:
        raise fail(f"unknown stage {stage!r}; stages: {', '.join(dlq.STAGES)}")
    letters = _dead_letters(settings_or_exit())
    retried = dlq.retried_by(letters)
    chosen = dlq.select(letters, stage=stage, code=code, service=service, event_type=event_type)
    out = stdout()
    if as_json:
        for x in chosen:
            out.print_json(
                json.dumps(
                    {
                        "id": x.id,
                        "failed_at": x.failed_at,
                        "stage": x.stage,
                        "code": x.code,
                        "service": x.service,
                        "event_type": x.event_type,
                        "event_id": x.event_id,
                        "source": _source(x),
                        "retry_of": x.retry_of or None,
                        "retried_as": retried.get(x.id, []),
                        "reason": x.reason,
                    }
                ),
                indent=None,
            )
        return
    if not chosen:
        console.print(f"no dead letters{' match' if len(letters) else ''}")
        return
    table = Table("id", "failed at", "stage", "code", "event type", "source", "retries", "reason")
    for x in chosen:
        notes = []
        if x.retry_of:
            notes.append(f"retry of {x.retry_of}")
        notes += [f"failed again as {i}" for i in retried.get(x.id, [])]
        table.add_row(
            x.id,
            x.failed_at[:19],
            x.stage,
            x.code,
            x.event_type or "-",
            _source(x),
            "; ".join(notes),
            x.reason,
        )
    out.print(table)
    by_stage = Counter(x.stage for x in chosen)
    out.print(
        f"{len(chosen)} dead letter(s): "
        + ", ".join(f"{stage} {n}" for stage, n in sorted(by_stage.items()))
    )


@dlq_app.command("show")
def dlq_show(
    letter_id: str = typer.Argument(..., metavar="ID", help="<partition>:<offset>, from list"),
    payload: bool = typer.Option(
        False,
        "--payload",
        help="Also print the record's values (they may hold personal data): auditors only,"
        " with LIKVARD_TOKEN",
    ),
) -> None:
    """Show one dead letter: why it was refused, its headers, and what it holds."""
    import json

    from likvard import dlq
    from likvard.cli.operator import record_read
    from likvard.codec import Catalogue, CodecError

    settings = settings_or_exit()
    try:
        dlq.parse_id(letter_id)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if payload:
        _require_auditor(settings, f"dead-letter:{letter_id.strip()}")
    try:
        (letter,) = dlq.find(_dead_letters(settings), [letter_id])
    except ValueError as exc:
        raise fail(str(exc)) from exc
    value = letter.value or b""
    try:
        decoded: Decoded | CodecError = Catalogue.load().decode(value)
    except CodecError as exc:
        decoded = exc
    # It shows a district's record (with --payload, personal data): logged before it is.
    case_id = None if isinstance(decoded, CodecError) else _case_id(decoded)
    action = PAYLOAD_ACTION if payload else Action.OPS_READ
    record_read(settings, action, f"dead-letter:{letter.id}", case_id)
    out = stdout()
    out.print(f"[bold]dead letter {letter.id}[/bold]: {letter.stage}/{letter.code}")
    out.print(f"  reason:  {letter.reason}", markup=False)
    out.print(f"  judged by the {letter.service} service at {letter.failed_at}")
    out.print(f"  source:  {_source(letter)}")
    if letter.retry_of:
        out.print(f"  retries: dead letter {letter.retry_of}")
    key = (letter.key or b"").decode("utf-8", errors="replace")
    if not payload:
        key = dlq.shown_header("key", letter.key)
    out.print(f"  key:     {key or '(none)'}", markup=False)
    out.print(f"  value:   {len(value)} bytes, starting {value[:10].hex(' ') or '(empty)'}")
    out.print("  headers:")
    for name, raw in letter.headers:
        text = (raw or b"").decode("utf-8", errors="replace")
        if not payload:
            text = dlq.shown_header(name, raw)
        out.print(f"    {name}: {text}", markup=False, highlight=False)
    if isinstance(decoded, CodecError):
        out.print(f"  decoded: no ({decoded})")
        return
    record = dict(decoded.record)
    meta = record.pop("metadata")
    out.print(f"  decoded: {decoded.event_type} v{decoded.version}")
    for name in ("event_id", "case_id", "producer", "district", "actor", "occurred_at"):
        shown = meta.get(name)
        if not payload and isinstance(shown, str):
            shown = dlq.shown_header(name, shown)
        out.print(f"    metadata.{name}: {shown}", markup=False, highlight=False)
    if payload:
        out.print(
            json.dumps(record, default=str, ensure_ascii=False, indent=2),
            markup=False,
            highlight=False,
        )
    else:
        out.print(f"    fields: {', '.join(record)} (an auditor's --payload prints their values)")


def _require_auditor(settings: Settings, resource: str) -> None:
    """Before anything is read: the operator must be a verified token's subject whose roles
    allow PAYLOAD_ACTION (exit 1 otherwise, nothing printed of the record). A token's
    refusal is recorded in the access log (`record_read` ends the command); an
    operating-system login has no Likvärd roles, so it cannot be an auditor."""
    from datetime import UTC, datetime

    from likvard.cli.operator import operator, record_read
    from likvard.policy import SystemScope, allowed

    who = operator(settings)
    if who.principal is None:
        raise fail(f"not allowed: {PAYLOAD_REFUSED}", 1)
    decision = allowed(who.principal, PAYLOAD_ACTION, SystemScope(resource), now=datetime.now(UTC))
    if not decision.allow:
        console.print(PAYLOAD_REFUSED)
        record_read(settings, PAYLOAD_ACTION, resource)  # logs the refusal and ends it
        raise fail(f"not allowed: {PAYLOAD_REFUSED}", 1)  # not reached: the policy refused


def _case_id(decoded: Decoded) -> str | None:
    """The record's case id for the access log, only if it is a UUID: a district system's
    refused record may hold anything there, even a personal identity number."""
    import uuid

    try:
        return str(uuid.UUID(str(decoded.record["metadata"]["case_id"])))
    except (KeyError, ValueError):
        return None


@dlq_app.command("retry")
def dlq_retry(
    ids: list[str] = typer.Argument(None, metavar="[ID]...", help="Dead letters to re-submit"),
    retry_all: bool = typer.Option(
        False, "--all", help="Every dead letter that matches the filters (not yet retried)"
    ),
    stage: str = typer.Option(None, help="With --all: only this stage"),
    code: str = typer.Option(None, help="With --all: only this code"),
    service: str = typer.Option(None, help="With --all: only those judged by this service"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be re-submitted"),
) -> None:
    """Re-submit dead letters to the ingest topic after a fix; the ingest path judges them
    again (a stored event is a duplicate then, a still wrong one a new dead letter)."""
    from likvard import dlq
    from likvard.ingest import INGEST_TOPIC

    if bool(ids) == retry_all:
        raise fail("give dead-letter ids, or --all (with filters) to retry every match")
    if ids and (stage or code or service):
        raise fail("--stage, --code and --service go with --all, not with ids")
    settings = settings_or_exit()
    letters = _dead_letters(settings)
    try:
        if ids:
            chosen = dlq.find(letters, ids)
        else:
            retried = dlq.retried_by(letters)
            chosen = [
                x
                for x in dlq.select(letters, stage=stage, code=code, service=service)
                if x.id not in retried  # its newest dead letter is retried instead
            ]
            summaries = [x for x in chosen if x.is_summary]
            if summaries:  # the record itself was too large to keep: nothing to re-submit
                console.print(
                    f"skipping {len(summaries)} summary dead letter(s) (record-too-large: the"
                    " record was not kept; ask its district system to send it again)"
                )
                chosen = [x for x in chosen if not x.is_summary]
    except ValueError as exc:
        raise fail(str(exc)) from exc
    for x in chosen:
        console.print(
            f"{'would re-submit' if dry_run else 're-submitting'} {x.id}"
            f" ({x.event_type or 'unknown type'}, {x.stage}/{x.code})"
        )
    if dry_run or not chosen:
        console.print(f"{len(chosen)} dead letter(s) {'would be ' if dry_run else ''}re-submitted")
        return
    try:
        sent = dlq.retry(settings.require_kafka(), settings.topic(INGEST_TOPIC), chosen)
    except (ConfigError, dlq.DeadLetterError) as exc:
        raise fail(str(exc), 1) from exc
    console.print(f"re-submitted {sent} dead letter(s) to {settings.topic(INGEST_TOPIC)}")
