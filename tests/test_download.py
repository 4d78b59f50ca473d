"""`python -m tutorial_api download`: only the network call is replaced, at its boundary; the rest
is real.
"""

import json
import os
import socket
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from tutorial_api import download, load_model
from tutorial_api.cli import main
from tutorial_api.download import downloaded

QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
UNREACHABLE = LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_API_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(autouse=True)
def reachable(monkeypatch):
    """both hubs answer the first short try; each test replaces the download itself."""
    monkeypatch.setattr(download, "unreachable", lambda url: None)


@pytest.fixture
def publish(tiny):
    """a download that delivers the tiny Qwen2's files, recording which repository was asked for."""
    asked = []

    def snapshot_download(repo_id, *, local_dir, **ignored):
        asked.append(repo_id)
        model, tokenizer = tiny
        model.save_pretrained(local_dir)
        tokenizer.save_pretrained(local_dir)
        return str(local_dir)

    snapshot_download.asked = asked
    return snapshot_download


@pytest.fixture
def modelscope(monkeypatch):
    """ModelScope's client module, with its download function to be replaced by each test."""
    module = pytest.importorskip("modelscope.hub.snapshot_download")
    return lambda download: monkeypatch.setattr(module, "snapshot_download", download)


def hub_unreachable(*args, **kwargs):
    raise UNREACHABLE


def same_weights(model, other) -> bool:
    return all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=False)
    )


def test_a_preset_downloads_from_the_hub_then_loads_offline(
    tiny, publish, monkeypatch, capsys, cache
):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", publish)
    main(["download", "qwen2.5-0.5b-instruct"])
    assert publish.asked == [QWEN]
    printed = capsys.readouterr().out
    assert "loads offline" in printed and "--model qwen2.5-0.5b-instruct" in printed
    receipt = json.loads((downloaded(QWEN) / "tutorial_api_download.json").read_text())
    assert receipt == {"hub_id": QWEN, "source": "https://huggingface.co"}

    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", hub_unreachable
    )  # offline from now on
    for name in ("qwen2.5-0.5b-instruct", QWEN):
        model, _ = load_model(name)
        assert same_weights(model, tiny[0])


def test_an_unreachable_hub_falls_back_to_modelscope(
    tiny, publish, modelscope, monkeypatch, capsys
):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_unreachable)
    modelscope(publish)
    main(["download", QWEN])
    printed = capsys.readouterr().out
    assert "unreachable: Got: ConnectError" in printed and "Trying ModelScope" in printed
    assert publish.asked == [QWEN]
    assert (
        json.loads((downloaded(QWEN) / "tutorial_api_download.json").read_text())["source"]
        == "ModelScope"
    )
    assert same_weights(load_model(QWEN)[0], tiny[0])


def test_when_both_fail_nothing_counts_as_downloaded(modelscope, monkeypatch):
    """When both fail, nothing counts as downloaded and the message says what to do."""
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_unreachable)

    def modelscope_unreachable(model_id, *, local_dir, **ignored):
        raise ConnectionError("Failed to resolve the ModelScope host")

    modelscope(modelscope_unreachable)
    with pytest.raises(SystemExit) as exit:
        main(["download", QWEN])
    message = str(exit.value.code)
    assert "Hugging Face hub (Got: ConnectError" in message
    assert "ModelScope (ConnectionError: Failed to resolve" in message
    assert "HF_ENDPOINT" in message
    assert downloaded(QWEN) is None


def test_without_modelscope_the_message_says_how_to_install(monkeypatch):
    """Without the ModelScope client, the message says how to install it."""
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_unreachable)
    monkeypatch.setitem(
        sys.modules, "modelscope.hub.snapshot_download", None
    )  # an import of it fails
    with pytest.raises(SystemExit, match="pip install modelscope"):
        main(["download", QWEN])


def test_the_offline_models_need_no_download():
    with pytest.raises(SystemExit, match="ships with the kit"):
        main(["download", "smollm2-135m"])
    with pytest.raises(SystemExit, match="Unknown model"):
        main(["download", "no-such-model"])


@pytest.mark.slow
def test_without_a_network_download_gives_up_at_once(tmp_path):
    """Both hubs unreachable for real (nothing listens at their addresses): one message, no client
    retries.
    """
    dead = [socket.socket() for _ in range(2)]
    for probe in dead:
        probe.bind(("127.0.0.1", 0))
    environment = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    environment |= {
        "TUTORIAL_API_CACHE": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{dead[0].getsockname()[1]}",
        "MODELSCOPE_DOMAIN": f"127.0.0.1:{dead[1].getsockname()[1]}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tutorial_api", "download", "qwen2.5-0.5b-instruct"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    for probe in dead:
        probe.close()
    printed = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and len(printed) <= 6, printed
    assert "Trying ModelScope" in result.stdout and "nor from ModelScope" in result.stderr
    assert "Retrying" not in result.stdout + result.stderr
