"""The web console: server-rendered pages for analysts, auditors, unit staff and case
workers, served by the projections service under `/console` (docs/console.md).

Each page reads what the reporting API reads (the same read models and functions, in this
process) or calls the service API that owns the action (the referral API for the unit
inbox, with the viewer's own access token), so there is no second source of truth. Every
page and action asks the one policy through `likvard.guard`, and every case-level view is
in the access log. No page needs JavaScript; charts are SVG drawn here by Altair and
vl-convert, the same code that draws the self-contained HTML report.
"""

from services.projections.console.routes import install_console

__all__ = ["install_console"]
