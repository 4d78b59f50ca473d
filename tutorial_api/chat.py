"""the tutorial's `model.chat(tokenizer, prompt, history=...)`, for any chat model with a chat template."""

from dataclasses import dataclass

import torch

from tutorial_api.models import context_length
from tutorial_api.sampler import GREEDY_BELOW, Sampling, settle
from tutorial_api.settings import Settings

# The original tutorial's defaults for POST /.
DEFAULT_MAX_LENGTH = 2048
DEFAULT_TOP_P = 0.7
DEFAULT_TEMPERATURE = 0.95


class ChatInputError(ValueError):
    """a request the model cannot serve as asked; `field` names the input to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class PreparedChat:
    """a conversation turned into model input, with its token budget and sampling settings."""

    input_ids: torch.Tensor
    max_new_tokens: int
    sampling: Sampling

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.shape[-1]


def build_messages(prompt, history=None, system=None) -> list[dict]:
    """chat-template messages from `[user, assistant]` history pairs and the new prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": prompt}]


def tutorial_sampling(temperature=None, top_p=None) -> dict:
    """the tutorial's temperature and top_p, its defaults where they are left out; 0 means greedy, never a default."""
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    return {"temperature": temperature, "top_p": DEFAULT_TOP_P if top_p is None else top_p}


def sampling_options(temperature=None, top_p=None) -> dict:
    """the tutorial's sampling as generate() arguments, for a legacy model's own chat()."""
    options = tutorial_sampling(temperature, top_p)
    return {"do_sample": False} if options["temperature"] < GREEDY_BELOW else {"do_sample": True, **options}


def prepare(model, tokenizer, messages, *, max_length=None, max_new_tokens=None,
            default_max_length=DEFAULT_MAX_LENGTH, **sampling):
    """tokenize with the chat template and work out the answer's budget; `max_length` counts the prompt too.
    `sampling` (temperature, top_p, penalties, seed, top_logprobs) goes on top of the model's generation config."""
    input_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    budget = answer_budget(input_ids.shape[-1], context_length(model, tokenizer), max_length, max_new_tokens,
                           default_max_length)
    return PreparedChat(input_ids, budget, settle(model.generation_config, **sampling))


def answer_budget(prompt_tokens, context, max_length=None, max_new_tokens=None,
                  default_max_length=DEFAULT_MAX_LENGTH) -> int:
    """how many tokens the answer may take: `max_length` (else `default_max_length`, else the whole context) less
    the prompt, and at most `max_new_tokens`; ChatInputError when the prompt leaves no room."""
    if prompt_tokens >= context:
        raise ChatInputError(
            "prompt",
            f"The prompt and history take {prompt_tokens} tokens, but the model's context holds {context}. "
            "Shorten the prompt or drop old history turns.",
        )
    if max_length is not None and max_length > context:
        raise ChatInputError("max_length", f"max_length {max_length} is larger than the model's context of {context} tokens.")
    if max_length is None:
        total = context if default_max_length is None else min(default_max_length, context)
    else:
        total = max_length
    if prompt_tokens >= total:
        raise ChatInputError(
            "max_length",
            f"The prompt and history take {prompt_tokens} tokens, which leaves no room for an answer within "
            f"max_length {total}. Raise max_length (up to {context}) or shorten the history.",
        )
    budget = total - prompt_tokens
    return budget if max_new_tokens is None else min(budget, max_new_tokens)


def chat(model, tokenizer, prompt, history=None, *, max_length=None, max_new_tokens=None, top_p=None,
         temperature=None, system=None):
    """Answer `prompt` after `history`; return `(response, history)` with the new pair appended.

    The answer stops at `max_new_tokens`, by default the server's answer budget for `POST /` (512 tokens,
    $TUTORIAL_API_ANSWER_TOKENS), or sooner where `max_length` (prompt and answer together) says so.
    """
    history = [list(pair) for pair in history or []]
    max_new_tokens = Settings().answer_tokens if max_new_tokens is None else max_new_tokens
    if callable(getattr(model, "chat", None)):
        return _legacy_chat(model, tokenizer, prompt, history, max_length, max_new_tokens, top_p, temperature, system)
    prepared = prepare(
        model, tokenizer, build_messages(prompt, history, system),
        max_length=max_length, max_new_tokens=max_new_tokens, **tutorial_sampling(temperature, top_p),
    )
    input_ids = prepared.input_ids.to(model.device)
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=prepared.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **prepared.sampling.generate_options(),
        )
    # A budget that runs out mid-character leaves a partial UTF-8 sequence, decoded as U+FFFD: drop it.
    response = tokenizer.decode(output[0, input_ids.shape[-1]:], skip_special_tokens=True).rstrip("\ufffd").strip()
    return response, history + [[prompt, response]]


def _legacy_chat(model, tokenizer, prompt, history, max_length, max_new_tokens, top_p, temperature, system):
    """Qwen-7B-Chat's remote code brings its own chat(), which takes history as (query, response) tuples."""
    options = {"max_length": max_length, "max_new_tokens": max_new_tokens, **sampling_options(temperature, top_p)}
    if system:
        options["system"] = system
    response, _ = model.chat(
        tokenizer, prompt, history=[tuple(pair) for pair in history],
        **{key: value for key, value in options.items() if value is not None},
    )
    return response, history + [[prompt, response]]
