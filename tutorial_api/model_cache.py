"""A cache of GGUF models converted to transformers' format, safe for processes loading at once.

Each conversion gets a folder named for its source, built under a file lock and published by one
atomic rename, so a reader finds nothing or a whole folder; a start compares sizes and times with
its manifest instead of hashing.
"""

import hashlib
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from filelock import FileLock, Timeout
from transformers import AutoModelForCausalLM, AutoTokenizer

from tutorial_api.settings import default_cache_dir

logger = logging.getLogger(__name__)

# The layout's version: a new layout or manifest starts new folders rather than misread old ones.
_FORMAT = 2
_MANIFEST = "manifest.json"


def converted_tokenizer(gguf: Path) -> Path:
    """Return a folder holding the GGUF file's tokenizer, converted on first use."""

    def convert(folder: Path) -> None:
        """Save the GGUF file's tokenizer into `folder` in transformers' format."""
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(folder)

    return _cached(gguf, "tokenizer", convert)


def converted_model(gguf: Path) -> Path:
    """Return a folder holding the GGUF file's weights in fp32, converted on first use."""
    return _cached(gguf, "model", lambda folder: _dequantise(gguf).save_pretrained(folder))


def _dequantise(gguf: Path):
    """Return the GGUF model as a plain transformers model: one loaded from GGUF cannot be saved."""
    logger.info("Converting %s for transformers (first run only, about 15 s)", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    del config.quantization_config
    config.architectures = [type(loaded).__name__]
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    return plain


def _cached(gguf: Path, part: str, build) -> Path:
    """Return the published folder for one part of a GGUF model, building it if need be.

    The first process to find it missing or damaged builds it while the others wait, then they all
    use it.
    """
    source = _describe_source(gguf)
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    folder = default_cache_dir() / f"v{_FORMAT}" / gguf.stem / f"{part}-{key}"
    if _is_intact(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _alone(folder):
        if not _is_intact(folder):  # unless another process built it while this one waited
            _publish(folder, source, build)
    return folder


@contextmanager
def _alone(folder: Path):
    """Hold the folder's file lock: one process at a time converts it, whatever the others are."""
    lock = FileLock(folder.with_name(f"{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Waiting for another process to finish building %s", folder)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _publish(folder: Path, source: dict, build) -> None:
    """Build into a temporary folder beside `folder`, record a manifest, then rename it in place."""
    # Left by a build that was killed; holding the lock makes it ours to remove.
    for leftover in folder.parent.glob(f".{folder.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    logger.info("Building %s", folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(staging)
        files = {
            path.name: {**_fingerprint(path), "sha256": _sha256(path)} for path in staging.iterdir()
        }
        (staging / _MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1))
        if folder.exists():  # damaged: moved aside whole, so no reader ever sees it half removed
            folder.rename(staging.with_name(f"{staging.name}-damaged"))
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(f"{staging.name}-damaged"), ignore_errors=True)


def _describe_source(gguf: Path) -> dict:
    """Describe the GGUF file and the converter: a change in any of them asks for a new folder."""
    stat = gguf.stat()
    return {
        "format": _FORMAT,
        "file": str(gguf.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "transformers": transformers.__version__,
    }


def _is_intact(folder: Path) -> bool:
    """Tell whether the folder holds exactly the files its manifest lists, as they were recorded."""
    try:
        files = json.loads((folder / _MANIFEST).read_text())["files"]
        present = {path.name for path in folder.iterdir()} - {_MANIFEST}
        if present != set(files):
            return False
        return all(_unchanged(folder / name, recorded) for name, recorded in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _unchanged(path: Path, recorded: dict) -> bool:
    """Tell whether a file still has the size and time its manifest recorded."""
    return _fingerprint(path) == {field: recorded[field] for field in ("size", "mtime_ns")}


def _fingerprint(path: Path) -> dict:
    """Return a file's size and modification time, which a change to it would alter."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sha256(path: Path) -> str:
    """Return the file's SHA-256 digest, reading a megabyte at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
