import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from tutorial_api.cli import _parser, _settings_from, main
from tutorial_api.server import PortInUse, bind, network_address


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_serve_listens_on_loopback_answers_and_stops_on_ctrl_c():
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tutorial_api",
            "serve",
            "--model",
            "tiny-qwen2",
            "--port",
            str(port),
            "--dtype",
            "bfloat16",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                health = requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except requests.ConnectionError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.2)
        assert (health.json()["model"], health.json()["dtype"]) == ("tiny-qwen2", "bfloat16")
        answer = requests.post(
            f"http://127.0.0.1:{port}", json={"prompt": "你好", "history": [], "max_length": 60}
        )
        assert answer.json()["history"][0][0] == "你好"
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=20)
    finally:
        server.kill()
    assert server.returncode == 0
    assert f"http://127.0.0.1:{port}" in output
    assert "Shutting down" in output
    assert "Model tiny-qwen2 is ready, computing in bfloat16 on cpu" in output
    assert "tutorial_api.requests: id=" in output and "method=POST path=/ status=200" in output
    assert '"POST / HTTP/1.1"' not in output  # the kit's line replaces uvicorn's access log


@pytest.mark.slow
def test_chat_answers_one_prompt_in_the_terminal():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tutorial_api",
            "chat",
            "你好",
            "--model",
            "tiny-qwen2",
            "--max-length",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.slow
def test_help_names_the_presets_and_the_default_port():
    result = subprocess.run(
        [sys.executable, "-m", "tutorial_api", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        "qwen2.5-7b-instruct" in result.stdout
        and "6006" in result.stdout
        and "127.0.0.1" in result.stdout
    )


@pytest.fixture
def served(monkeypatch):
    """What `serve` would run: uvicorn's server loop is replaced, so nothing is served and no model
    loads.
    """
    runs = []

    def run(server, sockets):
        [listener] = sockets
        runs.append((server.config.app, *listener.getsockname()))
        listener.close()

    monkeypatch.setattr("tutorial_api.cli.uvicorn.Server.run", run)
    return runs


def test_flags_set_the_settings_and_replace_the_environment(served, monkeypatch):
    monkeypatch.setenv("TUTORIAL_API_KEYS", "from-env:zzz")
    monkeypatch.setenv("TUTORIAL_API_MAX_NEW_TOKENS", "99")
    monkeypatch.setenv("TUTORIAL_API_PORT", "not-a-port")  # a flag replaces it, so it is never read
    port = free_port()
    main(
        [
            "serve",
            "--model",
            "tiny-qwen2",
            "--port",
            str(port),
            "--api-key",
            "alice:aaa",
            "--api-key",
            "bbb",
            "--max-new-tokens",
            "64",
            "--request-timeout",
            "30",
            "--cors-origin",
            "http://localhost:3000",
            "--dtype",
            "float16",
            "--answer-tokens",
            "128",
        ]
    )
    [(app, host, bound)] = served
    settings = app.state.settings
    assert (host, bound, settings.port, settings.model) == ("127.0.0.1", port, port, "tiny-qwen2")
    assert [key.name for key in app.state.keys] == ["alice", "key2"]
    assert (settings.max_new_tokens, settings.request_timeout, settings.cors_origins) == (
        64,
        30.0,
        ("http://localhost:3000",),
    )
    assert (settings.dtype, settings.answer_tokens) == ("float16", 128)
    main(["serve", "--model", "tiny-qwen2", "--port", "0"])
    assert [key.name for key in served[1][0].state.keys] == ["from-env"]
    assert served[1][0].state.settings.max_new_tokens == 99


def test_serve_upstream_puts_the_kit_in_front_of_another_server(served, capsys, caplog):
    main(
        [
            "serve",
            "--upstream",
            "http://gpu-server:8000/v1",
            "--upstream-model",
            "Qwen/Qwen2.5-7B-Instruct",
            "--upstream-api-key",
            "gpu-s3cret",
            "--port",
            "0",
        ]
    )
    [(app, _, _)] = served
    settings = app.state.settings
    assert (settings.upstream, settings.upstream_model) == (
        "http://gpu-server:8000/v1",
        "Qwen/Qwen2.5-7B-Instruct",
    )
    assert settings.upstream_api_key == "gpu-s3cret"
    output = capsys.readouterr().out
    assert "Answering through http://gpu-server:8000/v1" in output and "Loading" not in output
    assert "gpu-s3cret" not in output + caplog.text


def test_sharing_without_keys_is_loudly_warned(served, caplog):
    main(["serve", "--model", "tiny-qwen2", "--host", "0.0.0.0", "--port", "0"])
    assert "WITHOUT ANY API KEY" in caplog.text and "--api-key" in caplog.text
    caplog.clear()
    main(
        [
            "serve",
            "--model",
            "tiny-qwen2",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--api-key",
            "alice:aaa",
        ]
    )
    assert "WITHOUT ANY API KEY" not in caplog.text and "1 keys" in caplog.text
    caplog.clear()
    main(["serve", "--model", "tiny-qwen2", "--port", "0"])
    assert "WARNING" not in caplog.text


def test_an_unreadable_key_file_stops_the_start_clearly(served, tmp_path):
    with pytest.raises(SystemExit, match="Cannot start: .*missing-keys.txt"):
        main(
            [
                "serve",
                "--model",
                "tiny-qwen2",
                "--port",
                "0",
                "--api-key-file",
                str(tmp_path / "missing-keys.txt"),
            ]
        )
    assert not served


@pytest.mark.slow
def test_help_shows_how_many_keys_never_a_key(monkeypatch):
    monkeypatch.setenv("TUTORIAL_API_KEYS", "alice:very-secret")
    monkeypatch.setenv("TUTORIAL_API_UPSTREAM_API_KEY", "gpu-secret")
    result = subprocess.run(
        [sys.executable, "-m", "tutorial_api", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "very-secret" not in result.stdout and "now: 1 keys" in result.stdout
    assert "gpu-secret" not in result.stdout and "now: set" in result.stdout


@pytest.mark.slow
def test_help_works_whatever_the_environment_says():
    environment = {
        **os.environ,
        "TUTORIAL_API_PORT": "abc",
        "TUTORIAL_API_MAX_BATCH_SIZE": "0",
        "TUTORIAL_API_REQUEST_TIMEOUT": "soon",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tutorial_api", "serve", "--help"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "now: 'abc', which is not valid" in " ".join(result.stdout.split())
        and "qwen2.5-7b-instruct" in result.stdout
    )


@pytest.mark.slow
def test_a_bad_setting_stops_serve_before_loading(tmp_path, served):
    """A bad setting stops serve before loading, naming the flag and the variable."""
    environment = {
        **os.environ,
        "TUTORIAL_API_MAX_BATCH_SIZE": "zero",
        "TUTORIAL_API_CACHE": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "tutorial_api", "serve", "--model", "tiny-qwen2"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Loading" not in result.stdout
    assert "Cannot start: $TUTORIAL_API_MAX_BATCH_SIZE must be a whole number" in result.stderr
    assert "--max-batch-size" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(
        SystemExit,
        match=r"max_batch_size must be .* --max-batch-size or \$TUTORIAL_API_MAX_BATCH_SIZE",
    ):
        main(["serve", "--model", "tiny-qwen2", "--port", "0", "--max-batch-size", "0"])
    with pytest.raises(
        SystemExit,
        match=r"dtype must be .* bfloat16, float16, not 'bf16' .* --dtype or \$TUTORIAL_API_DTYPE",
    ):
        main(["serve", "--model", "tiny-qwen2", "--port", "0", "--dtype", "bf16"])
    assert not served


@pytest.mark.slow
def test_serve_on_a_busy_port_says_so_before_loading_the_model(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUse) as expected:
            bind("127.0.0.1", port, another_port="--port {}")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tutorial_api",
                "serve",
                "--model",
                "tiny-qwen2",
                "--port",
                str(port),
                "--dtype",
                "bfloat16",
            ],
            env={**os.environ, "TUTORIAL_API_CACHE": str(tmp_path / "cache")},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == f"Cannot start: {expected.value.strerror}"
    assert (
        f"Port {port} on 127.0.0.1 is already in use" in result.stderr
        and f"--port {port + 1}" in result.stderr
    )
    assert (
        "Loading" not in result.stdout and not (tmp_path / "cache").exists()
    )  # no model work began


def dead_url() -> str:
    """an http:// address on loopback where nothing listens: a hub that cannot be reached."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "offline", [{"HF_ENDPOINT": "dead"}, {"HF_HUB_OFFLINE": "1"}], ids=["no-network", "offline"]
)
def test_serve_without_the_hub_fails_in_one_short_message(offline, tmp_path):
    """A hub model that is not downloaded stops serve at once, saying how to download it or serve
    offline.
    """
    environment = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    environment |= {"TUTORIAL_API_CACHE": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    environment |= {key: dead_url() if value == "dead" else value for key, value in offline.items()}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tutorial_api",
            "serve",
            "--model",
            "qwen2.5-0.5b-instruct",
            "--port",
            "0",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    printed = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and len(printed) <= 6, printed
    assert "python -m tutorial_api download qwen2.5-0.5b-instruct" in result.stderr
    assert "--model smollm2-135m" in result.stderr
    assert "Serving on" not in result.stdout and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_chat_command_stops_at_the_answer_budget(tiny, monkeypatch):
    """`chat` in the terminal ends its answer where POST / would: at $TUTORIAL_API_ANSWER_TOKENS."""
    from tutorial_api import chat

    monkeypatch.setenv("TUTORIAL_API_ANSWER_TOKENS", "6")
    short, _ = chat(*tiny, "你好", temperature=0)
    longer, _ = chat(*tiny, "你好", temperature=0, max_new_tokens=12)
    assert longer.startswith(short) and len(longer) > len(short)
    result = subprocess.run(
        [sys.executable, "-m", "tutorial_api", "chat", "你好", "--model", "tiny-qwen2"],
        env={**os.environ, "TUTORIAL_API_ANSWER_TOKENS": "6"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == short


def test_keys_puts_this_machines_address_on_the_sheet(tmp_path, capsys):
    main(["keys", "2", "--file", str(tmp_path / "keys.txt")])
    sheet = capsys.readouterr().out.splitlines()
    assert len(sheet) == 2 and all(f"http://{network_address()}:6006" in line for line in sheet)


@pytest.mark.slow
def test_switches_are_plain_flags_with_a_no_form():
    allowed = _settings_from(_parser().parse_args(["serve", "--trust-remote-code"]))
    refused = _settings_from(_parser().parse_args(["serve", "--no-trust-remote-code"]))
    assert (allowed.trust_remote_code, refused.trust_remote_code) == (True, False)
    help_text = subprocess.run(
        [sys.executable, "-m", "tutorial_api", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert (
        "--trust-remote-code, --no-trust-remote-code" in help_text
        and "[TRUST_REMOTE_CODE]" not in help_text
    )
