"""Who runs a command that reads case-level data straight from the database or Kafka
(`replay`, `dlq show`, `verify --stream`), and the access-log entry that read leaves.

The operator is the subject of a verified token in LIKVARD_TOKEN (`likvard token ...`, or
one from the city's identity provider), else the login of the operating-system account as
`os:<login>`. The entry is committed (service "cli") before anything is shown, as on the
HTTP side: a read the log cannot take is not made. With a token the policy also decides
(an analyst's token does not replay); an operating-system login has no Likvärd roles and
is trusted as far as its database and broker credentials go, so it is recorded, not asked.
"""

from __future__ import annotations

import getpass
import importlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from likvard.cli.base import console, fail
from likvard.config import ConfigError, Settings
from likvard.identity import InvalidPrincipal, Principal
from likvard.policy import Action, SystemScope, allowed

TOKEN_ENV = "LIKVARD_TOKEN"
SERVICE = "cli"


@dataclass(frozen=True)
class Operator:
    """The actor of command-line reads; `principal` is None for an operating-system login."""

    actor: str
    roles: str
    principal: Principal | None = None


def os_login() -> str:
    """`os:<login>` (or `os:uid-<n>` when the login is unknown or not a safe subject)."""
    try:
        login = getpass.getuser()
    except (OSError, KeyError):
        login = ""
    actor = f"os:{login}"
    try:
        Principal(actor, frozenset())  # the same rules as a token's subject
    except InvalidPrincipal:
        actor = f"os:uid-{os.getuid()}"
    return actor


def operator(settings: Settings) -> Operator:
    """The operator: LIKVARD_TOKEN verified against the identity provider, else the login.
    A token that does not verify ends the command (exit 2), naming why, never the token."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        return Operator(os_login(), "")
    from likvard.guard import AuthenticationError

    try:  # lazily: only a token needs the verifier (and its JOSE library)
        oidc = importlib.import_module("likvard.oidc")
    except ModuleNotFoundError as exc:
        raise fail(f"{TOKEN_ENV} is set, but this build has no token verifier") from exc
    try:
        principal = oidc.verifier_from_settings(settings).authenticate(token)
    except ConfigError as exc:
        raise fail(f"{TOKEN_ENV} is set, but the identity provider is not: {exc}") from exc
    except AuthenticationError as exc:
        raise fail(f"{TOKEN_ENV} is not a valid token ({exc.code}): {exc.detail}") from exc
    if not isinstance(principal, Principal):
        raise fail(f"{TOKEN_ENV}: the verifier did not name a principal")
    return Operator(principal.subject, principal.role_names, principal)


def record_read(
    settings: Settings,
    action: Action,
    resource: str,
    case_id: str | None = None,
) -> None:
    """Log that the operator reads `resource` (of `case_id`), before anything is shown.
    With a token the policy decides; a refusal is logged too and ends the command (exit 1).
    If the log cannot be written the command ends (exit 1) without reading."""
    from likvard import access_log
    from likvard.guard import AccessEntry

    who = operator(settings)
    now = datetime.now(UTC)
    if who.principal is not None:
        decision = allowed(who.principal, action, SystemScope(resource), now=now)
        allow, reason = decision.allow, decision.reason
    else:
        allow, reason = True, "os-login"
    entry = AccessEntry(
        actor=who.actor,
        roles=who.roles,
        action=str(action),
        resource=resource,
        case_id=case_id,
        allowed=allow,
        reason=reason,
        emergency_reason=None,
        service=SERVICE,
        occurred_at=now,
        trace_id=None,
    )
    try:
        writer = access_log.open_access_log(settings, SERVICE)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    except Exception as exc:  # the database: nothing is read unlogged
        raise fail(f"cannot open the access log, so nothing is read: {exc}", 1) from exc
    try:
        writer.record([entry])
    except Exception as exc:
        raise fail(f"cannot write the access log, so nothing is read: {exc}", 1) from exc
    finally:
        writer.close()
    if not allow:
        raise fail(f"not allowed: your roles do not allow {action} ({reason}); logged", 1)
    console.print(f"[dim]access logged: {who.actor} {action} {resource}[/dim]")
