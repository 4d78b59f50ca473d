"""Checks for the notebooks' exercises: each prints what is right, or what is wrong with a hint.

A check never raises, so that Run All goes on past an unsolved exercise.
"""

import functools

SOLVED = "✅ Solved:"
NOT_YET = "❌ Not yet:"


class _NotYet(Exception):
    """What a check found wrong, and a hint towards the fix."""

    def __init__(self, problem: str, hint: str):
        super().__init__(problem)
        self.problem, self.hint = problem, hint


def _require(condition, problem: str, hint: str) -> None:
    """Raise _NotYet with `problem` and `hint` unless `condition` holds."""
    if not condition:
        raise _NotYet(problem, hint)


def _check(hint: str):
    """Turn a function that raises _NotYet (or anything else) into a check that prints its verdict.

    `hint` is for the learner's code failing in a way the check did not foresee.
    """

    def decorate(function):
        @functools.wraps(function)
        def check(*args, **kwargs) -> None:
            """Print the verdict: what is right, or what is not yet, with a hint."""
            try:
                praise = function(*args, **kwargs)
            except _NotYet as finding:
                print(f"{NOT_YET} {finding.problem}\nHint: {finding.hint}")
            except Exception as error:  # the learner's code may fail in any way; Run All must go on
                print(f"{NOT_YET} your code raised {type(error).__name__}: {error}\nHint: {hint}")
            else:
                print(f"{SOLVED} {praise}")

        return check

    return decorate


def _require_status(reply, status: int, how_to_send: str, how_to_provoke: str) -> None:
    """Require a reply, and one answered with `status`."""
    _require(reply is not None, "`reply` is still None.", how_to_send)
    _require(
        reply.status_code == status,
        f"the server answered {reply.status_code}, not {status}.",
        how_to_provoke,
    )


def _client(app):
    """Return a test client for `app`; FastAPI's testing needs are imported only here."""
    from fastapi.testclient import TestClient

    return TestClient(app)


# notebook 1


@_check('define the route with @exercise_app.get("/squares/{number}") and annotate `number: int`.')
def check_square_route(exercise_app):
    """Check that GET /squares/{number} answers its square, and 422 to a number that is no integer.

    The square comes as {"number": n, "square": n * n}.
    """
    client = _client(exercise_app)
    reply = client.get("/squares/12")
    _require(
        reply.status_code != 404,
        "GET /squares/12 answered 404: the route does not exist yet.",
        'add @exercise_app.get("/squares/{number}") above a function that takes `number`.',
    )
    _require(
        reply.status_code == 200,
        f"GET /squares/12 answered {reply.status_code}.",
        "read the error above.",
    )
    _require(
        reply.json() == {"number": 12, "square": 144},
        f'GET /squares/12 answered {reply.json()}, not {{"number": 12, "square": 144}}.',
        'return {"number": number, "square": number * number}; '
        "with `number: int` it arrives as a number.",
    )
    refused = client.get("/squares/twelve")
    _require(
        refused.status_code == 422,
        f"GET /squares/twelve answered {refused.status_code}, not 422.",
        "annotate the parameter as `number: int`: "
        "FastAPI then refuses text that is not an integer.",
    )
    return "12 squared is 144, and 'twelve' is refused with 422 before your function runs."


@_check('define the route with @greeting_app.get("/greet") and a parameter `name: str = "World"`.')
def check_greeting(greeting_app):
    """Check that GET /greet?name=Ada answers {"message": "Hello, Ada"}, and "Hello, World" bare."""
    client = _client(greeting_app)
    named, default = client.get("/greet", params={"name": "Ada"}), client.get("/greet")
    _require(
        named.status_code != 404,
        "GET /greet answered 404: the route does not exist yet.",
        'add @greeting_app.get("/greet") above a function with a `name` parameter.',
    )
    _require(
        named.json() == {"message": "Hello, Ada"},
        f'GET /greet?name=Ada answered {named.json()}, not {{"message": "Hello, Ada"}}.',
        'return {"message": f"Hello, {name}"}; '
        "a parameter that is not in the path is a query parameter.",
    )
    _require(
        default.status_code == 200 and default.json() == {"message": "Hello, World"},
        f"GET /greet without a name answered {default.status_code} {default.json()}.",
        'give the parameter a default: `name: str = "World"`, which also makes it optional.',
    )
    return "a query parameter with a default: /greet?name=Ada and /greet both answer."


# notebook 2


@_check("count_tokens(text) should return len(tokenizer(text)['input_ids']).")
def check_token_count(count_tokens, tokenizer):
    """Check that count_tokens(text) gives the number of tokens the tokenizer makes of text."""
    for text in ["Hello, world!", "你好", "FastAPI serves models."]:
        expected, got = len(tokenizer(text)["input_ids"]), count_tokens(text)
        _require(
            got == expected,
            f"count_tokens({text!r}) returned {got!r}; the tokenizer makes {expected} tokens.",
            "tokenizer(text) returns a dict; its 'input_ids' is the list of token numbers.",
        )
    return "your counts match the tokenizer's, Chinese included."


@_check("GREEDY should be a dict of chat() keyword arguments, such as {'temperature': ...}.")
def check_repeatable(greedy_settings, model, tokenizer):
    """Check that chat(**greedy_settings) decodes greedily: one prompt, the same answer twice."""
    from tutorial_api.conversation import sampling_options

    temperature = greedy_settings.get("temperature")
    _require(
        temperature is not None and not sampling_options(temperature)["do_sample"],
        f"with temperature={temperature!r}, chat() samples: two answers may differ.",
        "section 7: which temperature makes chat() take the most likely token every time?",
    )
    prompt = "Name a colour."
    first, second = (_chat_answer(model, tokenizer, prompt, greedy_settings) for _ in range(2))
    _require(first == second, f"two answers differ: {first!r} / {second!r}.", "use temperature 0.")
    return f"greedy decoding, proved: the same answer twice, {first!r}."


def _chat_answer(model, tokenizer, prompt, settings) -> str:
    """Return chat()'s answer to `prompt` with `settings`, in a few tokens."""
    from tutorial_api.conversation import chat

    return chat(model, tokenizer, prompt, **{"max_new_tokens": 12, **settings})[0]


# notebook 3


@_check("declare `system: str | None = None` in the class body.")
def check_system_field(request_model):
    """Check that the request body gains an optional `system` text.

    Absent means None, text is kept, a number is refused.
    """
    from pydantic import ValidationError

    _require(
        "system" in request_model.model_fields,
        "the model has no `system` field yet.",
        "add a line `system: str | None = None` to the class, below `pass` (then remove `pass`).",
    )
    plain = request_model.model_validate({"prompt": "你好"})
    _require(
        plain.system is None,
        f"without a system field the value is {plain.system!r}, not None.",
        "give the field the default None, so that the tutorial's old requests stay valid.",
    )
    with_system = request_model.model_validate(
        {"prompt": "你好", "system": "Answer in one sentence."}
    )
    _require(
        with_system.system == "Answer in one sentence.",
        "the system text did not arrive.",
        "declare the field as `str | None`.",
    )
    try:
        request_model.model_validate({"prompt": "你好", "system": 5})
    except ValidationError:
        return (
            "the body accepts a system text, keeps old requests valid, "
            "and refuses a number (a 422 in the app)."
        )
    raise _NotYet(
        "a number was accepted as the system text.", "declare the field as `str | None`, not `Any`."
    )


@_check("fill_defaults(max_length, top_p, temperature) should return a dict with those three keys.")
def check_defaults(fill_defaults):
    """Check that missing values take the tutorial's defaults, and that a deliberate 0 stays 0."""
    expected = {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}
    got = fill_defaults(None, None, None)
    _require(
        got == expected,
        f"fill_defaults(None, None, None) returned {got}, not {expected}.",
        "a missing value (None) takes the tutorial's default.",
    )
    got = fill_defaults(64, 0.5, 0)
    _require(
        got == {"max_length": 64, "top_p": 0.5, "temperature": 0},
        f"fill_defaults(64, 0.5, 0) returned {got}: a deliberate 0 was replaced.",
        "`value if value else default` treats 0 as missing; test `value is not None` instead.",
    )
    return "None takes the default, and temperature 0 stays 0."


# notebook 4


@_check("stream_and_count(client) should return a pair: (the text, the number of tokens).")
def check_streamed_tokens(stream_and_count, client):
    """Check the streamed text and its token count against the same request, not streamed."""
    text, tokens = stream_and_count(client)
    reference = client.chat.completions.create(
        model="smollm2-135m",
        temperature=0,
        max_tokens=16,
        messages=[{"role": "user", "content": "Name a fruit."}],
    )
    _require(
        text == reference.choices[0].message.content,
        f"the streamed text {text!r} is not the answer {reference.choices[0].message.content!r}.",
        "join every chunk's choices[0].delta.content (skip None and the last, empty chunk), "
        "with the exercise's settings: temperature 0, max_tokens 16.",
    )
    _require(
        tokens == reference.usage.completion_tokens,
        f"you counted {tokens!r} tokens; the server generated {reference.usage.completion_tokens}.",
        "ask for stream_options={'include_usage': True}: "
        "the last chunk carries usage.completion_tokens. "
        "(Counting chunks is not the same: a chunk may hold several tokens, or none.)",
    )
    return f"{tokens} tokens, streamed and counted from the server's own usage."


@_check("`reply` should be the requests.Response of your POST.")
def check_refused_temperature(reply):
    """Check a POST / that the server refused with 422, naming temperature as the field to fix."""
    _require_status(
        reply,
        422,
        "reply = requests.post(server.url, json={...}).",
        "send a prompt and a temperature the server cannot accept: the field allows 0 to 2.",
    )
    field = reply.json().get("field")
    _require(
        field == "temperature",
        f"the server refused, but names the field {field!r}.",
        "send a valid prompt, so that temperature is the only thing wrong.",
    )
    return f"422, field 'temperature': {reply.json()['message']}"


# notebook 5


@_check("`batch` should be what tokenizer(prompts, padding=True, return_tensors='pt') returns.")
def check_left_padding(batch, tokenizer, prompts):
    """Check the prompts padded on the left, with an attention mask 0 exactly on the padding."""
    _require(
        batch is not None,
        "`batch` is still None.",
        "tokenizer(PROMPTS, padding=True, return_tensors='pt').",
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    _require(
        ids.shape[0] == len(prompts),
        f"the batch has {ids.shape[0]} rows for {len(prompts)} prompts.",
        "pass the whole list of prompts to the tokenizer at once.",
    )
    _require(
        bool(mask[:, -1].all()),
        "the last column holds padding: the padding is on the right.",
        "pass padding_side='left' to the tokenizer, "
        "so that every row ends with its last real token.",
    )
    for row, prompt in enumerate(prompts):
        real = ids[row][mask[row].bool()].tolist()
        _require(
            real == tokenizer(prompt)["input_ids"],
            f"row {row} is not the tokens of {prompt!r}.",
            "tokenize the prompts as they are, in order.",
        )
        _require(
            mask[row].tolist() == sorted(mask[row].tolist()),
            f"row {row} has padding after real tokens.",
            "left padding puts every pad token before the first real one.",
        )
    return (
        f"{len(prompts)} rows of {ids.shape[1]} tokens; "
        "each ends with its own last token, ready for the next one."
    )


@_check("drop_finished(rows, finished) should return the rows whose flag is False, in order.")
def check_drop_finished(drop_finished):
    """Check that a finished row leaves the batch, and the others keep their order."""
    import torch

    rows = torch.arange(12).reshape(4, 3)
    kept = drop_finished(rows, [False, True, False, True])
    _require(
        kept is not None,
        "drop_finished returned None.",
        "return rows[...] indexed with the rows to keep.",
    )
    _require(
        torch.equal(kept, rows[[0, 2]]),
        f"from rows 0 to 3 with rows 1 and 3 finished you kept\n{kept}.",
        "keep = torch.tensor([not done for done in finished]); return rows[keep].",
    )
    _require(
        torch.equal(drop_finished(rows, [False] * 4), rows),
        "with nothing finished, rows went missing.",
        "keep every row whose flag is False.",
    )
    return "finished rows leave; the engine does the same to the cache, the ids and the mask."


# notebook 6


@_check("`reply` should be the requests.Response that was refused.")
def check_too_many_requests(reply):
    """Check a request refused with 429 Too Many Requests, and Retry-After saying when to retry."""
    _require_status(
        reply,
        429,
        "send three requests at once with one key (a ThreadPoolExecutor), "
        "and keep the one answered 429.",
        "the limit is two requests in flight per key: send a third while two are still generating.",
    )
    _require(
        "Retry-After" in reply.headers,
        "the 429 has no Retry-After header.",
        "keep the 429 reply itself.",
    )
    return f"429, retry after {reply.headers['Retry-After']} s: {reply.json()['message']}"


@_check("`reply` should be the requests.Response of your POST.")
def check_wrong_key(reply):
    """Check that a key the server does not know is refused with 401, naming Authorization."""
    _require_status(
        reply,
        401,
        "reply = requests.post(server.url, json={...}, headers={'Authorization': 'Bearer ...'}).",
        "send a key that is not one of the class's keys.",
    )
    _require(
        reply.json().get("field") == "Authorization",
        f"the answer names {reply.json().get('field')!r}.",
        "send the key in the Authorization header as 'Bearer KEY'.",
    )
    return "401: a wrong key is refused, and the answer says which header to fix."
