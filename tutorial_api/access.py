"""API keys: which callers may use the API, checked in constant time, known in the log by name, never by key."""

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tutorial_api.errors import Refusal

bearer = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description="an API key, sent as `Authorization: Bearer KEY`")


@dataclass(frozen=True)
class ApiKey:
    name: str
    secret: str = field(repr=False)


def parse_keys(entries) -> list[ApiKey]:
    """`KEY` or `NAME:KEY` entries as keys; an unnamed key is called key1, key2... by its place in the list."""
    keys = []
    for place, entry in enumerate(entries, start=1):
        name, colon, secret = entry.partition(":")
        if not colon:
            name, secret = "", name
        name, secret = name.strip() or f"key{place}", secret.strip()
        if not secret:
            raise ValueError(f"API key number {place} ({name}) is empty.")
        keys.append(ApiKey(name, secret))
    return keys


def read_key_file(path) -> list[str]:
    """the entries of a key file: one `KEY` or `NAME:KEY` a line; blank lines and `#` comments are skipped."""
    lines = (line.strip() for line in open(path, encoding="utf-8"))
    return [line for line in lines if line and not line.startswith("#")]


def keys_from(settings) -> list[ApiKey]:
    """the keys of `settings`: its api_keys (one string is one key, not one key a character), then its file's."""
    given = [settings.api_keys] if isinstance(settings.api_keys, str) else list(settings.api_keys)
    return parse_keys([*given, *(read_key_file(settings.api_key_file) if settings.api_key_file else [])])


def find_key(keys: list[ApiKey], presented: str) -> ApiKey | None:
    """the key matching `presented`, compared with every key by their SHA-256 digests in constant time, so the time
    taken reveals neither a key nor its length."""
    presented_digest = _digest(presented)
    found = None
    for key in keys:
        if hmac.compare_digest(_digest(key.secret), presented_digest):
            found = key
    return found


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


async def require_key(request: Request,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """the caller's key name, kept for the log; a missing or unknown key is refused with 401."""
    if credentials is None:
        raise _unauthorized("This server needs an API key: send it as the header 'Authorization: Bearer YOUR_KEY'.")
    key = find_key(request.app.state.keys, credentials.credentials)
    if key is None:
        raise _unauthorized("This API key is not valid: check it for typos, or ask whoever runs the server for one.")
    request.state.key_name = key.name
    return key.name


def _unauthorized(message: str) -> Refusal:
    return Refusal(401, message, field="Authorization", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
