"""The city's catalogue of interventions and specialist units, as reference data.

Interventions are the national guidelines' interventions for care and support in substance
abuse and addiction (Socialstyrelsen), each with its priority (1-10, 1 most recommended)
where the catalogue has one; `verified` is False for priorities not yet checked against the
guideline text. Specialist units are the units a case worker can refer a person to, each
hosted by a current district and belonging to the city's social services or to another
organisation (healthcare, the Prison and Probation Service, a non-profit), which decides
whether a referral needs the person's consent.
Data: the `interventions` and `units` of likvard/reference/reference.json (one versioned file).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from likvard.districts import DistrictRegistry, ReferenceDataError

__all__ = [
    "INTERVENTIONS_PATH",
    "INTERVENTION_KINDS",
    "RECIPIENT_KINDS",
    "SUBSTANCES",
    "UNITS_PATH",
    "CatalogueError",
    "Intervention",
    "ReferenceCatalogue",
    "SpecialistUnit",
]

_REFERENCE = Path(__file__).resolve().parent / "reference"
INTERVENTIONS_PATH = _REFERENCE / "reference.json"
UNITS_PATH = _REFERENCE / "reference.json"

INTERVENTION_KINDS = frozenset(
    {"psychosocial", "medication-assisted", "housing-support", "family-support"}
)
RECIPIENT_KINDS = frozenset(
    {"CITY_SOCIAL_SERVICES", "HEALTHCARE", "PRISON_PROBATION", "NON_PROFIT"}
)
"""The Avro enum referral.RecipientKind."""
SUBSTANCES = frozenset({"ALCOHOL", "NARCOTICS", "PHARMACEUTICALS", "GAMBLING"})
"""The Avro enum se.goteborg.likvard.Substance."""
_CITY_TZ = ZoneInfo("Europe/Stockholm")


class CatalogueError(ReferenceDataError):
    """The intervention or unit reference data is malformed or contradicts itself."""


@dataclass(frozen=True)
class Intervention:
    """An intervention in the national guidelines. `guideline_priority` is None when the
    catalogue has none; `verified` is False while the priority is unchecked."""

    code: str
    name: str
    kind: str
    substances: frozenset[str]
    guideline_priority: int | None
    verified: bool
    note: str


@dataclass(frozen=True)
class SpecialistUnit:
    """A unit that receives referrals; `recipient_kind` other than CITY_SOCIAL_SERVICES
    means a referral leaves the city's social services."""

    id: str
    name: str
    host_district: str
    recipient_kind: str
    intervention_codes: frozenset[str]

    def offers(self, code: str) -> bool:
        return code in self.intervention_codes


class ReferenceCatalogue:
    """Look-ups over the interventions and specialist units, checked against each other
    and against the districts when built."""

    def __init__(
        self,
        interventions: Iterable[Intervention],
        units: Iterable[SpecialistUnit],
        districts: DistrictRegistry,
        on: date,
    ) -> None:
        self._interventions: dict[str, Intervention] = {}
        for i in interventions:
            if i.code in self._interventions:
                raise CatalogueError(f"The intervention code {i.code!r} is listed twice.")
            self._interventions[i.code] = i
        self._units: dict[str, SpecialistUnit] = {}
        for u in units:
            if u.id in self._units:
                raise CatalogueError(f"The unit id {u.id!r} is listed twice.")
            if not districts.valid_on(u.host_district, on):
                raise CatalogueError(
                    f"Unit {u.id!r} is hosted by {u.host_district!r}, which is not a district"
                    f" in operation on {on.isoformat()}."
                )
            unknown = sorted(u.intervention_codes - self._interventions.keys())
            if unknown:
                raise CatalogueError(
                    f"Unit {u.id!r} offers unknown intervention codes: {', '.join(unknown)}."
                )
            self._units[u.id] = u

    @classmethod
    def load(
        cls,
        interventions_path: Path | None = None,
        units_path: Path | None = None,
        *,
        districts: DistrictRegistry | None = None,
        on: date | None = None,
    ) -> ReferenceCatalogue:
        """Load the JSON reference data (default: the files shipped in the package), checking
        that every unit's host district is in operation `on` (default: today in the city)."""
        i_path = interventions_path or INTERVENTIONS_PATH
        u_path = units_path or UNITS_PATH
        registry = districts if districts is not None else DistrictRegistry.load()
        day = on if on is not None else datetime.now(_CITY_TZ).date()
        try:
            interventions = [_intervention(d) for d in _read(i_path)["interventions"]]
            units = [_unit(d) for d in _read(u_path)["units"]]
        except CatalogueError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CatalogueError(
                f"The catalogue reference data ({i_path}, {u_path}) is unreadable or"
                f" malformed: {exc!r}"
            ) from exc
        return cls(interventions, units, registry, day)

    def unit(self, unit_id: str) -> SpecialistUnit | None:
        return self._units.get(unit_id)

    def intervention(self, code: str) -> Intervention | None:
        return self._interventions.get(code)

    def units(self) -> Iterator[SpecialistUnit]:
        return iter(self._units.values())

    def interventions(self) -> Iterator[Intervention]:
        return iter(self._interventions.values())


def _read(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise CatalogueError(f"{path} must hold a JSON object.")
    return doc


def _strings(value: Any, what: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogueError(f"{what} must be a list of strings.")
    return frozenset(value)


def _intervention(d: dict[str, Any]) -> Intervention:
    code = str(d["code"])
    kind = str(d["kind"])
    if kind not in INTERVENTION_KINDS:
        raise CatalogueError(f"Intervention {code!r} has the unknown kind {kind!r}.")
    substances = _strings(d["substances"], f"The substances of intervention {code!r}")
    if not substances or not substances <= SUBSTANCES:
        raise CatalogueError(
            f"Intervention {code!r} needs substances from " + ", ".join(sorted(SUBSTANCES)) + "."
        )
    priority = d.get("guideline_priority")
    if priority is not None and (
        not isinstance(priority, int) or isinstance(priority, bool) or not 1 <= priority <= 10
    ):
        raise CatalogueError(f"Intervention {code!r} has a priority outside 1-10.")
    verified = d["verified"]
    if not isinstance(verified, bool):
        raise CatalogueError(f"Intervention {code!r}: verified must be true or false.")
    if verified and priority is None:
        raise CatalogueError(f"Intervention {code!r} is marked verified but has no priority.")
    return Intervention(
        code=code,
        name=str(d["name"]),
        kind=kind,
        substances=substances,
        guideline_priority=priority,
        verified=verified,
        note=str(d.get("note") or ""),
    )


def _unit(d: dict[str, Any]) -> SpecialistUnit:
    unit_id = str(d["id"])
    kind = str(d["recipient_kind"])
    if kind not in RECIPIENT_KINDS:
        raise CatalogueError(f"Unit {unit_id!r} has the unknown recipient kind {kind!r}.")
    codes = _strings(d["intervention_codes"], f"The intervention codes of unit {unit_id!r}")
    if not codes:
        raise CatalogueError(f"Unit {unit_id!r} offers no intervention.")
    return SpecialistUnit(
        id=unit_id,
        name=str(d["name"]),
        host_district=str(d["host_district"]),
        recipient_kind=kind,
        intervention_codes=codes,
    )
