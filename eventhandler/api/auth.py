"""Who may call the admin API: bearer tokens from the settings, and the role each one gives.

Two roles: `reader` (any GET) and `admin` (also POST, PUT and DELETE). Tokens are compared in constant
time and never logged; the audit trail records the role as the actor (`api:admin`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from eventhandler.config import Settings

Role = Literal["admin", "reader"]


@dataclass(frozen=True)
class Principal:
    role: Role

    @property
    def actor(self) -> str:
        """Who the audit log names for a change made with this token."""
        return f"api:{self.role}"

    @property
    def may_change(self) -> bool:
        return self.role == "admin"


class TokenChecker:
    """Bearer tokens from the settings. Every configured token is compared, in constant time."""

    def __init__(self, settings: Settings) -> None:
        self._tokens: list[tuple[bytes, Role]] = []
        if settings.admin_token is not None:
            self._tokens.append((_digest(settings.admin_token.get_secret_value().encode()), "admin"))
        if settings.admin_read_token is not None:
            self._tokens.append((_digest(settings.admin_read_token.get_secret_value().encode()), "reader"))

    @property
    def configured(self) -> bool:
        return bool(self._tokens)

    @property
    def roles(self) -> dict[bytes, Role]:
        """The configured tokens' digests and roles (a console session holds the digest that signed
        it in, and has the role that token has now)."""
        return {token: role for token, role in reversed(self._tokens)}

    def role_of_token(self, token: str) -> tuple[Role, bytes] | None:
        """The role a token gives and its digest (the console's sign-in form), or None."""
        presented = _digest(token.strip().encode("utf-8", "surrogateescape"))
        found: tuple[Role, bytes] | None = None
        for digest, role in self._tokens:
            if hmac.compare_digest(presented, digest) and found is None:
                found = (role, digest)
        return found

    def role_for(self, authorization: str | None) -> Role | None:
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return None
        # Starlette decodes header bytes as latin-1; this gives back the bytes the client sent.
        presented = _digest(credentials.strip().encode("latin-1"))
        found: Role | None = None
        for token, role in self._tokens:
            if hmac.compare_digest(presented, token) and found is None:
                found = role
        return found


def _digest(token: bytes) -> bytes:
    """Tokens are compared as SHA-256 digests: equal lengths, so the comparison time tells nothing."""
    return hashlib.sha256(token).digest()


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="BearerToken",
    description="EVENTHANDLER_ADMIN_TOKEN (read and change) or EVENTHANDLER_ADMIN_READ_TOKEN (read only).",
)


def _principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """The caller the middleware authenticated (the bearer dependency puts the scheme in OpenAPI)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    return principal


def _admin(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if not principal.may_change:
        raise HTTPException(403, "this token may read but not change the DLQ")
    return principal


Reader = Annotated[Principal, Depends(_principal)]
Admin = Annotated[Principal, Depends(_admin)]
