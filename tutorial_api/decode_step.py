"""the model's forward pass for one decoding step, as the engine runs it: each row's next input token in, each row's
next-token logits out.

transformers' forward serves every use of a model. On its way through a decoding step of SmolLM2-135M it makes about
400 module calls and as many checks, which on a CPU cost a fifth of the step. For Llama-style models (Llama, Qwen2,
Mistral, SmolLM2) whose projections `packed_linear` has packed, `_LlamaStyleStep` calls the same layers' own norms,
projections, rotary embedding and activation in a plain loop, with transformers' arithmetic, op for op. On this
project's test machine a step took 10.3 instead of 13.5 ms for one row, 15.8 instead of 18.8 ms for eight and 21.5
instead of 25.8 ms for sixteen, with the same tokens.
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tutorial_api.packed_linear import PackedSiblings

# A step: (input ids [rows, 1], mask [rows, columns] with 1 over real tokens, position ids [rows, 1], cache) -> logits
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]

# transformers' own classes, by name: importing them costs a second and a half
_LLAMA_STYLE = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


def decode_step_for(model) -> DecodeStep:
    """the fastest faithful decoding step for `model`: `_LlamaStyleStep` where it applies, else transformers' forward
    (with a 4-D mask on a CPU, see `_transformers_step`)."""
    on_cpu_sdpa = model.device.type == "cpu" and model.config._attn_implementation == "sdpa" and plain_cache(model)
    if on_cpu_sdpa and _llama_style(model):
        return _LlamaStyleStep(model)
    return functools.partial(_transformers_step, model, mask_4d=on_cpu_sdpa)


def plain_cache(model) -> bool:
    """whether every layer of the model's cache holds plain keys and values of all the past (no sliding window, no
    state): a prefix can be cut from them, and a mask alone says what each row attends to."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def _transformers_step(model, input_ids, mask, position_ids, cache, *, mask_4d: bool) -> torch.Tensor:
    """transformers' own forward. When no row is padded, it drops a 2-D mask and runs torch's grouped-query attention
    kernel, which in bf16 on a CPU took 25 instead of 20 ms a step of 8 rows, and 36 instead of 26 of 16. Given a 4-D
    mask, which it takes as is, it folds each key/value head's queries together instead (`mask_4d`: only where every
    layer attends to all the past, as a mask taken as is would override a sliding window)."""
    return model(input_ids=input_ids, attention_mask=mask.bool()[:, None, None, :] if mask_4d else mask,
                 position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def _llama_style(model) -> bool:
    """a Llama-style model of transformers' own class, its forward not replaced, no module hooked, and its q/k/v and
    gate/up projections packed together."""
    return (type(model).__name__ in _LLAMA_STYLE and type(model).__module__.startswith("transformers.models.")
            and "forward" not in vars(model)
            and not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
            and all(isinstance(getattr(layer.self_attn, "qkv_proj", None), PackedSiblings)
                    and isinstance(getattr(layer.mlp, "gate_up_proj", None), PackedSiblings)
                    for layer in model.model.layers))


class _LlamaStyleStep:
    """transformers' Llama decoder layers for one token a row, without the wrappers: it calls each module's
    `forward`, taken once from the model as it is when the step is made. Queries are folded onto their key/value
    head, as transformers does for one query token (`pack_gqa`); q and k turn by the rotary embedding together.
    Keys and values go into spare columns of the cache (`_appended`)."""

    def __init__(self, model):
        inner = model.model
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.embed, self.rotary = inner.embed_tokens.forward, inner.rotary_emb.forward
        self.final_norm, self.lm_head = inner.norm.forward, model.lm_head.forward
        self.layers = [(layer.input_layernorm.forward, layer.self_attn.qkv_proj.forward, layer.self_attn.scaling,
                        layer.self_attn.o_proj.forward, layer.post_attention_layernorm.forward,
                        layer.mlp.gate_up_proj.forward, layer.mlp.act_fn.forward, layer.mlp.down_proj.forward)
                       for layer in inner.layers]

    def __call__(self, input_ids, mask, position_ids, cache) -> torch.Tensor:
        rows, heads, kv_heads, head_dim = len(input_ids), self.heads, self.kv_heads, self.head_dim
        hidden = self.embed(input_ids)
        cos, sin = (part.unsqueeze(1) for part in self.rotary(hidden, position_ids))
        mask = mask.bool()[:, None, None, :]
        for index, (norm, qkv_proj, scaling, o_proj, mlp_norm, gate_up_proj, act, down_proj) in enumerate(self.layers):
            qkv = qkv_proj(norm(hidden)).view(rows, 1, -1, head_dim).transpose(1, 2)
            qk = _rotated(qkv[:, :heads + kv_heads], cos, sin)
            keys, values = _appended(cache.layers[index], qk[:, heads:], qkv[:, heads + kv_heads:])
            queries = qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, head_dim)
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scaling)
            hidden = hidden + o_proj(attended.reshape(rows, 1, -1))
            gate, up = gate_up_proj(mlp_norm(hidden)).chunk(2, dim=-1)
            hidden = hidden + down_proj(act(gate) * up)
        return self.lm_head(self.final_norm(hidden))[:, -1]


def _appended(layer, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a step's keys and values added to a cache layer, as `DynamicLayer.update` does, but written into spare columns
    where the layer has some left. `update` concatenates, copying the whole cache at every step: a step of 16 rows of
    1,000 tokens each took 81 ms that way, 60 ms this way. The layer's tensors become views of buffers with room for
    an eighth more tokens (32 at least); tensors that replace them (a merge, a row leaving) get new buffers at the
    next step."""
    length = layer.keys.shape[2]
    held = layer.__dict__.get("_spare")  # the keys it made last, and their buffers
    if held is not None and held[0] is layer.keys and held[1].shape[2] > length:
        key_buffer, value_buffer = held[1:]
    else:
        rows, heads, _, dim = layer.keys.shape
        room = length + max(32, length // 8)
        key_buffer, value_buffer = (old.new_empty(rows, heads, room, dim) for old in (layer.keys, layer.values))
        key_buffer[:, :, :length], value_buffer[:, :, :length] = layer.keys, layer.values
    key_buffer[:, :, length:length + 1], value_buffer[:, :, length:length + 1] = keys, values
    layer.keys, layer.values = key_buffer[:, :, :length + 1], value_buffer[:, :, :length + 1]
    layer._spare = (layer.keys, key_buffer, value_buffer)
    return layer.keys, layer.values


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` for one tensor."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
