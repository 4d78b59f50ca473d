"""Checks for the notebooks' exercises: each prints what is right, or what is wrong with a hint.

A check never raises, so that Run All goes on past an unsolved exercise.

Language: a check speaks the notebook's language without being told, so that the English and the
Chinese notebooks keep identical code cells. Jupyter (JupyterLab, Notebook, and VS Code by default)
starts a notebook's kernel in the notebook's own folder: in a folder named `zh` (notebooks/zh/) the
checks print Chinese, anywhere else English. A learner who moves a Chinese notebook elsewhere gets
English; keep the notebooks in their folders.

Hints come in steps, what is wrong first and the answer last: each time a check finds the same
problem again, it shows one step more.
"""

import collections
import dataclasses
import functools
import json
import random
import re
import time
from pathlib import Path

import httpx

# Every text a learner reads, as (English, Chinese).
Text = tuple[str, str]

_WORDS = {
    "solved": ("✅ Solved:", "✅ 通过："),
    "not_yet": ("❌ Not yet:", "❌ 还没通过："),
    "hint": ("Hint {step} of {steps}:", "提示 {step}/{steps}："),
    "more": (
        "Stuck? Run this check again for the next hint.",
        "还是卡住了？再运行一次这个检查，会多给一条提示。",
    ),
    "raised": ("your code raised {name}: {error}", "你的代码抛出了 {name}：{error}"),
}
SOLVED, NOT_YET = _WORDS["solved"][0], _WORDS["not_yet"][0]
SOLVED_ZH, NOT_YET_ZH = _WORDS["solved"][1], _WORDS["not_yet"][1]

# How often each check has found each problem in this kernel: the next miss shows one hint more.
_misses: collections.Counter = collections.Counter()


def language() -> str:
    """Return "zh" when the kernel runs in a folder named zh (notebooks/zh/), else "en"."""
    return "zh" if Path.cwd().name == "zh" else "en"


def _say(text: Text) -> str:
    """Return `text` in the notebook's language."""
    return text[language() == "zh"]


def _line(label: str, text: Text) -> str:
    """Return one labelled line; a Chinese label ends in a full-width colon and needs no space."""
    space = "" if language() == "zh" else " "
    return f"{_say(_WORDS[label])}{space}{_say(text)}"


class _NotYet(Exception):
    """What a check found wrong, and hints towards the fix: what is wrong first, the answer last."""

    def __init__(self, problem: Text, hints: tuple[Text, ...]):
        super().__init__(problem[0])
        self.problem, self.hints = problem, hints


def _require(condition, problem: Text, *hints: Text) -> None:
    """Raise _NotYet with `problem` and its `hints` unless `condition` holds."""
    if not condition:
        raise _NotYet(problem, hints)


def _report(check: str, finding: _NotYet) -> str:
    """Return the verdict on `finding`, with one hint more than the last time it was found."""
    _misses[check, finding.hints[0][0]] += 1
    shown = min(_misses[check, finding.hints[0][0]], len(finding.hints))
    lines = [_line("not_yet", finding.problem)]
    space = "" if language() == "zh" else " "
    for step, hint in enumerate(finding.hints[:shown], start=1):
        label = _say(_WORDS["hint"]).format(step=step, steps=len(finding.hints))
        lines.append(f"{label}{space}{_say(hint)}")
    if shown < len(finding.hints):
        lines.append(_say(_WORDS["more"]))
    return "\n".join(lines)


def _check(*hints: Text):
    """Turn a function that raises _NotYet (or anything else) into a check that prints its verdict.

    `hints` are for the learner's code failing in a way the check did not foresee.
    """

    def decorate(function):
        @functools.wraps(function)
        def check(*args, **kwargs) -> None:
            """Print the verdict: what is right, or what is not yet, with a hint."""
            try:
                praise = function(*args, **kwargs)
            except _NotYet as finding:
                print(_report(function.__name__, finding))
            except Exception as error:  # the learner's code may fail in any way; Run All must go on
                raised = tuple(
                    words.format(name=type(error).__name__, error=error)
                    for words in _WORDS["raised"]
                )
                print(_report(function.__name__, _NotYet(raised, hints)))
            else:
                print(_line("solved", praise))

        return check

    return decorate


def _require_status(reply, status: int, how_to_send: Text, *how_to_provoke: Text) -> None:
    """Require a reply, and one answered with `status`."""
    _require(reply is not None, ("`reply` is still None.", "`reply` 还是 None。"), how_to_send)
    _require(
        reply.status_code == status,
        (
            f"the server answered {reply.status_code}, not {status}.",
            f"服务端返回的是 {reply.status_code}，不是 {status}。",
        ),
        *how_to_provoke,
    )


def _client(app):
    """Return a test client for `app`; FastAPI's testing needs are imported only here."""
    from fastapi.testclient import TestClient

    return TestClient(app)


# notebook 1


@_check(
    (
        'define the route with @exercise_app.get("/squares/{number}") and annotate `number: int`.',
        '用 @exercise_app.get("/squares/{number}") 定义路由，并把参数标注为 `number: int`。',
    )
)
def check_square_route(exercise_app):
    """Check GET /squares/{n} for several integers, and a 422 to twelve and to 2.5.

    The square comes as {"number": n, "square": n * n}, both integers.
    """
    client = _client(exercise_app)
    reply = client.get("/squares/12")
    _require(
        reply.status_code != 404,
        (
            "GET /squares/12 answered 404: the route does not exist yet.",
            "GET /squares/12 返回 404：这个路由还不存在。",
        ),
        (
            "a route is a decorator above a function: which path does it need?",
            "路由就是写在函数上面的装饰器：它应该对应哪个路径？",
        ),
        (
            'add @exercise_app.get("/squares/{number}") above a function that takes `number`.',
            '在一个接收 `number` 参数的函数上面加 @exercise_app.get("/squares/{number}")。',
        ),
    )
    _require(
        reply.status_code == 200,
        (
            f"GET /squares/12 answered {reply.status_code}.",
            f"GET /squares/12 返回了 {reply.status_code}。",
        ),
        ("read the error above.", "先看上面打印的报错信息。"),
    )
    compute = (
        "return a dict built from `number` itself, not fixed values.",
        "返回的 dict 要用 `number` 算出来，不能写死。",
    )
    answer = (
        'return {"number": number, "square": number * number}.',
        '写成 return {"number": number, "square": number * number}。',
    )
    for number in (12, random.randint(13, 999), -7):
        got = client.get(f"/squares/{number}").json()
        _require(
            got == {"number": number, "square": number * number},
            (
                f"GET /squares/{number} answered {got}, "
                f'not {{"number": {number}, "square": {number * number}}}.',
                f"GET /squares/{number} 返回了 {got}，"
                f'应该是 {{"number": {number}, "square": {number * number}}}。',
            ),
            compute,
            answer,
        )
        _require(
            all(type(value) is int for value in got.values()),
            (
                f"GET /squares/{number} answered {got}: decimals, not integers.",
                f"GET /squares/{number} 返回了 {got}：这是小数，不是整数。",
            ),
            (
                "the type annotation of `number` decides what FastAPI hands your function.",
                "FastAPI 交给你的函数什么类型，由 `number` 的类型标注决定。",
            ),
            ("annotate the parameter as `number: int`.", "把参数标注为 `number: int`。"),
        )
    for text in ("twelve", "2.5"):
        refused = client.get(f"/squares/{text}")
        _require(
            refused.status_code == 422,
            (
                f"GET /squares/{text} answered {refused.status_code}, not 422.",
                f"GET /squares/{text} 返回了 {refused.status_code}，不是 422。",
            ),
            (
                f"{text!r} is not a whole number: with the right type annotation FastAPI refuses "
                "it before your function runs.",
                f"{text!r} 不是整数：类型标注写对了，FastAPI 会在你的函数运行之前就拒绝它。",
            ),
            (
                "annotate the parameter as `number: int` (not `str`, not `float`).",
                "把参数标注为 `number: int`（不是 `str`，也不是 `float`）。",
            ),
        )
    return (
        "every integer gets its square, and 'twelve' and '2.5' are refused with 422 "
        "before your function runs.",
        "每个整数都得到它的平方，'twelve' 和 '2.5' 在你的函数运行之前就被 422 拒绝了。",
    )


@_check(
    (
        'define the route with @greeting_app.get("/greet") and a parameter `name: str = "World"`.',
        '用 @greeting_app.get("/greet") 定义路由，参数写成 `name: str = "World"`。',
    )
)
def check_greeting(greeting_app):
    """Check that GET /greet?name=Ada answers {"message": "Hello, Ada"}, and "Hello, World" bare."""
    client = _client(greeting_app)
    named = client.get("/greet", params={"name": "Ada"})
    _require(
        named.status_code != 404,
        (
            "GET /greet answered 404: the route does not exist yet.",
            "GET /greet 返回 404：这个路由还不存在。",
        ),
        (
            'add @greeting_app.get("/greet") above a function with a `name` parameter.',
            '在一个带 `name` 参数的函数上面加 @greeting_app.get("/greet")。',
        ),
    )
    for name in ("Ada", random.choice(["Grace", "李雷", "Linus"])):
        got = client.get("/greet", params={"name": name})
        _require(
            got.status_code == 200 and got.json() == {"message": f"Hello, {name}"},
            (
                f"GET /greet?name={name} answered {got.json()}, "
                f'not {{"message": "Hello, {name}"}}.',
                f"GET /greet?name={name} 返回了 {got.json()}，"
                f'应该是 {{"message": "Hello, {name}"}}。',
            ),
            (
                "a function parameter that is not in the path comes from the query string "
                "(?name=...): use it in the message.",
                "不在路径里的函数参数，FastAPI 会从查询字符串（?name=...）里取："
                "把它用到返回的消息里。",
            ),
            (
                'return {"message": f"Hello, {name}"}.',
                '写成 return {"message": f"Hello, {name}"}。',
            ),
        )
    default = client.get("/greet")
    _require(
        default.status_code == 200 and default.json() == {"message": "Hello, World"},
        (
            f"GET /greet without a name answered {default.status_code} {default.json()}.",
            f"不带 name 的 GET /greet 返回了 {default.status_code} {default.json()}。",
        ),
        (
            "without ?name=... the parameter is missing: what should it be then?",
            "请求里没有 ?name=... 时，这个参数就缺失了：这时它应该取什么值？",
        ),
        (
            'give the parameter a default: `name: str = "World"`, which also makes it optional.',
            '给参数一个默认值：`name: str = "World"`，这样它也就变成了可选参数。',
        ),
    )
    return (
        "a query parameter with a default: /greet?name=... and /greet both answer.",
        "带默认值的查询参数：/greet?name=... 和 /greet 都能正确回答。",
    )


# notebook 2


@_check(
    (
        "count_tokens(text) should return a number: how many tokens the tokenizer makes of text.",
        "count_tokens(text) 应该返回一个数：tokenizer 把 text 切成了多少个 token。",
    )
)
def check_token_count(count_tokens, tokenizer):
    """Check that count_tokens(text) gives the number of tokens the tokenizer makes of text."""
    for text in ["Hello, world!", "你好", "FastAPI serves models."]:
        expected, got = len(tokenizer(text)["input_ids"]), count_tokens(text)
        _require(
            got == expected,
            (
                f"count_tokens({text!r}) returned {got!r}; the tokenizer makes {expected} tokens.",
                f"count_tokens({text!r}) 返回了 {got!r}；tokenizer 实际切出 {expected} 个 token。",
            ),
            (
                "a token is neither a character nor a word: ask the tokenizer itself.",
                "token 既不是字符，也不是单词：要问 tokenizer 本身。",
            ),
            (
                "tokenizer(text) returns a dict; its 'input_ids' is the list of token numbers.",
                "tokenizer(text) 返回一个 dict，其中 'input_ids' 就是 token 编号的列表。",
            ),
            (
                "return len(tokenizer(text)['input_ids']).",
                "写成 return len(tokenizer(text)['input_ids'])。",
            ),
        )
    return (
        "your counts match the tokenizer's, Chinese included.",
        "你数出的 token 数和 tokenizer 的一致，中文也对。",
    )


@_check(
    (
        "GREEDY should be a dict of chat() keyword arguments, such as {'temperature': ...}.",
        "GREEDY 应该是 chat() 的关键字参数组成的 dict，例如 {'temperature': ...}。",
    )
)
def check_repeatable(greedy_settings, model, tokenizer):
    """Check that chat(**greedy_settings) decodes greedily: one prompt, the same answer twice."""
    from tutorial_api.conversation import sampling_options

    temperature = greedy_settings.get("temperature")
    _require(
        temperature is not None and not sampling_options(temperature)["do_sample"],
        (
            f"with temperature={temperature!r}, chat() samples: two answers may differ.",
            f"temperature={temperature!r} 时 chat() 会随机采样：两次回答可能不一样。",
        ),
        (
            "section 7: which temperature makes chat() take the most likely token every time?",
            "看第 7 节：temperature 取多少时，chat() 每一步都选概率最大的 token？",
        ),
        ("GREEDY = {'temperature': 0}.", "写成 GREEDY = {'temperature': 0}。"),
    )
    prompt = "Name a colour."
    first, second = (_chat_answer(model, tokenizer, prompt, greedy_settings) for _ in range(2))
    _require(
        first == second,
        (
            f"two answers differ: {first!r} / {second!r}.",
            f"两次回答不一样：{first!r} / {second!r}。",
        ),
        (
            "use temperature 0 and nothing that samples.",
            "用 temperature 0，不要加任何会采样的设置。",
        ),
    )
    return (
        f"greedy decoding, proved: the same answer twice, {first!r}.",
        f"贪心解码，验证通过：两次都是同一个回答 {first!r}。",
    )


def _chat_answer(model, tokenizer, prompt, settings) -> str:
    """Return chat()'s answer to `prompt` with `settings`, in a few tokens."""
    from tutorial_api.conversation import chat

    return chat(model, tokenizer, prompt, **{"max_new_tokens": 12, **settings})[0]


# notebook 3


@_check(
    (
        "declare `system: str | None = None` in the class body.",
        "在类里声明 `system: str | None = None`。",
    )
)
def check_system_field(request_model):
    """Check that the request body gains an optional `system` text.

    Absent means None, text is kept, a number is refused.
    """
    from pydantic import ValidationError

    declare = ("declare the field as `str | None`.", "把字段声明为 `str | None`。")
    answer = (
        "the line is `system: str | None = None` (in place of `pass`).",
        "这一行是 `system: str | None = None`（替换掉 `pass`）。",
    )
    _require(
        "system" in request_model.model_fields,
        ("the model has no `system` field yet.", "这个模型还没有 `system` 字段。"),
        (
            "a pydantic field is a line `name: type = default` in the class body.",
            "pydantic 的字段就是类里的一行 `名字: 类型 = 默认值`。",
        ),
        answer,
    )
    optional = (
        "give the field the default None, so that the tutorial's old requests stay valid.",
        "给这个字段默认值 None，这样教程里原来的请求仍然有效。",
    )
    try:
        plain = request_model.model_validate({"prompt": "你好"})
    except ValidationError:
        raise _NotYet(
            (
                "a request without `system` was refused: the field is required.",
                "不带 `system` 的请求被拒绝了：这个字段成了必填项。",
            ),
            (optional, answer),
        ) from None
    _require(
        plain.system is None,
        (
            f"without a system field the value is {plain.system!r}, not None.",
            f"请求里没有 system 时，它的值是 {plain.system!r}，不是 None。",
        ),
        optional,
        answer,
    )
    with_system = request_model.model_validate(
        {"prompt": "你好", "system": "Answer in one sentence."}
    )
    _require(
        with_system.system == "Answer in one sentence.",
        ("the system text did not arrive.", "system 文本没有传进来。"),
        declare,
        answer,
    )
    try:
        request_model.model_validate({"prompt": "你好", "system": 5})
    except ValidationError:
        return (
            "the body accepts a system text, keeps old requests valid, "
            "and refuses a number (a 422 in the app).",
            "请求体接受 system 文本，原来的请求仍然有效，数字会被拒绝（在应用里就是 422）。",
        )
    raise _NotYet(
        ("a number was accepted as the system text.", "数字也被当成 system 文本接受了。"),
        (
            (
                "the type annotation decides what pydantic accepts: `Any` accepts everything.",
                "pydantic 接受什么，由类型标注决定：`Any` 什么都接受。",
            ),
            answer,
        ),
    )


@_check(
    (
        "fill_defaults(max_length, top_p, temperature) should return a dict with those three keys.",
        "fill_defaults(max_length, top_p, temperature) 应该返回包含这三个键的 dict。",
    )
)
def check_defaults(fill_defaults):
    """Check that missing values take the tutorial's defaults, and that a deliberate 0 stays 0."""
    answer = (
        "write each as `value if value is not None else default`.",
        "每一项都写成 `value if value is not None else default`。",
    )
    for arguments, expected in [
        ((None, None, None), {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}),
        ((64, 0.5, 0), {"max_length": 64, "top_p": 0.5, "temperature": 0}),
        ((None, 0.9, 0), {"max_length": 2048, "top_p": 0.9, "temperature": 0}),
    ]:
        got = fill_defaults(*arguments)
        call = f"fill_defaults{arguments}"
        _require(
            got == expected,
            (
                f"{call} returned {got}, not {expected}.",
                f"{call} 返回了 {got}，应该是 {expected}。",
            ),
            (
                "a missing value (None) takes the tutorial's default; a value that is given, "
                "0 included, is kept.",
                "缺失的值（None）取教程的默认值；传进来的值（包括 0）要原样保留。",
            ),
            (
                "`value if value else default` treats 0 as missing, because 0 counts as false.",
                "`value if value else default` 会把 0 当成缺失，因为 0 在 Python 里算作假。",
            ),
            answer,
        )
    return (
        "None takes the default, and temperature 0 stays 0.",
        "None 取默认值，temperature 0 保持为 0。",
    )


# notebook 4


@_check(
    (
        "stream_and_count(client) should return a pair: (the text, the number of tokens).",
        "stream_and_count(client) 应该返回一对值：（文本, token 数）。",
    )
)
def check_streamed_tokens(stream_and_count, client):
    """Check that every call streams and asks for usage, and the answer matches one unstreamed."""
    import httpx

    calls = []  # (request body, response content type) of each call the learner's code makes

    def record(response):
        body = json.loads(response.request.content or b"{}")
        calls.append((body, response.headers.get("content-type", "")))

    with httpx.Client(event_hooks={"response": [record]}) as http:
        text, tokens = stream_and_count(client.with_options(http_client=http))
    streamed = [body for body, kind in calls if kind.startswith("text/event-stream")]
    stream_hint = (
        "pass stream=True to client.chat.completions.create(...) and loop over what it returns.",
        "给 client.chat.completions.create(...) 传 stream=True，再用 for 循环遍历它的返回值。",
    )
    _require(
        calls,
        (
            "stream_and_count made no request to the server.",
            "stream_and_count 没有向服务端发任何请求。",
        ),
        (
            "ask the server with client.chat.completions.create(...), as in section 4.",
            "像第 4 节那样，用 client.chat.completions.create(...) 向服务端提问。",
        ),
        stream_hint,
    )
    _require(
        len(streamed) == len(calls),
        (
            f"{len(calls) - len(streamed)} of your {len(calls)} requests were not streamed: "
            "the server sent those answers in one piece.",
            f"你发的 {len(calls)} 个请求里有 {len(calls) - len(streamed)} 个不是流式的："
            "服务端把这些回答一次性发了回来。",
        ),
        (
            "a streamed answer arrives in chunks as it is generated: "
            "which argument of create() asks for that?",
            "流式的回答是边生成边一块一块（chunk）发回来的：create() 的哪个参数能要求这样做？",
        ),
        stream_hint,
    )
    _require(
        all(body.get("stream_options", {}).get("include_usage") for body in streamed),
        (
            "your stream did not ask for usage, so the number of tokens was guessed: "
            "counting chunks is not counting tokens (a chunk may hold several tokens, or none).",
            "你的流式请求没有要 usage，所以 token 数只能靠猜：数 chunk 不等于数 token"
            "（一个 chunk 可能包含好几个 token，也可能一个都没有）。",
        ),
        (
            "let the server count: a stream can end with one more chunk that carries usage.",
            "让服务端来数：流式回答的最后可以多发一个带 usage 的 chunk。",
        ),
        (
            "add stream_options={'include_usage': True}; the last chunk's "
            "usage.completion_tokens is the count, and its choices list is empty.",
            "加上 stream_options={'include_usage': True}；最后一个 chunk 的 "
            "usage.completion_tokens 就是 token 数，它的 choices 是空列表。",
        ),
    )
    reference = client.chat.completions.create(
        model="smollm2-135m",
        temperature=0,
        max_tokens=16,
        messages=[{"role": "user", "content": "Name a fruit."}],
    )
    expected = reference.choices[0].message.content
    _require(
        text == expected,
        (
            f"the streamed text {text!r} is not the answer {expected!r}.",
            f"流式拼出的文本 {text!r} 和回答 {expected!r} 不一样。",
        ),
        (
            "use the exercise's settings (temperature 0, max_tokens 16) and keep every piece.",
            "用练习要求的设置（temperature 0，max_tokens 16），并且每一块文本都要保留。",
        ),
        (
            "join every chunk's choices[0].delta.content; skip None, and the last chunk, "
            "whose choices list is empty.",
            "把每个 chunk 的 choices[0].delta.content 拼起来；跳过 None，"
            "也跳过 choices 为空的最后一个 chunk。",
        ),
    )
    _require(
        tokens == reference.usage.completion_tokens,
        (
            f"you counted {tokens!r} tokens; the server generated "
            f"{reference.usage.completion_tokens}.",
            f"你数出 {tokens!r} 个 token；"
            f"服务端实际生成了 {reference.usage.completion_tokens} 个。",
        ),
        (
            "return the count from the chunk that carries usage.",
            "token 数要取自带 usage 的那个 chunk。",
        ),
        (
            "in the loop: `if chunk.usage: tokens = chunk.usage.completion_tokens`.",
            "在循环里写：`if chunk.usage: tokens = chunk.usage.completion_tokens`。",
        ),
    )
    return (
        f"{tokens} tokens, streamed and counted from the server's own usage.",
        f"{tokens} 个 token：以流式方式收到，数目取自服务端自己的 usage。",
    )


@_check(
    (
        "`reply` should be the requests.Response of your POST.",
        "`reply` 应该是你 POST 得到的 requests.Response。",
    )
)
def check_refused_temperature(reply):
    """Check a POST / that the server refused with 422, naming temperature as the field to fix."""
    _require_status(
        reply,
        422,
        (
            "reply = requests.post(server.url, json={...}).",
            "写成 reply = requests.post(server.url, json={...})。",
        ),
        (
            "send a prompt and a temperature the server cannot accept.",
            "发一个 prompt，再配一个服务端不能接受的 temperature。",
        ),
        (
            "the field allows 0 to 2: try json={'prompt': '你好', 'temperature': 5}.",
            "这个字段只允许 0 到 2：试试 json={'prompt': '你好', 'temperature': 5}。",
        ),
    )
    field = reply.json().get("field")
    _require(
        field == "temperature",
        (
            f"the server refused, but names the field {field!r}.",
            f"服务端拒绝了，但它指出的字段是 {field!r}。",
        ),
        (
            "send a valid prompt, so that temperature is the only thing wrong.",
            "prompt 要合法，让 temperature 成为唯一的错误。",
        ),
    )
    message = reply.json()["message"]
    return (
        f"422, field 'temperature': {message}",
        f"422，出错的字段是 temperature。服务端的原话（英文）：{message}\n"
        "意思是：temperature 不合格，它必须是 0 到 2 之间的数。"
        "422 表示请求的格式或取值不对，改好这个字段再发就行。",
    )


# notebook 5


@_check(
    (
        "`batch` should be what tokenizer(prompts, padding=True, return_tensors='pt') returns.",
        "`batch` 应该是 tokenizer(prompts, padding=True, return_tensors='pt') 的返回值。",
    )
)
def check_left_padding(batch, tokenizer, prompts):
    """Check the prompts padded on the left, with an attention mask 0 exactly on the padding."""
    answer = (
        "batch3 = tokenizer(EXERCISE_PROMPTS, padding=True, padding_side='left', "
        "return_tensors='pt').",
        "写成 batch3 = tokenizer(EXERCISE_PROMPTS, padding=True, padding_side='left', "
        "return_tensors='pt')。",
    )
    _require(
        batch is not None,
        ("`batch` is still None.", "`batch` 还是 None。"),
        (
            "give the tokenizer all the prompts at once, padded, as tensors.",
            "把所有 prompt 一次交给 tokenizer，要求 padding，并返回 tensor。",
        ),
        answer,
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    _require(
        ids.shape[0] == len(prompts),
        (
            f"the batch has {ids.shape[0]} rows for {len(prompts)} prompts.",
            f"batch 有 {ids.shape[0]} 行，但 prompt 有 {len(prompts)} 个。",
        ),
        (
            "pass the whole list of prompts to the tokenizer at once.",
            "把整个 prompt 列表一次传给 tokenizer。",
        ),
        answer,
    )
    _require(
        bool(mask[:, -1].all()),
        (
            "the last column holds padding: the padding is on the right.",
            "最后一列里有 padding：padding 加在了右边。",
        ),
        (
            "the next token goes after each row's last column: "
            "which side must the padding go, so that every row ends with a real token?",
            "下一个 token 接在每一行的最后一列后面："
            "padding 放在哪一边，每行才会以真实的 token 结尾？",
        ),
        answer,
    )
    for row, prompt in enumerate(prompts):
        real = ids[row][mask[row].bool()].tolist()
        _require(
            real == tokenizer(prompt)["input_ids"],
            (
                f"row {row} is not the tokens of {prompt!r}.",
                f"第 {row} 行不是 {prompt!r} 的 token。",
            ),
            (
                "tokenize the prompts as they are, in order.",
                "按原样、按顺序对 prompt 做 tokenize。",
            ),
            answer,
        )
        _require(
            mask[row].tolist() == sorted(mask[row].tolist()),
            (
                f"row {row} has padding after real tokens.",
                f"第 {row} 行在真实 token 后面还有 padding。",
            ),
            (
                "left padding puts every pad token before the first real one.",
                "左侧 padding 要把所有 pad token 都放在第一个真实 token 之前。",
            ),
            answer,
        )
    return (
        f"{len(prompts)} rows of {ids.shape[1]} tokens; "
        "each ends with its own last token, ready for the next one.",
        f"{len(prompts)} 行，每行 {ids.shape[1]} 个 token；每一行都以自己的最后一个 token 结尾，"
        "可以直接接上下一个 token。",
    )


@_check(
    (
        "drop_finished(rows, finished) should return the rows whose flag is False, in order.",
        "drop_finished(rows, finished) 应该按原顺序返回标记为 False 的那些行。",
    )
)
def check_drop_finished(drop_finished):
    """Check that a finished row leaves the batch, and the others keep their order."""
    import torch

    answer = (
        "keep = torch.tensor([not done for done in finished]); return rows[keep].",
        "写成 keep = torch.tensor([not done for done in finished]); return rows[keep]。",
    )
    rows = torch.arange(12).reshape(4, 3)
    for finished in ([False, True, False, True], [True, False, False, False], [False] * 4):
        kept = drop_finished(rows, finished)
        _require(
            kept is not None,
            ("drop_finished returned None.", "drop_finished 返回了 None。"),
            (
                "return rows[...] indexed with the rows to keep.",
                "返回 rows[...]，下标是要保留的那些行。",
            ),
            answer,
        )
        staying = [index for index, done in enumerate(finished) if not done]
        _require(
            torch.equal(kept, rows[staying]),
            (
                f"from rows 0 to 3 with finished={finished} you kept\n{kept},\nnot rows {staying}.",
                f"rows 是第 0 到 3 行，finished={finished}，你保留的是\n{kept}，\n"
                f"应该保留第 {staying} 行。",
            ),
            (
                "a row stays while its flag is False: the finished ones (True) leave.",
                "标记为 False 的行留下，已完成（True）的行离开。",
            ),
            (
                "a tensor indexed with a list of True/False keeps the rows marked True.",
                "用 True/False 列表做下标，tensor 会保留标记为 True 的行。",
            ),
            answer,
        )
    return (
        "finished rows leave; the engine does the same to the cache, the ids and the mask.",
        "已完成的行离开了；引擎对 KV cache、token id 和 mask 也是这样做的。",
    )


# notebook 6


@_check(
    (
        "`reply` should be the requests.Response that was refused.",
        "`reply` 应该是被拒绝的那个 requests.Response。",
    )
)
def check_too_many_requests(reply):
    """Check a request refused with 429 Too Many Requests, and Retry-After saying when to retry."""
    _require_status(
        reply,
        429,
        (
            "send three requests at once with one key (a ThreadPoolExecutor), "
            "and keep the one answered 429.",
            "用同一个 key 同时发三个请求（用 ThreadPoolExecutor），把返回 429 的那个保存下来。",
        ),
        (
            "the limit is two requests in flight per key: send a third while two are still "
            "generating, and keep the reply that was refused.",
            "每个 key 同时最多只能有两个请求在处理："
            "在两个还在生成时发第三个，保存被拒绝的那个响应。",
        ),
        (
            "with ThreadPoolExecutor(max_workers=3) as pool: replies = list(pool.map(ask, "
            "range(3))); then reply = the one whose status_code is 429.",
            "with ThreadPoolExecutor(max_workers=3) as pool: replies = list(pool.map(ask, "
            "range(3)))；然后 reply 取 status_code 为 429 的那个。",
        ),
    )
    _require(
        "Retry-After" in reply.headers,
        ("the 429 has no Retry-After header.", "这个 429 没有 Retry-After header。"),
        ("keep the 429 reply itself.", "保存 429 响应本身。"),
    )
    seconds, message = reply.headers["Retry-After"], reply.json()["message"]
    return (
        f"429, retry after {seconds} s: {message}",
        f"429，{seconds} 秒后重试。服务端的原话（英文）：{message}\n"
        "意思是：这个 key 同时在处理的请求已经到了上限。等前面的回答完成后再发；"
        "Retry-After 告诉你过几秒再试。",
    )


@_check(
    (
        "`reply` should be the requests.Response of your POST.",
        "`reply` 应该是你 POST 得到的 requests.Response。",
    )
)
def check_wrong_key(reply):
    """Check that a key sent as Bearer but unknown to the server is refused with 401."""
    send = (
        "reply = requests.post(server.url, json={...}, headers={'Authorization': 'Bearer ...'}).",
        "写成 reply = requests.post(server.url, json={...}, "
        "headers={'Authorization': 'Bearer ...'})。",
    )
    _require_status(
        reply,
        401,
        send,
        (
            "send a key that is not one of the class's keys.",
            "发一个不属于本班的 key。",
        ),
        send,
    )
    sent = reply.request.headers.get("Authorization", "")
    scheme, _, key = sent.partition(" ")
    _require(
        scheme == "Bearer" and key.strip(),
        (
            f"your request sent no key (Authorization: {sent!r}): "
            "the server refused a missing key, not a wrong one.",
            f"你的请求没有带 key（Authorization: {sent!r}）：服务端拒绝的是“没有 key”，"
            "而不是“key 不对”。",
        ),
        (
            "a key travels in a header: which one, and in what form?",
            "key 是放在 header 里发送的：哪个 header，什么格式？",
        ),
        send,
    )
    message = reply.json()["message"]
    return (
        f"401: a wrong key is refused, and the answer names the header to fix: {message}",
        f"401：错误的 key 被拒绝了，回答里指出了要改的 header。服务端的原话（英文）：{message}\n"
        "意思是：这个 API key 无效，检查有没有输错，或者向老师要一个。",
    )


# notebook 7: a student's laptop, only requests and openai

QUESTIONS = ("你好，请用一句话介绍你自己。", "你刚才说了什么？", "把它翻译成英文。")
# Non-empty text in a JSON answer or in one of a stream's events.
_TEXT = re.compile(rb'"content":\s*"[^"]')


@dataclasses.dataclass
class _Timing:
    """One answer on the wire: its times in seconds since its request was sent, and its bytes."""

    streamed: bool
    first_text: float | None = None
    last_byte: float | None = None
    body: bytes = b""


class _TimedBody(httpx.SyncByteStream):
    """A response body that fills in its answer's _Timing as its bytes arrive."""

    def __init__(self, chunks: httpx.SyncByteStream, sent: float, timing: _Timing):
        self._chunks, self._sent, self._timing = chunks, sent, timing

    def __iter__(self):
        for chunk in self._chunks:
            if self._timing.first_text is None and _TEXT.search(chunk):
                self._timing.first_text = time.monotonic() - self._sent
            self._timing.body += chunk
            yield chunk
        self._timing.last_byte = time.monotonic() - self._sent

    def close(self) -> None:
        self._chunks.close()


class _Stopwatch(httpx.HTTPTransport):
    """An httpx transport that times each answer on the wire, under the learner's code."""

    def __init__(self):
        super().__init__()
        self.timings: list[_Timing] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        response = super().handle_request(request)
        timing = _Timing(
            streamed=response.headers.get("content-type", "").startswith("text/event-stream")
        )
        self.timings.append(timing)
        response.stream = _TimedBody(response.stream, sent, timing)
        return response


def _timed(client, watch: _Stopwatch, http: httpx.Client):
    """Return `client` sending through `watch`, warmed up by one short answer.

    A client's first answer loads code: warmed, the learner's clock and the wire's measure the same.
    """
    timed = client.with_options(http_client=http)
    name = timed.models.list().data[0].id
    timed.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    watch.timings.clear()
    return timed


def _close_to(measured, actual: float) -> bool:
    """Tell whether the learner's `measured` seconds agree with the wire's `actual` ones."""
    return isinstance(measured, int | float) and abs(measured - actual) <= 0.1 + 0.25 * actual


@_check(
    (
        "three_turns(session, url, questions) should return the history after the third answer.",
        "three_turns(session, url, questions) 应该返回第三个回答之后的 history。",
    )
)
def check_three_turns(three_turns, url, key=None):
    """Check three turns of one chat, each request sending the history the last answer returned."""
    import requests

    sent, answers = [], []

    def record(response, *args, **kwargs):
        sent.append(json.loads(response.request.body or b"{}"))
        answers.append(response.json() if response.ok else {})

    with requests.Session() as session:
        session.hooks["response"].append(record)
        if key:
            session.headers["Authorization"] = f"Bearer {key}"
        history = three_turns(session, url, QUESTIONS)
    _require(
        len(sent) == 3 and [body.get("prompt") for body in sent] == list(QUESTIONS),
        (
            f"you sent {len(sent)} requests with the prompts "
            f"{[body.get('prompt') for body in sent]}, not the three questions in order.",
            f"你发了 {len(sent)} 个请求，prompt 依次是 "
            f"{[body.get('prompt') for body in sent]}，不是按顺序的三个问题。",
        ),
        (
            "loop over `questions` and send one POST for each, with session.post(url, json=...).",
            "对 `questions` 做循环，每个问题用 session.post(url, json=...) 发一个 POST。",
        ),
    )
    for turn in (1, 2):
        _require(
            sent[turn].get("history") == answers[turn - 1].get("history"),
            (
                f"request {turn + 1} sent the history {sent[turn].get('history')!r}, not the one "
                "the answer before it returned: the model did not see the earlier turns.",
                f"第 {turn + 1} 个请求发出的 history 是 {sent[turn].get('history')!r}，"
                "不是上一个回答返回的 history：模型看不到前面几轮对话。",
            ),
            (
                "the server remembers nothing between requests: each request carries the "
                "whole conversation so far.",
                "服务端在两次请求之间什么都不记：每个请求都要带上到目前为止的整段对话。",
            ),
            (
                "send json={'prompt': question, 'history': history}, and after each answer set "
                "history = answer.json()['history'].",
                "发送 json={'prompt': question, 'history': history}，"
                "每次收到回答后令 history = answer.json()['history']。",
            ),
        )
    _require(
        history == answers[2].get("history"),
        (
            "three_turns returned something else than the history of the last answer.",
            "three_turns 返回的不是最后一个回答里的 history。",
        ),
        ("return the last answer's history.", "返回最后一个回答的 history。"),
    )
    return (
        "three turns, each sent with the ones before it: the model saw the whole conversation.",
        "三轮对话，每一轮都带上了前面的内容：模型看到的是完整的对话。",
    )


@_check(
    (
        "first_text_seconds(client, stream) should return the seconds until the first text.",
        "first_text_seconds(client, stream) 应该返回收到第一段文字之前等了多少秒。",
    )
)
def check_first_text(first_text_seconds, client):
    """Check the learner's clock for an answer's first text, streamed and not, against the wire."""
    watch = _Stopwatch()
    with httpx.Client(transport=watch) as http:
        timed = _timed(client, watch, http)
        measured = {stream: first_text_seconds(timed, stream) for stream in (True, False)}
    _require(
        [timing.streamed for timing in watch.timings] == [True, False],
        (
            "each call should send one request: streamed when stream is True, not when False.",
            "每次调用应该只发一个请求：stream 为 True 时流式，为 False 时不是。",
        ),
        (
            "pass stream=stream to client.chat.completions.create(...).",
            "把 stream=stream 传给 client.chat.completions.create(...)。",
        ),
    )
    streamed, whole = watch.timings
    _require(
        _close_to(measured[True], streamed.first_text or 0),
        (
            f"streamed, you measured {measured[True]!r} s; the first text arrived after "
            f"{streamed.first_text or 0:.2f} s.",
            f"流式时你测到 {measured[True]!r} 秒；第一段文字其实在 "
            f"{streamed.first_text or 0:.2f} 秒时就到了。",
        ),
        (
            "start the clock just before create(...) and stop it at the first chunk that "
            "carries text, not at the end of the loop.",
            "在 create(...) 之前开始计时，在第一个带文字的 chunk 到达时停止，而不是在循环结束后。",
        ),
        (
            "for chunk in stream: if chunk.choices and chunk.choices[0].delta.content: "
            "return time.perf_counter() - start",
            "for chunk in stream: if chunk.choices and chunk.choices[0].delta.content: "
            "return time.perf_counter() - start",
        ),
    )
    _require(
        _close_to(measured[False], whole.last_byte or 0),
        (
            f"not streamed, you measured {measured[False]!r} s; the answer arrived after "
            f"{whole.last_byte or 0:.2f} s.",
            f"非流式时你测到 {measured[False]!r} 秒；"
            f"回答其实在 {whole.last_byte or 0:.2f} 秒时才到。",
        ),
        (
            "without streaming, the first text comes with the whole answer: stop the clock "
            "when create(...) returns.",
            "不用流式时，第一段文字是和整个回答一起到的：create(...) 返回时停止计时。",
        ),
    )
    return (
        f"streamed, the first text came after {measured[True]:.2f} s; not streamed, after "
        f"{measured[False]:.2f} s: the same answer, but streamed you start reading sooner.",
        f"流式：{measured[True]:.2f} 秒后看到第一段文字；非流式：{measured[False]:.2f} 秒后。"
        "回答是一样的，但用流式可以早点开始读。",
    )


@_check(
    (
        "tokens_and_seconds(client) should return a pair: (tokens, seconds).",
        "tokens_and_seconds(client) 应该返回一对值：（token 数, 秒数）。",
    )
)
def check_tokens_per_second(tokens_and_seconds, client):
    """Check one answer's token count, from the server's usage, and the seconds it took."""
    watch = _Stopwatch()
    with httpx.Client(transport=watch) as http:
        tokens, seconds = tokens_and_seconds(_timed(client, watch, http))
    _require(
        len(watch.timings) == 1 and not watch.timings[0].streamed,
        (
            f"tokens_and_seconds sent {len(watch.timings)} requests; this exercise wants one, "
            "not streamed.",
            f"tokens_and_seconds 发了 {len(watch.timings)} 个请求；这个练习只要一个非流式请求。",
        ),
        (
            "call client.chat.completions.create(...) once, without stream=True.",
            "只调用一次 client.chat.completions.create(...)，不要加 stream=True。",
        ),
    )
    (timing,) = watch.timings
    generated = json.loads(timing.body)["usage"]["completion_tokens"]
    _require(
        tokens == generated,
        (
            f"you counted {tokens!r} tokens; the server generated {generated}.",
            f"你数出 {tokens!r} 个 token；服务端实际生成了 {generated} 个。",
        ),
        (
            "words and characters are not tokens: let the server count.",
            "单词数、字数都不等于 token 数：让服务端来数。",
        ),
        (
            "answer.usage.completion_tokens is the number of tokens in the answer.",
            "answer.usage.completion_tokens 就是回答里的 token 数。",
        ),
    )
    _require(
        _close_to(seconds, timing.last_byte or 0),
        (
            f"you measured {seconds!r} s; the answer took {timing.last_byte or 0:.2f} s.",
            f"你测到 {seconds!r} 秒；这个回答实际用了 {timing.last_byte or 0:.2f} 秒。",
        ),
        (
            "start the clock just before create(...) and stop it when it returns.",
            "在 create(...) 之前开始计时，它返回时停止。",
        ),
    )
    return (
        f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s for you; the "
        "server shares its speed among everyone asking at once.",
        f"{seconds:.2f} 秒生成了 {tokens} 个 token，也就是每秒 {tokens / seconds:.1f} 个 token。"
        "服务端的速度是所有同时提问的人一起分的。",
    )
