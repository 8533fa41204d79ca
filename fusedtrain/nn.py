"""nn.Modules users touch."""
import torch

from fusedtrain.ops import bce as _bce
from fusedtrain.ops import head as _head


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


class FusedLinearBCEWithLogits(torch.nn.Module):
    """The many-label head: nn.Linear(in_features, num_labels) followed by BCE with logits, fused
    and chunked so that the (batch x num_labels) logits, their gradient and a dense target never
    exist (fusedtrain.functional.linear_binary_cross_entropy_with_logits). weight and bias are
    nn.Linear's (same shapes, initialization and state_dict keys: a trained nn.Linear head loads
    into it); pos_weight and label_weight are non-persistent buffers (loss settings, so that the
    state_dict stays nn.Linear's).

    Call: head(h, target, unknown_mask=None) -> the loss, with target dense (..., num_labels)
    or sparse positives (torch.sparse_csr, or a pair (row offsets, label indices)).
    """

    def __init__(self, in_features, num_labels, bias=True, *, pos_weight=None, label_weight=None, reduction="mean",
                 chunk_size=None, device=None, dtype=None):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"FusedLinearBCEWithLogits: reduction must be 'mean' or 'sum', got {reduction!r}"
                             + ("; for per-element losses use FusedBCEWithLogits(reduction='none') on the logits"
                                if reduction == "none" else ""))
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.num_labels = in_features, num_labels
        self.weight = torch.nn.Parameter(torch.empty((num_labels, in_features), **factory))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(num_labels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        self.register_buffer("pos_weight", pos_weight, persistent=False)
        self.register_buffer("label_weight", label_weight, persistent=False)
        self.reduction, self.chunk_size = reduction, chunk_size

    reset_parameters = torch.nn.Linear.reset_parameters  # nn.Linear's initialization, for meta-device/FSDP init

    def forward(self, h, target, unknown_mask=None):
        return _head.linear_binary_cross_entropy_with_logits(
            h, self.weight, self.bias, target, pos_weight=self.pos_weight, label_weight=self.label_weight,
            reduction=self.reduction, unknown_mask=unknown_mask, chunk_size=self.chunk_size)

    def logits(self, h):
        """h @ weight.T + bias, for inference (materializes the logits)."""
        return torch.nn.functional.linear(h, self.weight, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, num_labels={self.num_labels}, bias={self.bias is not None}, "
                f"reduction={self.reduction!r}")
