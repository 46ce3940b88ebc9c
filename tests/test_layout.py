"""The import graph points one way: entrypoints (likvard/cli) -> services -> kernel."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "tests" not in p.parts)


def _kernel() -> list[Path]:
    return [p for p in _modules("likvard") if "cli" not in p.relative_to(ROOT / "likvard").parts]


@pytest.mark.parametrize("path", _kernel(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_kernel_imports_no_service_and_no_entrypoint(path: Path) -> None:
    wrong = {
        n for n in _imports(path) if n.split(".")[0] == "services" or n.startswith("likvard.cli")
    }
    assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


@pytest.mark.parametrize("path", _modules("services"), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_service_imports_no_other_service_and_no_entrypoint(path: Path) -> None:
    own = path.relative_to(ROOT / "services").parts[0]
    wrong = {
        n
        for n in _imports(path)
        if n.startswith("likvard.cli") or (n.startswith("services.") and n.split(".")[1] != own)
    }
    assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_layout_test_sees_the_kernel_and_the_entrypoints() -> None:
    kernel = {p.name for p in _kernel()}
    assert {"eventstore.py", "service.py", "http.py"} <= kernel
    assert "devstack.py" not in kernel and (ROOT / "likvard/cli/devstack.py").exists()
