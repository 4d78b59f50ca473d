import sys

from tutorial_api.engine import text_stream as text_stream_module
from tutorial_api.engine.text_stream import TextStream


def stream(tokenizer, text, stop=()):
    pieces, text_stream = [], TextStream(tokenizer, stop)
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        piece, stopped = text_stream.add(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    return pieces + [text_stream.flush()], False


def test_chinese_and_emoji_stream_whole(tiny):
    _, tokenizer = tiny
    text = "给我讲一个年轻人奋斗创业最终取得成功的故事。🚀 好！"
    pieces, _ = stream(tokenizer, text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len([p for p in pieces if p]) > 3, "the text should arrive in several pieces"


def test_stop_string_ends_the_text_and_is_never_sent(tiny):
    _, tokenizer = tiny
    pieces, stopped = stream(
        tokenizer, "The title is: Rising Star. THE END and more", stop=["THE END"]
    )
    assert stopped
    assert "".join(pieces) == "The title is: Rising Star. "
    assert not any("THE" in piece for piece in pieces)


def test_text_that_only_looks_like_a_stop_string_is_released(tiny):
    _, tokenizer = tiny
    pieces, stopped = stream(tokenizer, "THE ENTRANCE is open", stop=["THE END"])
    assert not stopped
    assert "".join(pieces) == "THE ENTRANCE is open"


def test_the_earliest_stop_string_wins(tiny):
    """The earliest stop string wins, whatever its place in the list."""
    _, tokenizer = tiny
    pieces, stopped = stream(tokenizer, "Hello World", stop=["World", "lo W"])
    assert stopped
    assert "".join(pieces) == "Hel"


def test_a_stop_string_that_spans_tokens_and_repeats_itself(tiny):
    """A stop string that repeats its own start is still found where it ends first."""
    _, tokenizer = tiny
    pieces, stopped = stream(tokenizer, "ababac abababc and more", stop=["ababc"])
    assert stopped
    assert "".join(pieces) == "ababac ab"


def test_hostile_stop_strings_cost_a_few_steps_a_character(tiny):
    """The issue's stop strings (4 of 250,000 characters) cost steps per character, not per length.

    The steps are the Python lines text_stream.py runs while tokens are added; past the bound the
    count stops the test at once.
    """
    _, tokenizer = tiny
    text = "x" * 300 + " and then the answer goes on"
    text_stream = TextStream(tokenizer, ["x" * 250_000] * 4)
    bound = 30 * len(text)
    steps = 0

    def count(frame, event, arg):
        nonlocal steps
        if frame.f_code.co_filename != text_stream_module.__file__:
            return None
        steps += event == "line"
        if steps > bound:
            raise AssertionError(f"more than {bound} steps for {len(text)} characters")
        return count

    pieces = []
    sys.settrace(count)
    try:
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            pieces.append(text_stream.add(token)[0])
    finally:
        sys.settrace(None)
    assert "".join(pieces) == text
    assert steps > 0, "the count must see the stream's own lines"
