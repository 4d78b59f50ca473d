"""a cache of GGUF models converted to transformers' own format, shared safely by processes that load at once.

Each conversion gets a folder named for its source, built under a file lock and published by one atomic rename, so a
reader finds nothing or a whole folder; a start compares sizes and times with its manifest instead of hashing.
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

_FORMAT = 2  # the layout's version: a change of layout or manifest starts new folders instead of misreading old ones
_MANIFEST = "manifest.json"


def converted_tokenizer(gguf: Path) -> Path:
    """a folder holding the GGUF file's tokenizer, converted on first use."""
    return _cached(gguf, "tokenizer", lambda folder: AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name).save_pretrained(folder))


def converted_model(gguf: Path) -> Path:
    """a folder holding the GGUF file's weights dequantised to fp32, converted on first use."""
    return _cached(gguf, "model", lambda folder: _dequantise(gguf).save_pretrained(folder))


def _dequantise(gguf: Path):
    """the GGUF model as a plain transformers model: one loaded from GGUF refuses to save itself."""
    logger.info("Converting %s for transformers (first run only, about 15 s)", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.architectures = [type(loaded).__name__]
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    return plain


def _cached(gguf: Path, part: str, build) -> Path:
    """the published folder for one part of a GGUF model; the first process to find it missing or damaged builds it
    while the others wait, then they all use it."""
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
    """hold the folder's file lock: one process at a time converts it, whatever the others are."""
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
    """build into a temporary folder beside `folder`, record its manifest, then rename it into place."""
    for leftover in folder.parent.glob(f".{folder.name}-*"):  # from a build that was killed; the lock makes it ours
        shutil.rmtree(leftover, ignore_errors=True)
    logger.info("Building %s", folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(staging)
        files = {path.name: {**_fingerprint(path), "sha256": _sha256(path)} for path in staging.iterdir()}
        (staging / _MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1))
        if folder.exists():  # damaged: moved aside whole, so no reader ever sees it half removed
            folder.rename(staging.with_name(f"{staging.name}-damaged"))
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(f"{staging.name}-damaged"), ignore_errors=True)


def _describe_source(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"format": _FORMAT, "file": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "transformers": transformers.__version__}


def _is_intact(folder: Path) -> bool:
    """whether the folder holds exactly the files its manifest lists, each with its recorded size and time."""
    try:
        files = json.loads((folder / _MANIFEST).read_text())["files"]
        present = {path.name for path in folder.iterdir()} - {_MANIFEST}
        return present == set(files) and all(
            _fingerprint(folder / name) == {field: recorded[field] for field in ("size", "mtime_ns")}
            for name, recorded in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
