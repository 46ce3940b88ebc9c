"""The city's districts as reference data with validity dates.

The city reorganises its districts (ten district committees 2011-2020, four social services
areas from 2021). Events keep the district code that was valid when they happened, and
reports map old codes to their successors, so figures stay comparable across a
reorganisation. Data: the `districts` of likvard/reference/reference.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_PATH", "KINDS", "District", "DistrictRegistry", "ReferenceDataError"]

DEFAULT_PATH = Path(__file__).resolve().parent / "reference" / "reference.json"
KINDS = frozenset({"district-committee", "social-services-area"})
"""district-committee: stadsdelsnämnd (2011-2020); social-services-area: socialförvaltning
(from 2021)."""


class ReferenceDataError(ValueError):
    """The district reference data contradicts itself (caught when it is loaded)."""


@dataclass(frozen=True)
class District:
    """One district of one organisational structure, valid from/to a date (both inclusive;
    valid_to None = still valid). `successor` is the district that took over its cases in
    the next structure; `successor_confirmed` is False while that mapping is provisional."""

    code: str
    name: str
    valid_from: date
    valid_to: date | None
    kind: str
    successor: str | None
    successor_confirmed: bool

    def valid_on(self, day: date) -> bool:
        return self.valid_from <= day and (self.valid_to is None or day <= self.valid_to)


class DistrictRegistry:
    """Look-ups over the districts: is a code known, valid on a day, what succeeded it."""

    def __init__(self, districts: Iterable[District]) -> None:
        self._by_code: dict[str, District] = {}
        for d in districts:
            if d.code in self._by_code:
                raise ReferenceDataError(f"The district code {d.code!r} is listed twice.")
            if d.valid_to is not None and d.valid_to < d.valid_from:
                raise ReferenceDataError(f"District {d.code!r} ends before it starts.")
            self._by_code[d.code] = d
        for d in self._by_code.values():
            if d.successor is not None and d.successor not in self._by_code:
                raise ReferenceDataError(
                    f"District {d.code!r} names the successor {d.successor!r},"
                    " which is not a known district."
                )

    @classmethod
    def load(cls, path: Path | None = None) -> DistrictRegistry:
        """Load the JSON reference data (default: the file shipped in the package)."""
        source = path or DEFAULT_PATH
        try:
            doc = json.loads(source.read_text(encoding="utf-8"))
            return cls(_district(d) for d in doc["districts"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, ReferenceDataError):
                raise
            raise ReferenceDataError(
                f"The district reference data {source} is unreadable or malformed: {exc!r}"
            ) from exc

    def __iter__(self) -> Iterator[District]:
        return iter(self._by_code.values())

    def get(self, code: str) -> District | None:
        return self._by_code.get(code)

    def is_known(self, code: str) -> bool:
        return code in self._by_code

    def valid_on(self, code: str, day: date) -> bool:
        """Whether `code` is a district on `day`; unknown codes never are."""
        d = self._by_code.get(code)
        return d is not None and d.valid_on(day)

    def current(self, day: date) -> list[District]:
        """The districts valid on `day`, in the order of the reference data."""
        return [d for d in self._by_code.values() if d.valid_on(day)]

    def successor_of(self, code: str) -> str:
        """The code that continues `code` in the newest structure: its successor (followed
        to the end of the chain), or the code itself if it has none. Unknown codes are
        returned unchanged, so a report groups them on their own instead of failing."""
        seen = {code}
        while (d := self._by_code.get(code)) is not None and d.successor is not None:
            code = d.successor
            if code in seen:  # a cycle in the data; stop rather than loop
                break
            seen.add(code)
        return code

    def with_predecessors(self, codes: Iterable[str]) -> frozenset[str]:
        """The codes and every code that became one of them through successors: a worker of
        Hisingen also works the cases recorded under Lundby, Norra and Västra Hisingen."""
        wanted = set(codes)
        found = set(wanted)
        for d in self._by_code.values():
            code: str | None = d.code
            seen: set[str] = set()
            while code is not None and code not in seen:
                if code in wanted:
                    found.add(d.code)
                    break
                seen.add(code)
                entry = self._by_code.get(code)
                code = None if entry is None else entry.successor
        return frozenset(found)

    def in_structure_of(self, code: str, day: date) -> str | None:
        """The district valid on `day` that `code` is, or became through successors; None if
        there is none (e.g. a 2021 area asked for in 2015, or an unknown code). Lets a report
        count events from both structures under the districts of one date."""
        seen: set[str] = set()
        current: str | None = code
        while current is not None and current not in seen:
            d = self._by_code.get(current)
            if d is None:
                return None
            if d.valid_on(day):
                return current
            seen.add(current)
            current = d.successor
        return None


def _district(d: dict[str, Any]) -> District:
    kind = str(d["kind"])
    if kind not in KINDS:
        raise ReferenceDataError(f"District {d.get('code')!r} has the unknown kind {kind!r}.")
    valid_to = d.get("valid_to")
    successor = d.get("successor")
    return District(
        code=str(d["code"]),
        name=str(d["name"]),
        valid_from=date.fromisoformat(d["valid_from"]),
        valid_to=date.fromisoformat(valid_to) if valid_to else None,
        kind=kind,
        successor=str(successor) if successor else None,
        successor_confirmed=bool(d.get("successor_confirmed", False)),
    )
