from dataclasses import fields

import pytest

from tutorial_api.settings import Settings


def test_each_setting_has_its_own_environment_variable_and_flag():
    about = [setting.metadata for setting in fields(Settings)]
    assert all(entry["env"].startswith("TUTORIAL_API_") and entry["flag"].startswith("--") for entry in about)
    assert len({entry["env"] for entry in about}) == len({entry["flag"] for entry in about}) == len(about)


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
    assert (settings.max_new_tokens, settings.request_timeout, settings.max_prompt_tokens) == (64, 2.5, None)


def test_defaults_keep_the_tutorials_server_open_and_on_this_machine(monkeypatch):
    for setting in fields(Settings):
        monkeypatch.delenv(setting.metadata["env"], raising=False)
    settings = Settings()
    assert (settings.host, settings.port, settings.api_keys, settings.cors_origins) == ("127.0.0.1", 6006, (), ())
    assert settings.max_body_bytes == 1_000_000 and settings.max_new_tokens is None


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                                ("::1", True), ("0.0.0.0", False), ("192.168.1.23", False),
                                                ("::", False), ("my-laptop.local", False)])
def test_loopback_only(host, loopback):
    assert Settings(host=host).loopback_only is loopback


def test_a_client_reaches_a_wildcard_host_on_loopback(monkeypatch):
    monkeypatch.setenv("TUTORIAL_API_HOST", "0.0.0.0")
    assert Settings().url == "http://127.0.0.1:6006"
