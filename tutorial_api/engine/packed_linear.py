"""Linear layers whose weights oneDNN, the CPU's matrix library, lays out once, not at every call.

A decoding step multiplies one token's vector by every weight matrix of the model, so on a CPU the
time goes into reading weights. `torch.nn.Linear` hands oneDNN a plain matrix on each call; a weight
reordered once into the blocked layout oneDNN reads fastest makes a step faster, with the same
tokens. This is what torch's own compiler does for CPU inference (`freezing`).

Sibling projections that read the same input (a layer's q, k and v; its gate and up) are packed as
one matrix and multiplied once, as vLLM does, since each oneDNN call has a cost of its own beyond
reading its weights.
"""

import copy
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

_PACKABLE = (torch.float32, torch.bfloat16)
# Sibling projections that Llama-style layers (Llama, Qwen2, Qwen3, Mistral, SmolLM2) call one after
# the other on the same input, and the name their packed product takes, as in vLLM.
_SIBLINGS = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


class PackedLinear(nn.Linear):
    """An `nn.Linear` with its weight packed for oneDNN while it is on the CPU.

    Its state dict holds the plain weight, so saving and loading work as before; `.to()` and
    `copy.deepcopy` unpack it and pack it again where it stays packable.
    """

    @classmethod
    def packing(cls, linear: nn.Linear) -> "PackedLinear":
        """Return `linear` as a packed layer, sharing its bias."""
        packed = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta"
        )
        packed.weight, packed.bias = _packed(linear.weight), linear.bias
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multiply `x` by the weight, packed or not."""
        if self.weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)

    def unpacked(self) -> nn.Linear:
        """Return the same layer as a plain `nn.Linear`."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        weight = self.weight.to_dense() if self.weight.is_mkldnn else self.weight
        linear.weight, linear.bias = nn.Parameter(weight, requires_grad=False), self.bias
        return linear

    def _apply(self, fn, recurse=True):
        """Apply `fn` (`.to()`, `.float()`, ...) to the plain weight, then pack it again."""
        self.weight = self.unpacked().weight
        super()._apply(fn, recurse)
        self.weight = _packed(self.weight)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Save the plain weight."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.unpacked().weight

    def _load_from_state_dict(self, *args, **kwargs):
        """Load a plain weight, then pack it."""
        self.weight = self.unpacked().weight
        super()._load_from_state_dict(*args, **kwargs)
        self.weight = _packed(self.weight)

    def __deepcopy__(self, memo):
        """Copy the plain layer and pack the copy."""
        return type(self).packing(copy.deepcopy(self.unpacked(), memo))

    def extra_repr(self) -> str:
        """Describe the layer, saying whether it is packed."""
        return super().extra_repr() + (", packed for oneDNN" if self.weight.is_mkldnn else "")


class PackedSiblings(PackedLinear):
    """The packed product of sibling projections, their weights stacked.

    Each sibling (`SiblingPart`) takes its own columns of one multiplication. Siblings called in a
    row on the same tensor share that product; a sibling called a second time, or on another
    tensor, or on a tensor changed since, multiplies afresh. Once the sibling with the last columns
    has taken its part, the product and its input are let go, as after a prefill they are large.
    """

    def product(self, x: torch.Tensor, part: str, *, last: bool) -> torch.Tensor:
        """Return the product for `x`, shared with the siblings until the `last` takes its part."""
        version = _version(x)
        shared = self.__dict__.pop("_shared", None)
        fresh = shared is not None and shared.x is x and shared.version == version
        if not fresh or part in shared.taken:
            shared = _SharedProduct(x, version, self.forward(x), set())
        shared.taken.add(part)
        if not last:
            self._shared = shared
        return shared.product

    def __getstate__(self):
        """Return the state to copy or pickle, leaving the shared product behind."""
        return {name: value for name, value in super().__getstate__().items() if name != "_shared"}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Save nothing: each sibling saves its own part, under its own name and in its place."""


@dataclass
class _SharedProduct:
    """The last multiplication of packed siblings, its input as it was then, and the parts taken."""

    x: torch.Tensor
    version: int | None  # `x`'s version then, see `_version`
    product: torch.Tensor
    taken: set[str]


class SiblingPart(nn.Module):
    """One of sibling projections, in its old place and name: columns of their packed product.

    It has no weight of its own: it takes columns `start:stop` of its `PackedSiblings` product.
    """

    def __init__(self, siblings: PackedSiblings, name: str, start: int, stop: int):
        """Stand for columns `start:stop` of `siblings`, as the projection `name`."""
        super().__init__()
        self.__dict__["siblings"] = siblings  # held, not registered: the parent module owns it
        self.name, self.start, self.stop = name, start, stop
        self.in_features, self.out_features = siblings.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return this projection's columns of the siblings' product for `x`."""
        last = self.stop == self.siblings.out_features
        product = self.siblings.product(x, self.name, last=last)
        return product[..., self.start : self.stop]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Save this projection's rows of the stacked weight and bias, as its own."""
        stacked = self.siblings.unpacked()
        destination[prefix + "weight"] = stacked.weight[self.start : self.stop]
        if stacked.bias is not None:
            destination[prefix + "bias"] = stacked.bias[self.start : self.stop]

    def extra_repr(self) -> str:
        """Describe the columns it takes."""
        return f"columns {self.start}:{self.stop} of the packed product of its siblings"


class PackedCopyLinear(nn.Linear):
    """An output layer that shares its weight with the token embedding, and multiplies by a copy.

    The weight stays shared and plain, for the embedding to look up, while a packed copy of it,
    outside the parameters, does the multiplying. The copy costs the weight's size once more; it is
    made again whenever the weight changes (moved, converted, loaded, edited in place).
    """

    @classmethod
    def sharing(cls, linear: nn.Linear) -> "PackedCopyLinear":
        """Return `linear` as a layer that multiplies by a packed copy of its shared weight."""
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta"
        )
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._packed_copy()  # now, rather than in the first request's time
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multiply `x` by the packed copy, or by the weight where it cannot be packed."""
        packed = self._packed_copy()
        if packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def _packed_copy(self) -> torch.Tensor | None:
        """Return the packed copy of the weight as it is now, or None where it cannot be packed."""
        weight = self.weight
        if not _packable(weight):
            return None
        stamp = (weight.data_ptr(), weight.dtype, _version(weight))
        if self.__dict__.get("_stamp") != stamp:
            self._copy, self._stamp = _pack(weight), stamp
        return self._copy

    def __getstate__(self):
        """Return the state to copy or pickle, without the packed copy: it packs when first used."""
        return {
            name: value
            for name, value in super().__getstate__().items()
            if name not in ("_copy", "_stamp")
        }

    def extra_repr(self) -> str:
        """Describe the layer, saying that it multiplies by a packed copy."""
        return super().extra_repr() + ", multiplies by a packed copy of its shared weight"


def pack_linear_layers(model: nn.Module) -> int:
    """Replace the model's CPU `nn.Linear` layers by packed ones, in place; return how many.

    Sibling projections (q/k/v, gate/up) become one `PackedSiblings` matrix; the state dict still
    holds each sibling's weight, under its name and in its place. An output layer that shares its
    weight with the token embedding keeps sharing it, and multiplies by a packed copy
    (`PackedCopyLinear`). Nothing changes where this torch cannot pack (no oneDNN, another device,
    float16).
    """
    shared = {
        id(parameter)
        for module in model.modules()
        if not isinstance(module, nn.Linear)
        for parameter in module.parameters(recurse=False)
    }
    layers = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and _packable(child.weight)
    ]
    if not layers:
        return 0
    for parent in {id(parent): parent for parent, _, _ in layers}.values():
        for names, product in _SIBLINGS.items():
            if _fusable(parent, names, product, shared):
                _fuse(parent, names, product)
    for parent, name, child in layers:
        if getattr(parent, name) is not child:  # fused with its siblings
            continue
        pack = PackedCopyLinear.sharing if id(child.weight) in shared else PackedLinear.packing
        setattr(parent, name, pack(child))
    logger.info("Packed %d linear layers for oneDNN", len(layers))
    return len(layers)


def _fusable(parent: nn.Module, names: tuple[str, ...], product: str, shared: set[int]) -> bool:
    """Tell whether `parent`'s projections `names` can be packed together as `product`."""
    siblings = [getattr(parent, name, None) for name in names]
    packable = all(
        type(sibling) is nn.Linear
        and _packable(sibling.weight)
        and id(sibling.weight) not in shared
        for sibling in siblings
    )
    if not packable:
        return False
    alike = len({(s.in_features, s.weight.dtype, s.bias is None) for s in siblings}) == 1
    return alike and not hasattr(parent, product)


def _fuse(parent: nn.Module, names: tuple[str, ...], product: str) -> None:
    """Replace `parent`'s sibling projections `names` by their `PackedSiblings`, named `product`."""
    siblings = [getattr(parent, name) for name in names]
    stacked = nn.Linear(
        siblings[0].in_features,
        sum(s.out_features for s in siblings),
        bias=siblings[0].bias is not None,
        device="meta",
    )
    # weight: [sum of the siblings' out_features, in_features]
    weight = torch.cat([s.weight.detach() for s in siblings])
    stacked.weight = nn.Parameter(weight, requires_grad=False)
    if stacked.bias is not None:
        bias = torch.cat([s.bias.detach() for s in siblings])
        stacked.bias = nn.Parameter(bias, requires_grad=False)
    fused = PackedSiblings.packing(stacked)
    setattr(parent, product, fused)
    start = 0
    for name, sibling in zip(names, siblings, strict=True):
        setattr(parent, name, SiblingPart(fused, name, start, start + sibling.out_features))
        start += sibling.out_features
    parent.register_load_state_dict_pre_hook(
        functools.partial(_load_siblings, names=names, product=product)
    )


def _load_siblings(parent, state_dict, prefix, *args, names, product):
    """Stack a state dict's sibling weights and biases, in place, to load into their product."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in names]
        if all(key in state_dict for key in keys):
            stacked = torch.cat([state_dict.pop(key) for key in keys])
            state_dict[f"{prefix}{product}.{kind}"] = stacked


def _version(x: torch.Tensor) -> int | None:
    """Return how often `x` was changed in place; None for an inference tensor, which keeps none."""
    return None if x.is_inference() else x._version


def _packable(weight: torch.Tensor) -> bool:
    """Tell whether this torch can pack `weight` for oneDNN."""
    on_cpu = weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
    return on_cpu and weight.dtype in _PACKABLE and packing_works(weight.dtype)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """Return `weight` reordered into oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _packed(weight: nn.Parameter) -> nn.Parameter:
    """Return `weight` packed where it can be, else as it is."""
    return nn.Parameter(_pack(weight), requires_grad=False) if _packable(weight) else weight


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Tell whether this torch packs and multiplies `dtype` weights on this CPU.

    The ops are torch's internals: a build without them, or a CPU without oneDNN's bf16 path
    (which needs AVX512-BW/VL/DQ or AVX-NE-CONVERT), keeps the plain layers.
    """
    weight, x = torch.ones(4, 8, dtype=dtype), torch.ones(2, 8, dtype=dtype)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, _pack(weight), None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        logger.info(
            "Linear layers stay unpacked: this torch cannot pack %s weights (%s)", dtype, error
        )
        return False
    return torch.equal(y, x @ weight.T)
