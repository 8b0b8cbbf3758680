"""CPU inference speed-up: linear layers with weights pre-packed for oneDNN.

A decode step multiplies a batch of some 64 rows by every weight matrix. At that size MKL's sgemm spends much of
its time re-packing each weight matrix on every call; oneDNN can keep the weights packed once (the same path
PyTorch's inductor takes when it freezes a model for CPU inference). bench/sampling.py measures the gain
against plain nn.Linear in the same run. Outputs match nn.Linear to ~1e-6.

Inference only: packed layers have no gradients. Worker processes only (imports torch).
"""

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=True"


def can_pack(model) -> bool:
    parameter = next(model.parameters())
    return (
        parameter.device.type == "cpu"
        and parameter.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


@torch.inference_mode()
def pack_linear_layers(model, *, batch_hint: int = 64) -> int:
    """Replace every nn.Linear of `model` (in place) with a PackedLinear. Returns how many were replaced.

    Leaves the model untouched (and returns 0) where packing is unavailable or fails.
    """
    if not can_pack(model):
        return 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    try:
        replacements = [(parent, name, PackedLinear(child, batch_hint)) for parent, name, child in targets]
    except (RuntimeError, AttributeError) as exc:
        logger.warning("could not pack linear layers, keeping nn.Linear: %s", exc)
        return 0
    for parent, name, packed in replacements:
        setattr(parent, name, packed)
    return len(replacements)
