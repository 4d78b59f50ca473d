import logging
from dataclasses import FrozenInstanceError, fields, replace
from pathlib import Path

import pytest

from tutorial_api.settings import Settings, SettingsError


def test_each_setting_has_its_own_environment_variable_and_flag():
    about = [setting.metadata for setting in fields(Settings)]
    assert all(
        entry["env"].startswith("TUTORIAL_API_") and entry["flag"].startswith("--")
        for entry in about
    )
    assert (
        len({entry["env"] for entry in about})
        == len({entry["flag"] for entry in about})
        == len(about)
    )


def test_environment_variables_are_read_and_typed(monkeypatch, tmp_path):
    monkeypatch.setenv("TUTORIAL_API_KEYS", " alice:one, two ,")
    monkeypatch.setenv("TUTORIAL_API_KEY_FILE", str(tmp_path / "keys.txt"))
    monkeypatch.setenv("TUTORIAL_API_CORS_ORIGINS", "http://localhost:3000,http://127.0.0.1:8888")
    monkeypatch.setenv("TUTORIAL_API_MAX_NEW_TOKENS", "64")
    monkeypatch.setenv("TUTORIAL_API_REQUEST_TIMEOUT", "2.5")
    monkeypatch.setenv("TUTORIAL_API_MAX_PROMPT_TOKENS", "")
    settings = Settings()
    assert settings.api_keys == ("alice:one", "two")
    assert settings.api_key_file == tmp_path / "keys.txt"
    assert settings.cors_origins == ("http://localhost:3000", "http://127.0.0.1:8888")
    assert (settings.max_new_tokens, settings.request_timeout, settings.max_prompt_tokens) == (
        64,
        2.5,
        None,
    )


def test_defaults_keep_the_server_open_and_on_this_machine(monkeypatch):
    """The defaults keep the tutorial's server open, and on this machine."""
    for setting in fields(Settings):
        monkeypatch.delenv(setting.metadata["env"], raising=False)
    settings = Settings()
    assert (settings.host, settings.port, settings.api_keys, settings.cors_origins) == (
        "127.0.0.1",
        6006,
        (),
        (),
    )
    assert settings.max_body_bytes == 1_000_000 and settings.max_new_tokens is None
    assert (settings.dtype, settings.answer_tokens) == ("auto", 512)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("192.168.1.23", False),
        ("::", False),
        ("my-laptop.local", False),
    ],
)
def test_loopback_only(host, loopback):
    assert Settings(host=host).loopback_only is loopback


def test_a_client_reaches_a_wildcard_host_on_loopback(monkeypatch):
    monkeypatch.setenv("TUTORIAL_API_HOST", "0.0.0.0")
    assert Settings().url == "http://127.0.0.1:6006"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_batch_size", 0),
        ("max_waiting", 0),
        ("max_new_tokens", -5),
        ("max_prompt_tokens", 0),
        ("max_history_turns", -1),
        ("max_concurrent_per_key", 0),
        ("max_body_bytes", 0),
        ("port", 70000),
        ("port", -1),
        ("port", "6006"),
        ("max_batch_size", True),
        ("max_batch_size", 2.5),
        ("request_timeout", 0),
        ("request_timeout", float("nan")),
        ("host", None),
        ("api_key_file", 3),
        ("upstream", "http://gpu-server:8000"),
        ("upstream", "ftp://gpu-server/v1"),
        ("upstream", "gpu-server:8000/v1"),
        ("dtype", "bf16"),
        ("dtype", "float64"),
        ("dtype", None),
        ("answer_tokens", 0),
        ("answer_tokens", None),
    ],
)
def test_a_bad_value_is_refused_naming_flag_and_variable(name, value):
    """A bad value is refused when built, naming the flag and the variable."""
    about = next(setting.metadata for setting in fields(Settings) if setting.name == name)
    with pytest.raises(SettingsError) as refused:
        Settings(**{name: value})
    assert about["flag"] in str(refused.value) and f"${about['env']}" in str(refused.value)
    assert repr(value) in str(refused.value)


@pytest.mark.parametrize(
    ("env", "text"),
    [
        ("TUTORIAL_API_PORT", "abc"),
        ("TUTORIAL_API_MAX_BATCH_SIZE", "0"),
        ("TUTORIAL_API_REQUEST_TIMEOUT", "soon"),
        ("TUTORIAL_API_PORT", "99999"),
        ("TUTORIAL_API_DTYPE", "fp16"),
        ("TUTORIAL_API_ANSWER_TOKENS", "0"),
    ],
)
def test_a_bad_environment_variable_is_refused_naming_its_flag(monkeypatch, env, text):
    """A bad environment variable is refused, naming itself and its flag."""
    monkeypatch.setenv(env, text)
    flag = next(
        setting.metadata["flag"] for setting in fields(Settings) if setting.metadata["env"] == env
    )
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert (
        f"${env}" in str(refused.value)
        and flag in str(refused.value)
        and text in str(refused.value)
    )


def test_good_values_are_kept_in_the_settings_own_types():
    settings = Settings(
        port=0,
        max_history_turns=0,
        request_timeout=2,
        api_key_file="keys.txt",
        api_keys="alice:one",
        cors_origins=["http://localhost:3000"],
        dtype="bfloat16",
    )
    assert (settings.port, settings.max_history_turns, settings.request_timeout) == (0, 0, 2.0)
    assert settings.dtype == "bfloat16"
    assert settings.api_key_file == Path("keys.txt") and settings.api_keys == ("alice:one",)
    assert settings.cors_origins == ("http://localhost:3000",)


def test_settings_once_built_cannot_be_changed_into_bad_ones():
    settings = Settings()
    with pytest.raises(FrozenInstanceError):
        settings.max_batch_size = 0
    with pytest.raises(SettingsError, match="--max-batch-size"):
        replace(settings, max_batch_size=0)


def test_api_keys_never_appear_in_a_repr_a_log_or_an_error(caplog):
    settings = Settings(api_keys=("alice:s3cret", "t0psecret"))
    logging.getLogger("tutorial_api").warning("settings: %s %r", settings, settings)
    assert "s3cret" not in repr(settings) + str(settings) + caplog.text
    assert "t0psecret" not in repr(settings) + str(settings) + caplog.text
    with pytest.raises(SettingsError) as refused:
        Settings(api_keys=("alice:s3cret", 42))
    assert "s3cret" not in str(refused.value) and "--api-key" in str(refused.value)


def test_an_upstream_is_a_base_url_and_its_key_is_never_shown(caplog):
    """An upstream is its API's base URL, and its key is never shown."""
    settings = Settings(upstream="https://gpu-server.example:8000/v1", upstream_api_key="up-s3cret")
    assert settings.upstream == "https://gpu-server.example:8000/v1"
    logging.getLogger("tutorial_api").warning("settings: %s %r", settings, settings)
    assert "up-s3cret" not in repr(settings) + caplog.text
