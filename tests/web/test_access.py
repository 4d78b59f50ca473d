import logging

import openai
import pytest
import requests

from tutorial_api import create_app, start_server
from tutorial_api.settings import Settings
from tutorial_api.web.access import find_key, keys_from, parse_keys

ALICE, BOB = "alice-secret-1", "bob-secret-2"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    server = start_server(
        create_app("tiny-qwen2", api_keys=[f"alice:{ALICE}", f"bob:{BOB}"]),
        port=0,
        log_level="warning",
    )
    yield server
    server.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_named_by_name_or_by_place():
    keys = parse_keys(["alice:one", "two", " carol : three:with:colons "])
    assert [(key.name, key.secret) for key in keys] == [
        ("alice", "one"),
        ("key2", "two"),
        ("carol", "three:with:colons"),
    ]
    assert "one" not in repr(keys)


def test_an_empty_key_is_refused():
    with pytest.raises(ValueError, match="empty"):
        parse_keys(["alice:"])


def test_a_key_file_holds_one_key_a_line_with_comments(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# group 1\ngroup1:aaa\n\n  bbb  \n", encoding="utf-8")
    keys = keys_from(Settings(api_keys=("teacher:ttt",), api_key_file=key_file))
    assert [(key.name, key.secret) for key in keys] == [
        ("teacher", "ttt"),
        ("group1", "aaa"),
        ("key3", "bbb"),
    ]


def test_one_key_given_as_a_string_is_one_key():
    assert [(key.name, key.secret) for key in keys_from(Settings(api_keys="alice:secret"))] == [
        ("alice", "secret")
    ]


def test_find_key_matches_whole_keys_only():
    keys = parse_keys([f"alice:{ALICE}", f"bob:{BOB}"])
    assert find_key(keys, BOB).name == "bob"
    assert (
        find_key(keys, ALICE[:-1]) is None
        and find_key(keys, ALICE + "x") is None
        and find_key(keys, "") is None
    )
    assert find_key(keys, "ключ") is None  # any text, not only ASCII


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong"), {"Authorization": ALICE}, {"Authorization": "Basic abc"}],
    ids=["no-key", "wrong-key", "no-scheme", "basic"],
)
def test_the_tutorial_endpoint_needs_a_key(server, headers):
    answer = requests.post(server.url, json={"prompt": "hi", "max_length": 40}, headers=headers)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    body = answer.json()
    assert (
        body["status"] == 401 and body["field"] == "Authorization" and "API key" in body["message"]
    )


def test_the_openai_api_needs_a_key_in_its_own_shape(server):
    for path, call in [("/v1/models", requests.get), ("/v1/chat/completions", requests.post)]:
        answer = call(f"{server.url}{path}", json={"messages": MESSAGES}, headers=bearer("wrong"))
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
        assert (
            answer.json()["error"]["code"] == "invalid_api_key"
            and "API key" in answer.json()["error"]["message"]
        )


def test_a_key_opens_both_apis(server):
    answer = requests.post(
        server.url, json={"prompt": "hi", "max_length": 40}, headers=bearer(ALICE)
    )
    assert answer.status_code == 200 and answer.json()["history"][0][0] == "hi"
    assert requests.get(f"{server.url}/v1/models", headers=bearer(BOB)).status_code == 200


def test_the_official_openai_client_sends_its_key(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=BOB, max_retries=0)
    completion = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
    assert completion.usage.completion_tokens <= 3
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_health_and_the_docs_need_no_key(server):
    for path in ("/health", "/docs", "/redoc", "/openapi.json"):
        assert requests.get(f"{server.url}{path}").status_code == 200, path


def test_the_log_names_the_key_never_the_key_itself(server, caplog):
    caplog.set_level(logging.INFO, logger="tutorial_api.requests")
    requests.post(server.url, json={"prompt": "hi", "max_length": 40}, headers=bearer(ALICE))
    requests.post(
        server.url, json={"prompt": "hi", "max_length": 40}, headers=bearer("wrong-" + BOB)
    )
    lines = [
        record.getMessage() for record in caplog.records if record.name == "tutorial_api.requests"
    ]
    assert " key=alice " in lines[0] and " status=200 " in lines[0]
    assert " key=- " in lines[1] and " status=401 " in lines[1]
    assert not [line for line in lines if ALICE in line or BOB in line]


def test_openapi_offers_the_bearer_scheme_only_with_keys(server):
    schema = requests.get(f"{server.url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["APIKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key, sent as `Authorization: Bearer KEY`",
    }
    assert schema["paths"]["/"]["post"]["security"] == [{"APIKey": []}]
    assert "401" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    open_schema = create_app("tiny-qwen2").openapi()
    assert "securitySchemes" not in open_schema.get("components", {})
    assert "401" not in open_schema["paths"]["/"]["post"]["responses"]


def test_a_name_ending_in_teacher_marks_a_teachers_key():
    keys = parse_keys(["Ms Wang (teacher):t-1", "alice:a-1", "(teacher):t-2"])
    assert [(key.name, key.teacher) for key in keys] == [
        ("Ms Wang", True),
        ("alice", False),
        ("key3", True),
    ]


def test_the_dashboards_data_needs_a_teachers_key(serve):
    server = serve(api_keys=["Ms Wang (teacher):t-key", f"alice:{ALICE}"])
    data = f"{server.url}/dashboard/data"
    assert requests.get(data).status_code == 401
    assert requests.get(data, headers=bearer("wrong")).status_code == 401
    student = requests.get(data, headers=bearer(ALICE))
    assert student.status_code == 403 and "teacher" in student.json()["message"]
    assert requests.get(data, headers=bearer("t-key")).status_code == 200
    # The page itself holds no figures and no key: anyone may load it.
    page = requests.get(f"{server.url}/dashboard")
    assert page.status_code == 200 and "t-key" not in page.text


def test_the_chat_page_needs_no_key_and_holds_none(server):
    page = requests.get(server.url)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert ALICE not in page.text and BOB not in page.text
    # POST / is still the tutorial's, behind its key; other methods learn both of the path's.
    assert requests.post(server.url, json={"prompt": "hi"}).status_code == 401
    refused = requests.put(server.url)
    assert refused.status_code == 405 and refused.headers["Allow"] == "GET, POST"
