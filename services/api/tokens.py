"""API tokens: random, shown once, stored only as their SHA-256.

A token is ``dbt_`` + 32 random bytes (URL-safe base64). Its SHA-256 hex digest is what the database
keeps, so a leaked database does not leak usable tokens; lookups compare digests (an index lookup on
the digest of a high-entropy secret, so no timing side channel reveals anything useful).
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "dbt_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def create_token(database_url: str, name: str) -> str:
    """Store a new token's hash under ``name`` and return the token (shown this once, never stored)."""
    from ..core.db import ApiToken, session_factory

    name = name.strip()
    if not name:
        from ..core.errors import InputError

        raise InputError("a token needs a name", fix="e.g. dosebench token create alice-laptop")
    token = new_token()
    with session_factory(database_url)() as session, session.begin():
        session.add(ApiToken(name=name[:255], token_hash=hash_token(token)))
    return token
