"""docs/district-integration.md is a contract district developers code against, so it must
stay true: its worked example is exactly the bytes Likvärd's codec writes, its snippets
produce them, and its code tables name exactly the codes the ingest path can give.

The sections checked are marked in the markdown with HTML comments (`<!-- example:record
-->` before a fenced block, `<!-- codes -->` ... `<!-- /codes -->` around a table)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_SECRET
from likvard import district_keys, dlq, ingest
from likvard.codec import Catalogue
from likvard.pseudonym import DOMAIN, ERROR_CODES, MAX_BATCH, VERSION, pseudonymise
from services.followup.scheduling import FOLLOWUP_NAMESPACE
from tests.district import private_key
from tests.support import RunningService

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "district-integration.md"
INGEST_SOURCE = ROOT / "likvard" / "ingest.py"
RULE_SOURCES = [
    INGEST_SOURCE,
    ROOT / "likvard" / "domain.py",
    *sorted(ROOT.glob("services/*/ingest.py")),
    *sorted(ROOT.glob("services/*/domain.py")),
]
"""Where a refusal code can come from: the envelope, the shared kernel and each service."""
AVRO_JARS = ("avro.jar", "jackson-core-asl.jar", "jackson-mapper-asl.jar", "slf4j-api.jar")
"""Avro 1.8.2 as Debian's libavro-java installs it, with what it needs at run time."""
_CODE = re.compile(r"`([a-z][a-z0-9_]*(?:-[a-z0-9_]+)+)`")
_HEXDUMP_LINE = re.compile(r"^([0-9a-f]{8})  (.{48}) {1,2}\|.*\|$")


# --- reading the document ------------------------------------------------------------------
@cache
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def fenced_after(marker: str, language: str) -> str:
    """The body of the first ```language block after `<!-- marker -->`."""
    start = doc().index(f"<!-- {marker} -->")
    match = re.compile(rf"^```{language}\n(.*?)^```$", re.S | re.M).search(doc(), start)
    assert match is not None, f"no ```{language} block after <!-- {marker} -->"
    return match.group(1)


def section(marker: str) -> str:
    """The text between `<!-- marker -->` and `<!-- /marker -->`."""
    start = doc().index(f"<!-- {marker} -->")
    return doc()[start : doc().index(f"<!-- /{marker} -->", start)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of a markdown table's body rows (header and separator left out)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def unquote(cell: str) -> str:
    assert cell.startswith("`") and cell.endswith("`"), cell
    return cell[1:-1]


def hexdump_bytes(text: str) -> bytes:
    """Bytes of a `hexdump -C` listing, checking its offsets on the way."""
    data = bytearray()
    lines = text.strip().splitlines()
    for line in lines[:-1]:
        m = _HEXDUMP_LINE.match(line)
        assert m is not None, f"not a hexdump -C line: {line!r}"
        assert int(m.group(1), 16) == len(data), line
        data += bytes.fromhex(m.group(2))
    assert int(lines[-1], 16) == len(data), "the last line must be the total length"
    return bytes(data)


# --- the worked example --------------------------------------------------------------------
@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return Catalogue.load()


@pytest.fixture(scope="module")
def record() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(fenced_after("example:record", "json"))
    return loaded


@pytest.fixture(scope="module")
def encoded(catalogue: Catalogue, record: dict[str, Any]) -> bytes:
    """What Likvärd's own codec writes for the document's record."""
    return catalogue.encode(record["metadata"]["event_type"], record)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The schemas as `likvard schemas export DIR` writes them for district developers."""
    out = tmp_path_factory.mktemp("avro")
    subprocess.run(
        [sys.executable, "-m", "likvard.cli", "schemas", "export", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def test_the_hex_dump_is_what_the_codec_writes(encoded: bytes) -> None:
    assert hexdump_bytes(fenced_after("example:hexdump", "text")).hex(" ") == encoded.hex(" ")


def test_the_annotated_bytes_add_up_to_the_encoding(encoded: bytes) -> None:
    rows = table_rows(section("example:bytes"))
    data = bytearray()
    for offset, hex_bytes, *_ in rows:
        assert int(offset) == len(data), f"offset {offset} should be {len(data)}"
        data += bytes.fromhex(unquote(hex_bytes))
    assert bytes(data).hex(" ") == encoded.hex(" ")
    assert f"The {len(encoded)} bytes" in doc()


def test_the_encoding_decodes_to_the_record(
    catalogue: Catalogue, record: dict[str, Any], encoded: bytes
) -> None:
    decoded = catalogue.decode(encoded)
    expected = json.loads(json.dumps(record))
    for name in ("occurred_at", "recorded_at"):  # timestamp-micros decode to UTC datetimes
        micros = expected["metadata"][name]
        expected["metadata"][name] = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
            microseconds=micros
        )
    assert (decoded.event_type, decoded.version) == ("CaseClosed", 1)
    assert decoded.record == expected


def test_the_fastavro_script_writes_the_same_bytes(
    tmp_path: Path, exported: Path, record: dict[str, Any], encoded: bytes
) -> None:
    script = tmp_path / "encode_event.py"
    script.write_text(fenced_after("example:encode-py", "python"), encoding="utf-8")
    (tmp_path / "caseclosed.json").write_text(json.dumps(record), encoding="utf-8")
    subprocess.run(
        [
            sys.executable,
            str(script),
            str(exported / "CaseClosed.v1.avsc"),
            str(tmp_path / "caseclosed.json"),
            str(tmp_path / "event.bin"),
        ],
        check=True,
        timeout=60,
    )
    assert (tmp_path / "event.bin").read_bytes() == encoded


def _avro_classpath() -> str | None:
    """LIKVARD_AVRO_CLASSPATH, else Debian's libavro-java jars if installed."""
    given = os.environ.get("LIKVARD_AVRO_CLASSPATH")
    if given:
        return given
    jars = [Path("/usr/share/java") / name for name in AVRO_JARS]
    return os.pathsep.join(map(str, jars)) if all(j.is_file() for j in jars) else None


def test_the_java_encoder_writes_the_same_bytes(
    tmp_path: Path, exported: Path, encoded: bytes
) -> None:
    javac, java, classpath = shutil.which("javac"), shutil.which("java"), _avro_classpath()
    if javac is None or java is None:
        pytest.skip("javac/java are not installed, so the document's Java encoder is not run")
    if classpath is None:
        pytest.skip(
            "Avro Java is not installed (Debian: libavro-java; or set LIKVARD_AVRO_CLASSPATH),"
            " so the document's Java encoder is not run"
        )
    source = fenced_after("example:encode-java", "java")
    match = re.search(r"public final class (\w+)", source)
    assert match is not None, "the Java example must declare a public final class"
    (tmp_path / f"{match.group(1)}.java").write_text(source, encoding="utf-8")
    subprocess.run(
        [javac, "-cp", classpath, "-d", str(tmp_path), str(tmp_path / f"{match.group(1)}.java")],
        check=True,
        timeout=180,
    )
    out = tmp_path / "event.bin"
    subprocess.run(
        [
            java,
            "-cp",
            os.pathsep.join([classpath, str(tmp_path)]),
            match.group(1),
            str(exported / "CaseClosed.v1.avsc"),
            str(out),
        ],
        check=True,
        timeout=180,
    )
    assert out.read_bytes().hex(" ") == encoded.hex(" ")


@pytest.mark.integration
def test_the_pseudonym_example_asks_a_running_intake(
    intake: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example, run as written against the intake service on a real server, signed in
    with the client credentials of a district system at the development provider (a real
    process): the pseudonym it gets is the one intake computes, and its answer is the
    document's."""
    monkeypatch.setenv("LIKVARD_TOKEN_URL", os.environ["LIKVARD_OIDC_ISSUER"] + "/token")
    monkeypatch.setenv("LIKVARD_INTAKE_URL", intake.base_url)
    monkeypatch.setenv("LIKVARD_CLIENT_ID", "district-system-nordost")
    monkeypatch.setenv("LIKVARD_CLIENT_SECRET", "dev")
    namespace: dict[str, Any] = {}
    exec(fenced_after("example:pseudonyms", "python"), namespace)  # runs its own assert
    assert namespace["person"] == pseudonymise("19121212-1212", TEST_SECRET)
    assert namespace["answer"] == json.loads(fenced_after("example:pseudonyms-answer", "json"))
    assert namespace["answer"]["version"] == VERSION


def test_the_pseudonym_error_table_names_every_code() -> None:
    codes = [unquote(code) for code, *_ in table_rows(section("pseudonym-errors"))]
    assert codes == list(ERROR_CODES)
    assert f"`{DOMAIN[:-1].decode()}`, a NUL byte" in doc()  # how intake computes it
    assert f"up to {MAX_BATCH} numbers" in doc() and f"more than {MAX_BATCH}," in doc()


# --- the tables and the facts they rest on -------------------------------------------------
def _loop_values(tree: ast.AST) -> dict[str, list[str]]:
    """Names bound by `for name in ("a", "b")` loops, with the strings they take."""
    bound: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.For)
            and isinstance(node.target, ast.Name)
            and isinstance(node.iter, ast.Tuple | ast.List)
            and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.iter.elts
            )
        ):
            values = [str(e.value) for e in node.iter.elts if isinstance(e, ast.Constant)]
            bound.setdefault(node.target.id, []).extend(values)
    return bound


def _expand(node: ast.expr, bound: dict[str, list[str]]) -> Iterator[str]:
    """The code strings an argument can be: a literal, or an f-string over a loop variable.
    Anything else (`exc.code`) passes on a code from elsewhere and yields nothing."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.JoinedStr):
        names = [
            v.value.id
            for v in node.values
            if isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name)
        ]
        assert len(names) == 1 and names[0] in bound, (
            f"line {node.lineno}: a code built in a way this test cannot expand; keep codes"
            " literal (or an f-string over one `for name in (...)` loop)"
        )
        for value in bound[names[0]]:
            yield "".join(
                value if isinstance(part, ast.FormattedValue) else str(getattr(part, "value", ""))
                for part in node.values
            )


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


def codes_given_by(path: Path, code_arg: dict[str, int]) -> set[str]:
    """Every code a file passes to the named calls, by the code's argument position."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bound = _loop_values(tree)
    codes: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node) in code_arg:
            position = code_arg[_call_name(node)]
            if len(node.args) > position:
                codes.update(_expand(node.args[position], bound))
    return codes


@cache
def ingest_codes() -> frozenset[str]:
    """The codes of the ingest path itself: the envelope's and the services' ingest rules."""
    codes = codes_given_by(INGEST_SOURCE, {"Rejected": 1, "_schema": 1, "_check_id": 2})
    for path in sorted(ROOT.glob("services/*/ingest.py")):
        codes |= codes_given_by(path, {"RuleViolation": 0})
    return frozenset(codes)


@cache
def source_strings() -> frozenset[str]:
    """Every string literal of the files refusal codes come from, plus the built codes."""
    found: set[str] = set(ingest_codes())
    for path in RULE_SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return frozenset(found)


def code_table() -> dict[str, str]:
    """The dead-letter code table: code -> stage."""
    return {unquote(code): stage for code, stage, *_ in table_rows(section("codes"))}


def test_the_sources_give_the_codes_this_test_expects() -> None:
    """Guards the AST reading above: if it found nothing, the next tests would prove nothing."""
    codes = ingest_codes()
    assert {"key-mismatch", "producer-invalid", "correlation-id-invalid"} <= codes
    assert {"derived-event", "case-not-found", "case-not-known", "internal-error"} <= codes


def test_every_code_in_the_code_table_is_given_by_the_code() -> None:
    unknown = sorted(set(code_table()) - source_strings())
    assert not unknown, f"the code table lists codes no source gives: {unknown}"


def test_the_code_table_lists_every_code_of_the_ingest_path() -> None:
    missing = sorted(ingest_codes() - set(code_table()))
    assert not missing, f"add these codes to the table in {DOC.name}: {missing}"
    assert set(code_table().values()) <= set(dlq.STAGES)


def test_every_code_in_the_rules_table_is_a_rule_code() -> None:
    codes = set(_CODE.findall(section("rules")))
    assert len(codes) > 50
    unknown = sorted(codes - source_strings())
    assert not unknown, f"the rules table names codes no source gives: {unknown}"


def test_the_tables_name_every_event_type_and_its_owner(catalogue: Catalogue) -> None:
    owners = {
        event_type: owner
        for owner, types in table_rows(section("owners"))
        for event_type in re.findall(r"`([A-Za-z]+)`", types)
    }
    assert owners == {t: catalogue.owner(t) for t in catalogue.event_types()}
    ruled = [unquote(row[0]) for row in table_rows(section("rules"))]
    assert sorted(ruled) == catalogue.event_types()


def test_the_facts_quoted_in_the_document_are_the_codes() -> None:
    text = doc()
    assert ingest.INGEST_TOPIC in text and ingest.DEAD_LETTER_TOPIC in text
    assert ingest.FUTURE_TOLERANCE.total_seconds() == 300 and "5 minutes" in text
    assert str(ingest.DERIVED_NAMESPACE) in text
    assert str(FOLLOWUP_NAMESPACE) in text
    headers = [
        dlq.REASON,
        dlq.STAGE,
        dlq.CODE,
        dlq.SERVICE,
        dlq.FAILED_AT,
        dlq.SOURCE_TOPIC,
        dlq.SOURCE_PARTITION,
        dlq.SOURCE_OFFSET,
        dlq.RETRY_OF,
    ]
    assert all(f"`{h}`" in text for h in headers)
    for stage in dlq.STAGES:
        assert f"**{stage}**" in text


# --- signing -------------------------------------------------------------------------------
SIGNING_HEADERS: list[list[tuple[str, bytes | None]]] = [
    [("event_type", b"CaseClosed"), ("event_id", b"9b1d3e5f-7a2c-4e6b-8d0f-1a3c5e7b9d2f")],
    [],
    [("b", b"2"), ("a", None), ("b", b"1"), ("a", b""), ("b", b"\xff"), ("b", b"10")],
    [("dlq_retry_of", b"3:2"), ("likvard-signature", b"x..y"), ("traceparent", b"00-ab")],
    [("ärende", "å".encode()), ("z", b"\x00"), ("Z", b"upper before lower")],
]


def section_three_record(catalogue: Catalogue, record: dict[str, Any]) -> tuple[bytes, bytes]:
    key = record["metadata"]["case_id"].encode()
    return key, catalogue.encode("CaseClosed", record)


def test_the_signing_input_dump_is_what_the_code_signs(
    catalogue: Catalogue, record: dict[str, Any]
) -> None:
    from likvard.district_keys import signing_input

    key, value = section_three_record(catalogue, record)
    expected = signing_input(key, value, SIGNING_HEADERS[0])
    assert hexdump_bytes(fenced_after("example:signing-input", "text")) == expected
    assert f"({len(expected)} bytes)" in section_or_text("example:signing-input")
    assert district_keys.MAGIC.decode() in doc() and district_keys.SIGNATURE_HEADER in doc()


def section_or_text(marker: str) -> str:
    """The text of the paragraph just before `<!-- marker -->`."""
    end = doc().index(f"<!-- {marker} -->")
    return doc()[doc().rindex("\n\n", 0, end - 2) : end]


def test_the_python_signing_example_is_the_reference(
    catalogue: Catalogue, record: dict[str, Any]
) -> None:
    namespace: dict[str, Any] = {}
    exec(fenced_after("example:sign-py", "python"), namespace)
    key, value = section_three_record(catalogue, record)
    for headers in SIGNING_HEADERS:
        for k, v in ((key, value), (None, None), (b"", b"")):
            assert namespace["signing_input"](k, v, headers) == district_keys.signing_input(
                k, v, headers
            )
    keys = district_keys.DistrictKeys()
    for system in ("nordost-treserva", "angered-procapita"):  # ES256 and RS256
        token = namespace["signature"](key, value, SIGNING_HEADERS[0], private_key(system), system)
        headers = [*SIGNING_HEADERS[0], ("likvard-signature", token.encode())]
        assert keys.verify(key, value, headers).id == system


def test_the_java_signing_example_verifies(
    tmp_path: Path, catalogue: Catalogue, record: dict[str, Any]
) -> None:
    """Compiled and run with the JDK alone (no Avro or Kafka jars needed)."""
    from cryptography.hazmat.primitives import serialization

    javac, java = shutil.which("javac"), shutil.which("java")
    if javac is None or java is None:
        pytest.skip("javac/java are not installed, so the document's Java signer is not run")
    source = fenced_after("example:sign-java", "java")
    (tmp_path / "LikvardSignature.java").write_text(source, encoding="utf-8")
    subprocess.run(
        [javac, "-d", str(tmp_path), str(tmp_path / "LikvardSignature.java")],
        check=True,
        timeout=180,
    )
    key = private_key("nordost-treserva")
    pkcs8 = key.private_key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "key.p8").write_bytes(pkcs8)
    case_key, value = section_three_record(catalogue, record)
    (tmp_path / "key.bin").write_bytes(case_key)
    (tmp_path / "value.bin").write_bytes(value)
    headers = [("event_type", b"CaseClosed"), ("b", b"2"), ("a", b""), ("b", b"\xff"), ("b", b"1")]
    args = []
    for n, (name, header) in enumerate(headers):
        (tmp_path / f"h{n}").write_bytes(header or b"")
        args.append(f"{name}={tmp_path / f'h{n}'}")
    out = subprocess.run(
        [
            java,
            "-cp",
            str(tmp_path),
            "LikvardSignature",
            str(tmp_path / "key.p8"),
            str(key.kid),
            "nordost-treserva",
            str(tmp_path / "key.bin"),
            str(tmp_path / "value.bin"),
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    signed = [*headers, ("likvard-signature", out.encode())]
    assert district_keys.DistrictKeys().verify(case_key, value, signed).id == "nordost-treserva"
    with pytest.raises(district_keys.BadSignature):  # and it covers the headers
        district_keys.DistrictKeys().verify(case_key, value, [*signed[1:], ("event_type", b"X")])
