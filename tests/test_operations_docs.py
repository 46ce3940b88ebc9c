"""docs/operations.md stays true: the metrics its table names are the instruments the code
creates (in Prometheus's names), and every instrument is in the table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
KINDS = {
    "create_counter": "counter",
    "create_histogram": "histogram",
    "create_observable_gauge": "gauge",
}


def instruments() -> dict[str, tuple[str, str]]:
    """Instrument name -> (kind, unit), from every create_* call with literal arguments."""
    found: dict[str, tuple[str, str]] = {}
    for path in [*ROOT.glob("likvard/**/*.py"), *ROOT.glob("services/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            kind = KINDS.get(node.func.attr)
            if kind is None or not node.args or not isinstance(node.args[0], ast.Constant):
                continue
            unit = next(
                (
                    k.value.value
                    for k in node.keywords
                    if k.arg == "unit" and isinstance(k.value, ast.Constant)
                ),
                "",
            )
            found[str(node.args[0].value)] = (kind, str(unit))
    return found


def prometheus_name(name: str, kind: str, unit: str) -> str:
    """The name OpenTelemetry's Prometheus exporter gives an instrument."""
    base = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    if unit == "s" and not base.endswith("_seconds"):
        base += "_seconds"
    return base + "_total" if kind == "counter" else base


def documented() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("| metric | what | watch for |") : text.index("**Traces**")]
    names: set[str] = set()
    for line in table.splitlines()[2:]:
        if line.startswith("|"):
            names |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return names


def test_every_instrument_is_documented_and_every_documented_metric_exists() -> None:
    exported = {prometheus_name(n, *ku) for n, ku in instruments().items()}
    assert len(exported) >= 12  # the AST reading found the instruments
    assert documented() == exported
