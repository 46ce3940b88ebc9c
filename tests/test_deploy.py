"""The deployment files, checked without Docker or a cluster: docker-compose.yml against the
Compose Specification, deploy/k8s/ against the Kubernetes API schemas, and both against
the `likvard` command and each other (same roles, same commands, health checks, metrics,
databases, no secret values). The image's layout is checked by installing the wheel the
way the Dockerfile does and running it from elsewhere with the image's environment.

The helpers here (the compose file's Likvärd services, the image's environment) are also
used by tests/test_deploy_processes.py, which runs every compose process for real.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from functools import cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from likvard import db_roles
from likvard.catalogue import ReferenceCatalogue
from likvard.cli import APPS, CONSUMERS, INGESTERS, READ_APPS, app
from likvard.cli.stack import KEY_USERS
from likvard.config import DEFAULT_PORTS, load_settings, service_port
from likvard.districts import DistrictRegistry
from likvard.identity import Principal, Role

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
SECRET_EXAMPLE = "secret.example.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
POSTGRES_INIT = ROOT / "deploy" / "postgres"
ENV_EXAMPLE = ROOT / ".env.example"
REALM_FILE = ROOT / "deploy" / "keycloak" / "likvard-realm.json"
ACCESS_LOG = "access-log"  # `likvard relay access-log`
ACCESS_LOG_DB = "access_log"  # its database
# The secrets compose reads from .env (each a ${VAR:?...} reference).
COMPOSE_SECRETS = {
    "POSTGRES_PASSWORD",
    "LIKVARD_PSEUDONYM_SECRET",
    "KEYCLOAK_ADMIN_PASSWORD",
    "LIKVARD_METRICS_CLIENT_SECRET",
    "LIKVARD_DISTRICT_NORDOST_CLIENT_SECRET",
    "LIKVARD_KEK",
    "LIKVARD_CONSOLE_SECRET",
    *(db_roles.password_variable(r) for r in db_roles.roles()),
}
KUBERNETES_VERSION = "1.31.0"  # the oldest Kubernetes the manifests are meant for

ONE_SHOT = {"topics", "migrate"}  # run to completion, in this order; no health check
# Services of a compose profile (not started by `docker compose up`): one-shots too.
PROFILED = {"retention"}
MIGRATE = ["db", "migrate", "--database-per-service"]
RETENTION = ["retention", "run"]
URL_VARS = (
    "LIKVARD_DATABASE_URL",
    "LIKVARD_ACCESS_LOG_DATABASE_URL",
    "LIKVARD_KEYS_DATABASE_URL",
    "LIKVARD_OWNER_DATABASE_URL",
    "LIKVARD_PROJECTIONS_DATABASE_URL",
)
# Long-running services without a container health check, and why.
NO_HEALTHCHECK = {
    # The collector image is built FROM scratch: nothing inside it can run a check.
    # Prometheus scrapes its own metrics instead (test_prometheus_scrapes_every_process).
    "otel-collector": "otel-collector:8888",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|KEK|DATABASE_URL")
REFERENCE = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?(?P<op>[?-])(?P<arg>[^}]*))?\}")
REQUIRED_REFERENCE = re.compile(r"\$\{[A-Z0-9_]+:\?[^}]+\}")


# --- reading the files ---------------------------------------------------------------------
@cache
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return doc


def is_likvard(service: Mapping[str, Any]) -> bool:
    """A service that runs the Likvärd image (built from deploy/Dockerfile)."""
    build = service.get("build") or {}
    return isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"


def likvard_services(*, profiled: bool = False) -> dict[str, dict[str, Any]]:
    """The compose services that run Likvärd (the topics and migrate jobs among them); with
    `profiled`, those of a profile too (retention)."""
    return {
        name: s
        for name, s in compose()["services"].items()
        if is_likvard(s) and (profiled or not s.get("profiles"))
    }


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}` with `variables`."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        if variables.get(name):
            return variables[name]
        if op == "-":
            return arg
        if op == "?":
            raise KeyError(f"{name} is required: {arg}")
        return ""

    return REFERENCE.sub(one, value)


def compose_env(service: Mapping[str, Any], variables: Mapping[str, str]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {k: interpolate(str(v), variables) for k, v in env.items()}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, per stage (line continuations joined)."""
    stages: list[list[Instruction]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


def image_env() -> dict[str, str]:
    """The ENV of the image's final stage."""
    env: dict[str, str] = {}
    for ins in dockerfile_stages()[-1]:
        if ins.keyword == "ENV":
            for word in shlex.split(ins.args):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def image_copies() -> dict[PurePosixPath, Path]:
    """What the final stage copies from the build context: image path -> repository path."""
    copies: dict[PurePosixPath, Path] = {}
    for ins in dockerfile_stages()[-1]:
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            *sources, dest = shlex.split(ins.args)
            assert len(sources) == 1, ins
            copies[PurePosixPath(dest)] = ROOT / sources[0]
    return copies


def effective_env(service: Mapping[str, Any]) -> dict[str, str]:
    """What a compose service's process sees: the image's ENV, then the compose file's."""
    variables = dict.fromkeys(COMPOSE_SECRETS, "x" * 16)
    return {**image_env(), **compose_env(service, variables)}


def api_service(command: list[str]) -> str | None:
    """The API a command serves (`serve intake ...` -> intake), or None for a worker."""
    return command[1] if command[0] == "serve" else None


def database_of(command: list[str]) -> str:
    """The database a long-running process works in: its service's, the read models' for
    the projection worker, the access log's for its relay."""
    if command[0] == "project":
        return "projections"
    if command == ["relay", ACCESS_LOG]:
        return ACCESS_LOG_DB
    return command[1]


def writes_the_access_log(command: list[str]) -> bool:
    """The APIs record every case-level read; the access-log relay publishes the log."""
    return api_service(command) is not None or command == ["relay", ACCESS_LOG]


@cache
def realm() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(REALM_FILE.read_text(encoding="utf-8"))
    return doc


def realm_client(client_id: str) -> dict[str, Any]:
    clients: list[dict[str, Any]] = [c for c in realm()["clients"] if c["clientId"] == client_id]
    assert len(clients) == 1, client_id
    return clients[0]


def claims_mapped(client: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The claims a Keycloak client's own mappers put in access tokens: claim -> config
    (the audience mapper under "aud")."""
    found: dict[str, dict[str, str]] = {}
    for mapper in client.get("protocolMappers", []):
        config = mapper["config"]
        if config.get("access.token.claim") != "true":
            continue
        if mapper["protocolMapper"] == "oidc-audience-mapper":
            found["aud"] = config
        elif "claim.name" in config:
            found[config["claim.name"]] = {"kind": mapper["protocolMapper"], **config}
    return found


def k8s_resources() -> list[str]:
    resources_: list[str] = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return resources_


def k8s_documents(files: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    for name in files if files is not None else k8s_resources():
        for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            if doc is not None:
                yield name, doc


def k8s_workloads() -> dict[str, dict[str, Any]]:
    """Deployments, Jobs and CronJobs by name -> the document, its pod template and its
    (single) container."""
    found: dict[str, dict[str, Any]] = {}
    for _, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "Job", "CronJob"):
            spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
            pod = spec["template"]
            containers = pod["spec"]["containers"]
            assert len(containers) == 1, doc["metadata"]["name"]
            found[doc["metadata"]["name"]] = {"doc": doc, "pod": pod, "container": containers[0]}
    return found


def k8s_name(compose_name: str) -> str:
    """The Kubernetes workload of a compose service: the jobs are likvard-<name>."""
    return f"likvard-{compose_name}" if compose_name in ONE_SHOT | PROFILED else compose_name


def role_of(url: str) -> str:
    """The PostgreSQL role a URL connects as."""
    user = urlsplit(REQUIRED_REFERENCE.sub("REF", url)).username
    assert user, url
    return user


def secret_key_of(role: str) -> str:
    """The Secret key of a role's URL: likvard_access_log -> access-log-database-url."""
    return role.removeprefix(db_roles.ROLE_PREFIX).replace("_", "-") + "-database-url"


def part_of(command: list[str]) -> db_roles.Part:
    """The db_roles part (so the role) of a long-running process."""
    database = database_of(command)
    return db_roles.PARTS["access-log" if database == ACCESS_LOG_DB else database]


def config_map() -> dict[str, str]:
    for _, doc in k8s_documents():
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "likvard-config":
            data: dict[str, str] = doc["data"]
            return data
    raise AssertionError("no ConfigMap likvard-config")


# --- docker-compose.yml ------------------------------------------------------------------
def test_compose_file_follows_the_compose_specification() -> None:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text(encoding="utf-8"))
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(compose())
    ]
    assert errors == []


def test_compose_runs_every_likvard_role() -> None:
    commands = {tuple(s["command"]) for s in likvard_services().values()}
    expected: set[tuple[str, ...]] = {("topics",), ("project",), tuple(MIGRATE)}
    expected |= {("serve", s, "--host", "0.0.0.0") for s in APPS | READ_APPS}
    expected |= {("relay", s) for s in APPS} | {("ingest", s) for s in INGESTERS}
    expected |= {("consume", s) for s in CONSUMERS}
    expected.add(("relay", ACCESS_LOG))
    assert commands == expected


def test_every_compose_command_is_a_real_likvard_command() -> None:
    """Each command line (and each health check) parses: `likvard <command...> --help`."""
    lines = {" ".join(s["command"]): list(s["command"]) for s in likvard_services().values()}
    # The retention profile's command, once `likvard retention` exists (another change).
    registered = {g.name for g in app.registered_groups} | {
        c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands
    }
    if "retention" in registered:
        lines[" ".join(RETENTION)] = RETENTION
    for s in likvard_services().values():
        test = (s.get("healthcheck") or {}).get("test")
        if test:
            assert test[:2] == ["CMD", "likvard"], test
            lines[" ".join(test[2:])] = test[2:]
    for ins in dockerfile_stages()[-1]:
        if ins.keyword == "HEALTHCHECK":
            test = json.loads(ins.args.split("CMD", 1)[1])
            lines[" ".join(test[1:])] = test[1:]
    procs = {
        line: subprocess.Popen(
            [sys.executable, "-m", "likvard.cli", *argv, "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        for line, argv in lines.items()
    }
    for line, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"likvard {line} --help: {out.decode()[-2000:]}"
    # --help does not check the service argument: the command's body does.
    known = {
        "serve": APPS | READ_APPS,
        "relay": {**APPS, ACCESS_LOG: ""},
        "ingest": INGESTERS,
        "consume": CONSUMERS,
        "probe": {**APPS, **READ_APPS, "worker": ""},
    }
    for argv in lines.values():
        if argv[0] in known and len(argv) > 1:
            assert argv[1] in known[argv[0]], argv


def test_each_process_uses_its_own_services_database() -> None:
    for name, s in likvard_services().items():
        env = effective_env(s)
        if name in ONE_SHOT:
            assert "LIKVARD_DATABASE_URL" not in env
            continue
        owner = database_of(s["command"])
        assert urlsplit(env["LIKVARD_DATABASE_URL"]).path == f"/{owner}", name
        # ... as its service's own role, never the owner or the administrator.
        assert role_of(env["LIKVARD_DATABASE_URL"]) == part_of(s["command"]).role, name
        # The key store's role and the KEK: where personal details are sealed or opened,
        # the same processes as in `likvard up` (likvard.cli.stack.KEY_USERS).
        keys = env.get("LIKVARD_KEYS_DATABASE_URL")
        sealing = (s["command"][0], s["command"][1] if len(s["command"]) > 1 else "")
        assert (keys is not None) == (sealing in KEY_USERS), name
        assert ("LIKVARD_KEK" in env) == (keys is not None), name
        if keys is not None:
            assert role_of(keys) == db_roles.PARTS["keys"].role, name
            assert urlsplit(keys).path == f"/{db_roles.PARTS['keys'].database}", name
        # The pseudonym key: only where persons are registered.
        assert ("LIKVARD_PSEUDONYM_SECRET" in env) == (name == "intake"), name
        # The access log: a database of its own, for every API and its relay.
        log = env.get("LIKVARD_ACCESS_LOG_DATABASE_URL")
        assert (log is not None) == writes_the_access_log(s["command"]), name
        if log is not None:
            assert urlsplit(log).path == f"/{ACCESS_LOG_DB}", name
            assert role_of(log) == db_roles.PARTS["access-log"].role, name


def test_the_migrate_job_runs_as_the_owner_before_every_process() -> None:
    services = likvard_services()
    migrate = services["migrate"]
    assert migrate["command"] == MIGRATE and migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    env = effective_env(migrate)
    assert role_of(env["LIKVARD_OWNER_DATABASE_URL"]) == db_roles.OWNER
    assert not {"LIKVARD_DATABASE_URL", "LIKVARD_KEK", "LIKVARD_PSEUDONYM_SECRET"} & set(env)
    # Nobody else has the owner's credentials.
    for name, s in likvard_services(profiled=True).items():
        if name != "migrate":
            users = {role_of(v) for k, v in effective_env(s).items() if k in URL_VARS}
            assert db_roles.OWNER not in users, name
    job = k8s_workloads()["likvard-migrate"]
    assert job["doc"]["kind"] == "Job" and job["container"]["args"] == MIGRATE
    (entry,) = job["container"]["env"]
    assert entry["name"] == "LIKVARD_OWNER_DATABASE_URL"
    assert entry["valueFrom"]["secretKeyRef"]["key"] == secret_key_of(db_roles.OWNER)


def test_the_init_scripts_create_the_roles_and_compose_gives_them_their_passwords() -> None:
    script = (POSTGRES_INIT / "20-roles.sh").read_text(encoding="utf-8")
    created = re.findall(r"^CREATE ROLE (\w+) (.*) PASSWORD :'(\w+)';$", script, re.M)
    assert [r for r, _, _ in created] == db_roles.roles()
    for role, attributes, variable in created:
        assert attributes == (
            "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS"
        ), role
        assert f'-v {variable}="${db_roles.password_variable(role)}"' in script, role
    for database in db_roles.DATABASES:
        assert f"ALTER DATABASE {database} OWNER TO {db_roles.OWNER};" in script
        roles = sorted(p.role for p in db_roles.PARTS.values() if p.database == database)
        granted = re.search(rf"^GRANT CONNECT ON DATABASE {database} TO ([\w, ]+);$", script, re.M)
        assert granted and sorted(granted.group(1).split(", ")) == roles, database
    postgres_env = compose()["services"]["postgres"]["environment"]
    for role in db_roles.roles():
        variable = db_roles.password_variable(role)
        assert postgres_env[variable].startswith(f"${{{variable}:?"), role
    # Every URL's password is its own role's variable.
    for name, s in likvard_services(profiled=True).items():
        for key, value in (s.get("environment") or {}).items():
            if key in URL_VARS:
                role = role_of(str(value))
                assert f"${{{db_roles.password_variable(role)}:?" in str(value), (name, key)


def test_the_init_script_creates_the_databases_the_urls_name() -> None:
    created: set[str] = set()
    for script in POSTGRES_INIT.glob("*.sql"):
        created |= set(re.findall(r"CREATE DATABASE (\w+);", script.read_text(encoding="utf-8")))
    named = {
        urlsplit(effective_env(s)[var]).path.lstrip("/")
        for name, s in likvard_services().items()
        if name not in ONE_SHOT
        for var in ("LIKVARD_DATABASE_URL", "LIKVARD_ACCESS_LOG_DATABASE_URL")
        if var in effective_env(s)
    }
    assert created == named == {"intake", "referral", "followup", "projections", ACCESS_LOG_DB}
    postgres = compose()["services"]["postgres"]
    assert "./deploy/postgres:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]


def test_every_long_running_compose_service_has_a_health_check() -> None:
    for name, s in compose()["services"].items():
        check = s.get("healthcheck") or {}
        if name in ONE_SHOT | PROFILED:
            assert s["restart"] == "no" and check == {"disable": True}, name
            continue
        assert s.get("restart") == "unless-stopped", name
        if name in NO_HEALTHCHECK:
            assert check == {"disable": True}, name
            continue
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        if is_likvard(s):  # `likvard probe <its API>` or `likvard probe worker`
            api = api_service(s["command"])
            assert check["test"] == ["CMD", "likvard", "probe", api or "worker"], name


def test_compose_start_order() -> None:
    services = compose()["services"]
    assert services["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    for name, s in likvard_services(profiled=True).items():
        if name not in ONE_SHOT:
            needs = s["depends_on"]
            assert needs["postgres"] == {"condition": "service_healthy"}, name
            assert needs["migrate"] == {"condition": "service_completed_successfully"}, name
            assert needs["topics"] == {"condition": "service_completed_successfully"}, name
    declared = set(compose()["volumes"])
    for s in services.values():
        for volume in s.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith("./") or source in declared, volume


def test_no_secret_value_in_the_compose_file() -> None:
    """Secrets are `${VAR:?message}` references, and .env.example names each (empty)."""
    referenced: set[str] = set()
    for name, s in compose()["services"].items():
        for key, value in (s.get("environment") or {}).items():
            text = str(value)
            if "DATABASE_URL" in key:
                password = urlsplit(REQUIRED_REFERENCE.sub("REF", text)).password
                assert password == "REF", f"{name}: {key} holds a password"
            elif SECRET_NAME.search(key):
                assert REQUIRED_REFERENCE.fullmatch(text), f"{name}: {key} is not a reference"
            refs = REFERENCE.finditer(text)
            referenced |= {m.group("name") for m in refs if m.group("op") == "?"}
    example = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    assert referenced == COMPOSE_SECRETS
    assert {k: example.get(k) for k in referenced} == dict.fromkeys(referenced, "")
    # Compose's file-mounted secrets come from the same variables, never a literal.
    for name, secret in (compose().get("secrets") or {}).items():
        assert set(secret) == {"environment"} and secret["environment"] in referenced, name
    # The realm file holds no client secret either: a placeholder Keycloak fills in from
    # its environment at import, which compose sets from .env.
    keycloak_env = compose()["services"]["keycloak"]["environment"]
    for client in realm()["clients"]:
        if client.get("publicClient") is False:
            placeholder = re.fullmatch(r"\$\{([A-Z0-9_]+)\}", client["secret"])
            assert placeholder, f"{client['clientId']}: a secret in the realm file"
            assert placeholder.group(1) in keycloak_env, client["clientId"]
            assert placeholder.group(1) in referenced, client["clientId"]


def test_prometheus_scrapes_every_likvard_process() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    scraped: set[str] = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        for sd in job.get("dns_sd_configs", []):
            scraped |= {f"{host}:{sd['port']}" for host in sd["names"]}
        for static in job.get("static_configs", []):
            scraped |= set(static["targets"])
    expected = set(NO_HEALTHCHECK.values())
    for name, s in likvard_services().items():
        if name in ONE_SHOT:
            continue
        env, api = effective_env(s), api_service(s["command"])
        port = service_port(api, env) if api else int(env["LIKVARD_OPS_PORT"])
        expected.add(f"{name}:{port}")
    assert expected <= scraped
    assert image_env()["LIKVARD_OPS_PORT"] == "9464"


# --- sign-in: Keycloak in compose, the realm, the issuer ---------------------------------
def test_compose_runs_keycloak_with_the_likvard_realm() -> None:
    keycloak = compose()["services"]["keycloak"]
    assert re.fullmatch(r"quay\.io/keycloak/keycloak:\d+\.\d+\.\d+", keycloak["image"])
    assert keycloak["command"][0] == "start-dev" and "--import-realm" in keycloak["command"]
    mount = f"./{REALM_FILE.parent.relative_to(ROOT)}:/opt/keycloak/data/import:ro"
    assert mount in keycloak["volumes"]
    assert [p.name for p in REALM_FILE.parent.glob("*.json")] == [REALM_FILE.name]
    env = keycloak["environment"]
    assert env["KC_HEALTH_ENABLED"] == "true"
    assert "/health/ready" in " ".join(keycloak["healthcheck"]["test"])
    # One issuer inside and outside: the services' issuer is KC_HOSTNAME's realm, and the
    # published port is the one KC_HOSTNAME names.
    hostname = urlsplit(env["KC_HOSTNAME"])
    issuer = f"{env['KC_HOSTNAME']}/realms/{realm()['realm']}"
    assert any(port.endswith(f":{hostname.port}") for port in keycloak["ports"])
    for name, s in likvard_services().items():
        service_env = effective_env(s)
        assert service_env["LIKVARD_OIDC_ISSUER"] == issuer, name
        assert service_env["LIKVARD_OIDC_AUDIENCE"] == realm_client("likvard")["clientId"]
        assert urlsplit(issuer).hostname == "keycloak" == hostname.hostname
        if api_service(s["command"]):  # an API verifies tokens from the first request on
            assert s["depends_on"]["keycloak"] == {"condition": "service_healthy"}, name


def test_the_realm_defines_every_role_and_maps_the_claims_the_settings_read() -> None:
    doc = realm()
    assert doc["realm"] == "likvard" and doc["enabled"] is True
    roles = {r["name"] for r in doc["roles"]["realm"]}
    assert roles == {str(r) for r in Role}
    defaults = load_settings({})
    client = realm_client("likvard")
    mapped = claims_mapped(client)
    assert defaults.oidc_audience in mapped["aud"]["included.client.audience"].split(",")
    by_claim = {
        defaults.oidc_roles_claim: ("oidc-usermodel-realm-role-mapper", "true"),
        defaults.oidc_districts_claim: ("oidc-usermodel-attribute-mapper", "true"),
        defaults.oidc_unit_claim: ("oidc-usermodel-attribute-mapper", "false"),
    }
    for claim, (kind, multivalued) in by_claim.items():
        assert mapped[claim]["kind"] == kind, claim
        assert mapped[claim]["multivalued"] == multivalued, claim
    # `sub` (the actor) comes from Keycloak's `basic` scope; no `profile` or `email`
    # scope: no staff names or addresses in access tokens.
    assert client["defaultClientScopes"] == ["basic"] and client["optionalClientScopes"] == []
    assert doc["defaultSignatureAlgorithm"] in defaults.oidc_algorithms
    # The district and unit attributes are declared (Keycloak drops undeclared ones) and
    # only an administrator may change them: a user who could edit their own districts
    # could open another district's cases.
    (provider,) = doc["components"]["org.keycloak.userprofile.UserProfileProvider"]
    profile = json.loads(provider["config"]["kc.user.profile.config"][0])
    attributes = {a["name"]: a for a in profile["attributes"]}
    for claim in (defaults.oidc_districts_claim, defaults.oidc_unit_claim):
        user_attribute = mapped[claim]["user.attribute"]
        assert attributes[user_attribute]["permissions"]["edit"] == ["admin"], claim
        assert attributes[user_attribute]["multivalued"] == (by_claim[claim][1] == "true")


def test_the_realms_example_users_cover_every_role_with_temporary_passwords() -> None:
    districts = {d.code for d in DistrictRegistry.load().current(date.today())}
    units = {u.id for u in ReferenceCatalogue.load().units()}
    defaults = load_settings({})
    mapped = claims_mapped(realm_client("likvard"))
    district_attr = mapped[defaults.oidc_districts_claim]["user.attribute"]
    unit_attr = mapped[defaults.oidc_unit_claim]["user.attribute"]
    people = [u for u in realm()["users"] if "serviceAccountClientId" not in u]
    seen: set[str] = set()
    for user in people:
        (role,) = user["realmRoles"]
        seen.add(role)
        # The token's subject is the user's id: a valid, pseudonymous Likvärd actor.
        Principal(user["id"], frozenset({Role(role)}))
        attrs = user.get("attributes", {})
        if role == Role.CASE_WORKER:
            assert attrs[district_attr] and set(attrs[district_attr]) <= districts
        if role == Role.UNIT_STAFF:
            assert len(attrs[unit_attr]) == 1 and attrs[unit_attr][0] in units
        (credential,) = user["credentials"]
        assert credential["temporary"] is True, f"{user['username']}: an example password"
    # A district system is a service account (client credentials), not a person.
    assert seen == {str(r) for r in Role} - {str(Role.DISTRICT_SYSTEM)}
    assert "EXAMPLE" in realm()["displayName"]


def test_prometheus_scrapes_the_apis_with_an_ops_token_from_keycloak() -> None:
    """An API's /metrics needs the ops role: Prometheus uses client credentials."""
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "likvard-api"]
    oauth2 = job["oauth2"]
    env = compose()["services"]["keycloak"]["environment"]
    assert oauth2["token_url"] == (
        f"{env['KC_HOSTNAME']}/realms/{realm()['realm']}/protocol/openid-connect/token"
    )
    client = realm_client(oauth2["client_id"])
    assert client["serviceAccountsEnabled"] is True and client["publicClient"] is False
    mapped = claims_mapped(client)
    assert "likvard" in mapped["aud"]["included.client.audience"].split(",")
    assert load_settings({}).oidc_roles_claim in mapped
    (account,) = [
        u for u in realm()["users"] if u.get("serviceAccountClientId") == client["clientId"]
    ]
    assert account["realmRoles"] == [str(Role.OPS)]
    prometheus = compose()["services"]["prometheus"]
    (secret,) = prometheus["secrets"]
    assert oauth2["client_secret_file"] == f"/run/secrets/{secret['target']}"
    assert compose()["secrets"][secret["source"]]["environment"] == client["secret"][2:-1]


# --- the image -----------------------------------------------------------------------------
def test_dockerfile_builds_a_slim_pinned_non_root_image() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and the runtime"
    bases = [s[0].args.split()[0] for s in stages]
    for base in bases:  # an exact version, not `python:3.11-slim`
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    assert len(set(bases)) == 1, "the venv links to the builder's Python: same base"
    assert "@sha256:" in DOCKERFILE.read_text() or "digest" in DOCKERFILE.read_text()
    final = {ins.keyword: ins.args for ins in stages[-1]}
    assert final["USER"] in ("10001", "10001:10001")
    assert json.loads(final["ENTRYPOINT"]) == ["likvard"]
    assert final["HEALTHCHECK"].endswith('CMD ["likvard", "probe"]')
    assert set(final["EXPOSE"].split()) == {"8001", "8002", "8003", "8004", "9464"}
    env = image_env()
    assert env["LIKVARD_LOG_FORMAT"] == "json"
    assert env["LIKVARD_OPS_PORT"] == "9464"
    assert env["PYTHONUNBUFFERED"] == "1"
    # The runtime stage takes only the venv from the builder, and the runtime files.
    from_builder = [i.args for i in stages[-1] if i.keyword == "COPY" and "--from" in i.args]
    assert len(from_builder) == 1 and env["VIRTUAL_ENV"] in from_builder[0]
    copies = image_copies()
    assert copies[PurePosixPath(env["LIKVARD_SCHEMAS_DIR"])] == ROOT / "schemas"
    assert copies[PurePosixPath(env["LIKVARD_TOPICS_FILE"])] == ROOT / "deploy" / "topics.toml"
    # Everything a process writes goes to /tmp (read-only root file system on Kubernetes).
    assert env["LIKVARD_PROBE_FILE"].startswith("/tmp/")


def test_the_build_context_keeps_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    kept = {line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")}
    for stage in dockerfile_stages():
        for ins in stage:
            if ins.keyword == "COPY" and "--from" not in ins.args:
                *sources, _ = shlex.split(ins.args)
                for source in sources:
                    assert source.rstrip("/").removeprefix("./") in kept, source


def test_the_image_layout_works_from_an_installed_wheel(tmp_path: Path) -> None:
    """As in the image: Likvärd installed from its wheel (not editable), the files the
    Dockerfile copies where it copies them, the image's ENV, run from another folder."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("likvard", "services"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    offline = ["--no-index", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "wheel", *offline, "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("likvard-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-index", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    image_root = tmp_path / "image"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIKVARD_", "PYTHON"))}
    for path, value in image_env().items():
        if path in ("PATH", "VIRTUAL_ENV"):
            continue
        env[path] = str(image_root / value[1:]) if value.startswith("/") else value
    for dest, src in image_copies().items():
        target = image_root / str(dest)[1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, target)
    env["PYTHONPATH"] = str(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def likvard(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "likvard.cli", *argv],
            env=env,
            cwd=elsewhere,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        return done.stdout.decode()

    assert "IntakeRegistered" in likvard("schemas", "list")
    assert "Create the Kafka topics" in likvard("topics", "--help")
    roles = {*APPS.values(), *READ_APPS.values(), *CONSUMERS.values(), *INGESTERS.values()}
    roles.add("services.projections.worker:build")
    smoke = textwrap.dedent(
        """
        import importlib, sys
        from importlib import resources
        import likvard, services
        from likvard.catalogue import ReferenceCatalogue
        from likvard.codec import Catalogue
        from likvard.topics import load_topics
        site, *roles = sys.argv[1:]
        for role in roles:
            module, _, name = role.partition(":")
            assert callable(getattr(importlib.import_module(module), name)), role
        for package in (likvard, services):
            assert package.__file__.startswith(site), package.__file__
        assert len(load_topics()) == 6
        from likvard.district_keys import DistrictKeys
        assert DistrictKeys().systems  # the district systems' public keys are package data
        assert Catalogue.load().writers()
        ReferenceCatalogue.load()
        sql = [p.name for p in resources.files("likvard.migrations").iterdir()]
        assert any(n.startswith("eventstore_0001") and n.endswith(".sql") for n in sql), sql
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", smoke, str(site), *sorted(roles)],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        timeout=120,
    )
    assert done.stdout.decode().strip() == "ok", done.stderr.decode()[-3000:]


# --- Kubernetes ----------------------------------------------------------------------------
def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    listed = k8s_resources()
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert SECRET_EXAMPLE in on_disk and SECRET_EXAMPLE not in listed
    assert set(listed) == on_disk - {SECRET_EXAMPLE}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "likvard"
    assert [i["name"] for i in kustomization["images"]] == ["likvard"]
    assert kustomization["labels"][0]["pairs"]
    for name, doc in k8s_documents():
        assert doc["metadata"].get("namespace", "likvard") == "likvard", name
    for name, workload in k8s_workloads().items():
        assert workload["container"]["image"] == "likvard", name


@pytest.mark.parametrize(
    "name", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
)
def test_kubernetes_manifests_follow_the_api_schemas(name: str) -> None:
    for _, doc in k8s_documents([name]):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_manifests() -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert len(built) == sum(1 for _ in k8s_documents())
    for doc in built:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "likvard"
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_compose_and_kubernetes_run_the_same_roles_with_the_same_commands() -> None:
    in_compose = {
        k8s_name(name): s["command"] for name, s in likvard_services(profiled=True).items()
    }
    in_k8s = {name: w["container"]["args"] for name, w in k8s_workloads().items()}
    assert in_k8s == in_compose
    for name, w in k8s_workloads().items():
        assert "command" not in w["container"], f"{name}: the image's ENTRYPOINT is likvard"


def test_kubernetes_reads_every_secret_from_the_secret() -> None:
    kinds = {doc["kind"] for _, doc in k8s_documents()}
    assert "Secret" not in kinds
    for name, value in config_map().items():
        assert not SECRET_NAME.search(name), name
        assert "@" not in value, f"{name}: credentials in a URL"
    example = next(d for _, d in k8s_documents([SECRET_EXAMPLE]))
    keys = set(example["stringData"])
    assert keys == {"pseudonym-secret", "kek", "console-secret"} | {
        secret_key_of(r) for r in db_roles.roles()
    }
    assert all("<" in v for v in example["stringData"].values()), "placeholders only"
    services = {k8s_name(n): s for n, s in likvard_services(profiled=True).items()}
    for name, w in k8s_workloads().items():
        env = {e["name"]: e for e in w["container"].get("env", [])}
        for var, entry in env.items():
            if SECRET_NAME.search(var):
                assert set(entry) == {"name", "valueFrom"}, f"{name}: {var} has a value"
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "likvard-secrets" and ref["key"] in keys, (name, var)
        compose_service = services[name]
        for var in URL_VARS:
            url = effective_env(compose_service).get(var)
            if url is None:
                assert var not in env, (name, var)
            else:  # the same role (so the same database) as in compose
                key = env[var]["valueFrom"]["secretKeyRef"]["key"]
                assert key == secret_key_of(role_of(url)), (name, var)
        for var in ("LIKVARD_PSEUDONYM_SECRET", "LIKVARD_KEK", "LIKVARD_CONSOLE_SECRET"):
            assert (var in env) == (var in effective_env(compose_service)), (name, var)
        assert [e["configMapRef"]["name"] for e in w["container"]["envFrom"]] == ["likvard-config"]


def test_kubernetes_probes_resources_and_security() -> None:
    ops_port = int(config_map()["LIKVARD_OPS_PORT"])
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for _, doc in k8s_documents():
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    budgets, services = by_kind["PodDisruptionBudget"], by_kind["Service"]
    for name, w in k8s_workloads().items():
        container, pod = w["container"], w["pod"]
        resources_ = container["resources"]
        assert set(resources_) == {"requests", "limits"}, name
        assert set(resources_["requests"]) == set(resources_["limits"]) == {"cpu", "memory"}
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name
        assert pod["spec"]["securityContext"]["runAsUser"] == 10001, name
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be writable"
        if w["doc"]["kind"] in ("Job", "CronJob"):
            continue
        api = api_service(container["args"])
        port = service_port(api, {}) if api else ops_port
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http" if api else "ops": port}, name
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path and ports[get["port"]] == port, (name, probe)
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/port"] == str(port), name
        assert annotations["prometheus.io/path"] == "/metrics", name
        if api:
            assert services[name]["spec"]["ports"][0]["port"] == DEFAULT_PORTS[api], name
            assert (
                budgets[name]["spec"]["selector"]["matchLabels"]
                == w["doc"]["spec"]["selector"]["matchLabels"]
            ), name
    assert set(services) == set(APPS | READ_APPS)
    assert set(budgets) == set(APPS | READ_APPS) | {"projections-worker"}
    workloads = k8s_workloads()
    for name, budget in budgets.items():
        replicas = workloads[name]["doc"]["spec"]["replicas"]
        assert replicas > budget["spec"]["minAvailable"], f"{name}: the budget blocks drains"


def test_kubernetes_takes_the_issuer_and_the_claims_from_the_config_map() -> None:
    data = config_map()
    issuer = urlsplit(data["LIKVARD_OIDC_ISSUER"])
    assert issuer.scheme == "https" and issuer.hostname, "the issuer over TLS"
    assert data["LIKVARD_OIDC_AUDIENCE"] == realm_client("likvard")["clientId"]
    # The claim settings the ConfigMap spells out are the defaults, and the claims the
    # realm's mappers produce: a city with Keycloak changes only the issuer.
    oidc = {k: v for k, v in data.items() if k.startswith("LIKVARD_OIDC_")}
    assert load_settings(oidc) == load_settings(
        {"LIKVARD_OIDC_ISSUER": oidc["LIKVARD_OIDC_ISSUER"]}
    )
    mapped = claims_mapped(realm_client("likvard"))
    for var in ("ROLES", "DISTRICTS", "UNIT"):
        assert data[f"LIKVARD_OIDC_{var}_CLAIM"] in mapped, var
    for name, w in k8s_workloads().items():  # every process reads the ConfigMap
        assert {"configMapRef": {"name": "likvard-config"}} in w["container"]["envFrom"], name


def test_the_access_log_relay_runs_in_compose_and_on_kubernetes() -> None:
    (compose_name,) = [
        n for n, s in likvard_services().items() if s["command"] == ["relay", ACCESS_LOG]
    ]
    relay = k8s_workloads()[compose_name]
    assert relay["container"]["args"] == ["relay", ACCESS_LOG]
    env = {e["name"]: e for e in relay["container"]["env"]}
    ref = env["LIKVARD_ACCESS_LOG_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "likvard-secrets", "key": "access-log-database-url"}
    # Every API writes the access log into the same database.
    for name, w in k8s_workloads().items():
        if api_service(w["container"]["args"]):
            api_env = {e["name"]: e for e in w["container"]["env"]}
            log = api_env["LIKVARD_ACCESS_LOG_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            assert log == ref, name


def test_retention_runs_daily_on_kubernetes_and_in_a_compose_profile() -> None:
    service = likvard_services(profiled=True)["retention"]
    assert service["profiles"] == ["retention"] and service["command"] == RETENTION
    assert service["restart"] == "no" and service["healthcheck"] == {"disable": True}
    env = effective_env(service)
    wanted = {
        "LIKVARD_DATABASE_URL": db_roles.PARTS["intake"].role,
        "LIKVARD_KEYS_DATABASE_URL": db_roles.PARTS["keys"].role,
        "LIKVARD_PROJECTIONS_DATABASE_URL": db_roles.PARTS["projections"].role,
    }
    assert {k: role_of(env[k]) for k in wanted} == wanted
    assert "LIKVARD_KEK" in env
    assert env["LIKVARD_RETENTION_YEARS"] == config_map()["LIKVARD_RETENTION_YEARS"]
    cron = k8s_workloads()["likvard-retention"]
    assert cron["doc"]["kind"] == "CronJob" and cron["container"]["args"] == RETENTION
    assert cron["doc"]["spec"]["concurrencyPolicy"] == "Forbid"
    minute, hour, *days = cron["doc"]["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and days == ["*", "*", "*"], "daily"
    assert "retention.yaml" in k8s_resources()
    load_settings({"LIKVARD_RETENTION_YEARS": config_map()["LIKVARD_RETENTION_YEARS"]})
