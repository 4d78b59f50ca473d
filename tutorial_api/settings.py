"""the kit's configuration: one settings object, each field read from its environment variable or its flag."""

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6006


def default_cache_dir() -> Path:
    """where converted models are kept: $TUTORIAL_API_CACHE, else ~/.cache/tutorial_api."""
    configured = os.environ.get("TUTORIAL_API_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "tutorial_api"


def _yes_or_no(text: str) -> bool:
    """a switch's value: 1, true, yes, on or 0, false, no, off."""
    answers = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if text.lower() not in answers:
        raise ValueError(f"{text!r} is not a yes or no; use 1 or 0")
    return answers[text.lower()]


def _setting(default, env: str, flag: str, help: str, parse=str, many: bool = False):
    """a field whose value comes from `env` (comma-separated when `many`), else `default`; `flag` sets it too."""

    def from_environment():
        text = os.environ.get(env, "").strip()
        if not text:
            return default
        return tuple(parse(item.strip()) for item in text.split(",") if item.strip()) if many else parse(text)

    return field(default_factory=from_environment,
                 metadata={"env": env, "flag": flag, "help": help, "parse": parse, "many": many})


@dataclass
class Settings:
    """what the server runs, where it listens, who may call it and how much one request may ask."""

    model: str = _setting(DEFAULT_MODEL, "TUTORIAL_API_MODEL", "--model",
                          "a preset (listed below), a hub id or a local folder")
    host: str = _setting(DEFAULT_HOST, "TUTORIAL_API_HOST", "--host",
                         "address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 shares it on the network")
    port: int = _setting(DEFAULT_PORT, "TUTORIAL_API_PORT", "--port", "port", int)
    api_keys: tuple[str, ...] = _setting(
        (), "TUTORIAL_API_KEYS", "--api-key",
        "an API key callers must send as 'Authorization: Bearer KEY'; NAME:KEY names it in the log (repeatable)",
        many=True)
    api_key_file: Path | None = _setting(
        None, "TUTORIAL_API_KEY_FILE", "--api-key-file", "a file of API keys, one KEY or NAME:KEY a line", Path)
    cors_origins: tuple[str, ...] = _setting(
        (), "TUTORIAL_API_CORS_ORIGINS", "--cors-origin",
        "a web page origin allowed to call the API from a browser, e.g. http://localhost:3000 (repeatable)",
        many=True)
    max_body_bytes: int = _setting(1_000_000, "TUTORIAL_API_MAX_BODY_BYTES", "--max-body-bytes",
                                   "largest request body, in bytes", int)
    max_prompt_tokens: int | None = _setting(None, "TUTORIAL_API_MAX_PROMPT_TOKENS", "--max-prompt-tokens",
                                             "most tokens of prompt and history together (none: the model's context)",
                                             int)
    max_new_tokens: int | None = _setting(None, "TUTORIAL_API_MAX_NEW_TOKENS", "--max-new-tokens",
                                          "most tokens one answer may have (none: the model's context)", int)
    max_history_turns: int | None = _setting(None, "TUTORIAL_API_MAX_HISTORY_TURNS", "--max-history-turns",
                                             "most earlier turns (user messages) a request may carry", int)
    max_concurrent_per_key: int | None = _setting(
        None, "TUTORIAL_API_MAX_CONCURRENT_PER_KEY", "--max-concurrent-per-key",
        "most requests one key (without keys: one client address) may have in flight; more get 429", int)
    request_timeout: float | None = _setting(None, "TUTORIAL_API_REQUEST_TIMEOUT", "--request-timeout",
                                             "seconds a request may take before it is cancelled with a 504", float)
    max_batch_size: int = _setting(16, "TUTORIAL_API_MAX_BATCH_SIZE", "--max-batch-size",
                                   "most requests decoded together", int)
    max_waiting: int = _setting(64, "TUTORIAL_API_MAX_WAITING", "--max-waiting",
                                "most requests waiting for the batch; more get 503", int)
    trust_remote_code: bool = _setting(
        False, "TUTORIAL_API_TRUST_REMOTE_CODE", "--trust-remote-code",
        "run Python code from the model's own repository, which some models need (Qwen-7B-Chat): only for a "
        "repository you trust", _yes_or_no)

    @property
    def url(self) -> str:
        """where a client on this machine reaches the server (a wildcard address is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def loopback_only(self) -> bool:
        """whether only this machine can reach the server."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"
