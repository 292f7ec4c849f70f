"""API keys: random, shown once, stored as a SHA-256 hash; each key belongs to one tenant."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "lp_"
TENANT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class AuthError(Exception):
    """Missing, malformed, unknown or revoked key."""


def hash_key(key: str) -> str:
    """Hex SHA-256 of a key; keys have 256 random bits, so a slow KDF adds nothing."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (only ever shown to its owner once)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def validate_tenant_name(name: str) -> str:
    """The tenant name, or ValueError saying what to fix."""
    if not 1 <= len(name) <= 64 or not set(name) <= TENANT_NAME_CHARS:
        raise ValueError(f"tenant name must be 1-64 characters of a-z 0-9 - _ . (got {name!r})")
    return name


def create_key(session: Session, tenant_name: str, name: str = "", is_admin: bool = False) -> tuple[str, ApiKey]:
    """Create (or reuse) the tenant and a new key for it; returns the plain key and its row."""
    validate_tenant_name(tenant_name)
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    key = new_key()
    row = ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10], name=name, is_admin=is_admin)
    session.add(row)
    session.flush()
    return key, row


def authenticate(session: Session, authorization: str | None) -> ApiKey:
    """The key row named by an `Authorization: Bearer <key>` header, or AuthError."""
    if not authorization:
        raise AuthError("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthError("malformed Authorization header; send 'Authorization: Bearer <api key>'")
    digest = hash_key(key)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    # The lookup is by hash, so timing reveals nothing about the key; compare anyway to be explicit.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise AuthError("unknown API key")
    if row.revoked_at is not None:
        raise AuthError("this API key was revoked")
    return row


def revoke_key(session: Session, prefix: str) -> int:
    """Revoke every key whose shown prefix matches; returns how many."""
    rows = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))).all()
    for row in rows:
        row.revoked_at = utcnow()
    return len(rows)
