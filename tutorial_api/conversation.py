"""The tutorial's `model.chat(tokenizer, prompt, history)`, for any model with a chat template."""

from dataclasses import dataclass

import torch

from tutorial_api.backend import DEFAULT_MAX_LENGTH, answer_budget
from tutorial_api.engine.sampler import GREEDY_BELOW, Sampling, settle
from tutorial_api.models import context_length
from tutorial_api.settings import Settings

# The original tutorial's defaults for POST /.
DEFAULT_TOP_P = 0.7
DEFAULT_TEMPERATURE = 0.95


@dataclass
class PreparedChat:
    """A conversation turned into model input, with its answer's budget and sampling settings."""

    input_ids: torch.Tensor
    max_new_tokens: int
    sampling: Sampling

    @property
    def prompt_tokens(self) -> int:
        """Count the prompt's tokens."""
        return self.input_ids.shape[-1]


def build_messages(prompt, history=None, system=None) -> list[dict]:
    """Return chat-template messages from `[user, assistant]` history pairs and the new prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": prompt}]


def tutorial_sampling(temperature=None, top_p=None) -> dict:
    """Return the tutorial's temperature and top_p, with its defaults for those left out.

    A temperature of 0 means greedy decoding, never "use the default".
    """
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    return {"temperature": temperature, "top_p": DEFAULT_TOP_P if top_p is None else top_p}


def sampling_options(temperature=None, top_p=None) -> dict:
    """Return the tutorial's sampling as `generate()` arguments, for a model's own `model.chat`."""
    options = tutorial_sampling(temperature, top_p)
    if options["temperature"] < GREEDY_BELOW:
        return {"do_sample": False}
    return {"do_sample": True, **options}


def prepare(
    model,
    tokenizer,
    messages,
    *,
    max_length=None,
    max_new_tokens=None,
    default_max_length=DEFAULT_MAX_LENGTH,
    **sampling,
):
    """Tokenize a chat with its template and work out the answer's budget.

    `max_length` counts the prompt too. `sampling` (temperature, top_p, penalties, seed,
    top_logprobs) goes on top of the model's generation config.
    """
    input_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    budget = answer_budget(
        input_ids.shape[-1],
        context_length(model, tokenizer),
        max_length,
        max_new_tokens,
        default_max_length,
    )
    return PreparedChat(input_ids, budget, settle(model.generation_config, **sampling))


def chat(
    model,
    tokenizer,
    prompt,
    history=None,
    *,
    max_length=None,
    max_new_tokens=None,
    top_p=None,
    temperature=None,
    system=None,
):
    """Answer `prompt` after `history`; return `(response, history)` with the new pair appended.

    The answer stops at `max_new_tokens`, by default the server's answer budget for `POST /` (512
    tokens, $TUTORIAL_API_ANSWER_TOKENS), or sooner where `max_length` (prompt and answer) says so.
    """
    history = [list(pair) for pair in history or []]
    max_new_tokens = Settings().answer_tokens if max_new_tokens is None else max_new_tokens
    if callable(getattr(model, "chat", None)):
        limits = {"max_length": max_length, "max_new_tokens": max_new_tokens}
        sampling = sampling_options(temperature, top_p)
        return _with_model_chat(model, tokenizer, prompt, history, system, limits | sampling)
    prepared = prepare(
        model,
        tokenizer,
        build_messages(prompt, history, system),
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        **tutorial_sampling(temperature, top_p),
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
    answer = tokenizer.decode(output[0, input_ids.shape[-1] :], skip_special_tokens=True)
    # A budget that runs out mid-character leaves a partial UTF-8 sequence, decoded as U+FFFD: drop
    # it.
    response = answer.rstrip("\ufffd").strip()
    return response, history + [[prompt, response]]


def _with_model_chat(model, tokenizer, prompt, history, system, options):
    """Answer with the model's own `model.chat` (Qwen-7B-Chat's remote code): history as tuples."""
    if system:
        options["system"] = system
    response, _ = model.chat(
        tokenizer,
        prompt,
        history=[tuple(pair) for pair in history],
        **{key: value for key, value in options.items() if value is not None},
    )
    return response, history + [[prompt, response]]
