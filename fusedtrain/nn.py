"""nn.Modules users touch."""
import torch

from fusedtrain.ops import bce as _bce


def _check_reduction(cls, reduction):
    if reduction not in _bce._REDUCTIONS:
        raise ValueError(f"{cls}: reduction must be one of 'none', 'mean', 'sum'; got {reduction!r}")


class FusedBCEWithLogits(torch.nn.Module):
    """Drop-in for torch.nn.BCEWithLogitsLoss (same constructor, call, broadcasting, dtypes and
    values), backed by fusedtrain's fused kernels. weight and pos_weight are buffers.

    Args:
        weight, reduction, pos_weight: as torch.nn.BCEWithLogitsLoss.
        label_smoothing: targets become y (1 - eps) + eps / 2.
        ignore_index: a target value marking unknown labels (no loss, no gradient, left out of
            the mean).
    """

    def __init__(self, weight=None, reduction="mean", pos_weight=None, *, label_smoothing=0.0, ignore_index=None):
        super().__init__()
        _check_reduction("FusedBCEWithLogits", reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, input, target):
        return _bce.binary_cross_entropy_with_logits(input, target, self.weight, reduction=self.reduction,
                                                     pos_weight=self.pos_weight, label_smoothing=self.label_smoothing,
                                                     ignore_index=self.ignore_index)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"


class FusedSigmoidFocalLoss(torch.nn.Module):
    """Module form of fusedtrain.functional.sigmoid_focal_loss (torchvision's focal loss).

    Args:
        alpha, gamma, reduction: as torchvision.ops.sigmoid_focal_loss.
        weight: optional per-element weight buffer, broadcastable to the input.
        label_smoothing, ignore_index: as FusedBCEWithLogits.
    """

    def __init__(self, alpha=0.25, gamma=2.0, reduction="none", *, weight=None, label_smoothing=0.0,
                 ignore_index=None):
        super().__init__()
        _check_reduction("FusedSigmoidFocalLoss", reduction)
        self.register_buffer("weight", weight)
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index

    def forward(self, input, target):
        return _bce.sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction, weight=self.weight,
                                       label_smoothing=self.label_smoothing, ignore_index=self.ignore_index)

    def extra_repr(self):
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class FusedAsymmetricLoss(torch.nn.Module):
    """Module form of fusedtrain.functional.asymmetric_loss (ASL).

    Args:
        gamma_neg, gamma_pos, clip, reduction: as fusedtrain.functional.asymmetric_loss.
        weight: optional per-element weight buffer, broadcastable to the input.
        label_smoothing, ignore_index: as FusedBCEWithLogits.
    """

    def __init__(self, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, reduction="mean", *, weight=None,
                 label_smoothing=0.0, ignore_index=None):
        super().__init__()
        _check_reduction("FusedAsymmetricLoss", reduction)
        self.register_buffer("weight", weight)
        self.gamma_neg, self.gamma_pos, self.clip, self.reduction = gamma_neg, gamma_pos, clip, reduction
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index

    def forward(self, input, target):
        return _bce.asymmetric_loss(input, target, self.gamma_neg, self.gamma_pos, self.clip, self.reduction,
                                    weight=self.weight, label_smoothing=self.label_smoothing,
                                    ignore_index=self.ignore_index)

    def extra_repr(self):
        return (f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, "
                f"reduction={self.reduction!r}")
