"""The console's cookies: sealed (AES-GCM) so that a browser holds its own session and no
server keeps one, which lets any replica of the projections service answer any page.

A session cookie holds the access token the provider issued, its expiry, the anti-forgery
(CSRF) token of the session's forms and the language. A sign-in cookie holds, for the ten
minutes a sign-in may take, the `state`, `nonce` and PKCE verifier of one authorisation
request and the page to return to. Both are HttpOnly, SameSite=Lax, Path=/console and, behind
TLS, Secure. A cookie that does not open (another key, tampered, too old) is no cookie.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SESSION_COOKIE = "likvard_session"
SIGNIN_COOKIE = "likvard_signin"
LANGUAGE_COOKIE = "likvard_lang"
SIGNIN_SECONDS = 600
MAX_COOKIE_BYTES = 4000  # browsers keep about 4 KB per cookie


@dataclass(frozen=True)
class Session:
    """A signed-in browser: the access token (verified again on every page), when it
    expires (epoch seconds), the session's CSRF token."""

    token: str
    expires_at: int
    csrf: str


@dataclass(frozen=True)
class SignIn:
    """One authorisation request in flight (RFC 6749 state, OIDC nonce, RFC 7636 verifier)."""

    state: str
    nonce: str
    verifier: str
    next: str
    started_at: int


def new_signin(next_page: str, now: float | None = None) -> SignIn:
    return SignIn(
        state=secrets.token_urlsafe(24),
        nonce=secrets.token_urlsafe(24),
        verifier=secrets.token_urlsafe(48),  # 64 characters: within RFC 7636's 43-128
        next=next_page,
        started_at=int(time.time() if now is None else now),
    )


def new_session(token: str, expires_at: int) -> Session:
    return Session(token=token, expires_at=expires_at, csrf=secrets.token_urlsafe(24))


class CookieBox:
    """Seals and opens the console's cookies with a key derived from the console secret;
    the cookie's name is bound in as associated data, so one cookie never opens as another."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the console secret must be at least 32 bytes")
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"likvard console cookies v1"
        ).derive(secret)
        self._aead = AESGCM(key)

    def seal(self, name: str, value: Session | SignIn) -> str:
        nonce = secrets.token_bytes(12)
        plain = json.dumps(asdict(value), separators=(",", ":")).encode()
        sealed = nonce + self._aead.encrypt(nonce, plain, name.encode())
        text = base64.urlsafe_b64encode(sealed).decode().rstrip("=")
        if len(text) > MAX_COOKIE_BYTES:
            raise ValueError("the sealed cookie is too large for a browser to keep")
        return text

    def _open(self, name: str, text: str | None) -> dict[str, Any] | None:
        if not text or len(text) > MAX_COOKIE_BYTES:
            return None
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            plain = self._aead.decrypt(raw[:12], raw[12:], name.encode())
            data = json.loads(plain)
        except (binascii.Error, ValueError, InvalidTag):
            return None
        return data if isinstance(data, dict) else None

    def session(self, text: str | None, now: float | None = None) -> Session | None:
        data = self._open(SESSION_COOKIE, text)
        try:
            found = Session(**data) if data is not None else None
        except TypeError:
            return None
        if found is None or found.expires_at <= (time.time() if now is None else now):
            return None
        return found

    def signin(self, text: str | None, now: float | None = None) -> SignIn | None:
        data = self._open(SIGNIN_COOKIE, text)
        try:
            found = SignIn(**data) if data is not None else None
        except TypeError:
            return None
        if found is None:
            return None
        if (time.time() if now is None else now) - found.started_at > SIGNIN_SECONDS:
            return None
        return found
