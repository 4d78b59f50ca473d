import pytest
import torch

from tutorial_api import ChatInputError, chat
from tutorial_api.backend import DEFAULT_MAX_LENGTH
from tutorial_api.conversation import build_messages, prepare, tutorial_sampling


def reference_greedy(model, tokenizer, messages, max_new_tokens):
    """what plain transformers produces: the chat template, then greedy generate."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    output = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, ids.shape[-1] :], skip_special_tokens=True).strip()


def test_history_grows_by_one_pair_and_the_caller_keeps_theirs(tiny):
    history = [("Hi", "Hello!")]
    response, new_history = chat(*tiny, "How are you?", history, max_new_tokens=5, temperature=0)
    assert new_history == [["Hi", "Hello!"], ["How are you?", response]]
    assert history == [("Hi", "Hello!")]


def test_greedy_matches_transformers_with_the_chat_template(tiny):
    history = [["你好", "你好！有什么可以帮你？"]]
    response, _ = chat(*tiny, "给这个故事起一个标题", history, max_new_tokens=12, temperature=0)
    expected = reference_greedy(*tiny, build_messages("给这个故事起一个标题", history), 12)
    assert response == expected


def test_temperature_zero_is_greedy_whatever_the_seed(tiny):
    answers = set()
    for seed in range(3):
        torch.manual_seed(seed)
        answers.add(chat(*tiny, "Tell me a story", max_new_tokens=10, temperature=0)[0])
    assert len(answers) == 1


def test_a_vanishing_temperature_is_greedy(tiny):
    """A vanishing temperature is greedy instead of overflowing."""
    greedy = chat(*tiny, "Tell me a story", max_new_tokens=10, temperature=0)[0]
    assert chat(*tiny, "Tell me a story", max_new_tokens=10, temperature=5e-324)[0] == greedy


def test_positive_temperature_samples(tiny):
    answers = set()
    for seed in range(3):
        torch.manual_seed(seed)
        answers.add(
            chat(*tiny, "Tell me a story", max_new_tokens=10, temperature=1.0, top_p=1.0)[0]
        )
    assert len(answers) == 3


def test_system_message_reaches_the_template(tiny):
    _, tokenizer = tiny
    messages = build_messages("Hi", [["a", "b"]], system="Answer in French.")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "Answer in French." in text and "You are a helpful AI assistant" not in text


def test_max_length_counts_the_prompt(tiny):
    model, tokenizer = tiny
    prepared = prepare(model, tokenizer, build_messages("Hello"), max_length=40)
    assert prepared.max_new_tokens == 40 - prepared.input_ids.shape[-1]
    assert (
        prepare(
            model, tokenizer, build_messages("Hello"), max_length=40, max_new_tokens=3
        ).max_new_tokens
        == 3
    )
    default = prepare(model, tokenizer, build_messages("Hello"))
    assert default.max_new_tokens == min(DEFAULT_MAX_LENGTH, 1024) - default.input_ids.shape[-1]


def test_answer_stays_within_max_length(tiny):
    model, tokenizer = tiny
    prompt_tokens = prepare(model, tokenizer, build_messages("Hello")).input_ids.shape[-1]
    response, _ = chat(model, tokenizer, "Hello", max_length=prompt_tokens + 6, temperature=0)
    assert response == reference_greedy(model, tokenizer, build_messages("Hello"), 6)


def test_sampling_settings_are_not_silently_replaced(tiny):
    model, tokenizer = tiny
    greedy = prepare(model, tokenizer, build_messages("Hi"), temperature=0).sampling
    assert greedy.generate_options() == {"do_sample": False, "repetition_penalty": 1.0}
    chosen = prepare(model, tokenizer, build_messages("Hi"), temperature=0.3, top_p=0.5).sampling
    assert (chosen.do_sample, chosen.temperature, chosen.top_p) == (True, 0.3, 0.5)
    assert prepare(
        model, tokenizer, build_messages("Hi"), **tutorial_sampling()
    ).sampling.generate_options() == {
        "do_sample": True,
        "temperature": 0.95,
        "top_p": 0.7,
        "top_k": 0,
        "min_p": None,
        "repetition_penalty": 1.0,
    }


@pytest.mark.parametrize(
    ("prompt", "max_length", "field"),
    [
        ("word " * 1100, None, "prompt"),
        ("Hello", 5000, "max_length"),
        ("Hello", 10, "max_length"),
    ],
    ids=["longer-than-context", "max-length-beyond-context", "no-room-for-an-answer"],
)
def test_inputs_that_do_not_fit_are_refused_not_cut(tiny, prompt, max_length, field):
    with pytest.raises(ChatInputError) as failure:
        chat(*tiny, prompt, max_length=max_length)
    assert failure.value.field == field


def test_legacy_models_use_their_own_chat(tiny):
    _, tokenizer = tiny

    class QwenRemoteCodeStandIn:
        """the calling convention of Qwen-7B-Chat's remote-code model.chat."""

        def chat(self, tokenizer, query, history, **options):
            self.seen = (query, history, options)
            return f"echo: {query}", history + [(query, f"echo: {query}")]

    model = QwenRemoteCodeStandIn()
    response, history = chat(model, tokenizer, "你好", [["a", "b"]], temperature=0, max_length=100)
    assert response == "echo: 你好"
    assert history == [["a", "b"], ["你好", "echo: 你好"]]
    assert model.seen == (
        "你好",
        [("a", "b")],
        {"max_length": 100, "max_new_tokens": 512, "do_sample": False},
    )
