"""Functional forms (like torch.nn.functional)."""
from fusedtrain.ops.bce import binary_cross_entropy_with_logits

__all__ = ["binary_cross_entropy_with_logits"]
