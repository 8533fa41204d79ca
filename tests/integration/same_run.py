"""What the integration tests share: a small learnable multi-label data set, and the comparison
of a training run made with fusedtrain's pieces against the same run made with torch's.

Tolerances (measured on this project's 2-core CPU, torch 2.14.1, one thread; each test states
which it uses):
- Runs that differ only in fusedtrain's pieces (FusedAdamW for torch.optim.AdamW, and/or
  FusedBCEWithLogits for torch.nn.BCEWithLogitsLoss), 16-32 steps of models of 4k-60k params,
  fp32, bf16 autocast or fp16 with a GradScaler: the largest parameter difference measured was
  9e-8 (the BCE comparisons in Trainer; 2e-8 for the optimizer alone) -- under one fp32 ulp of
  the largest params (|p| ~ 1); the fused step rounds its expression once where torch rounds
  each op, and a 1-ulp loss difference changes the gradients by as little. The largest loss
  difference was 2.4e-7 (losses 0.3-1.5). FusedAdamW against torch's fused AdamW (CPU) was
  bit-identical. RUN_ATOL + RUN_RTOL * |p| allows 10x the largest measured difference (11 ulps
  at |p| = 1) and is still far below what a one-line bug moves: with FusedAdamW ignoring the
  weight decay, the largest parameter difference of these runs became 8e-4 to 2.3e-3; ignoring
  the scheduler's lr, 2e-2.
- Under fp16 autocast, where fusedtrain rounds differently in the last bit: FusedBCEWithLogits
  against torch's loss (each rounds the fp16 logits' gradient once, but their fp32 math differs
  in the last bits, so now and then an element lands one fp16 ulp, 2^-11 relative, apart, and
  Adam, which normalizes each element's step, carries that into the params at up to
  lr * 2^-11 per step), or the one-read clipped step (the clip coefficient applied in the kernel
  rather than to the stored gradients; an fp32 last-bit difference in a param flips the fp16
  rounding of some activation). Measured: 1.0e-6 largest parameter difference, 1.2e-6 loss
  difference; FP16_ATOL / FP16_RTOL allow 10x that (dropping the weight decay still moves
  params by 100x more).
- A resumed run against the uninterrupted one, with the same optimizer: bit-identical.
"""
import torch

RUN_ATOL = 1e-6  # params and losses; see above
RUN_RTOL = 1e-5
FP16_ATOL = 1e-5  # the fused loss on fp16 logits; see above
FP16_RTOL = 1e-4
NUM_LABELS = 6
NUM_FEATURES = 16


def multilabel_data(n=64, seed=0):
    """(features (n, 16) fp32, labels (n, 6) in {0, 1} fp32): label j is 1 where a fixed linear
    function of the features passes a threshold, so that a model can learn it (and its
    gradients are not noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, NUM_FEATURES, generator=g)
    w = torch.randn(NUM_FEATURES, NUM_LABELS, generator=g)
    y = (x @ w > 1.0).float()
    return x, y


def mlp(seed=0):
    """A small multi-label classifier: Linear, GELU, LayerNorm (a param with no decay in most
    recipes), Linear. Same weights for the same seed."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                               torch.nn.Linear(64, NUM_LABELS))


def params_of(model):
    """Detached copies of the model's float parameters and buffers, by name."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def assert_same_run(ours, theirs, atol=RUN_ATOL, rtol=RUN_RTOL, what="run"):
    """Two runs' (losses, params) agree: every loss, and every parameter element, within
    atol + rtol * |theirs|; atol = rtol = 0 asks for bit-identical runs. The message names the
    first step / tensor that differs and by how much."""
    (our_losses, our_params), (their_losses, their_params) = ours, theirs
    assert len(our_losses) == len(their_losses) > 0, \
        f"{what}: {len(our_losses)} losses recorded against {len(their_losses)}"
    for step, (a, b) in enumerate(zip(our_losses, their_losses)):
        assert abs(a - b) <= atol + rtol * abs(b), f"{what}: loss of step {step}: {a!r} against {b!r}"
    assert our_params.keys() == their_params.keys(), f"{what}: different parameter names"
    for name, b in their_params.items():
        a = our_params[name]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name} is {a.dtype} {tuple(a.shape)}"
        bound = atol + rtol * b.abs()
        diff = (a.double() - b.double()).abs()
        assert bool((diff <= bound).all()), \
            f"{what}: param {name} differs by up to {diff.max().item():.3g} (allowed {atol} + {rtol}|p|)"


def bitwise(ours, theirs, what):
    assert_same_run(ours, theirs, atol=0.0, rtol=0.0, what=what)
