"""linear layers whose weights oneDNN, the CPU's matrix library, lays out once instead of at every call.

A decoding step multiplies one token's vector by every weight matrix of the model, so on a CPU the time goes into
reading weights. `torch.nn.Linear` hands oneDNN a plain matrix on each call; a weight reordered once into the
blocked layout oneDNN reads fastest made a SmolLM2 decoding step about 1.6 times faster in bf16 on this project's
test machine, with the same tokens. This is what torch's own compiler does for CPU inference (`freezing`).
"""

import copy
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_PACKABLE = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Linear):
    """an `nn.Linear` with its weight packed for oneDNN while it is on the CPU. Its state dict holds the plain
    weight, so saving and loading work as before; `.to()` and `copy.deepcopy` unpack it and pack it again where it
    stays packable."""

    @classmethod
    def packing(cls, linear: nn.Linear) -> "PackedLinear":
        packed = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        packed.weight, packed.bias = _packed(linear.weight), linear.bias
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)

    def unpacked(self) -> nn.Linear:
        """the same layer as a plain `nn.Linear`."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight = self.weight.to_dense() if self.weight.is_mkldnn else self.weight
        linear.weight, linear.bias = nn.Parameter(weight, requires_grad=False), self.bias
        return linear

    def _apply(self, fn, recurse=True):
        self.weight = self.unpacked().weight
        super()._apply(fn, recurse)
        self.weight = _packed(self.weight)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.unpacked().weight

    def _load_from_state_dict(self, *args, **kwargs):
        self.weight = self.unpacked().weight
        super()._load_from_state_dict(*args, **kwargs)
        self.weight = _packed(self.weight)

    def __deepcopy__(self, memo):
        return PackedLinear.packing(copy.deepcopy(self.unpacked(), memo))

    def extra_repr(self) -> str:
        return super().extra_repr() + (", packed for oneDNN" if self.weight.is_mkldnn else "")


class PackedCopyLinear(nn.Linear):
    """an output layer that shares its weight with the token embedding: the weight stays shared and plain, for the
    embedding to look up, while a packed copy of it, outside the parameters, does the multiplying. The copy costs the
    weight's size once more (56 MB for SmolLM2-135M in bf16) and made a decoding step about 1.1 times faster; it is
    made again whenever the weight changes (moved, converted, loaded, edited in place)."""

    @classmethod
    def sharing(cls, linear: nn.Linear) -> "PackedCopyLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._packed_copy()  # now, rather than in the first request's time
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_copy()
        if packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def _packed_copy(self) -> torch.Tensor | None:
        """the packed copy of the weight as it is now, or None where it cannot be packed."""
        weight = self.weight
        if not _packable(weight):
            return None
        try:
            version = weight._version
        except RuntimeError:  # an inference tensor, made under torch.inference_mode: it keeps no version
            version = None
        stamp = (weight.data_ptr(), weight.dtype, version)
        if self.__dict__.get("_stamp") != stamp:
            self._copy, self._stamp = _pack(weight), stamp
        return self._copy

    def __getstate__(self):
        """a copy or a pickle leaves the packed copy behind, and packs its own weight when first used."""
        return {name: value for name, value in super().__getstate__().items() if name not in ("_copy", "_stamp")}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", multiplies by a packed copy of its shared weight"


def pack_linear_layers(model: nn.Module) -> int:
    """replace the model's CPU `nn.Linear` layers by `PackedLinear` ones, in place; how many were replaced.

    An output layer that shares its weight with the token embedding keeps sharing it, and multiplies by a packed
    copy (`PackedCopyLinear`). Nothing changes where this torch cannot pack (no oneDNN, another device, float16)."""
    shared = {id(parameter) for module in model.modules() if not isinstance(module, nn.Linear)
              for parameter in module.parameters(recurse=False)}
    layers = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
              if type(child) is nn.Linear and _packable(child.weight)]
    if not layers or not _packing_works(layers[0][2].weight.dtype):
        return 0
    for parent, name, child in layers:
        setattr(parent, name, (PackedCopyLinear.sharing if id(child.weight) in shared else PackedLinear.packing)(child))
    logger.info("Packed %d linear layers for oneDNN", len(layers))
    return len(layers)


def _packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in _PACKABLE and torch.backends.mkldnn.is_available()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _packed(weight: nn.Parameter) -> nn.Parameter:
    """`weight` packed where it can be, else as it is."""
    return nn.Parameter(_pack(weight), requires_grad=False) if _packable(weight) else weight


def _packing_works(dtype: torch.dtype) -> bool:
    """whether this torch build packs and multiplies `dtype` weights: the ops are torch's internals, so a build
    without them, or with a bf16 path this CPU lacks, keeps the plain layers."""
    weight, x = torch.ones(4, 8, dtype=dtype), torch.ones(2, 8, dtype=dtype)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, _pack(weight), None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        logger.info("Linear layers stay unpacked: this torch cannot pack %s weights (%s)", dtype, error)
        return False
    return torch.equal(y, x @ weight.T)
