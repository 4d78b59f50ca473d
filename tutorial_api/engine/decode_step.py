"""The model's forward pass for one decoding step: each row's next input token in, its logits out.

transformers' forward serves every use of a model, and on its way through one decoding step it
makes hundreds of module calls and as many checks, a sizeable part of a CPU step. For Llama-style
models (Llama, Qwen2, Mistral, SmolLM2) whose projections `packed_linear` has packed,
`_LlamaStyleStep` calls the same layers' own norms, projections, rotary embedding and activation
in a plain loop, with transformers' arithmetic, op for op, so the tokens stay the same.
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tutorial_api.engine.packed_linear import PackedSiblings

# A step: (input ids [rows, 1], mask [rows, columns] with 1 over real tokens,
# position ids [rows, 1], cache) -> logits [rows, vocab]
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]

# transformers' own classes, by name, as importing them is slow
_LLAMA_STYLE = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


def decode_step_for(model) -> DecodeStep:
    """Return the fastest faithful decoding step for `model`.

    That is `_LlamaStyleStep` where it applies, else transformers' forward (with a 4-D mask on a
    CPU, see `_transformers_step`).
    """
    on_cpu = model.device.type == "cpu"
    on_cpu_sdpa = on_cpu and model.config._attn_implementation == "sdpa" and plain_cache(model)
    if on_cpu_sdpa and _llama_style(model):
        return _LlamaStyleStep(model)
    return functools.partial(_transformers_step, model, mask_4d=on_cpu_sdpa)


def plain_cache(model) -> bool:
    """Tell whether every layer of the model's cache holds plain keys and values of all the past.

    No sliding window, no state: a prefix can be cut from them, and a mask alone says what each row
    attends to.
    """
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def _transformers_step(
    model, input_ids, mask, position_ids, cache, *, mask_4d: bool
) -> torch.Tensor:
    """Run transformers' own forward for one step; return the logits, [rows, vocab].

    When no row is padded, transformers drops a 2-D mask and runs torch's grouped-query attention
    kernel, slower in bf16 on a CPU. Given a 4-D mask, which it takes as is, it folds each key/value
    head's queries together instead. Hence `mask_4d`, only where every layer attends to all the
    past, as a mask taken as is would override a sliding window.
    """
    # mask: [rows, columns], or [rows, 1, 1, columns] with `mask_4d`
    attention_mask = mask.bool()[:, None, None, :] if mask_4d else mask
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[:, -1]  # logits: [rows, 1, vocab] -> [rows, vocab]


def _llama_style(model) -> bool:
    """Tell whether `model` is a plain Llama-style model with packed projections.

    Of transformers' own class, its forward not replaced, no module hooked, and its q/k/v and
    gate/up projections packed together.
    """
    cls = type(model)
    own_class = cls.__name__ in _LLAMA_STYLE and cls.__module__.startswith("transformers.models.")
    if not own_class or "forward" in vars(model):
        return False
    if any(module._forward_hooks or module._forward_pre_hooks for module in model.modules()):
        return False
    return all(
        isinstance(getattr(layer.self_attn, "qkv_proj", None), PackedSiblings)
        and isinstance(getattr(layer.mlp, "gate_up_proj", None), PackedSiblings)
        for layer in model.model.layers
    )


class _LlamaStyleStep:
    """transformers' Llama decoder layers for one token a row, without the wrappers.

    It calls each module's `forward`, taken once from the model as it is when the step is made.
    Queries are folded onto their key/value head, as transformers does for one query token
    (`pack_gqa`); q and k turn by the rotary embedding together. Keys and values go into spare
    columns of the cache (`_appended`).
    """

    def __init__(self, model):
        """Take the forwards of `model`'s modules, layer by layer."""
        inner = model.model
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.embed, self.rotary = inner.embed_tokens.forward, inner.rotary_emb.forward
        self.final_norm, self.lm_head = inner.norm.forward, model.lm_head.forward
        self.layers = [
            (
                layer.input_layernorm.forward,
                layer.self_attn.qkv_proj.forward,
                layer.self_attn.scaling,
                layer.self_attn.o_proj.forward,
                layer.post_attention_layernorm.forward,
                layer.mlp.gate_up_proj.forward,
                layer.mlp.act_fn.forward,
                layer.mlp.down_proj.forward,
            )
            for layer in inner.layers
        ]

    def __call__(self, input_ids, mask, position_ids, cache) -> torch.Tensor:
        """Decode one token a row; return the logits, [rows, vocab] (see `DecodeStep`)."""
        rows, heads, kv_heads, head_dim = len(input_ids), self.heads, self.kv_heads, self.head_dim
        group = heads // kv_heads  # queries a key/value head serves
        hidden = self.embed(input_ids)  # hidden: [rows, 1, hidden_size]
        # cos, sin: [rows, 1, head_dim] -> [rows, 1 (head), 1, head_dim]
        cos, sin = (part.unsqueeze(1) for part in self.rotary(hidden, position_ids))
        mask = mask.bool()[:, None, None, :]  # mask: [rows, 1, 1, columns]
        for index, layer in enumerate(self.layers):
            norm, qkv_proj, scaling, o_proj, mlp_norm, gate_up_proj, act, down_proj = layer
            # qkv: [rows, 1, (heads + 2 * kv_heads) * head_dim]
            #   -> [rows, heads + 2 * kv_heads, 1, head_dim]
            qkv = qkv_proj(norm(hidden)).view(rows, 1, -1, head_dim).transpose(1, 2)
            # qk: [rows, heads + kv_heads, 1, head_dim], queries and keys turned together
            qk = _rotated(qkv[:, : heads + kv_heads], cos, sin)
            # keys, values: [rows, kv_heads, columns, head_dim]
            keys, values = _appended(cache.layers[index], qk[:, heads:], qkv[:, heads + kv_heads :])
            # queries: [rows, kv_heads, group, head_dim], a head's queries as its query tokens
            queries = qk[:, :heads].reshape(rows, kv_heads, group, head_dim)
            # attended: [rows, kv_heads, group, head_dim]
            attended = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, scale=scaling
            )
            # back to [rows, 1, heads * head_dim]
            hidden = hidden + o_proj(attended.reshape(rows, 1, -1))
            # gate, up: [rows, 1, intermediate_size]
            gate, up = gate_up_proj(mlp_norm(hidden)).chunk(2, dim=-1)
            hidden = hidden + down_proj(act(gate) * up)
        return self.lm_head(self.final_norm(hidden))[:, -1]  # logits: [rows, vocab]


def _appended(layer, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add a step's keys and values to a cache layer; return the layer's keys and values.

    As `DynamicLayer.update` does, but written into spare columns where the layer has some left,
    since `update` concatenates, copying the whole cache at every step. The layer's tensors become
    views of buffers with room for an eighth more tokens (32 at least); tensors that replace them
    (a merge, a row leaving) get new buffers at the next step.
    """
    # keys, values: [rows, kv_heads, 1, head_dim]; layer.keys: [rows, kv_heads, length, head_dim]
    length = layer.keys.shape[2]
    held = layer.__dict__.get("_spare")  # the keys it made last, and their buffers
    if held is not None and held[0] is layer.keys and held[1].shape[2] > length:
        key_buffer, value_buffer = held[1:]
    else:
        rows, heads, _, dim = layer.keys.shape
        room = length + max(32, length // 8)
        # key_buffer, value_buffer: [rows, kv_heads, room, head_dim]
        key_buffer, value_buffer = (
            old.new_empty(rows, heads, room, dim) for old in (layer.keys, layer.values)
        )
        key_buffer[:, :, :length], value_buffer[:, :, :length] = layer.keys, layer.values
    key_buffer[:, :, length : length + 1], value_buffer[:, :, length : length + 1] = keys, values
    layer.keys, layer.values = key_buffer[:, :, : length + 1], value_buffer[:, :, : length + 1]
    layer._spare = (layer.keys, key_buffer, value_buffer)
    return layer.keys, layer.values


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn `x` [..., head_dim] by the rotary embedding, as transformers' `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
