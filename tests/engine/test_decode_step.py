import copy

import pytest
import torch
from transformers import DynamicCache

from tutorial_api import load_model
from tutorial_api.engine.decode_step import _LlamaStyleStep, decode_step_for
from tutorial_api.engine.packed_linear import pack_linear_layers, packing_works

# three rows of different lengths, left-padded: the mask and the positions must keep them apart
PROMPTS = [[5, 17, 260, 33, 101, 7], [9, 48, 2001], [300, 41, 77, 12]]


def decode(model, step, tokens=40):
    """prefill PROMPTS left-padded, then decode greedily with `step`: each step's logits."""
    width = max(map(len, PROMPTS))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        steps = []
        for _ in range(tokens):
            mask = torch.cat([mask, mask.new_ones(len(PROMPTS), 1)], dim=1)
            logits = step(
                logits.float().argmax(-1)[:, None], mask, mask.sum(-1, keepdim=True) - 1, cache
            )
            steps.append(logits)
    return torch.stack(steps)


def transformers_forward(model):
    return lambda input_ids, mask, position_ids, cache: model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
    ).logits[:, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_qwen2_decodes_in_the_plain_loop(dtype):
    """A packed Qwen2 decodes without transformers' wrappers, to the same logits."""
    if not packing_works(dtype):
        pytest.skip(
            f"this CPU has no oneDNN path for {dtype} (bf16 needs AVX512-BW/VL/DQ or "
            "AVX-NE-CONVERT): its layers stay unpacked and decode through transformers' forward"
        )
    model, _ = load_model("tiny-qwen2", dtype=dtype)
    pack_linear_layers(model)

    step = decode_step_for(model)

    assert isinstance(step, _LlamaStyleStep)
    expected = decode(model, transformers_forward(model))
    if dtype == torch.float32:
        torch.testing.assert_close(decode(model, step), expected)
    else:
        # bf16 rounds at every op: the same logits only from the same ops, as transformers' with a
        # 4-D mask runs
        assert torch.equal(
            decode(model, step), decode(model, decode_step_for(_replaced_forward(model)))
        )


def _replaced_forward(model):
    """A copy of `model` with its forward set on the instance, as the fixtures that slow or fault a
    model do.
    """
    copied = copy.deepcopy(model)
    copied.forward = copied.forward
    return copied


def _hooked(model, calls):
    hooked = copy.deepcopy(model)
    hooked.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    return hooked


def _sliding(model):
    """the same model attending to its last 4 tokens only."""
    config = copy.deepcopy(model.config)
    config.use_sliding_window, config.sliding_window = True, 4
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    sliding = type(model)(config).eval()
    sliding.load_state_dict(model.state_dict())
    pack_linear_layers(sliding)
    return sliding


@pytest.mark.parametrize("variant", ["not packed", "forward replaced", "hooked", "sliding window"])
def test_other_models_decode_through_their_own_forward(variant):
    """A model the plain loop does not fit decodes through its own forward."""
    model, _ = load_model("tiny-qwen2", dtype="float32")
    calls = []
    if variant not in ("not packed", "sliding window"):
        pack_linear_layers(model)
    model = {
        "forward replaced": _replaced_forward,
        "hooked": lambda m: _hooked(m, calls),
        "sliding window": _sliding,
    }.get(variant, lambda m: m)(model)

    step = decode_step_for(model)

    assert not isinstance(step, _LlamaStyleStep)
    torch.testing.assert_close(decode(model, step), decode(model, transformers_forward(model)))
    if variant == "hooked":
        assert len(calls) == 2 * 41  # the prefill and 40 steps, twice
