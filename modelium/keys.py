"""API keys: made here, stored in the config only as their SHA-256 digest.

A key is 32 random bytes, so a fast digest is as safe as a slow one: there is no dictionary to
try, and the gateway compares digests, never the secret itself.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "mdl-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
