"""The exercise checks: each rejects a plausible wrong answer and accepts a right one, never raises,
gives its hints in steps (the answer last), and speaks Chinese in notebooks/zh.

The notebooks' own placeholders and solutions are fed to the checks that need no server; the
notebook runs (tests/test_notebooks.py) hold the others to the same rule.
"""

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from fastapi import FastAPI
from openai import OpenAI

from tutorial_api import create_app, exercises, start_server
from tutorial_api.web.tutorial_schemas import ChatRequest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
OFFLINE_CHECKS = (
    "check_square_route",
    "check_greeting",
    "check_system_field",
    "check_defaults",
    "check_left_padding",
    "check_drop_finished",
    "check_token_count",
)
QUESTION = [{"role": "user", "content": "Name a fruit."}]


def _cells(name):
    """(edit cell, check cell) of every exercise in an English notebook."""
    import nbformat

    cells = nbformat.read(NOTEBOOKS / "en" / name, as_version=4).cells
    return {
        cells[index + 2].source: cells[index + 1].source
        for index, cell in enumerate(cells)
        if cell.cell_type == "markdown" and cell.source.startswith("## Exercise")
    }


SOLUTIONS = _cells("solutions.ipynb")
PLACEHOLDERS = {
    check: edit
    for name in sorted(path.name for path in (NOTEBOOKS / "en").glob("0*.ipynb"))
    for check, edit in _cells(name).items()
}
CASES = [
    check for check in PLACEHOLDERS if any(f"exercises.{name}(" in check for name in OFFLINE_CHECKS)
]


@pytest.fixture(autouse=True)
def first_miss():
    """Every test starts as a learner who has not missed yet."""
    exercises._misses.clear()


@pytest.fixture
def tokenizer(tiny):
    return tiny[1]  # the offline SmolLM2 tokenizer


@pytest.fixture
def verdict(capsys):
    """Run a check and return what it printed."""

    def run(check, *args):
        check(*args)  # a check that raised would fail the test here
        return capsys.readouterr().out

    return run


@pytest.fixture(scope="module")
def keyed(slow_tiny):
    """A server with class keys and one request in flight per key, on the slowed tiny model."""
    server = start_server(
        create_app(slow_tiny, api_keys=["alice:alice-key"], max_concurrent_per_key=1),
        port=0,
        log_level="warning",
    )
    yield server
    server.stop()


def _solved(printed: str) -> bool:
    return printed.startswith(exercises.SOLVED)


def _rejected(printed: str) -> bool:
    return printed.startswith(exercises.NOT_YET) and "\nHint 1 of " in printed


def _run_cells(edit, check, tokenizer, capsys) -> str:
    namespace = {"FastAPI": FastAPI, "torch": torch, "tokenizer": tokenizer, "exercises": exercises}
    exec(edit, namespace)
    exec(check, namespace)  # a check that raised would fail the test here
    return capsys.readouterr().out


def test_every_offline_check_is_covered():
    assert len(CASES) == len(OFFLINE_CHECKS)


@pytest.mark.parametrize(
    "check", CASES, ids=lambda check: check.split("exercises.")[-1].split("(")[0]
)
def test_the_placeholder_is_not_yet_solved_and_gets_a_hint(check, tokenizer, capsys):
    printed = _run_cells(PLACEHOLDERS[check], check, tokenizer, capsys)
    assert _rejected(printed), printed


@pytest.mark.parametrize(
    "check", CASES, ids=lambda check: check.split("exercises.")[-1].split("(")[0]
)
def test_the_solution_is_solved(check, tokenizer, capsys):
    printed = _run_cells(SOLUTIONS[check], check, tokenizer, capsys)
    assert _solved(printed), printed


def test_code_that_raises_is_reported_not_raised(verdict):
    def broken(rows, finished):
        raise ZeroDivisionError("division by zero")

    printed = verdict(exercises.check_drop_finished, broken)
    assert _rejected(printed) and "ZeroDivisionError" in printed


def test_a_second_miss_shows_one_hint_more_and_the_answer_last(verdict):
    app = FastAPI()
    first = verdict(exercises.check_square_route, app)
    assert "Hint 1 of 2:" in first and "Hint 2 of 2:" not in first
    assert "@exercise_app.get" not in first and "again for the next hint" in first
    second = verdict(exercises.check_square_route, app)
    assert "Hint 1 of 2:" in second and "Hint 2 of 2:" in second and "@exercise_app.get" in second
    assert "again for the next hint" not in second


def test_a_check_prints_chinese_in_the_chinese_notebooks_folder(verdict, monkeypatch):
    monkeypatch.chdir(NOTEBOOKS / "zh")
    wrong = verdict(exercises.check_square_route, FastAPI())
    assert wrong.startswith(exercises.NOT_YET_ZH) and "提示 1/2：" in wrong, wrong
    assert "Hint" not in wrong and "route does not exist" not in wrong
    app = FastAPI()

    @app.get("/squares/{number}")
    def square(number: int):
        return {"number": number, "square": number * number}

    right = verdict(exercises.check_square_route, app)
    assert right.startswith(exercises.SOLVED_ZH) and "平方" in right, right
    monkeypatch.chdir(NOTEBOOKS / "en")
    assert _solved(verdict(exercises.check_square_route, app))


def _square_app(route):
    app = FastAPI()
    app.get("/squares/{number}")(route)
    return app


def _hard_coded(number: int):
    return {"number": 12, "square": 144}


def _floats(number: float):
    return {"number": number, "square": number * number}


def _untyped(number):
    return {"number": number, "square": 144}


def _squares(number: int):
    return {"square": number**2, "number": number}


@pytest.mark.parametrize("wrong", [_hard_coded, _floats, _untyped])
def test_square_route_rejects_a_wrong_route(wrong, verdict):
    assert _rejected(verdict(exercises.check_square_route, _square_app(wrong)))


def test_square_route_accepts_a_right_answer_by_another_route(verdict):
    assert _solved(verdict(exercises.check_square_route, _square_app(_squares)))


def _greeting_app(route):
    app = FastAPI()
    app.get("/greet")(route)
    return app


def _greets_only_ada(name: str = "World"):
    return {"message": "Hello, Ada" if name != "World" else "Hello, World"}


def _greets_without_default(name: str):
    return {"message": f"Hello, {name}"}


@pytest.mark.parametrize("wrong", [_greets_only_ada, _greets_without_default])
def test_greeting_rejects_a_wrong_route(wrong, verdict):
    assert _rejected(verdict(exercises.check_greeting, _greeting_app(wrong)))


@pytest.mark.parametrize("wrong", [len, lambda text: len(text.split())])
def test_token_count_rejects_counting_characters_or_words(wrong, tokenizer, verdict):
    assert _rejected(verdict(exercises.check_token_count, wrong, tokenizer))


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7}, {"max_new_tokens": 8}])
def test_repeatable_rejects_settings_that_sample(settings, tiny, verdict):
    assert _rejected(verdict(exercises.check_repeatable, settings, *tiny))


def test_repeatable_accepts_temperature_zero(tiny, verdict):
    assert _solved(verdict(exercises.check_repeatable, {"temperature": 0}, *tiny))


class _EmptyDefault(ChatRequest):
    system: str = ""


class _Required(ChatRequest):
    system: str


class _Anything(ChatRequest):
    system: Any = None


@pytest.mark.parametrize("wrong", [_EmptyDefault, _Required, _Anything])
def test_system_field_rejects_a_wrong_declaration(wrong, verdict):
    assert _rejected(verdict(exercises.check_system_field, wrong))


def _or_defaults(max_length, top_p, temperature):
    return {"max_length": max_length or 2048, "top_p": top_p or 0.7, "temperature": temperature}


def _fixed_defaults(max_length, top_p, temperature):
    return {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}


@pytest.mark.parametrize("wrong", [_or_defaults, _fixed_defaults])
def test_defaults_rejects_a_wrong_fill(wrong, verdict):
    assert _rejected(verdict(exercises.check_defaults, wrong))


PROMPTS = ["Hi", "The sky is blue because", "Two plus two is"]


def test_left_padding_rejects_right_padding(tokenizer, verdict):
    right = tokenizer(PROMPTS, padding=True, padding_side="right", return_tensors="pt")
    assert _rejected(verdict(exercises.check_left_padding, right, tokenizer, PROMPTS))


@pytest.mark.parametrize(
    "wrong",
    [
        lambda rows, finished: rows[torch.tensor(finished)],
        lambda rows, finished: rows[: finished.count(False)],
    ],
    ids=["keeps the finished rows", "keeps the first rows"],
)
def test_drop_finished_rejects_the_wrong_rows(wrong, verdict):
    assert _rejected(verdict(exercises.check_drop_finished, wrong))


def _client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="none")


def _not_streamed(client):
    answer = client.chat.completions.create(
        model="smollm2-135m", temperature=0, max_tokens=16, messages=QUESTION
    )
    return answer.choices[0].message.content, answer.usage.completion_tokens


def _chunks_counted(client):
    stream = client.chat.completions.create(
        model="smollm2-135m", temperature=0, max_tokens=16, stream=True, messages=QUESTION
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    return "".join(pieces), len(pieces)


def _streamed_with_usage(client):
    stream = client.chat.completions.create(
        model="smollm2-135m",
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        messages=QUESTION,
    )
    text, tokens = "", 0
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return text, tokens


@pytest.mark.parametrize("wrong", [_not_streamed, _chunks_counted])
def test_streamed_tokens_rejects_a_count_not_from_a_stream(wrong, tiny_server, verdict):
    assert _rejected(verdict(exercises.check_streamed_tokens, wrong, _client(tiny_server)))


def test_streamed_tokens_accepts_the_usage_of_a_stream(tiny_server, verdict):
    printed = verdict(exercises.check_streamed_tokens, _streamed_with_usage, _client(tiny_server))
    assert _solved(printed), printed


@pytest.mark.parametrize(
    "body",
    [{"prompt": "你好", "temperature": 0.5}, {"prompt": 5, "temperature": 5}],
    ids=["served", "refused for the prompt"],
)
def test_refused_temperature_rejects_another_reply(body, tiny_server, verdict):
    reply = requests.post(tiny_server.url, json={"max_length": 40, **body})
    assert _rejected(verdict(exercises.check_refused_temperature, reply))


def test_refused_temperature_accepts_a_422_for_temperature(tiny_server, verdict, monkeypatch):
    reply = requests.post(tiny_server.url, json={"prompt": "你好", "temperature": 5})
    assert _solved(verdict(exercises.check_refused_temperature, reply))
    monkeypatch.chdir(NOTEBOOKS / "zh")
    printed = verdict(exercises.check_refused_temperature, reply)
    assert printed.startswith(exercises.SOLVED_ZH) and "意思是" in printed, printed


ALICE = {"Authorization": "Bearer alice-key"}


def test_too_many_requests_rejects_a_served_reply_and_accepts_the_429(keyed, verdict):
    served = requests.post(keyed.url, json={"prompt": "hi", "max_length": 40}, headers=ALICE)
    assert served.status_code == 200
    assert _rejected(verdict(exercises.check_too_many_requests, served))
    long = {"messages": QUESTION, "max_tokens": 900, "temperature": 0, "stream": True}
    with requests.post(
        f"{keyed.url}/v1/chat/completions", json=long, headers=ALICE, stream=True
    ) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        refused = requests.post(keyed.url, json={"prompt": "hi", "max_length": 40}, headers=ALICE)
    assert _solved(verdict(exercises.check_too_many_requests, refused))


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Token not-a-class-key"}], ids=["no key", "not Bearer"]
)
def test_wrong_key_rejects_a_request_without_a_key(headers, keyed, verdict):
    reply = requests.post(keyed.url, json={"prompt": "你好"}, headers=headers)
    assert reply.status_code == 401
    assert _rejected(verdict(exercises.check_wrong_key, reply))


def test_wrong_key_accepts_an_unknown_bearer_key(keyed, verdict):
    headers = {"Authorization": "Bearer not-a-class-key"}
    reply = requests.post(keyed.url, json={"prompt": "你好"}, headers=headers)
    assert _solved(verdict(exercises.check_wrong_key, reply))


def _three_turns(session, url, questions):
    history = []
    for question in questions:
        answer = session.post(
            url, json={"prompt": question, "history": history, "max_length": 1024}
        )
        history = answer.json()["history"]
    return history


def _three_turns_forgetting(session, url, questions):
    for question in questions:
        answer = session.post(url, json={"prompt": question, "max_length": 1024})
    return answer.json()["history"]


def _three_turns_kept_locally(session, url, questions):
    history = []
    for question in questions:
        answer = session.post(url, json={"prompt": question, "max_length": 1024})
        history.append([question, answer.json()["response"]])
    return history


@pytest.fixture(scope="module")
def short_answers(tiny):
    """A server with a class's key whose answers stop at 16 tokens: room for three turns."""
    app = create_app(tiny, api_keys=["bob:bob-key"], answer_tokens=16)
    server = start_server(app, port=0, log_level="warning")
    yield server
    server.stop()


@pytest.mark.parametrize("wrong", [_three_turns_forgetting, _three_turns_kept_locally])
def test_three_turns_rejects_turns_sent_without_the_history(wrong, short_answers, verdict):
    printed = verdict(exercises.check_three_turns, wrong, short_answers.url, "bob-key")
    assert _rejected(printed)


def test_three_turns_accepts_each_turn_sent_with_the_last_history(
    short_answers, verdict, monkeypatch
):
    monkeypatch.chdir(NOTEBOOKS / "zh")
    printed = verdict(exercises.check_three_turns, _three_turns, short_answers.url, "bob-key")
    assert printed.startswith(exercises.SOLVED_ZH), printed


@pytest.fixture(scope="module")
def slow_server(slow_tiny):
    """The slowed tiny model's app: a 64-token answer takes over a second, its first text not."""
    server = start_server(create_app(slow_tiny), port=0, log_level="warning")
    yield server
    server.stop()


def _ask(client, stream):
    return client.chat.completions.create(
        model="tiny-qwen2",
        messages=[{"role": "user", "content": exercises.QUESTIONS[0]}],
        max_tokens=64,
        temperature=0,
        stream=stream,
    )


def _first_text(client, stream):
    start = time.perf_counter()
    answer = _ask(client, stream)
    if not stream:
        return time.perf_counter() - start
    for chunk in answer:
        if chunk.choices and chunk.choices[0].delta.content:
            return time.perf_counter() - start


def _first_text_timed_to_the_end(client, stream):
    start = time.perf_counter()
    answer = _ask(client, stream)
    if stream:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in answer if chunk.choices)
        assert len(text) > 20  # a long answer, so its end comes well after its first text
    return time.perf_counter() - start


def _first_text_never_streamed(client, stream):
    return _first_text(client, False)


@pytest.mark.parametrize("wrong", [_first_text_timed_to_the_end, _first_text_never_streamed])
def test_first_text_rejects_a_wrong_clock(wrong, slow_server, verdict):
    assert _rejected(verdict(exercises.check_first_text, wrong, _client(slow_server)))


def test_first_text_accepts_the_first_chunk_with_text(slow_server, verdict):
    printed = verdict(exercises.check_first_text, _first_text, _client(slow_server))
    assert _solved(printed), printed


def _tokens_and_seconds(client):
    start = time.perf_counter()
    answer = _ask(client, False)
    return answer.usage.completion_tokens, time.perf_counter() - start


def _words_and_seconds(client):
    start = time.perf_counter()
    answer = _ask(client, False)
    return len(answer.choices[0].message.content.split()), time.perf_counter() - start


def test_tokens_per_second_rejects_counting_words(tiny_server, verdict):
    printed = verdict(exercises.check_tokens_per_second, _words_and_seconds, _client(tiny_server))
    assert _rejected(printed)


def test_tokens_per_second_accepts_the_servers_usage(tiny_server, verdict):
    printed = verdict(exercises.check_tokens_per_second, _tokens_and_seconds, _client(tiny_server))
    assert _solved(printed), printed


STUDENT_CHECKS = """
import sys
sys.modules["torch"] = None  # a laptop without torch: importing it fails
from openai import OpenAI
from tutorial_api import exercises

def three_turns(session, url, questions):
    history = []
    for question in questions:
        answer = session.post(url, json={"prompt": question, "history": history})
        history = answer.json()["history"]
    return history

def tokens_and_seconds(client):
    import time
    start = time.perf_counter()
    answer = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    return answer.usage.completion_tokens, time.perf_counter() - start

url = sys.argv[1]
exercises.check_three_turns(three_turns, url, "bob-key")
client = OpenAI(base_url=url + "/v1", api_key="bob-key")
exercises.check_tokens_per_second(tokens_and_seconds, client)
"""


def test_a_students_checks_need_no_torch(short_answers):
    """A student's laptop runs the notebook 7 checks with requests and openai alone."""
    printed = subprocess.run(
        [sys.executable, "-c", STUDENT_CHECKS, short_answers.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    assert len(printed) == 2 and all(line.startswith(exercises.SOLVED) for line in printed), printed
