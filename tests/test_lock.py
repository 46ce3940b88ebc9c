"""The locks match pyproject.toml, offline: installs are reproducible only while every
dependency is pinned in them (to a version its specifier allows, with hashes) and none is
stale. A dependency added to pyproject.toml without `make lock` fails here, before an
install from the old lock leaves it out."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
DEV_LOCK = ROOT / "requirements-dev.lock"  # what make installs
RUNTIME_LOCK = ROOT / "requirements.lock"  # the image's dependencies
BUILD_LOCK = ROOT / "requirements-build.lock"  # the image's build backend

# The platform the locks are for (the image's and the developers'): markers are evaluated
# here, not on whatever machine runs the test (Marker.evaluate fills in the rest).
TARGET: dict[str, str] = {
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
    "python_full_version": "3.11.10",
    "implementation_version": "3.11.10",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")
PIN = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[(?P<extras>[^\]]*)\])?==(?P<version>\S+)"
)
PROJECT_VIA = "likvard (pyproject.toml)"
BUILD_VIA = "likvard (pyproject.toml::build-system.requires)"


@dataclass(frozen=True)
class Pin:
    """One package of a lock: `name[extras]==version`, its hashes, and who asked for it."""

    name: str
    extras: frozenset[str]
    version: Version
    hashes: int
    via: tuple[str, ...]


def parse_lock(text: str) -> dict[str, Pin]:
    """The pins of a pip-compile lock, by canonical name. A requirement line that is not an
    exact `==` pin is an error: a lock with a range installs whatever is newest."""
    pins: dict[str, Pin] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#") or line.startswith(" "):
            continue
        if line.startswith("-"):
            raise ValueError(f"an option in the lock: {line.split()[0]}")
        logical = line
        while logical.endswith("\\") and i < len(lines):
            logical = logical[:-1] + " " + lines[i].strip()
            i += 1
        requirement, _, rest = logical.partition(" ")
        match = PIN.fullmatch(requirement.split(";")[0])
        if match is None:
            raise ValueError(f"not an exact pin: {requirement}")
        via: list[str] = []
        while i < len(lines) and lines[i].startswith("    #"):
            note = lines[i].strip().removeprefix("#").strip()
            via.append(note.removeprefix("via").strip())
            i += 1
        extras = match["extras"] or ""
        name = canonicalize_name(match["name"])
        pins[name] = Pin(
            name=name,
            extras=frozenset(canonicalize_name(e) for e in extras.split(",") if e.strip()),
            version=Version(match["version"]),
            hashes=len(HASH.findall(rest)),
            via=tuple(v for v in via if v),
        )
    return pins


def applies(requirement: Requirement) -> bool:
    """Whether a requirement is installed on the locks' platform."""
    return requirement.marker is None or requirement.marker.evaluate(TARGET)


def lock_problems(
    wanted: Iterable[str], pins: Mapping[str, Pin], lock: str, via: str = PROJECT_VIA
) -> list[str]:
    """What is wrong between the requirements pyproject.toml lists and one lock."""
    problems: list[str] = []
    direct: set[str] = set()
    for text in wanted:
        requirement = Requirement(text)
        if not applies(requirement):
            continue
        name = canonicalize_name(requirement.name)
        direct.add(name)
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{requirement} is in pyproject.toml but not in {lock}")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirement} is locked at {pin.version} in {lock}")
        elif missing := {canonicalize_name(e) for e in requirement.extras} - pin.extras:
            problems.append(f"{requirement}: extras {sorted(missing)} not locked in {lock}")
    for pin in pins.values():
        if pin.hashes == 0:
            problems.append(f"{pin.name}=={pin.version} has no --hash in {lock}")
        if via in pin.via and pin.name not in direct:
            problems.append(f"{pin.name} is locked in {lock} but pyproject.toml no longer lists it")
    return [f"{p} (run `make lock`)" for p in problems]


def pyproject() -> dict[str, Any]:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


def dev_requirements(project: Mapping[str, Any]) -> list[str]:
    """What make installs: the dependencies, the dev extra and the local one (`make run`)."""
    extras = project.get("optional-dependencies", {})
    return [*project["dependencies"], *extras.get("dev", []), *extras.get("local", [])]


def read_lock(path: Path) -> dict[str, Pin]:
    return parse_lock(path.read_text(encoding="utf-8"))


# --- the repository's locks ----------------------------------------------------------------
def test_the_dev_lock_pins_the_dependencies_and_the_dev_extra() -> None:
    project = pyproject()["project"]
    assert lock_problems(dev_requirements(project), read_lock(DEV_LOCK), DEV_LOCK.name) == []


def test_the_runtime_lock_pins_the_dependencies() -> None:
    project = pyproject()["project"]
    pins = read_lock(RUNTIME_LOCK)
    assert lock_problems(project["dependencies"], pins, RUNTIME_LOCK.name) == []
    # The image's dependencies alone: no test tool in production.
    assert not {"pytest", "hypothesis", "mypy", "ruff", "pip-tools"} & set(pins)


def test_the_build_lock_pins_the_build_backend() -> None:
    requires = pyproject()["build-system"]["requires"]
    pins = read_lock(BUILD_LOCK)
    assert lock_problems(requires, pins, BUILD_LOCK.name, via=BUILD_VIA) == []
    # Built without build isolation (see deploy/Dockerfile): the backend must build wheels
    # by itself (setuptools has bdist_wheel built in from 70.1).
    assert pins["setuptools"].version >= Version("70.1")


def test_the_image_runs_the_versions_the_tests_ran() -> None:
    dev = read_lock(DEV_LOCK)
    for lock in (RUNTIME_LOCK, BUILD_LOCK):
        for name, pin in read_lock(lock).items():
            if name in dev:
                assert pin.version == dev[name].version, (
                    f"{name} in {lock.name} and {DEV_LOCK.name}"
                )


def test_the_locks_hold_no_machine_specific_index() -> None:
    """Resolved against the package index alone (an option line is refused by parse_lock):
    no local mirror or wheel folder of the machine that ran `make lock`."""
    for lock in (DEV_LOCK, RUNTIME_LOCK, BUILD_LOCK):
        text = lock.read_text(encoding="utf-8")
        assert "file://" not in text and "/opt/" not in text, lock.name
        assert "autogenerated by pip-compile with Python 3.11" in text, lock.name


# --- the check itself ----------------------------------------------------------------------
LOCK = """\
#    pip-compile --generate-hashes ...
fastapi==0.165.0 \\
    --hash=sha256:{h} \\
    --hash=sha256:{h}
    # via likvard (pyproject.toml)
psycopg[binary]==3.3.9 \\
    --hash=sha256:{h}
    # via
    #   likvard (pyproject.toml)
    #   psycopg-pool
starlette==1.10.0 \\
    --hash=sha256:{h}
    # via fastapi
""".format(h="0" * 64)


def test_a_lock_is_parsed_into_pins_hashes_and_who_wants_them() -> None:
    pins = parse_lock(LOCK)
    assert set(pins) == {"fastapi", "psycopg", "starlette"}
    assert pins["fastapi"] == Pin("fastapi", frozenset(), Version("0.165.0"), 2, (PROJECT_VIA,))
    assert pins["psycopg"].extras == {"binary"}
    assert pins["psycopg"].via == (PROJECT_VIA, "psycopg-pool")
    assert pins["starlette"].via == ("fastapi",)
    assert lock_problems(["fastapi>=0.110", "psycopg[binary]>=3.1"], pins, "x.lock") == []


def test_a_dependency_added_without_relocking_is_reported() -> None:
    pins = parse_lock(LOCK)
    (problem,) = lock_problems(["fastapi", "psycopg[binary]", "left-pad>=1"], pins, "x.lock")
    assert "left-pad>=1 is in pyproject.toml but not in x.lock" in problem
    assert "make lock" in problem
    # ... and one added to the real pyproject.toml.
    project = pyproject()["project"]
    added = [*dev_requirements(project), "left-pad>=1"]
    assert lock_problems(added, read_lock(DEV_LOCK), DEV_LOCK.name)


def test_a_raised_bound_a_lost_extra_a_removed_dependency_and_a_missing_hash_are_reported() -> None:
    pins = parse_lock(LOCK)
    assert "locked at 0.165.0" in lock_problems(["fastapi>=1", "psycopg[binary]"], pins, "x")[0]
    assert "extras ['pool']" in lock_problems(["fastapi", "psycopg[pool]"], pins, "x")[0]
    (stale,) = lock_problems(["fastapi"], pins, "x")
    assert "psycopg is locked in x but pyproject.toml no longer lists it" in stale
    unhashed = parse_lock("ruff==0.17.6\n    # via likvard (pyproject.toml)\n")
    assert "no --hash" in lock_problems(["ruff"], unhashed, "x")[0]


def test_a_requirement_for_another_platform_need_not_be_locked() -> None:
    pins = parse_lock(LOCK)
    assert (
        lock_problems(["fastapi", "psycopg[binary]", "pywin32; sys_platform == 'win32'"], pins, "x")
        == []
    )


@pytest.mark.parametrize("line", ["fastapi>=0.110 \\\n    --hash=sha256:" + "0" * 64, "-e ."])
def test_a_lock_with_a_range_or_an_option_is_refused(line: str) -> None:
    with pytest.raises(ValueError):
        parse_lock(line + "\n")
