"""Named fail points for fault tests: a process can be told to die at an exact spot.

Set LIKVARD_FAILPOINTS to a comma-separated list of names. Only tests set it; with it
unset these calls cost one environment look-up.
"""

from __future__ import annotations

import os

FAILPOINT_EXIT_CODE = 97


def fault_point(name: str) -> None:
    """Exit at once, without cleanup, as a crash or SIGKILL would, if `name` is armed."""
    armed = os.environ.get("LIKVARD_FAILPOINTS", "")
    if armed and name in armed.split(","):
        os._exit(FAILPOINT_EXIT_CODE)
