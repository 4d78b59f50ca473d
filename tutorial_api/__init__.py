"""tutorial_api: from FastAPI's hello world to a chat model served from a notebook cell.

The public names are imported on first use, so that `import tutorial_api.hello` (notebook 1) and the client
start without loading torch and transformers.
"""

import importlib
import sys
import types

_HOMES = {
    "PRESETS": "models",
    "ModelNotAvailable": "models",
    "load_model": "models",
    "ChatInputError": "chat",
    "chat": "chat",
    "create_app": "app",
    "get_completion": "client",
    "PortInUse": "server",
    "start_server": "server",
    "Settings": "settings",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'tutorial_api' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tutorial_api.{_HOMES[name]}"), name)
    globals()[name] = value  # found once, then a plain attribute
    return value


def __dir__():
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """the package, keeping `tutorial_api.chat` the function when Python's import of the submodule `chat` would
    set it to the module."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _HOMES.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
