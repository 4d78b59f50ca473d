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
