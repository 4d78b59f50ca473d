"""a cache of GGUF models converted to transformers' own format, checked by checksum before every use."""

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from tutorial_api.settings import default_cache_dir

logger = logging.getLogger(__name__)

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
    """the cache folder for one part of a GGUF model, rebuilt whenever its manifest or a checksum disagrees."""
    folder = default_cache_dir() / gguf.stem / part
    source = _describe_source(gguf)
    if _is_intact(folder, source):
        return folder
    logger.info("Building %s", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=folder.parent))
    try:
        build(staging)
        files = {path.name: _sha256(path) for path in staging.iterdir()}
        (staging / _MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _describe_source(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"file": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "transformers": transformers.__version__}


def _is_intact(folder: Path, source: dict) -> bool:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        files = manifest["files"]
        present = {path.name for path in folder.iterdir()} - {_MANIFEST}
        return manifest["source"] == source and present == set(files) and all(
            _sha256(folder / name) == digest for name, digest in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
