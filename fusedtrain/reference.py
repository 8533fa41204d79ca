"""PyTorch reference implementations: the spec every other backend is tested against.

Each op family keeps its own self-contained section below.
"""
import torch

# ---------------------------------------------------------------------------------------
# adam (fusedtrain/ops/adam.py): one Adam/AdamW step, torch.optim's update (DESIGN §4)
# ---------------------------------------------------------------------------------------


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, *,
          lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
          grad_mult=None, found_inf=None):
    """Plain torch ops, one tensor at a time, in fp32 (float64 for float64 params); the
    per-tensor scalars (bias corrections, step size) in float64 from the per-tensor step.
    With found_inf nonzero nothing changes (a device-side select, no host read)."""
    keep = None if found_inf is None else (found_inf.reshape(()) != 0)
    for i, param in enumerate(params):
        master = master_params[i] if master_params else None
        src = master if master is not None else param
        ct = torch.float64 if src.dtype == torch.float64 else torch.float32
        p = src.to(ct)
        g = grads[i].to(ct)
        m = exp_avgs[i].to(ct)
        v = exp_avg_sqs[i].to(ct)
        step = steps[i] + 1
        if grad_mult is not None:
            g = g * grad_mult.reshape(()).to(ct)
        if maximize:
            g = -g
        lr_d = lr.reshape(()).double() if torch.is_tensor(lr) else lr
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * torch.as_tensor(1 - lr_d * weight_decay, dtype=torch.float64).to(ct)
            else:
                g = g + weight_decay * p
        m = torch.lerp(m, g, 1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g
        s = step.double()
        bc1 = 1 - torch.pow(torch.tensor(beta1, dtype=torch.float64, device=s.device), s)
        bc2 = 1 - torch.pow(torch.tensor(beta2, dtype=torch.float64, device=s.device), s)
        step_size = (lr_d / bc1).to(ct)
        bc2_sqrt = bc2.sqrt().to(ct)
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(ct), v)
            denom = vmax.sqrt() / bc2_sqrt + eps
        else:
            denom = v.sqrt() / bc2_sqrt + eps
        p = p - step_size * m / denom
        outs = [(src, p), (exp_avgs[i], m), (exp_avg_sqs[i], v)]
        if master is not None:
            outs.append((param, p))
        if amsgrad:
            outs.append((max_exp_avg_sqs[i], vmax))
        if keep is None:
            for dst, new in outs:
                dst.copy_(new)
            steps[i].copy_(step)
        else:
            for dst, new in outs:
                dst.copy_(torch.where(keep, dst, new.to(dst.dtype)))
            steps[i].copy_(torch.where(keep, steps[i], step))
