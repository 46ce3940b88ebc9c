"""The city's districts as reference data with validity dates.

The city reorganises its districts (ten district committees 2011-2020, four social services
areas from 2021); events keep the code valid when they happened, and reports map old codes
to their successors so figures stay comparable across a reorganisation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent / "reference" / "districts.json"


@dataclass(frozen=True)
class District:
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
    def __init__(self, districts: Iterable[District]) -> None:
        self._by_code = {d.code: d for d in districts}

    @classmethod
    def load(cls, path: Path | None = None) -> DistrictRegistry:
        doc = json.loads((path or DEFAULT_PATH).read_text(encoding="utf-8"))
        return cls(
            District(
                code=d["code"],
                name=d["name"],
                kind=d["kind"],
                valid_from=date.fromisoformat(d["valid_from"]),
                valid_to=date.fromisoformat(d["valid_to"]) if d.get("valid_to") else None,
                successor=d.get("successor"),
                successor_confirmed=bool(d.get("successor_confirmed", False)),
            )
            for d in doc["districts"]
        )

    def get(self, code: str) -> District | None:
        return self._by_code.get(code)

    def is_known(self, code: str) -> bool:
        return code in self._by_code

    def valid_on(self, code: str, day: date) -> bool:
        d = self._by_code.get(code)
        return d is not None and d.valid_on(day)

    def current(self, day: date) -> list[District]:
        return [d for d in self._by_code.values() if d.valid_on(day)]

    def successor_of(self, code: str) -> str:
        """The code in the newest structure (follows successors; unknown codes unchanged)."""
        seen = {code}
        while (d := self._by_code.get(code)) is not None and d.successor:
            code = d.successor
            if code in seen:
                break
            seen.add(code)
        return code
