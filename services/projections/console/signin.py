"""Sign-in to the console: OpenID Connect's authorisation-code flow with PKCE (RFC 7636,
S256), the console being a public client of the same provider the APIs trust.

The browser is sent to the provider's `authorization_endpoint` with a fresh `state`,
`nonce` and code challenge; the provider sends it back to `/console/callback` with a code,
which the console exchanges (server to server) at the `token_endpoint` with the verifier.
The ID token must be the provider's, for this client, with the nonce of this sign-in; the
access token is then verified exactly as the APIs verify it, and is what every page acts
with. Nothing here trusts the browser beyond the code it returns.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from likvard.config import Settings
from likvard.guard import AuthenticationError
from likvard.oidc import OidcVerifier, pkce_s256


class SignInError(Exception):
    """The sign-in did not complete; `reason` is safe to show (no token, no personal data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Tokens:
    access_token: str
    expires_at: int


class Provider:
    """The OpenID provider as the console uses it: its endpoints (from discovery, fetched
    once and kept), the authorisation URL of a sign-in, and the code exchange."""

    def __init__(self, settings: Settings, client_id: str, timeout: float = 5.0) -> None:
        self.discovery_url = settings.oidc_discovery
        self.issuer = settings.require_oidc()
        self.client_id = client_id
        self._timeout = timeout
        self._document: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def document(self) -> dict[str, Any]:
        with self._lock:
            if self._document is None:
                try:
                    found = httpx.get(self.discovery_url, timeout=self._timeout)
                    found.raise_for_status()
                    document = found.json()
                except (httpx.HTTPError, ValueError) as exc:
                    raise SignInError("the identity provider does not answer") from exc
                needed = ("authorization_endpoint", "token_endpoint")
                if not isinstance(document, dict) or document.get("issuer") != self.issuer:
                    raise SignInError("the identity provider's discovery names another issuer")
                if not all(isinstance(document.get(k), str) for k in needed):
                    raise SignInError("the identity provider has no authorisation-code flow")
                self._document = document
            return self._document

    def authorize_url(
        self, redirect_uri: str, state: str, nonce: str, verifier: str, language: str
    ) -> str:
        query = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": redirect_uri,
            "scope": "openid",
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce_s256(verifier),
            "code_challenge_method": "S256",
            "ui_locales": language,
        }
        return f"{self.document()['authorization_endpoint']}?{urlencode(query)}"

    def logout_url(self, after: str) -> str | None:
        end = self.document().get("end_session_endpoint")
        if not isinstance(end, str):
            return None
        query = {"client_id": self.client_id, "post_logout_redirect_uri": after}
        return f"{end}?{urlencode(query)}"

    def exchange(
        self, code: str, verifier: str, redirect_uri: str, nonce: str, verifier_of: OidcVerifier
    ) -> Tokens:
        """The tokens for a code; SignInError unless the ID token is this sign-in's."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": self.client_id,
            "code_verifier": verifier,
        }
        try:
            answer = httpx.post(self.document()["token_endpoint"], data=form, timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise SignInError("the identity provider does not answer") from exc
        if answer.status_code != 200:
            raise SignInError("the identity provider refused the sign-in code")
        try:
            body = answer.json()
            access, id_token = body["access_token"], body["id_token"]
            lifetime = int(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError) as exc:
            raise SignInError("the identity provider's answer is not a token answer") from exc
        try:
            claims = verifier_of.verified_claims(id_token, audience=self.client_id)
            verifier_of.verified_claims(access)
        except AuthenticationError as exc:
            raise SignInError(f"the provider's token was refused ({exc.code})") from exc
        if claims.get("nonce") != nonce:
            raise SignInError("the ID token is not of this sign-in (nonce)")
        return Tokens(access, int(time.time()) + max(lifetime, 0))
