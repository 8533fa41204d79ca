import torch


class FusedBCEWithLogits(torch.nn.Module):
    def __init__(self, *a, **k):
        raise NotImplementedError("bce: not built yet")
