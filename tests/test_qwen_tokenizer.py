import logging
import random
import unicodedata

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from tutorial_api.qwen_tokenizer import (
    PATTERN,
    bpe_ranks_file,
    load_qwen_tokenizer,
    qwen_tokenizer_folder,
)

SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def qwen():
    """Qwen2.5's tokenizer from the kit's model cache."""
    return load_qwen_tokenizer()


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("你好", [108386]),
        ("Hello", [9707]),
        ("system", [8948]),
        ("user", [872]),
        ("assistant", [77091]),
        ("\n", [198]),
        ("12345", [16, 17, 18, 19, 20]),
        ("<|endoftext|>", [151643]),
        ("<|im_start|>", [151644]),
        ("<|im_end|>", [151645]),
    ],
)
def test_text_gets_qwen2_5s_own_ids(qwen, text, ids):
    assert qwen(text).input_ids == ids


def test_control_tokens_and_ids_are_qwen2_5s(qwen):
    """The 22 control tokens after the 151,643 byte pairs, in Qwen2.5's order; eos and pad."""
    added = qwen.convert_ids_to_tokens(list(range(151643, 151665)))
    assert added[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert added[13:16] == ["<|video_pad|>", "<tool_call>", "</tool_call>"]
    assert added[-1] == "<|file_sep|>"
    assert len(qwen) == 151665
    assert (qwen.eos_token, qwen.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen.pad_token, qwen.pad_token_id) == ("<|endoftext|>", 151643)
    assert qwen.bos_token is None


def test_decoding_drops_control_tokens_but_keeps_tool_call_tags(qwen):
    """As Qwen2.5 marks them: `<tool_call>` is text a client parses, `<|im_end|>` is not."""
    ids = qwen("<|im_start|>assistant\n<tool_call>{}</tool_call><|im_end|>").input_ids
    assert qwen.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>{}</tool_call>"


@pytest.mark.parametrize(
    "text",
    [
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
        "大语言模型（LLM）用 FastAPI 提供服务：第 3 课，温度 0.7，top_p=0.8 🚀",
        "  缩进、全角　空格\t和换行\r\n都要原样回来\n\n",
    ],
)
def test_decode_gives_chinese_text_back(qwen, text):
    assert qwen.decode(qwen(text).input_ids) == text


def sample_texts():
    """Return text of many scripts, numbers, spaces and emoji, the same on every run."""
    rng = random.Random(0)
    ranges = [
        (0x20, 0x2FF),
        (0x4E00, 0x9FFF),
        (0x3040, 0x30FF),
        (0x0400, 0x04FF),
        (0x1F300, 0x1F64F),
    ]
    alphabet = [chr(code) for low, high in ranges for code in range(low, high, 7)] + list(" \n\t")
    made_up = ["".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(400)]
    return [
        "The capital of France is Paris. It's 2026; prices rose 12.5% to $1,234,567.",
        "def f(x):\n    return x ** 2  # 平方\n\n\n",
        "e\u0301cole, ﬁne, Ａ１",  # decomposed and compatibility forms: Qwen normalises to NFC only
        *made_up,
    ]


def test_encoding_matches_tiktoken_on_the_same_ranks(qwen):
    """The converted tokenizer splits text exactly as tiktoken does with Qwen's own ranks."""
    ranks = load_tiktoken_bpe(str(bpe_ranks_file()))
    reference = tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in sample_texts():
        expected = reference.encode(unicodedata.normalize("NFC", text))
        assert qwen(text).input_ids == expected, text


def test_chat_template_is_chatml_with_qwens_default_system(qwen):
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "1+1=?"},
    ]
    assert qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        f"{SYSTEM}<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n"
        "<|im_start|>user\n1+1=?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = qwen.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"][:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert ids["input_ids"][-3:] == [151644, 77091, 198]


def test_chat_template_takes_the_callers_system_prompt(qwen):
    messages = [{"role": "system", "content": "用中文回答。"}, {"role": "user", "content": "Hi"}]
    assert qwen.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\n用中文回答。<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_template_lists_tools_and_replays_their_calls(qwen):
    """Qwen2.5's tool section, a call the assistant made, and the tool's answer as a user turn."""
    tool = {"type": "function", "function": {"name": "now", "parameters": {}}}
    call = {"type": "function", "function": {"name": "now", "arguments": {"tz": "UTC+8"}}}
    messages = [
        {"role": "user", "content": "几点了？"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "12:00"},
    ]
    rendered = qwen.apply_chat_template(messages, tools=[tool], tokenize=False)
    assert rendered == (
        f"{SYSTEM}\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
        '<tools>\n{"type": "function", "function": {"name": "now", "parameters": {}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n几点了？<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "now", "arguments": {"tz": "UTC+8"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>\n"
    )


@pytest.mark.slow
def test_built_once_into_the_model_cache(tmp_path, monkeypatch, caplog):
    """The first load builds the tokenizer into $TUTORIAL_API_CACHE; later loads only read it."""
    monkeypatch.setenv("TUTORIAL_API_CACHE", str(tmp_path))
    caplog.set_level(logging.INFO, logger="tutorial_api")
    folder = qwen_tokenizer_folder()
    assert folder.is_relative_to(tmp_path) and (folder / "tokenizer.json").is_file()
    assert qwen_tokenizer_folder() == folder
    building = [record for record in caplog.records if record.getMessage().startswith("Building")]
    assert len(building) == 1
