"""PyTorch reference implementations: the spec every other backend is tested against.

Each op family has its own self-contained section.
"""
import torch

# ---------------------------------------------------------------------------------------
# unscale (fusedtrain/ops/unscale.py)
# ---------------------------------------------------------------------------------------


def unscale_and_check_(tensors, inv_scale, found_inf, compute_norm, write):
    """Reference of torch.ops.fusedtrain.unscale_and_check_ for one (device, dtype) group.

    The unscaled value of x is the fp32 product x * inv_scale (what
    torch._amp_foreach_non_finite_check_and_unscale_ computes), rounded once to the storage
    dtype when written back. found_inf is set to 1.0 when any x is inf or NaN (with device
    ops: no host sync). Returns the sum of squares of the unscaled fp32 values, accumulated in
    float64 and rounded to a 0-d fp32 tensor, when compute_norm; else an empty fp32 tensor.
    """
    inv = inv_scale.reshape(()).float()
    sumsq = torch.zeros((), dtype=torch.float64, device=inv.device)
    bad = torch.zeros((), dtype=torch.bool, device=inv.device)
    with torch.no_grad():
        for t in tensors:
            if t.numel() == 0:
                continue
            x = t.float()
            y = x * inv
            bad |= ~torch.isfinite(x).all()
            if compute_norm:
                sumsq += y.double().square().sum()
            if write:
                t.copy_(y)
        found_inf.masked_fill_(bad, 1.0)
    if not compute_norm:
        return torch.empty((0,), dtype=torch.float32, device=inv.device)
    return sumsq.float()


def unscale_and_check_float64(tensors, inv_scale):
    """Float64 expectation for tests: (unscaled values in float64 per tensor, found_inf as a
    bool, the L2 norm of the unscaled values in float64)."""
    inv = float(inv_scale.reshape(()).float().item())
    outs, bad, sq = [], False, 0.0
    for t in tensors:
        x = t.detach().double().cpu()
        y = x * inv
        outs.append(y)
        bad = bad or not bool(torch.isfinite(x).all())
        sq += float(y.square().sum())
    return outs, bad, sq ** 0.5
