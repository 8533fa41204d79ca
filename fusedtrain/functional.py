"""Functional forms (like torch.nn.functional)."""
from fusedtrain.ops.bce import asymmetric_loss, binary_cross_entropy_with_logits, sigmoid_focal_loss
from fusedtrain.ops.head import linear_binary_cross_entropy_with_logits

__all__ = ["asymmetric_loss", "binary_cross_entropy_with_logits", "linear_binary_cross_entropy_with_logits",
           "sigmoid_focal_loss"]
