"""the kit's configuration: one settings object, read from environment variables and command-line flags."""

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


@dataclass
class Settings:
    """what the server runs: the model and where it listens."""

    model: str = field(default_factory=lambda: os.environ.get("TUTORIAL_API_MODEL", DEFAULT_MODEL))
    host: str = field(default_factory=lambda: os.environ.get("TUTORIAL_API_HOST", DEFAULT_HOST))
    port: int = field(default_factory=lambda: int(os.environ.get("TUTORIAL_API_PORT", DEFAULT_PORT)))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
