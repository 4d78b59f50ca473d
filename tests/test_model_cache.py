import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from tutorial_api import model_cache

LOADER = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from tutorial_api import load_model
print("ready", flush=True)
sys.stdin.readline()
load_model("tiny-qwen2")
print("loaded", flush=True)
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache for this test, and a stand-in GGUF file whose conversions the test
    writes itself.
    """
    monkeypatch.setenv("TUTORIAL_API_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"a stand-in for a GGUF file")
    return source


def write_weights(content: bytes):
    """a conversion that writes `content` as its one file, and counts how often it ran."""

    def build(folder):
        build.runs += 1
        (folder / "weights.bin").write_bytes(content)

    build.runs = 0
    return build


@pytest.mark.slow
def test_two_loaders_at_once_both_succeed_and_convert_once(tmp_path):
    """Two processes loading at once from an empty cache both succeed and convert once."""
    environment = {**os.environ, "TUTORIAL_API_CACHE": str(tmp_path)}
    loaders = [
        subprocess.Popen(
            [sys.executable, "-c", LOADER],
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for loader in loaders:  # both past their imports, so their loads start together
            while (line := loader.stdout.readline()) and line.strip() != "ready":
                pass
        for loader in loaders:
            loader.stdin.write("go\n")
            loader.stdin.flush()
        outputs = [loader.communicate(timeout=300)[0] for loader in loaders]
    finally:
        for loader in loaders:
            loader.kill()
    assert [loader.returncode for loader in loaders] == [0, 0], outputs
    assert all("loaded" in output for output in outputs)
    assert sum(output.count("model_cache: Building") for output in outputs) == 1, outputs


def test_a_loader_arriving_during_a_conversion_waits(cache, caplog):
    """A loader arriving during a conversion waits and never sees a half-written folder."""
    halfway, finish, waiting = threading.Event(), threading.Event(), threading.Event()

    def slow_build(folder):
        (folder / "weights.bin").write_bytes(b"half")
        halfway.set()
        assert finish.wait(60)
        (folder / "weights.bin").write_bytes(b"all of it")

    class NoticeWaiting(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Waiting for another process"):
                waiting.set()

    notice = NoticeWaiting()
    caplog.set_level(logging.INFO, logger="tutorial_api.model_cache")
    logging.getLogger("tutorial_api.model_cache").addHandler(notice)
    quick_build, found = write_weights(b"a second conversion"), {}
    writer = threading.Thread(
        target=lambda: found.update(writer=model_cache._cached(cache, "model", slow_build))
    )
    reader = threading.Thread(
        target=lambda: found.update(reader=model_cache._cached(cache, "model", quick_build))
    )
    try:
        writer.start()
        assert halfway.wait(60)
        published = [
            path
            for path in (cache.parent / "cache").rglob("*")
            if not path.name.startswith(".") and path.is_dir() and (path / "weights.bin").exists()
        ]
        assert published == []  # the half-written folder is not where a reader looks
        reader.start()
        deadline = time.monotonic() + 60
        while not waiting.wait(0.05) and reader.is_alive() and time.monotonic() < deadline:
            pass
        assert waiting.is_set()
    finally:
        finish.set()
        writer.join(60)
        reader.join(60)
        logging.getLogger("tutorial_api.model_cache").removeHandler(notice)
    assert found["reader"] == found["writer"] and quick_build.runs == 0
    assert (found["reader"] / "weights.bin").read_bytes() == b"all of it"


@pytest.mark.parametrize("damage", ["truncate", "rewrite", "delete", "add", "drop_manifest"])
def test_a_damaged_folder_is_noticed_and_rebuilt(cache, damage):
    build = write_weights(b"0123456789" * 1000)
    folder = model_cache._cached(cache, "model", build)
    weights = folder / "weights.bin"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "rewrite":  # the same size, other bytes, a second later
        written = weights.stat().st_mtime_ns
        weights.write_bytes(b"9876543210" * 1000)
        os.utime(weights, ns=(written + 10**9, written + 10**9))
    elif damage == "delete":
        weights.unlink()
    elif damage == "add":
        (folder / "stray.bin").write_bytes(b"?")
    else:
        (folder / "manifest.json").unlink()
    assert model_cache._cached(cache, "model", build) == folder and build.runs == 2
    assert sorted(path.name for path in folder.iterdir()) == ["manifest.json", "weights.bin"]
    assert weights.read_bytes() == b"0123456789" * 1000
    assert [
        path.name for path in folder.parent.iterdir() if path.name.startswith(".")
    ] == []  # nothing left over


def test_a_warm_start_reads_no_file(cache, monkeypatch):
    """A warm start checks sizes and times without reading the files."""
    build = write_weights(b"weights")
    folder = model_cache._cached(cache, "model", build)
    monkeypatch.setattr(
        model_cache, "_sha256", lambda path: pytest.fail(f"{path} was hashed on a warm start")
    )
    assert model_cache._cached(cache, "model", build) == folder and build.runs == 1


def test_each_transformers_version_keeps_its_own_conversion(cache, monkeypatch):
    build, installed = write_weights(b"weights"), model_cache.transformers.__version__
    first = model_cache._cached(cache, "model", build)
    monkeypatch.setattr(
        model_cache.transformers, "__version__", "99.0.0"
    )  # another environment sharing the cache
    second = model_cache._cached(cache, "model", build)
    assert second != first and build.runs == 2
    monkeypatch.setattr(model_cache.transformers, "__version__", installed)
    assert (
        model_cache._cached(cache, "model", build) == first and build.runs == 2
    )  # still intact: no rebuild
