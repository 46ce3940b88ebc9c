"""The whole stack on one machine (`likvard up`) and the demo that fills it."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from likvard.cli.base import (
    APPS,
    CONSUMERS,
    READ_APPS,
    app,
    check_service,
    console,
    fail,
    stop_on_signals,
)
from likvard.config import ConfigError, service_port

if TYPE_CHECKING:
    pass

# The processes that seal or open personal details: they get the key store's role and the KEK.
KEY_USERS = (("serve", "intake"), ("ingest", "intake"), ("serve", "projections"))


def _role_env(env: dict[str, str], kek: str) -> Callable[..., dict[str, str]]:
    """Create the database roles and migrate as the owner (when LIKVARD_DATABASE_URL's
    role may create roles: the embedded server's does), then give back the environment
    of each process: `role_env(part, api=..., keys=...)` sets its role's URL, the access
    log's role for an API, and the key store's role and the KEK where personal details
    are sealed or opened (KEY_USERS).
    Otherwise every process connects as LIKVARD_DATABASE_URL's role, and that is said."""
    import psycopg

    from likvard import db_roles
    from likvard.cli.devstack import StackError
    from likvard.db import MigrationError

    admin = env["LIKVARD_DATABASE_URL"]
    try:
        urls = _role_urls(admin, env)
    except (psycopg.Error, MigrationError) as exc:
        raise StackError(f"preparing the database roles failed: {exc}") from exc

    def role_env(part: str, *, api: bool = False, keys: bool = False) -> dict[str, str]:
        out = {"LIKVARD_DATABASE_URL": urls[db_roles.PARTS[part].role]}
        if api or part == "access-log":
            out["LIKVARD_ACCESS_LOG_DATABASE_URL"] = urls[db_roles.PARTS["access-log"].role]
        if keys:
            out["LIKVARD_KEYS_DATABASE_URL"] = urls[db_roles.PARTS["keys"].role]
            out["LIKVARD_KEK"] = kek
        return out

    return role_env


def _role_urls(admin: str, env: dict[str, str]) -> dict[str, str]:
    from likvard import db_roles
    from likvard.cli.devstack import dev_roles, may_create_roles

    if not may_create_roles(admin):
        console.print(
            "[yellow]Database     LIKVARD_DATABASE_URL's role may not create roles: every"
            " process connects as it (no least privilege; `likvard db roles` makes the"
            " roles)[/yellow]"
        )
        urls = dict.fromkeys(db_roles.roles(), admin)
    else:
        urls = dev_roles(admin, env)
        console.print(
            f"Database     migrated as {db_roles.OWNER}; each service connects as its own"
            " role (" + ", ".join(p.role for p in db_roles.PARTS.values()) + ")"
        )
    return urls


def _answers(url: str) -> bool:
    """Whether `url` answers 200 (the development OpenID provider's JWKS)."""
    import httpx

    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


@app.command()
def demo(
    persons: int = typer.Option(2000, min=1, help="Synthetic persons"),
    years: int = typer.Option(3, min=1, max=15, help="Years of activity, up to today"),
    bias: list[str] = typer.Option(
        [], help="Planted disparity DISTRICT:metric:factor (repeatable)"
    ),
    seed: int = typer.Option(1, help="Same seed, same activity"),
) -> None:
    """Generate realistic synthetic activity through the public APIs of a running stack
    (`likvard up`), which publishes it to Kafka, with optional planted disparities. Its
    staff sign in with tokens of the development OpenID provider (LIKVARD_OIDC_ISSUER,
    else the one `likvard up` starts on port 8009)."""
    from likvard.cli.demo import DemoFailed, DemoUrls, SignInFailed, main

    try:
        urls = DemoUrls(
            *(f"http://127.0.0.1:{service_port(s)}" for s in ("intake", "referral", "followup"))
        )
        main(persons, years, bias, seed, urls, console)
    except (ValueError, ConfigError) as exc:
        raise fail(str(exc)) from exc
    except (DemoFailed, SignInFailed) as exc:
        raise fail(str(exc), 1) from exc


@app.command()
def up(
    services: str = typer.Option(
        "intake,referral,followup,projections", help="Comma-separated services to run"
    ),
    broker_port: int = typer.Option(9092, help="Port of the development broker"),
    idp_port: int = typer.Option(
        8009,
        envvar="LIKVARD_DEV_IDP_PORT",
        help="Port of the development OpenID provider (not started if LIKVARD_OIDC_ISSUER is set)",
    ),
) -> None:
    """Run the whole stack on this machine, until Ctrl-C.

    With no settings: an embedded PostgreSQL and the Tansu broker (memory only). With
    LIKVARD_DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS set, those servers are used instead.
    A process that stops is restarted after a backoff (1s doubling to 30s); the stack
    stops only on Ctrl-C, or when one keeps failing (more than 5 failed starts within 2
    minutes: exit code 1). A restarted dev broker gets its topics back, and every event
    again from the event stores (`likvard republish`).

    Sign-in: without LIKVARD_OIDC_ISSUER, a development OpenID provider (`likvard
    dev-idp`) runs as a process of its own and every service trusts it; `likvard token
    --role case-worker --district nordost` prints a token from it. The API documents are
    open (LIKVARD_PUBLIC_DOCS=1). Both are development conveniences, never production.
    """
    from likvard.cli.devstack import (
        KEK_FILE,
        EmbeddedPostgres,
        Server,
        StackError,
        Supervisor,
        TansuBroker,
        dev_kek,
        random_kek,
        wait_until,
    )
    from likvard.topics import TopicError, ensure_topics, load_topics

    wanted = [check_service(s.strip(), APPS | READ_APPS) for s in services.split(",") if s.strip()]
    started = time.monotonic()
    # Many workers share this machine: none serves an ops port (each would want the same);
    # and the probe notes would overwrite each other.
    env = {
        k: v for k, v in os.environ.items() if k not in ("LIKVARD_OPS_PORT", "LIKVARD_PROBE_FILE")
    }
    env["LIKVARD_PROBE_FILE"] = os.path.join(tempfile.gettempdir(), f"likvard-probe-{os.getpid()}")
    pg: EmbeddedPostgres | None = None
    broker: TansuBroker | None = None
    sup = Supervisor(env, say=lambda line: console.print(line, markup=False, soft_wrap=True))
    stopping = stop_on_signals()

    def make_topics() -> int:
        prefix = env.get("LIKVARD_TOPIC_PREFIX", "")
        return len(ensure_topics(env["KAFKA_BOOTSTRAP_SERVERS"], load_topics(prefix=prefix)))

    def watch_broker(dev: TansuBroker) -> None:
        def back() -> str:
            """The dev broker forgot everything: its topics first, then every stored event
            again (the event stores are the source of truth)."""
            dev.start()
            try:
                n = make_topics()
            except TopicError as exc:
                dev.stop()
                raise StackError(str(exc)) from exc
            writers = [s for s in wanted if s in APPS]
            for s in writers:
                sup.spawn(f"{s}-republish", ["republish", s], oneshot=True, env=role_env(s))
            return (
                f"restarted on {dev.bootstrap} (memory only: it forgot every record); {n}"
                f" topics re-created; republishing {', '.join(writers) or 'nothing'} from"
                " the event stores"
            )

        sup.watch(Server("tansu-broker", dev.down, back))

    keys: Path | None = None
    try:
        env["LIKVARD_OIDC_AUDIENCE"] = env.get("LIKVARD_OIDC_AUDIENCE") or "likvard"
        if env.get("LIKVARD_OIDC_ISSUER"):
            issuer = env["LIKVARD_OIDC_ISSUER"]
            console.print(f"Sign-in      {issuer} (LIKVARD_OIDC_ISSUER)")
        else:  # first: it starts while PostgreSQL and the broker do
            issuer = f"http://127.0.0.1:{idp_port}"
            keys = Path(tempfile.gettempdir()) / f"likvard-dev-idp-{os.getpid()}.json"
            env["LIKVARD_OIDC_ISSUER"] = issuer
            sup.spawn("dev-idp", ["dev-idp", "--port", str(idp_port), "--keys", str(keys)])
        env["LIKVARD_PUBLIC_DOCS"] = "1"
        if not env.get("LIKVARD_DATABASE_URL"):
            pg = EmbeddedPostgres()
            env["LIKVARD_DATABASE_URL"] = pg.start()
            sup.watch(Server("postgresql", pg.down, pg.restart))
            console.print("PostgreSQL   embedded (temporary; gone when you stop)")
        else:
            console.print("PostgreSQL   from LIKVARD_DATABASE_URL")
        if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
            broker = TansuBroker(broker_port)
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.start()
            env.setdefault("LIKVARD_CONSUMER_SESSION_TIMEOUT_MS", "4000")
            watch_broker(broker)
            console.print(f"Kafka        Tansu dev broker on {broker.bootstrap} (memory only)")
        else:
            console.print(f"Kafka        {env['KAFKA_BOOTSTRAP_SERVERS']}")
        if not env.get("LIKVARD_PSEUDONYM_SECRET"):
            env["LIKVARD_PSEUDONYM_SECRET"] = secrets.token_hex(32)
            console.print(
                "[yellow]LIKVARD_PSEUDONYM_SECRET not set: using a random one for this"
                " run (pseudonyms will differ next time)[/yellow]"
            )
        kek = env.get("LIKVARD_KEK")
        if not kek and pg is not None:
            kek = random_kek()
            console.print(
                "[yellow]LIKVARD_KEK not set: a random KEK for this run (the embedded"
                " PostgreSQL is temporary too; data encrypted now cannot be read after a"
                " restart unless you set LIKVARD_KEK)[/yellow]"
            )
        elif not kek:
            kek = dev_kek()
            console.print(
                f"[yellow]LIKVARD_KEK not set: using the development KEK in {KEK_FILE} (mode"
                " 0600, kept between runs so what it encrypted stays readable); set"
                " LIKVARD_KEK from your secret store for anything but development[/yellow]"
            )
        if not env.get("LIKVARD_CONSOLE_SECRET"):
            env["LIKVARD_CONSOLE_SECRET"] = secrets.token_urlsafe(32)
            console.print(
                "[yellow]LIKVARD_CONSOLE_SECRET not set: a random key for the console's"
                " session cookies this run (everyone signs in again after a restart)[/yellow]"
            )
        if "projections" in wanted:
            referral = f"http://127.0.0.1:{service_port('referral', env)}"
            env.setdefault("LIKVARD_REFERRAL_URL", referral)
        role_env = _role_env(env, kek)
        console.print(f"Topics       {make_topics()} ready")
        import httpx

        if keys is not None:  # it starts beside the services; ready is checked with theirs
            console.print(
                f"Sign-in      development OpenID provider on {issuer} (ready-made users,"
                " password 'dev'; `likvard dev-idp --help` lists them)"
            )
        console.print(
            "[yellow]Development conveniences, never for production: "
            + ("the development OpenID provider, " if keys is not None else "")
            + "LIKVARD_PUBLIC_DOCS=1 (/docs and /openapi.json without an ops token)[/yellow]"
        )
        ports = {name: service_port(name, env) for name in wanted}
        sup.spawn("access-log-relay", ["relay", "access-log"], env=role_env("access-log"))
        for name in wanted:
            port = ports[name]
            sup.spawn(
                f"{name}",
                ["serve", name, "--port", str(port)],
                env=role_env(name, api=True, keys=("serve", name) in KEY_USERS),
            )
            if name in READ_APPS:
                sup.spawn(f"{name}-worker", ["project"], env=role_env(name))
                continue
            sup.spawn(f"{name}-relay", ["relay", name], env=role_env(name))
            if name in CONSUMERS:
                sup.spawn(f"{name}-consumer", ["consume", name], env=role_env(name))
            sup.spawn(
                f"{name}-ingest",
                ["ingest", name],
                env=role_env(name, keys=("ingest", name) in KEY_USERS),
            )

        def all_ready() -> bool:
            sup.check()  # a child that stops at start is restarted too, or stops the stack
            if keys is not None and not _answers(f"{issuer}/jwks"):
                return False
            for name in wanted:
                try:
                    r = httpx.get(f"http://127.0.0.1:{ports[name]}/readyz", timeout=0.5)
                    if r.status_code != 200:
                        return False
                except httpx.HTTPError:
                    return False
            return True

        wait_until(
            lambda: stopping.is_set() or all_ready(),
            60,
            "the services to become ready",
            interval=0.2,
        )
        console.print(f"[green]Likvärd is up[/green] in {time.monotonic() - started:.1f}s:")
        for name in wanted:
            port = ports[name]
            console.print(f"  {name:<12} http://127.0.0.1:{port}  (API docs: /docs)")
        if "projections" in wanted:
            console.print(
                f"  {'console':<12} http://127.0.0.1:{ports['projections']}/console/"
                "  (sign in with a ready-made user, e.g. analyst / dev)"
                if keys is not None
                else f"  {'console':<12} http://127.0.0.1:{ports['projections']}/console/"
            )
        if pg is not None or broker is not None:  # the dev servers: nothing secret to show
            console.print(
                "Other likvard commands (replay, report, verify, ...) reach this stack with:\n"
                f"  export LIKVARD_DATABASE_URL='{env['LIKVARD_DATABASE_URL']}'"
                f" KAFKA_BOOTSTRAP_SERVERS={env['KAFKA_BOOTSTRAP_SERVERS']}",
                soft_wrap=True,
            )
        console.print(
            "Every API takes a bearer token; get one with (the issuer is this stack's):\n"
            f"  export LIKVARD_OIDC_ISSUER={issuer}\n"
            "  TOKEN=$(likvard token --role case-worker --district nordost)\n"
            '  curl -H "Authorization: Bearer $TOKEN"'
            f" http://127.0.0.1:{ports.get('intake', 8001)}/cases/CASE_ID",
            soft_wrap=True,
            markup=False,
        )
        console.print("Press Ctrl-C to stop.")
        while not stopping.wait(0.5):
            sup.check()
    except (StackError, TopicError, ConfigError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        code = 1
    else:
        code = 0
    finally:
        console.print("stopping...")
        sup.stop_all()
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.stop()
        if keys is not None:
            keys.unlink(missing_ok=True)
        console.print("stopped")
    sys.exit(code)
