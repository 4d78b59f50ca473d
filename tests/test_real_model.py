"""the real offline default model, end to end."""

import pytest
import requests

from tutorial_api import chat, create_app, start_server

pytestmark = pytest.mark.real_model


def test_greedy_answer_names_paris(smollm2):
    response, history = chat(*smollm2, "What is the capital of France?", temperature=0, max_new_tokens=30)
    assert "Paris" in response
    assert history == [["What is the capital of France?", response]]


def test_served_on_the_tutorials_port_with_the_tutorials_request():
    server = start_server(create_app(), port=6006, log_level="warning")
    try:
        answer = requests.post("http://127.0.0.1:6006", headers={"Content-Type": "application/json"},
                               json={"prompt": "What is the capital of France?", "history": [], "temperature": 0})
    finally:
        server.stop()
    body = answer.json()
    assert "Paris" in body["response"]
    assert body["history"] == [["What is the capital of France?", body["response"]]]
