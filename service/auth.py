"""API keys: random, shown once, stored as a SHA-256 hash; each key belongs to one tenant."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import event, select
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


@dataclass(frozen=True)
class Principal:
    """An authenticated key: what request handlers need of it (no database row, so it can outlive its session)."""

    key_id: int
    tenant_id: int
    is_admin: bool


class KeyCache:
    """Recently authenticated keys by hash, kept `ttl_s` seconds, so most requests skip the key lookup.

    Only valid keys are kept. A key revoked through `revoke_key` in this process is dropped from every cache once
    the revocation commits; one revoked by another process (the CLI) stops working within `ttl_s`.
    """

    def __init__(self, ttl_s: float, max_keys: int = 1024, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_keys, self.clock = ttl_s, max_keys, clock
        self._keys: dict[str, tuple[float, Principal]] = {}
        _caches.add(self)

    def get(self, digest: str) -> Principal | None:
        entry = self._keys.get(digest)
        if entry is None:
            return None
        if self.clock() >= entry[0]:
            self._keys.pop(digest, None)
            return None
        return entry[1]

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._keys) >= self.max_keys:
            self._keys.pop(next(iter(self._keys), ""), None)  # the oldest entry
        self._keys[digest] = (self.clock() + self.ttl_s, principal)

    def clear(self) -> None:
        self._keys.clear()


_caches: weakref.WeakSet[KeyCache] = weakref.WeakSet()


def clear_key_caches(*_: object) -> None:
    """Forget every cached key of this process."""
    for cache in list(_caches):
        cache.clear()


def bearer_digest(authorization: str | None) -> str:
    """The hash of the key in an `Authorization: Bearer <key>` header, or AuthError."""
    if not authorization:
        raise AuthError("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthError("malformed Authorization header; send 'Authorization: Bearer <api key>'")
    return hash_key(key)


def authenticate(cache: KeyCache, sessions: Callable[[], Session], authorization: str | None) -> Principal:
    """The caller of an `Authorization` header, from `cache` or else looked up in a short session of its own."""
    digest = bearer_digest(authorization)
    principal = cache.get(digest)
    if principal is None:
        with sessions() as session:
            row = lookup_key(session, digest)
            principal = Principal(key_id=row.id, tenant_id=row.tenant_id, is_admin=row.is_admin)
        cache.put(digest, principal)
    return principal


def lookup_key(session: Session, digest: str) -> ApiKey:
    """The valid key row with this hash, or AuthError."""
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
    if rows:
        clear_key_caches()
        # Again once committed: a request in between may have cached the key from the old row.
        event.listen(session, "after_commit", clear_key_caches, once=True)
    return len(rows)
