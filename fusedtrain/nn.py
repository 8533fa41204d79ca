"""nn.Modules users touch."""
import torch

from fusedtrain.ops import bce as _bce


class FusedBCEWithLogits(torch.nn.Module):
    """Drop-in for torch.nn.BCEWithLogitsLoss (same constructor, call, broadcasting, dtypes and
    values), backed by fusedtrain's fused one-pass kernels. weight and pos_weight are buffers."""

    def __init__(self, weight=None, reduction="mean", pos_weight=None):
        super().__init__()
        if reduction not in _bce._REDUCTIONS:
            raise ValueError(f"FusedBCEWithLogits: reduction must be one of 'none', 'mean', 'sum'; got {reduction!r}")
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction

    def forward(self, input, target):
        return _bce.binary_cross_entropy_with_logits(input, target, self.weight, reduction=self.reduction,
                                                     pos_weight=self.pos_weight)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"
