"""Settings read from the environment in one place, so every process agrees on them."""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise

SERVICES = ("intake", "referral", "followup")
DEFAULT_PORTS = {"intake": 8001, "referral": 8002, "followup": 8003, "projections": 8004}


def service_port(service: str, env: dict[str, str] | None = None) -> int:
    """The service's port: LIKVARD_<SERVICE>_PORT, else the standard one."""
    e = os.environ if env is None else env
    value = e.get(f"LIKVARD_{service.upper()}_PORT")
    if value is None:
        return DEFAULT_PORTS[service]
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"LIKVARD_{service.upper()}_PORT must be a port number, not {value!r}")
    return int(value)


KAFKA_SETTING_PREFIX = "LIKVARD_KAFKA_"


def kafka_client_settings(env: dict[str, str] | None = None) -> dict[str, str]:
    """librdkafka settings for every Kafka client, from LIKVARD_KAFKA_<SETTING> variables
    (the setting's name with its dots as underscores): a managed Kafka's TLS and SASL, e.g.
    LIKVARD_KAFKA_SECURITY_PROTOCOL=SASL_SSL, LIKVARD_KAFKA_SASL_MECHANISM=SCRAM-SHA-512,
    LIKVARD_KAFKA_SASL_USERNAME, LIKVARD_KAFKA_SASL_PASSWORD,
    LIKVARD_KAFKA_SSL_CA_LOCATION=/etc/kafka/ca.pem."""
    e = os.environ if env is None else env
    return {
        key[len(KAFKA_SETTING_PREFIX) :].lower().replace("_", "."): value
        for key, value in e.items()
        if key.startswith(KAFKA_SETTING_PREFIX) and value
    }


def no_auto_create() -> dict[str, str]:
    """librdkafka settings that keep a client from creating topics: a producer (and an
    admin client, a producer inside) asks the broker to create a topic it does not know by
    default, and the broker then gives it its own default partition count (Tansu: 4), not
    the one of deploy/topics.toml. librdkafka applies it to producers and consumers alike
    (no configuration warning for either); a producer to a missing topic then fails its
    deliveries, so a process calls `likvard.topics.require_topics` before it starts."""
    return {"allow.auto.create.topics": "false"}


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the message says which and how to fix it."""


# A new user's first `likvard replay` or `report` usually runs beside `likvard up`: say how
# to reach that stack, not only which variable is missing.
_UP_EXPORTS = (
    "To use the stack `likvard up` runs on this machine, paste into this terminal the"
    " `export LIKVARD_DATABASE_URL=... KAFKA_BOOTSTRAP_SERVERS=...` line it prints when it"
    " is up (or run `likvard up` first: it starts an embedded PostgreSQL and a development"
    " broker)."
)


DEFAULT_ALGORITHMS = ("RS256", "PS256", "ES256")
# Asymmetric JWS algorithms a verifier may accept: never "none", never HS* (a shared secret,
# or the key-confusion attack with the public key as one).
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_CLAIM_PATH = re.compile(r"[A-Za-z0-9_:/-]+(\.[A-Za-z0-9_:/-]+)*")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _env_audience() -> str:
    return os.environ.get("LIKVARD_OIDC_AUDIENCE") or "likvard"


MIN_SECRET_BYTES = 32
MIN_SECRET_BITS_PER_BYTE = 2.75
"""Shannon entropy per character at least: a random hex secret of 32 characters (the
shortest allowed) measures 2.8 or more (none below it in 300,000 draws), "aaaa..." 0,
"abab..." 1."""
_MAKE_SECRET = (
    "Set it to a random secret of at least 32 characters, the same in every intake replica"
    " (e.g. python -c 'import secrets; print(secrets.token_hex(32))'); docs/pseudonyms.md"
    " says how to rotate it."
)


def _bits_per_byte(data: bytes) -> float:
    """Shannon entropy of the secret's byte frequencies (a random hex string: about 3.8;
    'aaaa...': 0)."""
    n = len(data)
    return sum(c / n * math.log2(n / c) for c in Counter(data).values())


def _period(data: bytes) -> int:
    """The length of the shortest unit the secret repeats ('abab...': 2; none: its length)."""
    return next((p for p in range(1, len(data)) if data[p:] == data[:-p]), len(data))


def pseudonym_secret_weakness(secret: bytes) -> str | None:
    """Why the secret is too weak to key pseudonyms, or None if it is strong enough. Pure;
    the reason gives lengths and measures, never the secret. With a guessable secret,
    whoever reads the events could turn every pseudonym back into an identity number (there
    are only some tens of millions to try), so short, typed, repeated and sequential ones
    are refused."""
    if len(secret) < MIN_SECRET_BYTES:
        return f"it is {len(secret)} bytes long, and must be at least {MIN_SECRET_BYTES}"
    bits = _bits_per_byte(secret)
    if bits < MIN_SECRET_BITS_PER_BYTE:
        return (
            f"it has {bits:.1f} bits of entropy per character (too few different characters),"
            f" and must have at least {MIN_SECRET_BITS_PER_BYTE:.2f}"
        )
    if _period(secret) <= len(secret) // 2:
        return "it repeats a shorter pattern"
    steps = Counter(b - a for a, b in pairwise(secret))
    if steps.most_common(1)[0][1] * 2 > len(secret) - 1:
        return "it is mostly a run of characters in sequence (such as abcdef... or 012345...)"
    return None


CONSOLE_SECRET_ENV = "LIKVARD_CONSOLE_SECRET"


def _console_secret(text: str | None) -> bytes | None:
    """LIKVARD_CONSOLE_SECRET as bytes: base64 of 32 bytes or more, or text of 32 characters
    or more; None when unset (the console then answers 503: never a made-up key)."""
    if not text:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    secret = raw if len(raw) >= 32 else text.encode()
    if len(secret) < 32:
        raise ConfigError(f"{CONSOLE_SECRET_ENV} must be 32 bytes or more (base64 or text)")
    return secret


@dataclass(frozen=True)
class ConsoleSettings:
    """The web console's (served by the reporting API): its cookies' key, its address as
    browsers reach it (None: each request's own), its OpenID client, whether its cookies
    are Secure (None: when the request is HTTPS), and the referral API its inbox calls."""

    secret: bytes | None = None
    url: str | None = None
    client_id: str = "likvard-console"
    secure_cookies: bool | None = None
    referral_url: str | None = None


def console_settings(env: Mapping[str, str] | None = None) -> ConsoleSettings:
    e = os.environ if env is None else env
    secure = e.get("LIKVARD_CONSOLE_SECURE_COOKIES")
    return ConsoleSettings(
        secret=_console_secret(e.get(CONSOLE_SECRET_ENV)),
        url=(e.get("LIKVARD_CONSOLE_URL") or "").rstrip("/") or None,
        client_id=e.get("LIKVARD_CONSOLE_CLIENT_ID") or "likvard-console",
        secure_cookies=_flag("LIKVARD_CONSOLE_SECURE_COOKIES", secure) if secure else None,
        referral_url=(e.get("LIKVARD_REFERRAL_URL") or "").rstrip("/") or None,
    )


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    kafka_bootstrap: str | None = None
    pseudonym_secret: bytes | None = None
    topic_prefix: str = ""
    relay_batch_size: int = 500
    case_wait_seconds: float = 5.0
    max_request_bytes: int = 1024 * 1024
    extra: dict[str, str] = field(default_factory=dict)
    # Sign-in (OpenID Connect). A Settings built in code (the tests) takes the issuer and
    # audience from the environment, so every app of a process verifies against the same
    # provider; load_settings reads and checks all of them.
    oidc_issuer: str | None = field(default_factory=lambda: _env("LIKVARD_OIDC_ISSUER"))
    oidc_audience: str = field(default_factory=_env_audience)
    oidc_discovery_url: str | None = field(
        default_factory=lambda: _env("LIKVARD_OIDC_DISCOVERY_URL")
    )
    oidc_roles_claim: str = "realm_access.roles"
    oidc_districts_claim: str = "likvard_districts"
    oidc_unit_claim: str = "likvard_unit"
    oidc_algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    oidc_leeway_seconds: int = 30
    public_docs: bool = False
    access_log_database_url: str | None = None
    # Personal data (docs/personal-data.md): the key store's PostgreSQL (its own role), the
    # key-encryption key, and how long records are kept after their last entry.
    keys_database_url: str | None = field(default_factory=lambda: _env("LIKVARD_KEYS_DATABASE_URL"))
    kek: str | None = field(default_factory=lambda: _env("LIKVARD_KEK"))
    kek_id: str = field(default_factory=lambda: _env("LIKVARD_KEK_ID") or "env-1")
    kek_previous: str | None = field(default_factory=lambda: _env("LIKVARD_KEK_PREVIOUS"))
    retention_years: int = 5
    # Overdue lists and report: a referral unanswered for more than these days, a follow-up
    # more than these days past its due date (the city's calendar days).
    referral_answer_days: int = 14
    followup_window_days: int = 30
    # The web console (a Settings built in code takes it from the environment, as OIDC).
    console: ConsoleSettings = field(default_factory=console_settings)

    def require_oidc(self) -> str:
        """The issuer every token must come from; ConfigError with the fix when unset."""
        if not self.oidc_issuer:
            raise ConfigError(
                "LIKVARD_OIDC_ISSUER is not set: export the URL of your OpenID Connect"
                " provider's issuer (e.g. export LIKVARD_OIDC_ISSUER="
                "https://login.example.se/realms/likvard), and LIKVARD_OIDC_AUDIENCE if the"
                " tokens' audience is not 'likvard'. On one machine, `likvard up` starts a"
                " development provider and sets it; `likvard dev-idp` runs one alone."
            )
        return self.oidc_issuer

    @property
    def oidc_discovery(self) -> str:
        """Where the discovery document is fetched from."""
        if self.oidc_discovery_url:
            return self.oidc_discovery_url
        return self.require_oidc().rstrip("/") + "/.well-known/openid-configuration"

    def require_access_log_database(self) -> str:
        """The access log's PostgreSQL (LIKVARD_ACCESS_LOG_DATABASE_URL, else the service's)."""
        url = self.access_log_database_url or self.database_url
        if not url:
            raise ConfigError(
                "LIKVARD_ACCESS_LOG_DATABASE_URL (or LIKVARD_DATABASE_URL) is not set: the"
                " access log needs a PostgreSQL (e.g. export LIKVARD_DATABASE_URL="
                "postgresql://user@host/dbname). " + _UP_EXPORTS
            )
        return url

    def require_keys_database(self) -> str:
        """The key store's PostgreSQL (LIKVARD_KEYS_DATABASE_URL, else the service's): in
        production a role that only the key store uses (docs/personal-data.md)."""
        url = self.keys_database_url or self.database_url
        if not url:
            raise ConfigError(
                "LIKVARD_KEYS_DATABASE_URL (or LIKVARD_DATABASE_URL) is not set: the key"
                " store of the persons' data keys needs a PostgreSQL. " + _UP_EXPORTS
            )
        return url

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "LIKVARD_DATABASE_URL is not set: export it with your PostgreSQL (e.g."
                " export LIKVARD_DATABASE_URL=postgresql://user@host/dbname). " + _UP_EXPORTS
            )
        return self.database_url

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap:
            raise ConfigError(
                "KAFKA_BOOTSTRAP_SERVERS is not set: export it with your Kafka brokers (e.g."
                " export KAFKA_BOOTSTRAP_SERVERS=host:9092). " + _UP_EXPORTS
            )
        return self.kafka_bootstrap

    def require_pseudonym_secret(self) -> bytes:
        """The key of the person pseudonyms, checked for strength when a service starts:
        ConfigError (which never quotes the secret) if it is missing or weak."""
        if not self.pseudonym_secret:
            raise ConfigError(
                "LIKVARD_PSEUDONYM_SECRET is not set: it keys the person pseudonyms, so the"
                " same person gets the same pseudonym in every service. " + _MAKE_SECRET
            )
        weakness = pseudonym_secret_weakness(self.pseudonym_secret)
        if weakness:
            raise ConfigError(f"LIKVARD_PSEUDONYM_SECRET is too weak: {weakness}. {_MAKE_SECRET}")
        return self.pseudonym_secret

    def topic(self, name: str) -> str:
        """Topic name with the optional prefix (tests isolate themselves with one)."""
        return f"{self.topic_prefix}{name}"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60:
        raise ConfigError(f"LIKVARD_CASE_WAIT_SECONDS must be 0-60 seconds, not {text!r}")
    return value


def _url(name: str, value: str | None) -> str | None:
    if not value:
        return None
    if not re.fullmatch(r"https?://[^\s/?#]+[^\s?#]*", value):
        raise ConfigError(f"{name} must be an http(s) URL, e.g. https://login.example.se/realms/x")
    return value


def _claim(e: dict[str, str] | os._Environ[str], name: str, default: str) -> str:
    value = e.get(name) or default
    if not _CLAIM_PATH.fullmatch(value):
        raise ConfigError(
            f"{name} must be a claim name or a dotted path to one (e.g. realm_access.roles"
            f" for Keycloak, roles for Entra ID), not {value!r}"
        )
    return value


def _algorithms(text: str) -> tuple[str, ...]:
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    refused = [a for a in names if a.lower() == "none" or a.upper().startswith("HS")]
    if refused:
        raise ConfigError(
            "LIKVARD_OIDC_ALGORITHMS may not hold 'none' or an HS* algorithm (a shared"
            " secret, and an attacker's way in with the public key); use asymmetric ones,"
            " e.g. RS256,PS256,ES256"
        )
    unknown = [a for a in names if a not in ALLOWED_ALGORITHMS]
    if unknown or not names:
        raise ConfigError(
            "LIKVARD_OIDC_ALGORITHMS must be a comma-separated list of "
            + ", ".join(sorted(ALLOWED_ALGORITHMS))
            + f"; not {text!r}"
        )
    return names


def _leeway(text: str) -> int:
    if not text.isdigit() or int(text) > 300:
        raise ConfigError(
            f"LIKVARD_OIDC_LEEWAY_SECONDS must be 0-300 whole seconds (the clock skew allowed"
            f" on exp/nbf/iat), not {text!r}"
        )
    return int(text)


def _flag(name: str, text: str | None) -> bool:
    if text is None or text == "":
        return False
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, not {text!r}")


def load_settings(env: dict[str, str] | None = None) -> Settings:
    e = os.environ if env is None else env
    secret = e.get("LIKVARD_PSEUDONYM_SECRET")
    batch = e.get("LIKVARD_RELAY_BATCH_SIZE", "500")
    if not batch.isdigit() or int(batch) < 1:
        raise ConfigError(
            f"LIKVARD_RELAY_BATCH_SIZE must be a positive whole number, not {batch!r}"
        )
    max_request = e.get("LIKVARD_MAX_REQUEST_BYTES", str(1024 * 1024))
    if not re.fullmatch(r"[1-9][0-9]{0,11}", max_request):
        raise ConfigError(
            "LIKVARD_MAX_REQUEST_BYTES must be a positive whole number of bytes (the largest"
            f" request body the HTTP APIs read), not {max_request!r}"
        )
    return Settings(
        database_url=e.get("LIKVARD_DATABASE_URL") or None,
        kafka_bootstrap=e.get("KAFKA_BOOTSTRAP_SERVERS") or None,
        pseudonym_secret=secret.encode() if secret else None,
        topic_prefix=e.get("LIKVARD_TOPIC_PREFIX", ""),
        relay_batch_size=int(batch),
        case_wait_seconds=_seconds(e.get("LIKVARD_CASE_WAIT_SECONDS", "5")),
        max_request_bytes=int(max_request),
        oidc_issuer=_url("LIKVARD_OIDC_ISSUER", e.get("LIKVARD_OIDC_ISSUER")),
        oidc_audience=e.get("LIKVARD_OIDC_AUDIENCE") or "likvard",
        oidc_discovery_url=_url("LIKVARD_OIDC_DISCOVERY_URL", e.get("LIKVARD_OIDC_DISCOVERY_URL")),
        oidc_roles_claim=_claim(e, "LIKVARD_OIDC_ROLES_CLAIM", "realm_access.roles"),
        oidc_districts_claim=_claim(e, "LIKVARD_OIDC_DISTRICTS_CLAIM", "likvard_districts"),
        oidc_unit_claim=_claim(e, "LIKVARD_OIDC_UNIT_CLAIM", "likvard_unit"),
        oidc_algorithms=_algorithms(e.get("LIKVARD_OIDC_ALGORITHMS") or "RS256,PS256,ES256"),
        oidc_leeway_seconds=_leeway(e.get("LIKVARD_OIDC_LEEWAY_SECONDS") or "30"),
        public_docs=_flag("LIKVARD_PUBLIC_DOCS", e.get("LIKVARD_PUBLIC_DOCS")),
        access_log_database_url=e.get("LIKVARD_ACCESS_LOG_DATABASE_URL") or None,
        keys_database_url=e.get("LIKVARD_KEYS_DATABASE_URL") or None,
        kek=e.get("LIKVARD_KEK") or None,
        kek_id=_kek_id(e.get("LIKVARD_KEK_ID") or "env-1"),
        kek_previous=e.get("LIKVARD_KEK_PREVIOUS") or None,
        retention_years=_years(e.get("LIKVARD_RETENTION_YEARS") or "5"),
        referral_answer_days=_days("LIKVARD_REFERRAL_ANSWER_DAYS", e, 14),
        followup_window_days=_days("LIKVARD_FOLLOWUP_WINDOW_DAYS", e, 30),
        console=console_settings(e),
    )


def _kek_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", text):
        raise ConfigError(
            f"LIKVARD_KEK_ID must be 1-64 letters, digits or ._- (names the KEK), not {text!r}"
        )
    return text


def _years(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise ConfigError(
            "LIKVARD_RETENTION_YEARS must be a whole number of years, 1-100 (records are"
            f" culled that long after their last entry), not {text!r}"
        )
    return int(text)


def _days(name: str, e: dict[str, str] | os._Environ[str], default: int) -> int:
    text = e.get(name) or str(default)
    if not re.fullmatch(r"[0-9]{1,4}", text) or int(text) > 3650:
        raise ConfigError(f"{name} must be a whole number of days, 0-3650, not {text!r}")
    return int(text)
