"""The kit's configuration: one settings object, set by environment variables and flags.

Each field has one environment variable and one command-line flag.
"""

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import get_args

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6006
# Megabytes kept for recent conversations' keys and values (--prefix-cache-mb).
PREFIX_CACHE_MB = 256
# The number formats a model may compute in: "auto" picks one for the machine (see models.py).
DTYPES = ("auto", "float32", "bfloat16", "float16")

_KINDS = {int: "a whole number", float: "a number", str: "text", Path: "a path", bool: "yes or no"}


class SettingsError(ValueError):
    """A setting's value is not valid; the message names its flag and its environment variable."""


def default_cache_dir() -> Path:
    """Return where converted models are kept: $TUTORIAL_API_CACHE, else ~/.cache/tutorial_api."""
    configured = os.environ.get("TUTORIAL_API_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "tutorial_api"


def _yes_or_no(text: str) -> bool:
    """Read a switch's value: 1, true, yes, on or 0, false, no, off."""
    answers = {
        "1": True,
        "true": True,
        "yes": True,
        "on": True,
        "0": False,
        "false": False,
        "no": False,
        "off": False,
    }
    if text.lower() not in answers:
        raise ValueError(f"{text!r} is not a yes or no; use 1 or 0")
    return answers[text.lower()]


def _at_least(low):
    """Return a (test, wording) pair for values of at least `low`."""
    return lambda value: value >= low, f"of at least {low}"


def _between(low, high):
    """Return a (test, wording) pair for values from `low` to `high`, both included."""
    return lambda value: low <= value <= high, f"between {low} and {high}"


_POSITIVE = (lambda value: value > 0, "above 0")
_DTYPE = (lambda value: value in DTYPES, f"that is one of {', '.join(DTYPES)}")
_API_BASE_URL = (
    lambda value: re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?/v1/?", value) is not None,
    "that is an http:// or https:// URL ending in /v1, e.g. http://gpu-server:8000/v1",
)


def _setting(
    default, env: str, flag: str, help: str, parse=str, many: bool = False, valid=None, secret=False
):
    """Return a settings field whose value comes from `env`, else `default`; `flag` sets it too.

    `env` is comma-separated when `many`. `valid` is a (test, wording) pair each value must pass
    when the settings are built; a `secret` is never shown.
    """

    def from_environment():
        """Read the field's value from its environment variable, else return the default."""
        text = os.environ.get(env, "").strip()
        if not text:
            return default
        try:
            if many:
                return tuple(parse(item.strip()) for item in text.split(",") if item.strip())
            return parse(text)
        except ValueError:
            raise SettingsError(
                f"${env} must be {_expected(parse, valid)}, not {text!r} "
                f"(set it with {flag} or ${env})."
            ) from None

    return field(
        default_factory=from_environment,
        repr=not secret,
        metadata={
            "env": env,
            "flag": flag,
            "help": help,
            "parse": parse,
            "many": many,
            "valid": valid,
            "secret": secret,
        },
    )


def _expected(kind, valid) -> str:
    """Say what a value must be, e.g. "a whole number of at least 1"."""
    wording = _KINDS.get(kind, "a valid value")
    return f"{wording} {valid[1]}" if valid else wording


@dataclass(frozen=True)
class Settings:
    """What the server runs, where it listens, who may call it, how much a request may ask.

    Each field is checked when the settings are built.
    """

    model: str = _setting(
        DEFAULT_MODEL,
        "TUTORIAL_API_MODEL",
        "--model",
        "a preset (listed below), a hub id or a local folder",
    )
    dtype: str = _setting(
        "auto",
        "TUTORIAL_API_DTYPE",
        "--dtype",
        "the number format the model computes in: auto is bfloat16 on a CPU with native bf16 "
        "(AVX512-BF16, AMX), float32 on other CPUs, the model's own on a GPU",
        valid=_DTYPE,
    )
    host: str = _setting(
        DEFAULT_HOST,
        "TUTORIAL_API_HOST",
        "--host",
        "address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 shares it on the network",
    )
    port: int = _setting(
        DEFAULT_PORT,
        "TUTORIAL_API_PORT",
        "--port",
        "port (0 picks a free one)",
        int,
        valid=_between(0, 65535),
    )
    api_keys: tuple[str, ...] = _setting(
        (),
        "TUTORIAL_API_KEYS",
        "--api-key",
        "an API key callers must send as 'Authorization: Bearer KEY'; "
        "NAME:KEY names it in the log (repeatable)",
        many=True,
        secret=True,
    )
    api_key_file: Path | None = _setting(
        None,
        "TUTORIAL_API_KEY_FILE",
        "--api-key-file",
        "a file of API keys, one KEY or NAME:KEY a line",
        Path,
    )
    cors_origins: tuple[str, ...] = _setting(
        (),
        "TUTORIAL_API_CORS_ORIGINS",
        "--cors-origin",
        "a web page origin allowed to call the API from a browser, "
        "e.g. http://localhost:3000 (repeatable)",
        many=True,
    )
    max_body_bytes: int = _setting(
        1_000_000,
        "TUTORIAL_API_MAX_BODY_BYTES",
        "--max-body-bytes",
        "largest request body, in bytes",
        int,
        valid=_at_least(1),
    )
    max_prompt_tokens: int | None = _setting(
        None,
        "TUTORIAL_API_MAX_PROMPT_TOKENS",
        "--max-prompt-tokens",
        "most tokens of prompt and history together (none: the model's context)",
        int,
        valid=_at_least(1),
    )
    max_new_tokens: int | None = _setting(
        None,
        "TUTORIAL_API_MAX_NEW_TOKENS",
        "--max-new-tokens",
        "the hard limit: most tokens any answer may have, on POST / and /v1, "
        "whatever the request asks (none: the model's context)",
        int,
        valid=_at_least(1),
    )
    answer_tokens: int = _setting(
        512,
        "TUTORIAL_API_ANSWER_TOKENS",
        "--answer-tokens",
        "the answer budget: most tokens an answer gets where the caller sets no limit of "
        "its own (POST /, the chat command, chat()), so that a sampled answer that never "
        "ends stops there",
        int,
        valid=_at_least(1),
    )
    max_history_turns: int | None = _setting(
        None,
        "TUTORIAL_API_MAX_HISTORY_TURNS",
        "--max-history-turns",
        "most earlier turns (user messages) a request may carry",
        int,
        valid=_at_least(0),
    )
    max_concurrent_per_key: int | None = _setting(
        None,
        "TUTORIAL_API_MAX_CONCURRENT_PER_KEY",
        "--max-concurrent-per-key",
        "most requests one key (without keys: one client address) may have in flight; more get 429",
        int,
        valid=_at_least(1),
    )
    request_timeout: float | None = _setting(
        None,
        "TUTORIAL_API_REQUEST_TIMEOUT",
        "--request-timeout",
        "seconds a request may take before it is cancelled with a 504",
        float,
        valid=_POSITIVE,
    )
    max_batch_size: int = _setting(
        16,
        "TUTORIAL_API_MAX_BATCH_SIZE",
        "--max-batch-size",
        "most requests decoded together",
        int,
        valid=_at_least(1),
    )
    max_waiting: int = _setting(
        64,
        "TUTORIAL_API_MAX_WAITING",
        "--max-waiting",
        "most requests waiting for the batch; more get 503",
        int,
        valid=_at_least(1),
    )
    prefix_cache_mb: int = _setting(
        PREFIX_CACHE_MB,
        "TUTORIAL_API_PREFIX_CACHE_MB",
        "--prefix-cache-mb",
        "memory kept for recent conversations' keys and values, so that a prompt starting "
        "as one did (a shared system prompt, a chat's history) computes only what is new; "
        "0 turns it off",
        int,
        valid=_at_least(0),
    )
    trust_remote_code: bool = _setting(
        False,
        "TUTORIAL_API_TRUST_REMOTE_CODE",
        "--trust-remote-code",
        "run Python code from the model's own repository, which some models need "
        "(Qwen-7B-Chat): only for a repository you trust",
        _yes_or_no,
    )
    upstream: str | None = _setting(
        None,
        "TUTORIAL_API_UPSTREAM",
        "--upstream",
        "serve through this OpenAI-compatible server (vLLM, SGLang, another kit) instead of "
        "loading a model: its API's base URL, ending in /v1",
        valid=_API_BASE_URL,
    )
    upstream_model: str | None = _setting(
        None,
        "TUTORIAL_API_UPSTREAM_MODEL",
        "--upstream-model",
        "the upstream's model to use (none: the first it lists)",
    )
    upstream_api_key: str | None = _setting(
        None,
        "TUTORIAL_API_UPSTREAM_API_KEY",
        "--upstream-api-key",
        "the API key the upstream server wants, if any",
        secret=True,
    )

    def __post_init__(self):
        """Check every field, and keep each in its settled type (a tuple, a Path, a float)."""
        for setting in fields(self):
            object.__setattr__(self, setting.name, _checked(setting, getattr(self, setting.name)))

    @property
    def url(self) -> str:
        """Return where a client on this machine reaches the server (a wildcard: on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def loopback_only(self) -> bool:
        """Tell whether only this machine can reach the server."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def _checked(setting, value):
    """Return `value` as the setting keeps it, or raise SettingsError naming its flag and variable.

    The setting keeps a tuple for a list, a Path for a path, a float for a whole number.
    """
    about = setting.metadata
    if about["many"]:
        values = (value,) if isinstance(value, str) else value
        if not isinstance(values, (tuple, list)) or not all(
            isinstance(item, str) for item in values
        ):
            raise _invalid(setting, "a list of text", value)
        return tuple(values)
    kinds = get_args(setting.type) or (setting.type,)  # `int | None` is (int, NoneType)
    kind = kinds[0]
    if value is None and type(None) in kinds:
        return value
    if kind is Path and isinstance(value, (str, os.PathLike)):
        value = Path(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # True is an int too, but not a number of anything.
    right_kind = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    in_range = about["valid"][0] if about["valid"] else lambda _: True
    if not right_kind or (kind is float and not math.isfinite(value)) or not in_range(value):
        raise _invalid(setting, _expected(kind, about["valid"]), value)
    return value


def _invalid(setting, expected: str, value) -> SettingsError:
    """Return the error for a bad value: what was expected, the value unless secret, the fix."""
    shown = "" if setting.metadata["secret"] else f", not {value!r}"
    return SettingsError(
        f"{setting.name} must be {expected}{shown} "
        f"(set it with {setting.metadata['flag']} or ${setting.metadata['env']})."
    )
