"""The OpenID Connect access-token verifier: a bearer JWT becomes a `Principal`, or is
refused with a code (`guard.AuthenticationError`).

Checks, in this order, so that nothing an attacker chose touches a key before it is known
to be allowed: the token's form; its `alg` against the allowed asymmetric algorithms
(`none` and every HS* never are); the signing key by `kid` from the issuer's JWKS (the
discovery document's `jwks_uri`), which must fit the algorithm (kty, curve, its own alg
and use); the signature (joserfc); `iss`, `aud` (a string or a list), `exp`/`nbf`/`iat`
with the configured leeway; then the claims mapping (dotted paths from the settings) and
the subject (`likvard.identity`: one shaped like an identity number is refused).

The JWKS is cached: fetched on first use, again on an unknown `kid` (at most once per
`refetch_interval`, so forged kids cannot make us hammer the provider), and after
`max_age`. Thread-safe: FastAPI runs sync handlers in a thread pool. Error details never
hold the token or a claim's value.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey, import_key
from joserfc.jws import extract_compact

from likvard.config import ALLOWED_ALGORITHMS, Settings
from likvard.districts import DistrictRegistry
from likvard.guard import AuthenticationError
from likvard.identity import InvalidPrincipal, Principal, principal_from_claims

log = logging.getLogger("likvard.oidc")

MAX_TOKEN_BYTES = 16 * 1024
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


def claim_at(claims: Mapping[str, Any], path: str) -> object:
    """The value at a dotted claim path (`realm_access.roles`), None where it is absent.
    A claim whose own name holds the whole path (e.g. a namespaced one) is taken first."""
    if path in claims:
        return claims[path]
    value: object = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _key_fits(key: Key, alg: str) -> bool:
    """The key may verify this algorithm: its type (and curve) fit, and its own alg and use,
    where it states them, agree."""
    params = key.as_dict(private=False)
    if params.get("alg") not in (None, alg) or params.get("use") not in (None, "sig"):
        return False
    if alg.startswith(("RS", "PS")):
        return isinstance(key, RSAKey)
    if alg in _CURVES:
        return isinstance(key, ECKey) and params.get("crv") == _CURVES[alg]
    if alg == "EdDSA":
        return isinstance(key, OKPKey) and params.get("crv") in ("Ed25519", "Ed448")
    return False


def pkce_s256(verifier: str) -> str:
    """The S256 code challenge of a PKCE verifier (RFC 7636): base64url(SHA-256(verifier)),
    unpadded; the console sends it, the development provider checks it."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OidcVerifier:
    """Verifies access tokens of one issuer for one audience (implements
    `guard.Authenticator`). Creating it does no I/O."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        discovery_url: str | None = None,
        algorithms: Collection[str] = ("RS256", "PS256", "ES256"),
        leeway: int = 30,
        roles_claim: str = "realm_access.roles",
        districts_claim: str = "likvard_districts",
        unit_claim: str = "likvard_unit",
        timeout: float = 3.0,
        refetch_interval: float = 10.0,
        retry_interval: float = 1.0,
        max_age: float = 3600.0,
        clock: Callable[[], float] = time.time,
        expand_districts: Callable[[Iterable[str]], frozenset[str]] | None = None,
    ) -> None:
        refused = set(algorithms) - ALLOWED_ALGORITHMS
        if refused or not algorithms:
            raise ValueError("only asymmetric JWS algorithms may verify tokens")
        self.issuer, self.audience = issuer, audience
        self.discovery_url = discovery_url or (
            issuer.rstrip("/") + "/.well-known/openid-configuration"
        )
        self.algorithms = frozenset(algorithms)
        # The token names today's districts; cases recorded under the districts they
        # replaced are theirs too (the reference data's successors).
        self.expand_districts = expand_districts
        self.leeway = leeway
        self.roles_claim, self.districts_claim = roles_claim, districts_claim
        self.unit_claim = unit_claim
        self.timeout = timeout
        self.refetch_interval, self.retry_interval = refetch_interval, retry_interval
        self.max_age = max_age
        self.clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str | None, Key] | None = None
        self._loaded_at = 0.0  # when the cached keys were fetched
        self._attempted_at: float | None = None  # the last fetch attempt, good or not
        self._client: httpx.Client | None = None
        self.fetches = 0  # JWKS fetches that succeeded (tests and metrics)

    # -- the checks ------------------------------------------------------------------

    def authenticate(self, token: str) -> Principal:
        """The principal of a verified token; AuthenticationError with its code otherwise."""
        return self._principal(self.verified_claims(token))

    def verified_claims(self, token: str, audience: str | None = None) -> dict[str, Any]:
        """The claims of a token signed by the issuer's key, of the issuer, for `audience`
        (default: the verifier's) and not expired; AuthenticationError otherwise. The
        console checks an ID token with it (its audience is the console's client id)."""
        header = self._header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthenticationError(
                "algorithm-not-allowed",
                "The token's signing algorithm is not allowed (allowed: "
                + ", ".join(sorted(self.algorithms))
                + ").",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("malformed", "The token's key id (kid) is not a string.")
        key = self._key(kid)
        if not _key_fits(key, alg):
            raise AuthenticationError(
                "algorithm-not-allowed",
                "The token's algorithm does not fit the issuer's key it names.",
            )
        try:
            verified = jwt.decode(token, key, algorithms=[alg])
        except BadSignatureError as exc:
            raise AuthenticationError(
                "bad-signature", "The token's signature is not valid."
            ) from exc
        except (JoseError, ValueError, TypeError) as exc:
            raise AuthenticationError("malformed", "The token is not a valid JWT.") from exc
        claims = verified.claims
        if not isinstance(claims, dict):
            raise AuthenticationError("malformed", "The token's claims are not a JSON object.")
        self._check_claims(claims, self.audience if audience is None else audience)
        return claims

    def _header(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise AuthenticationError("malformed", "The token is not a compact JWS (a JWT).")
        try:
            header = extract_compact(token.encode("ascii")).protected
        except (JoseError, ValueError, UnicodeError) as exc:
            raise AuthenticationError(
                "malformed", "The token is not a compact JWS (a JWT)."
            ) from exc
        if not isinstance(header, dict):
            raise AuthenticationError("malformed", "The token's header is not a JSON object.")
        return dict(header)

    def _check_claims(self, claims: dict[str, Any], audience: str) -> None:
        if claims.get("iss") != self.issuer:
            raise AuthenticationError(
                "wrong-issuer", f"The token was not issued by the configured issuer {self.issuer}."
            )
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if audience not in audiences:
            raise AuthenticationError(
                "wrong-audience", f"The token is not meant for this audience ({audience})."
            )
        now = self.clock()
        times = {}
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise AuthenticationError("malformed", f"The token's {name} is not a number.")
            times[name] = float(value)
        if "exp" not in times:
            raise AuthenticationError("malformed", "The token has no expiry (exp).")
        if times["exp"] + self.leeway < now:
            raise AuthenticationError("expired", "The token has expired: sign in again.")
        for name in ("nbf", "iat"):
            if name in times and times[name] - self.leeway > now:
                raise AuthenticationError(
                    "not-yet-valid", f"The token is not valid yet ({name} is in the future)."
                )

    def _principal(self, claims: dict[str, Any]) -> Principal:
        subject = claims.get("sub")
        try:
            principal = principal_from_claims(
                subject,
                claim_at(claims, self.roles_claim),
                claim_at(claims, self.districts_claim),
                claim_at(claims, self.unit_claim),
            )
        except InvalidPrincipal as exc:
            code = "invalid-subject" if _bad_subject(subject) else "malformed"
            raise AuthenticationError(code, str(exc)) from exc
        if self.expand_districts is not None and principal.districts:
            principal = replace(principal, districts=self.expand_districts(principal.districts))
        return principal

    # -- the keys --------------------------------------------------------------------

    def _key(self, kid: str | None) -> Key:
        with self._lock:
            now = self.clock()
            if self._keys is None:
                self._refresh(now, required=True)
            elif now - self._loaded_at > self.max_age:
                self._refresh(now, required=False)
            key = self._find(kid)
            if key is None and self._may_refetch(now):
                self._refresh(now, required=True)
                key = self._find(kid)
        if key is None:
            raise AuthenticationError(
                "unknown-key", "The token is signed with a key the issuer does not publish."
            )
        return key

    def _find(self, kid: str | None) -> Key | None:
        keys = self._keys or {}
        if kid is not None:
            return keys.get(kid)
        # No kid: only unambiguous when the issuer publishes one signing key.
        return next(iter(keys.values())) if len(keys) == 1 else None

    def _may_refetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self.refetch_interval

    def _refresh(self, now: float, *, required: bool) -> None:
        """Fetch the JWKS (through discovery). A failure raises issuer-unavailable when no
        usable keys are cached (`required`); otherwise the cached keys stay in use."""
        if (
            self._keys is None
            and self._attempted_at is not None
            and now - self._attempted_at < self.retry_interval
        ):
            raise AuthenticationError(
                "issuer-unavailable", "The identity provider does not answer; try again shortly."
            )
        self._attempted_at = now
        try:
            keys = self._fetch_keys()
        except (httpx.HTTPError, ValueError, KeyError, TypeError, JoseError) as exc:
            log.warning(
                "cannot fetch the issuer's keys",
                extra={"issuer": self.issuer, "error": type(exc).__name__},
            )
            if required:
                raise AuthenticationError(
                    "issuer-unavailable",
                    "The identity provider's keys cannot be fetched; try again shortly.",
                ) from exc
            return
        self._keys, self._loaded_at = keys, now
        self.fetches += 1

    def _fetch_keys(self) -> dict[str | None, Key]:
        if self._client is None:
            self._client = httpx.Client(timeout=httpx.Timeout(self.timeout), follow_redirects=False)
        discovery = self._client.get(self.discovery_url).raise_for_status().json()
        if not isinstance(discovery, dict) or discovery.get("issuer") != self.issuer:
            raise ValueError("the discovery document names another issuer")
        jwks_uri = discovery["jwks_uri"]
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise ValueError("the discovery document has no jwks_uri")
        document = self._client.get(jwks_uri).raise_for_status().json()
        keys: dict[str | None, Key] = {}
        for data in document["keys"]:
            if not isinstance(data, dict) or data.get("kty") == "oct" or data.get("use") == "enc":
                continue  # a symmetric or encryption key never verifies a token
            try:
                key = import_key(data)
            except (JoseError, ValueError, TypeError):
                log.warning(
                    "skipping a JWKS key that cannot be read", extra={"kid": data.get("kid")}
                )
                continue
            if key.is_private:
                continue  # a published private key is a provider's mistake; never use it
            keys[data.get("kid")] = key
        return keys

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _bad_subject(subject: object) -> bool:
    if not isinstance(subject, str):
        return True
    try:
        Principal(subject, frozenset())
    except InvalidPrincipal:
        return True
    return False


def verifier_from_settings(settings: Settings) -> OidcVerifier:
    """The verifier of the configured issuer (ConfigError when LIKVARD_OIDC_ISSUER is unset);
    no I/O until the first token."""
    return OidcVerifier(
        settings.require_oidc(),
        settings.oidc_audience,
        discovery_url=settings.oidc_discovery_url,
        algorithms=settings.oidc_algorithms,
        leeway=settings.oidc_leeway_seconds,
        roles_claim=settings.oidc_roles_claim,
        districts_claim=settings.oidc_districts_claim,
        unit_claim=settings.oidc_unit_claim,
        expand_districts=DistrictRegistry.load().with_predecessors,
    )


__all__ = ["OidcVerifier", "claim_at", "verifier_from_settings"]
