"""`likvard schemas list|export`: what district developers get is the contract Likvärd
reads: every exported schema fingerprints, in any Avro library, to what `list` prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

from likvard.codec import Catalogue


def likvard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "likvard.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_exported_schemas_have_the_fingerprints_list_prints(tmp_path: Path) -> None:
    catalogue = Catalogue.load()
    exported = likvard("schemas", "export", str(tmp_path / "avro"))
    assert exported.returncode == 0, exported.stderr
    listed = likvard("schemas", "list")
    assert listed.returncode == 0, listed.stderr
    files = sorted((tmp_path / "avro").glob("*.avsc"))
    assert {f.name for f in files} == {
        f"{t}.v{v}.avsc" for t in catalogue.event_types() for v in catalogue.versions(t)
    }
    for f in files:
        event_type, version = f.name.split(".")[0], int(f.name.split(".")[1][1:])
        schema = parse_schema(json.loads(f.read_text(encoding="utf-8")))
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
        assert fp == catalogue.fingerprint(event_type, version), f.name
        row = next(line for line in listed.stdout.splitlines() if f"/{f.name}" in line)
        assert fp.hex(" ") in row and catalogue.owner(event_type) in row


def test_export_to_a_place_that_cannot_be_written_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = likvard("schemas", "export", str(blocker / "avro"))
    assert r.returncode == 2
    assert "cannot write to" in r.stderr
