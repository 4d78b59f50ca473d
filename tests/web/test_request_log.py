import logging
import re

import pytest
import requests
from fastapi.testclient import TestClient

from tutorial_api import create_app

VALUE = r'(?:"(?:[^"\\]|\\.)*"|[^\s"]+)'  # plain, or a JSON string
LINE = re.compile(
    rf"id=(?P<id>[0-9a-f]{{16}}) key=(?P<key>{VALUE}) "
    rf"method=(?P<method>[A-Z]+) path=(?P<path>{VALUE}) "
    r"status=(?P<status>\d{3}) prompt_tokens=(?P<prompt>\d+) completion_tokens=(?P<completion>\d+) "
    r"finish=(?P<finish>\w+|-) cancelled=(?P<cancelled>yes|no) seconds=\d+\.\d{3}"
)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app("tiny-qwen2", api_keys=["group 1:key-one"])) as client:
        yield client


@pytest.fixture
def log_lines(caplog):
    """the request log's lines, as they are written."""
    caplog.set_level(logging.INFO, logger="tutorial_api.requests")
    return lambda: [
        record.getMessage() for record in caplog.records if record.name == "tutorial_api.requests"
    ]


def test_one_line_per_request_with_its_id_in_the_response(client, log_lines):
    answer = client.post(
        "/",
        json={"prompt": "你好", "max_length": 60, "temperature": 0},
        headers={"Authorization": "Bearer key-one"},
    )
    [line] = log_lines()
    fields = LINE.fullmatch(line).groupdict()
    assert fields["id"] == answer.headers["X-Request-ID"]
    assert fields["key"] == '"group 1"'  # a name with a space is quoted
    assert (fields["method"], fields["path"], fields["status"], fields["cancelled"]) == (
        "POST",
        "/",
        "200",
        "no",
    )
    assert (
        int(fields["prompt"]) > 0
        and int(fields["completion"]) > 0
        and fields["finish"] in ("stop", "length")
    )


def test_refusals_and_other_endpoints_are_logged_too(client, log_lines):
    ids = {
        client.get("/health").headers["X-Request-ID"],
        client.get("/v1/models").headers["X-Request-ID"],
    }
    lines = [LINE.fullmatch(line).groupdict() for line in log_lines()]
    assert [(f["path"], f["status"], f["key"], f["finish"]) for f in lines] == [
        ("/health", "200", "-", "-"),
        ("/v1/models", "401", "-", "-"),
    ]
    assert {f["id"] for f in lines} == ids and len(ids) == 2


def test_user_text_cannot_forge_log_lines(client, log_lines):
    forged = "hi\n2026-01-01 00:00:00 INFO tutorial_api.requests: id=0 key=admin status=200\r"
    headers = {"Authorization": "Bearer key-one"}
    assert (
        client.post("/", json={"prompt": forged, "max_length": 120}, headers=headers).status_code
        == 200
    )
    client.get("/v1/nothing%0Aid=0%20key=admin%0D", headers=headers)
    lines = log_lines()
    assert not [line for line in lines if "\n" in line or "\r" in line]
    fields = [LINE.fullmatch(line).groupdict() for line in lines]
    assert [(f["key"], f["path"]) for f in fields] == [
        ('"group 1"', "/"),
        ("-", '"/v1/nothing\\nid=0 key=admin\\r"'),
    ]


def test_a_disconnected_stream_is_logged_as_cancelled(log_lines, serve):
    server = serve()
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }
    with requests.post(f"{server.url}/v1/chat/completions", json=body, stream=True) as dropped:
        request_id = dropped.headers["X-Request-ID"]
        next(dropped.iter_lines())
    server.stop()  # waits for the request to end, and its line to be written
    [line] = log_lines()
    fields = LINE.fullmatch(line).groupdict()
    assert (
        fields["id"] == request_id
        and fields["cancelled"] == "yes"
        and int(fields["completion"]) < 900
    )
