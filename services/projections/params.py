"""Query parameters the reporting routes share, checked the same way everywhere."""

from __future__ import annotations

from likvard import http
from likvard.districts import DistrictRegistry
from services.projections import reports
from services.projections.reports import Structure


def check_district(registry: DistrictRegistry, code: str | None, structure: Structure) -> None:
    """A district filter must name a district (or `city`) that exists in the structure:
    422 otherwise, naming the successor of a district merged away."""
    if code is None or code == reports.CITY:
        return
    if registry.get(code) is None:
        raise http.ProblemError(
            422, "unknown-district", "Unknown district", f"No district has the code {code!r}."
        )
    if structure == "current" and registry.successor_of(code) != code:
        raise http.ProblemError(
            422,
            "district-not-in-structure",
            "District not in this structure",
            f"{code!r} was succeeded by {registry.successor_of(code)!r}; ask for that"
            " district, or for structure=as-recorded.",
        )
