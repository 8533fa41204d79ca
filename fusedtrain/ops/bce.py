def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    raise NotImplementedError("bce: not built yet")
