"""Requester API keys: ``mm_<prefix>_<secret>``; only the SHA-256 of the whole key is stored."""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any

from flask import g, request
from sqlalchemy.orm import Session

from service.db import get_session
from service.errors import ApiError
from service.models import ApiKey

KEY_PREFIX = "mm_"


def hash_secret(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def create_api_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """Create a key row and return it with the plaintext key (shown once, never stored)."""
    if not name.strip():
        raise ValueError("a key needs a non-empty name")
    prefix = secrets.token_hex(6)
    plaintext = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(name=name.strip(), prefix=prefix, key_hash=hash_secret(plaintext))
    session.add(key)
    session.flush()
    return key, plaintext


def lookup_api_key(session: Session, plaintext: str) -> ApiKey | None:
    if not plaintext.startswith(KEY_PREFIX):
        return None
    prefix, _, secret = plaintext[len(KEY_PREFIX) :].partition("_")
    if not prefix or not secret:
        return None
    key = ApiKey.by_prefix(session, prefix)
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.key_hash, hash_secret(plaintext)):
        return None
    return key


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message)


def require_api_key(view: Callable[..., Any]) -> Callable[..., Any]:
    """Resolve ``Authorization: Bearer <key>`` into ``g.api_key`` or answer 401."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("send an API key as 'Authorization: Bearer <key>'")
        key = lookup_api_key(get_session(), token.strip())
        if key is None:
            raise _unauthorized("the API key is not valid")
        g.api_key = key
        return view(*args, **kwargs)

    return wrapper
