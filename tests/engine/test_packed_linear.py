import copy
import weakref

import pytest
import torch
from torch import nn

from tutorial_api import load_model
from tutorial_api.conversation import build_messages
from tutorial_api.engine.packed_linear import (
    PackedCopyLinear,
    PackedLinear,
    PackedSiblings,
    SiblingPart,
    pack_linear_layers,
    packing_works,
)


def greedy(model, tokenizer, new_tokens=16):
    ids = tokenizer.apply_chat_template(
        build_messages("What is the capital of France?", []),
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    return model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)[0].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_model_answers_token_for_token_as_the_plain_one(dtype):
    """Where this CPU cannot pack a dtype (bf16 without AVX512-BW), every layer stays plain and
    answers the same.
    """
    model, tokenizer = load_model("tiny-qwen2", dtype=dtype)
    plain = greedy(model, tokenizer)
    linear_layers = sum(type(module) is nn.Linear for module in model.modules())

    assert pack_linear_layers(model) == (linear_layers if packing_works(dtype) else 0)
    assert all(type(module) is not nn.Linear for module in model.modules()) == packing_works(dtype)
    assert greedy(model, tokenizer) == plain


@pytest.mark.real_model
def test_the_output_layer_keeps_sharing_the_embedding(smollm2):
    """The default model's output layer keeps sharing the embedding."""
    model = copy.deepcopy(smollm2[0])
    parameters = model.num_parameters()

    pack_linear_layers(model)

    assert isinstance(model.lm_head, PackedCopyLinear)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert isinstance(model.model.layers[0].mlp.down_proj, PackedLinear)
    assert model.num_parameters() == parameters
    assert greedy(model, smollm2[1], 8) == greedy(smollm2[0], smollm2[1], 8)


def test_sibling_projections_multiply_once_and_keep_their_names():
    """Sibling projections multiply once and keep their names in the state dict."""
    model, _ = load_model("tiny-qwen2", dtype="float32")
    plain = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    attention = model.model.layers[0].self_attn
    q, k, v = (copy.deepcopy(getattr(attention, name)) for name in ("q_proj", "k_proj", "v_proj"))
    x = torch.randn(2, 3, q.in_features)
    calls = []

    pack_linear_layers(model)
    multiply = attention.qkv_proj.forward
    attention.qkv_proj.forward = lambda x: calls.append(x) or multiply(x)

    assert isinstance(attention.qkv_proj, PackedSiblings) and isinstance(
        model.model.layers[0].mlp.up_proj, SiblingPart
    )
    state = model.state_dict()
    assert list(state) == list(plain) and all(
        torch.equal(state[name], plain[name]) for name in plain
    )
    for layer, reference in ((attention.q_proj, q), (attention.k_proj, k), (attention.v_proj, v)):
        torch.testing.assert_close(layer(x), reference(x))
    assert len(calls) == 1
    calls.clear()
    held = weakref.ref(x)
    del x
    assert held() is None  # v took the last columns: neither the input nor the product is kept
    x = torch.randn(2, 3, q.in_features)
    torch.testing.assert_close(attention.q_proj(x), q(x))
    x.mul_(3)
    torch.testing.assert_close(attention.k_proj(x), k(x))
    torch.testing.assert_close(attention.v_proj(x * 2), v(x * 2))
    assert len(calls) == 3


def test_a_packed_copy_follows_the_weight_it_shares():
    """A packed copy follows the weight it shares when edited, copied or converted."""
    embedding, output = nn.Embedding(32, 16), nn.Linear(16, 32, bias=False)
    output.weight = embedding.weight
    model = nn.Sequential(embedding, output)
    x = torch.randn(3, 16)

    assert pack_linear_layers(model) == 1 and isinstance(model[1], PackedCopyLinear)
    with torch.no_grad():
        embedding.weight.mul_(2)
    torch.testing.assert_close(model[1](x), x @ embedding.weight.T)
    copied = copy.deepcopy(model)
    assert copied[1].weight is copied[0].weight
    torch.testing.assert_close(copied[1](x), x @ embedding.weight.T)
    model.to(torch.bfloat16)
    assert model[1].weight is model[0].weight
    torch.testing.assert_close(model[1](x.bfloat16()), x.bfloat16() @ model[0].weight.T)


def test_moving_a_packed_model_unpacks_and_repacks_it():
    """Moving a packed model unpacks it, and packs it again on the CPU."""
    model, tokenizer = load_model("tiny-qwen2", dtype="float32")
    plain = greedy(model, tokenizer)
    pack_linear_layers(model)
    layer = model.model.layers[0].self_attn.o_proj

    model.to(torch.float64)
    assert not layer.weight.is_mkldnn and layer.weight.dtype == torch.float64
    model.to(torch.float32)

    assert layer.weight.is_mkldnn and layer.weight.dtype == torch.float32
    assert greedy(model, tokenizer) == plain
    model.to("meta")
    assert not layer.weight.is_mkldnn and layer.weight.device.type == "meta"


def test_a_copy_of_a_packed_model_answers_the_same():
    model, tokenizer = load_model("tiny-qwen2")
    pack_linear_layers(model)

    assert greedy(copy.deepcopy(model), tokenizer) == greedy(model, tokenizer)


def test_nothing_is_packed_where_torch_has_no_onednn(monkeypatch):
    model, _ = load_model("tiny-qwen2")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)

    assert pack_linear_layers(model) == 0
    assert not any(isinstance(module, PackedLinear) for module in model.modules())


def test_float16_layers_stay_plain():
    model, _ = load_model("tiny-qwen2", dtype=torch.float16)

    assert pack_linear_layers(model) == 0


def test_a_packed_model_saves_and_loads_its_plain_weights(tmp_path):
    model, tokenizer = load_model("tiny-qwen2")
    plain = greedy(model, tokenizer)
    pack_linear_layers(model)

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert greedy(*load_model(str(tmp_path))) == plain
    model.load_state_dict(load_model("tiny-qwen2")[0].state_dict())
    assert greedy(model, tokenizer) == plain
