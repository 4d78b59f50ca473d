import signal
import socket
import subprocess
import sys
import time

import requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_listens_on_loopback_answers_and_stops_on_ctrl_c():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tutorial_api", "serve", "--model", "tiny-qwen2", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
        assert health.json()["model"] == "tiny-qwen2"
        answer = requests.post(f"http://127.0.0.1:{port}", json={"prompt": "你好", "history": [], "max_length": 60})
        assert answer.json()["history"][0][0] == "你好"
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=20)
    finally:
        server.kill()
    assert server.returncode == 0
    assert f"http://127.0.0.1:{port}" in output
    assert "Shutting down" in output


def test_chat_answers_one_prompt_in_the_terminal():
    result = subprocess.run(
        [sys.executable, "-m", "tutorial_api", "chat", "你好", "--model", "tiny-qwen2", "--max-length", "60"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_help_names_the_presets_and_the_default_port():
    result = subprocess.run([sys.executable, "-m", "tutorial_api", "serve", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert "qwen2.5-7b-instruct" in result.stdout and "6006" in result.stdout and "127.0.0.1" in result.stdout
