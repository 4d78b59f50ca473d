import pytest

from tutorial_api import get_completion
from tutorial_api.client import ChatAPIError


def test_get_completion_returns_the_answer_and_the_history(tiny_server):
    response, history = get_completion("你好", url=tiny_server.url, max_length=60, temperature=0)
    assert isinstance(response, str)
    assert history == [["你好", response]]
    again, longer = get_completion(
        "给这个故事起一个标题", history, url=tiny_server.url, max_length=100, temperature=0
    )
    assert longer == [["你好", response], ["给这个故事起一个标题", again]]


def test_get_completion_raises_the_servers_message(tiny_server):
    with pytest.raises(
        ChatAPIError, match="422: temperature: Input should be less than or equal to 2"
    ):
        get_completion("hi", url=tiny_server.url, temperature=5)


def test_get_completion_sends_the_api_key(serve):
    server = serve(api_keys=["student:s3cret"])
    response, history = get_completion("你好", url=server.url, api_key="s3cret", max_length=60)
    assert history == [["你好", response]]
    with pytest.raises(ChatAPIError, match="401: This server needs an API key"):
        get_completion("你好", url=server.url)
