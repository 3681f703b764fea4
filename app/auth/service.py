"""API keys: `cnd_<prefix>_<secret>`. Only the prefix (to find the row) and a sha256 of the whole key
are stored, so a database leak does not leak usable keys."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.auth import repository
from core.db.models import ApiKey, utcnow
from core.errors import Invalid, NotFound, Unauthorized

KEY_SCHEME = "cnd"
PREFIX_LENGTH = 8
_KEY_PATTERN = re.compile(rf"^{KEY_SCHEME}_([0-9a-f]{{{PREFIX_LENGTH}}})_([A-Za-z0-9_-]{{20,200}})$")
_TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class InvalidApiKey(Unauthorized):
    # RFC 6750: a 401 for a bearer-protected resource says which scheme to use.
    headers = {"WWW-Authenticate": 'Bearer realm="condenser"'}


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant every query is filtered by, and the key they used (for audit)."""

    tenant: str
    key_prefix: str

    @property
    def actor(self) -> str:
        return f"api-key:{self.key_prefix}"


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_key(session: Session, tenant: str) -> tuple[ApiKey, str]:
    """A new key for `tenant`; the plaintext is returned once and never stored."""
    if not _TENANT_PATTERN.match(tenant):
        raise Invalid("tenant must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    prefix = secrets.token_hex(PREFIX_LENGTH // 2)
    plaintext = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(tenant=tenant, prefix=prefix, key_hash=hash_key(plaintext))
    repository.add(session, key)
    return key, plaintext


def list_keys(session: Session, tenant: str) -> list[ApiKey]:
    return repository.for_tenant(session, tenant)


def revoke_key(session: Session, tenant: str, prefix: str) -> ApiKey:
    """Revoke the tenant's key with this prefix (accepts the bare prefix or `cnd_<prefix>`)."""
    prefix = prefix.removeprefix(f"{KEY_SCHEME}_")
    key = repository.by_prefix(session, prefix)
    if key is None or key.tenant != tenant:
        raise NotFound(f"tenant {tenant} has no API key with prefix {prefix}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def revoked(session: Session, principal: Principal) -> bool:
    """Whether the key the principal authenticated with has been revoked since (for long-lived requests)."""
    key = repository.by_prefix(session, principal.key_prefix)
    return key is None or key.revoked_at is not None


def authenticate(session: Session, plaintext: str | None) -> Principal:
    return verify_key(repository.by_prefix(session, key_prefix(plaintext)), plaintext)


def key_prefix(plaintext: str | None) -> str:
    """The prefix that finds the key's row; a missing or malformed key is refused before any query."""
    if not plaintext:
        raise InvalidApiKey("missing API key: send the header 'Authorization: Bearer cnd_...'")
    match = _KEY_PATTERN.match(plaintext)
    if match is None:
        raise InvalidApiKey("malformed API key: expected 'cnd_<prefix>_<secret>' as created by 'condenser keys create'")
    return match.group(1)


def verify_key(key: ApiKey | None, plaintext: str) -> Principal:
    """Who `plaintext` acts for, given the row its prefix found (None: no such prefix)."""
    # compare_digest so that response timing does not reveal how much of a guessed hash matched.
    if key is None or not hmac.compare_digest(key.key_hash, hash_key(plaintext)):
        raise InvalidApiKey("invalid API key")
    if key.revoked_at is not None:
        raise InvalidApiKey(f"API key cnd_{key.prefix} was revoked")
    return Principal(tenant=key.tenant, key_prefix=key.prefix)
