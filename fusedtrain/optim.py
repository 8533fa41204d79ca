import torch


class FusedAdam(torch.optim.Optimizer):
    def __init__(self, *a, **k):
        raise NotImplementedError("adam: not built yet")


class FusedAdamW(FusedAdam):
    pass
