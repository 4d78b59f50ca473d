"""API keys for a class: one named key per student, in a key file for --api-key-file."""

import os
import re
import secrets

from tutorial_api.web.access import ApiKey

# A name goes before the colon of `NAME:KEY` and into the log, so it keeps to plain characters.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def class_keys(count: int, prefix: str = "student") -> list[ApiKey]:
    """Return `count` fresh random keys named prefix01, prefix02 ... (128 bits each, URL-safe)."""
    if count < 1:
        raise ValueError(f"count: ask for at least one key, not {count}.")
    if not _PLAIN_NAME.fullmatch(prefix):
        raise ValueError(
            f"prefix: {prefix!r} must be letters, digits, '_', '.' or '-' (it names each key)."
        )
    width = max(2, len(str(count)))
    return [
        ApiKey(f"{prefix}{number:0{width}d}", secrets.token_urlsafe(16))
        for number in range(1, count + 1)
    ]


def write_key_file(path, keys: list[ApiKey], *, overwrite: bool = False) -> None:
    """Write `keys` as `NAME:KEY` lines to a file only this user can read.

    An existing file is an error unless `overwrite`, since replacing it locks out every student
    holding one of its keys.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    with os.fdopen(os.open(path, flags, 0o600), "w", encoding="utf-8") as key_file:
        key_file.write(
            "# API keys for a class: python -m tutorial_api serve --api-key-file THIS_FILE\n"
        )
        key_file.writelines(f"{key.name}:{key.secret}\n" for key in keys)


def student_sheet(keys: list[ApiKey], url: str) -> list[str]:
    """Return one line per student to hand out: their name, the server's address and their key."""
    width = max(len(key.name) for key in keys)
    return [f"{key.name:<{width}}  {url}  {key.secret}" for key in keys]
