"""API keys: which callers may use the API, and which of them may watch the class.

A key is checked in constant time, and known in the log by its name, never by the key itself. A
key whose name ends in `(teacher)`, as in `Ms Wang (teacher):s3cret`, also opens the dashboard.
"""

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tutorial_api.web.errors import Refusal

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="an API key, sent as `Authorization: Bearer KEY`",
)


TEACHER = "(teacher)"


@dataclass(frozen=True)
class ApiKey:
    """A caller's key, and the name the log knows it by; `repr` never shows the secret."""

    name: str
    secret: str = field(repr=False)
    teacher: bool = False  # also opens the teacher's dashboard


def parse_keys(entries) -> list[ApiKey]:
    """Parse `KEY` or `NAME:KEY` entries; an unnamed key is called key1, key2... by its place.

    A name ending in `(teacher)` marks a teacher's key; the name is kept without it.
    """
    keys = []
    for place, entry in enumerate(entries, start=1):
        name, colon, secret = entry.partition(":")
        if not colon:
            name, secret = "", name
        name, secret = name.strip(), secret.strip()
        teacher = name.endswith(TEACHER)
        name = name.removesuffix(TEACHER).strip() or f"key{place}"
        if not secret:
            raise ValueError(f"API key number {place} ({name}) is empty.")
        keys.append(ApiKey(name, secret, teacher))
    return keys


def read_key_file(path) -> list[str]:
    """Return a key file's entries, one `KEY` or `NAME:KEY` a line; skip blanks and `#` comments."""
    with open(path, encoding="utf-8") as key_file:
        lines = [line.strip() for line in key_file]
    return [line for line in lines if line and not line.startswith("#")]


def keys_from(settings) -> list[ApiKey]:
    """Return the keys of `settings`: its api_keys, then its key file's.

    One string in api_keys is one key, not one key a character.
    """
    given = [settings.api_keys] if isinstance(settings.api_keys, str) else list(settings.api_keys)
    from_file = read_key_file(settings.api_key_file) if settings.api_key_file else []
    return parse_keys([*given, *from_file])


def find_key(keys: list[ApiKey], presented: str) -> ApiKey | None:
    """Return the key matching `presented`, or None, taking the same time whichever it is.

    Every key is compared, by SHA-256 digests in constant time, so the time taken reveals neither a
    key nor its length.
    """
    presented_digest = _digest(presented)
    found = None
    for key in keys:
        if hmac.compare_digest(_digest(key.secret), presented_digest):
            found = key
    return found


def _digest(text: str) -> bytes:
    """Return the SHA-256 digest of `text`: the same length whatever the text's."""
    return hashlib.sha256(text.encode()).digest()


async def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """Return the caller's key name, kept for the log; refuse a missing or unknown key with 401."""
    if credentials is None:
        raise _unauthorized(
            "This server needs an API key: send it as the header 'Authorization: Bearer YOUR_KEY'."
        )
    key = find_key(request.app.state.keys, credentials.credentials)
    if key is None:
        raise _unauthorized(
            "This API key is not valid: check it for typos, or ask whoever runs the server for one."
        )
    request.state.key_name = key.name
    return key.name


async def require_teacher(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """Return the teacher's key name; refuse with 401 without a known key, 403 for a student's.

    A server without keys is open to all, its dashboard too.
    """
    if not request.app.state.keys:
        return "-"
    if credentials is None:
        raise _unauthorized("The dashboard needs a teacher's key, sent as 'Authorization: Bearer'.")
    key = find_key(request.app.state.keys, credentials.credentials)
    if key is None:
        raise _unauthorized("This API key is not valid: check it for typos.")
    request.state.key_name = key.name
    if not key.teacher:
        raise Refusal(
            403,
            f"The key of {key.name} is not a teacher's: mark one in the key file as "
            f"'NAME {TEACHER}:KEY'.",
            field="Authorization",
            code="not_a_teacher",
        )
    return key.name


def _unauthorized(message: str) -> Refusal:
    """Return a 401 refusal that names the Authorization header and asks for a Bearer key."""
    return Refusal(
        401,
        message,
        field="Authorization",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
