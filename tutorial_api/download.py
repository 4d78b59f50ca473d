"""Download a model once, with internet, so that it loads offline afterwards.

It comes from the Hugging Face hub (or the mirror named in $HF_ENDPOINT), else from ModelScope.
"""

import json
from pathlib import Path

import httpx
import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from tutorial_api.settings import default_cache_dir

# Written last, so a folder without it holds an interrupted download, which the next run resumes.
_RECEIPT = "tutorial_api_download.json"


class DownloadFailed(RuntimeError):
    """Neither the hub nor ModelScope delivered the model; the message says why and what to try."""


def downloaded(hub_id: str) -> Path | None:
    """Return the folder holding a finished download of `hub_id`, or None."""
    folder = _folder(hub_id)
    return folder if (folder / _RECEIPT).is_file() else None


def fetch(hub_id: str, say=print) -> Path:
    """Download every file of `hub_id` into the kit's cache; return the folder.

    `say` reports a fallback to ModelScope.
    """
    folder = _folder(hub_id)
    try:
        # Found out at once, rather than after the hub client's retries.
        offline = unreachable(constants.ENDPOINT)
        if offline:
            raise LocalEntryNotFoundError(offline)
        huggingface_hub.snapshot_download(hub_id, local_dir=folder)
        source = constants.ENDPOINT
    except LocalEntryNotFoundError as error:  # what the hub client raises when it cannot connect
        say(
            f"The Hugging Face hub ({constants.ENDPOINT}) is unreachable: {_first_line(error)}\n"
            f"Trying ModelScope instead."
        )
        _from_modelscope(hub_id, folder, hub_error=error)
        source = "ModelScope"
    except HfHubHTTPError as error:  # the hub answered: no such model, or no access
        raise DownloadFailed(
            f"The Hugging Face hub refused {hub_id!r}: {_first_line(error)}"
        ) from None
    (folder / _RECEIPT).write_text(json.dumps({"hub_id": hub_id, "source": source}))
    return folder


def _from_modelscope(hub_id: str, folder: Path, hub_error: Exception) -> None:
    """Download `hub_id` from ModelScope into `folder`; raise DownloadFailed with both causes."""
    advice = (
        "Connect to the internet, or set HF_ENDPOINT to a Hugging Face mirror you can reach, "
        "and run the same command again."
    )
    try:
        # Optional: only this fallback needs it.
        from modelscope.hub.snapshot_download import snapshot_download
        from modelscope.hub.utils.utils import get_endpoint
    except ImportError:
        raise DownloadFailed(
            f"Could not download {hub_id!r}: the Hugging Face hub is unreachable "
            f"({_first_line(hub_error)}), and the ModelScope client is not installed "
            f"(pip install modelscope).\n{advice}"
        ) from None
    try:
        # Found out at once, rather than after ModelScope's client retries.
        offline = unreachable(get_endpoint())
        if offline:
            raise ConnectionError(f"{get_endpoint()}: {offline}")
        snapshot_download(hub_id, local_dir=str(folder))
    except Exception as error:  # ModelScope's client's own error types vary between versions
        raise DownloadFailed(
            f"Could not download {hub_id!r} from the Hugging Face hub ({_first_line(hub_error)}) "
            f"nor from ModelScope ({type(error).__name__}: {_first_line(error)}).\n{advice}"
        ) from None


def unreachable(url: str) -> str | None:
    """Say why `url` cannot be reached, in one short try; None when it answers at all."""
    try:
        httpx.head(url, timeout=3)
    except httpx.TransportError as error:
        return str(error) or type(error).__name__
    return None


def _folder(hub_id: str) -> Path:
    """Return where `hub_id` is downloaded to, in the kit's cache."""
    return default_cache_dir() / "downloads" / hub_id.replace("/", "--")


def _first_line(error: Exception) -> str:
    """Return an error's first line, or its type's name when it has no message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
