"""fusedtrain::adam_: one Adam/AdamW step over lists of tensors of one device.

`adam_(...)` validates everything before any tensor is written (a bad input raises and
changes nothing), then runs the step on the backend `_backend.select(device, "adam")`
picks: native (torch.ops.fusedtrain.adam_, CPU and CUDA), triton (fusedtrain/triton/adam.py)
or reference (fusedtrain/reference.py). `prepare()` + `launch()` split the two halves so the
optimizer can validate every (device, dtype) group of a step before launching any.

Per element (csrc/include/fusedtrain/adam_math.h): torch.optim's Adam/AdamW update, fp32
math, grads multiplied by `grad_mult` as they are read (never written), nothing written at
all when `found_inf` is nonzero, `steps` incremented by the same kernel.
"""
import dataclasses

import torch

from fusedtrain import _backend, _ext

LOW_PRECISION = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class AdamCall:
    backend: str
    device: torch.device
    params: list
    grads: list
    exp_avgs: list
    exp_avg_sqs: list
    max_exp_avg_sqs: list
    steps: list
    master_params: list
    lr: float
    lr_tensor: object
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled_weight_decay: bool
    grad_mult: object
    found_inf: object
    writeback: list  # (original, staged contiguous copy) pairs to copy back after the kernel


def _fail(msg, exc=RuntimeError):
    raise exc(f"fusedtrain adam: {msg}")


def _one_element(name, t, device):
    if t is None:
        return None
    if not torch.is_tensor(t):
        return torch.tensor(float(t), dtype=torch.float32, device=device)
    if t.numel() != 1:
        _fail(f"{name} must be a one-element tensor, got shape {tuple(t.shape)}", ValueError)
    if t.is_complex() or t.is_sparse:
        _fail(f"{name} must be a real dense tensor", ValueError)
    # torch moves grad_scale/found_inf to each device non_blocking the same way
    return t.reshape(1).to(device=device, dtype=torch.float32, non_blocking=True)


def prepare(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params=(), *,
            lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
            grad_mult=None, found_inf=None, trusted_states=False) -> "AdamCall | None":
    """Validate and normalize one call; raise before anything is written. None: nothing to do.

    trusted_states: the caller (FusedAdam, from a plan it validated when it built it) vouches
    that params, states, steps and masters are consistent and contiguous; only the grads are
    checked (every call)."""
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    max_exp_avg_sqs, steps, master_params = list(max_exp_avg_sqs or ()), list(steps), list(master_params or ())
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == n):
        _fail(f"params, grads, exp_avgs, exp_avg_sqs, steps differ in length "
              f"({n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, {len(steps)})", ValueError)
    if amsgrad and len(max_exp_avg_sqs) != n:
        _fail(f"amsgrad needs one max_exp_avg_sq per param ({len(max_exp_avg_sqs)} for {n})", ValueError)
    if not amsgrad:
        max_exp_avg_sqs = []
    if master_params and len(master_params) != n:
        _fail(f"master_params: {len(master_params)} for {n} params", ValueError)
    if n == 0:
        return None
    device = params[0].device
    pdtype = params[0].dtype
    strided = torch.strided
    # the common case in one pass (params of a trusted plan share device and dtype already);
    # otherwise find the culprit and say what is wrong
    grads_contiguous = False
    if trusted_states:
        check = getattr(_ext._C, "adam_check_grads", None)
        fast = check(params, grads) if check is not None else 2
        if fast != 2:  # the check below, in C++ (and whether every grad is contiguous)
            ok, grads_contiguous = True, fast == 0
        else:
            ok = all(g is not None and g.layout is strided and g.dtype is pdtype and g.shape == p.shape
                     and g.device == device for p, g in zip(params, grads))
    else:
        ok = all(g is not None and g.layout is strided and g.dtype is pdtype and p.dtype is pdtype
                 and g.shape == p.shape and g.device == device and p.device == device for p, g in zip(params, grads))
    if not ok:
        _check_grads(params, grads, device, pdtype)
    if trusted_states:
        return _call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, device, pdtype,
                     lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult,
                     found_inf, stage_states=False, grads_contiguous=grads_contiguous)
    for i, s in enumerate(steps):
        if not torch.is_tensor(s) or s.numel() != 1 or s.dtype != torch.float32 or s.device != device:
            _fail(f"step of param {i} must be a one-element fp32 tensor on {device}, got "
                  f"{s.dtype if torch.is_tensor(s) else type(s).__name__}"
                  f"{'' if not torch.is_tensor(s) else ' on ' + str(s.device)}")
    sdtype = exp_avgs[0].dtype
    for name, lst in (("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs), ("max_exp_avg_sq", max_exp_avg_sqs)):
        for i, s in enumerate(lst):
            if s.device != device or s.shape != params[i].shape or s.dtype != sdtype or s.is_sparse:
                _fail(f"{name} of param {i} is {s.dtype} {tuple(s.shape)} on {s.device}; expected "
                      f"{sdtype} {tuple(params[i].shape)} on {device}")
    if sdtype != pdtype and not (sdtype == torch.float32 and pdtype in LOW_PRECISION):
        _fail(f"states must be in the param dtype or fp32 (params {pdtype}, states {sdtype})", TypeError)
    if master_params:
        if pdtype not in LOW_PRECISION or sdtype != torch.float32:
            _fail("master_params are for fp16/bf16 params with fp32 states", TypeError)
        for i, w in enumerate(master_params):
            if w.dtype != torch.float32 or w.shape != params[i].shape or w.device != device:
                _fail(f"master param {i} must be fp32 {tuple(params[i].shape)} on {device}")
    return _call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, device, pdtype,
                 lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult,
                 found_inf, stage_states=True)


def _check_grads(params, grads, device, pdtype):
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            _fail(f"param {i} has no grad (skip params whose grad is None)", ValueError)
        if g.is_sparse or g.layout != torch.strided:
            _fail("Adam does not support sparse gradients, please consider SparseAdam instead "
                  f"(param {i} has a {g.layout} grad)")
        if p.device != device:
            _fail(f"param {i} is on {p.device}, param 0 on {device}: one call takes one device")
        if g.device != device:
            _fail(f"grad of param {i} is on {g.device} but the param is on {device}")
        if p.dtype != pdtype:
            _fail(f"param {i} is {p.dtype}, param 0 {pdtype}: one call takes one dtype", TypeError)
        if g.dtype != p.dtype:
            _fail(f"grad of param {i} is {g.dtype} but the param is {p.dtype}")
        if g.shape != p.shape:
            _fail(f"grad of param {i} has shape {tuple(g.shape)} but the param {tuple(p.shape)}")


def _call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, device, pdtype, lr, beta1,
          beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult, found_inf, stage_states,
          grads_contiguous=False):
    complex_ = pdtype.is_complex
    real = torch.empty((), dtype=pdtype).real.dtype if complex_ else pdtype
    if not real.is_floating_point:
        _fail(f"params must be floating point or complex, got {pdtype}", TypeError)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        _fail(f"betas must be in [0, 1), got ({beta1}, {beta2})", ValueError)
    lr_tensor = None
    if torch.is_tensor(lr):
        lr_tensor = _one_element("lr", lr, device)
        lr = 0.0
    grad_mult = _one_element("grad_mult", grad_mult, device)
    found_inf = _one_element("found_inf", found_inf, device)

    backend = _backend.select(device, "adam")
    if real not in KERNEL_DTYPES and backend != "reference":
        if _backend._forced()[0] is not None:
            raise _backend.BackendError(f"adam: backend {backend!r} has kernels for fp32/fp16/bf16 params, "
                                        f"not {real}; use the reference backend")
        backend = "reference"

    if complex_:  # torch's way: the update on the real view
        params = [torch.view_as_real(t) for t in params]
        grads = [torch.view_as_real(t) for t in grads]
        exp_avgs = [torch.view_as_real(t) for t in exp_avgs]
        exp_avg_sqs = [torch.view_as_real(t) for t in exp_avg_sqs]
        max_exp_avg_sqs = [torch.view_as_real(t) for t in max_exp_avg_sqs]
    writeback = []
    if backend != "reference":
        if not grads_contiguous and not all(g.is_contiguous() for g in grads):
            grads = [g if g.is_contiguous() else g.contiguous() for g in grads]

        def staged(lst):
            out = []
            for t in lst:
                if t.is_contiguous():
                    out.append(t)
                else:
                    c = t.contiguous()
                    writeback.append((t, c))
                    out.append(c)
            return out

        if stage_states:
            params, exp_avgs, exp_avg_sqs = staged(params), staged(exp_avgs), staged(exp_avg_sqs)
            max_exp_avg_sqs, master_params = staged(max_exp_avg_sqs), staged(master_params)
    return AdamCall(backend, device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    master_params, float(lr), lr_tensor, float(beta1), float(beta2), float(eps),
                    float(weight_decay), bool(amsgrad), bool(maximize), bool(decoupled_weight_decay),
                    grad_mult, found_inf, writeback)


def _tracing():
    return (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() > 0)


def launch(c: AdamCall) -> None:
    """Run a prepared call: one kernel launch (CPU: one parallel region)."""
    if c.backend == "native":
        # plain CPU tensors outside tracing and dispatch modes: the same kernel without the
        # dispatcher's per-tensor list boxing (False: not eligible, nothing done)
        direct = getattr(_ext._C, "adam_cpu_direct", None)
        if not (direct is not None and c.device.type == "cpu" and not _tracing()
                and direct(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs,
                                            c.steps, c.master_params, c.lr, c.lr_tensor, c.beta1, c.beta2, c.eps,
                                            c.weight_decay, c.amsgrad, c.maximize, c.decoupled_weight_decay,
                                            c.grad_mult, c.found_inf)):
            torch.ops.fusedtrain.adam_(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs, c.steps,
                                       c.master_params, c.lr, c.lr_tensor, c.beta1, c.beta2, c.eps,
                                       c.weight_decay, c.amsgrad, c.maximize, c.decoupled_weight_decay,
                                       c.grad_mult, c.found_inf)
    elif c.backend == "triton":
        from fusedtrain.triton import adam as tk

        tk.adam_(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs, c.steps, c.master_params,
                 lr=c.lr, lr_tensor=c.lr_tensor, beta1=c.beta1, beta2=c.beta2, eps=c.eps,
                 weight_decay=c.weight_decay, amsgrad=c.amsgrad, maximize=c.maximize,
                 decoupled_weight_decay=c.decoupled_weight_decay, grad_mult=c.grad_mult, found_inf=c.found_inf)
    else:
        from fusedtrain import reference

        reference.adam_(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs, c.steps, c.master_params,
                        lr=c.lr_tensor if c.lr_tensor is not None else c.lr, beta1=c.beta1, beta2=c.beta2,
                        eps=c.eps, weight_decay=c.weight_decay, amsgrad=c.amsgrad, maximize=c.maximize,
                        decoupled_weight_decay=c.decoupled_weight_decay, grad_mult=c.grad_mult,
                        found_inf=c.found_inf)
    for orig, staged in c.writeback:
        orig.copy_(staged)


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params=(), *,
          lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
          grad_mult=None, found_inf=None) -> None:
    """One Adam (decoupled_weight_decay=False) or AdamW step, in place, over tensors of one
    device: see the module docstring and csrc/ops.cpp for the contract."""
    c = prepare(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr=lr,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, grad_mult=grad_mult,
                found_inf=found_inf)
    if c is not None:
        launch(c)


if _ext._C is not None and hasattr(torch.ops.fusedtrain, "adam_"):
    @torch.library.register_fake("fusedtrain::adam_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr, lr_tensor,
                   beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult,
                   found_inf):
        return None
