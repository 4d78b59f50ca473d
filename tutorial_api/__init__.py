"""tutorial_api: from FastAPI's hello world to a chat model served from a notebook cell."""

from tutorial_api.app import create_app
from tutorial_api.chat import ChatInputError, chat
from tutorial_api.client import get_completion
from tutorial_api.models import PRESETS, ModelNotAvailable, load_model
from tutorial_api.server import PortInUse, start_server
from tutorial_api.settings import Settings

__all__ = [
    "PRESETS",
    "ChatInputError",
    "ModelNotAvailable",
    "PortInUse",
    "Settings",
    "chat",
    "create_app",
    "get_completion",
    "load_model",
    "start_server",
]
