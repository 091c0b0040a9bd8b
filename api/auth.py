"""API keys: who is asking, on behalf of which organization, and whether they may manage models.

Keys live in the config only as SHA-256 digests (`modelium keys create` prints a key and its
entry; see `modelium.keys`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from fastapi import Request

from api.errors import Forbidden, Unauthorized
from modelium.config import ApiKey
from modelium.keys import digest

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    name: str
    organization: str
    admin: bool
    # Names or globs of the models this key may see; empty: all.
    models: tuple[str, ...] = ()

    def may_use(self, model: str) -> bool:
        return not self.models or any(fnmatchcase(model, pattern) for pattern in self.models)


# Without configured keys everyone is this principal: the gateway is then meant for loopback.
OPEN_ACCESS = Principal(ANONYMOUS, ANONYMOUS, admin=True)


class KeyRing:
    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_digest = {
            k.sha256: Principal(k.name, k.organization, "admin" in k.scopes, tuple(k.models)) for k in keys
        }

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, request: Request) -> Principal:
        if not self._by_digest:
            return OPEN_ACCESS
        presented = _presented_key(request)
        if not presented:
            raise Unauthorized(
                "this gateway requires an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        principal = self._by_digest.get(digest(presented))
        if principal is None:
            raise Unauthorized("the API key is not valid (unknown or revoked)")
        return principal


def require_admin(principal: Principal, action: str) -> None:
    if not principal.admin:
        raise Forbidden(
            f"API key {principal.name!r} (organization {principal.organization!r}) may not {action}: "
            "that needs a key with the admin scope"
        )


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    return request.headers.get("x-api-key") or None
