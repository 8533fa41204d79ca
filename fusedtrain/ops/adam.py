"""fusedtrain::adam_: one Adam/AdamW step over lists of tensors, one launch per device and dtype.

`adam_()` is the functional form. `FusedAdam.step` calls `prepare()` for every param group
first and `launch()` afterwards, so that a bad gradient anywhere raises before any tensor of
the step is written. The per-element math is csrc/include/fusedtrain/adam_math.h.
"""
import collections
from typing import NamedTuple, Optional, Union

import torch

from fusedtrain import _backend, _ext, reference

OP = "adam_"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)


class AdamTensors(NamedTuple):
    """The tensor lists of one call, index i of each belonging to param i."""

    params: list
    grads: list
    exp_avgs: list
    exp_avg_sqs: list
    max_exp_avg_sqs: list  # empty unless amsgrad
    steps: list            # one fp32 one-element tensor per param, on its device
    master_params: list    # empty, or fp32 copies of fp16/bf16 params
    # 8-bit (uint8) states: one fp32 tensor of ceil(numel / 256) block absmax per param and
    # state (reference.q8_*); empty for other states
    exp_avg_absmax: list
    exp_avg_sq_absmax: list
    max_exp_avg_sq_absmax: list  # empty unless amsgrad


class AdamHyper(NamedTuple):
    """The hyper-parameters of one call (the C++ kernels' make_coef arguments)."""

    lr: Union[float, torch.Tensor]  # a one-element tensor is read on the device
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled_weight_decay: bool
    # stochastic rounding (csrc/ops.cpp adam_): the seed (a group's; prepare() gives each call
    # its own), of the params (bf16, no master copies), of exp_avg_sq (calls with bf16 states)
    sr_seed: int = 0
    sr_params: bool = False
    sr_exp_avg_sq: bool = False


class AdamCall(NamedTuple):
    """One prepared launch: a registered op and its arguments, all on one device."""

    backend: str
    op: object
    tensors: AdamTensors
    hyper: AdamHyper
    grad_mult: Optional[torch.Tensor]
    found_inf: Optional[torch.Tensor]
    writeback: list  # (original, contiguous copy) pairs copied back after the kernel


# ---- the backends' ops: native in C++ (csrc/ops.cpp), triton and reference as custom ops ----

def _fake(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
          exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
          master_params: list[torch.Tensor], exp_avg_absmax: list[torch.Tensor], exp_avg_sq_absmax: list[torch.Tensor],
          max_exp_avg_sq_absmax: list[torch.Tensor], lr: float, lr_tensor: Optional[torch.Tensor], beta1: float,
          beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
          decoupled_weight_decay: bool, grad_mult: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
          sr_seed: int = 0, sr_params: bool = False, sr_exp_avg_sq: bool = False) -> None:
    return None


_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "master_params", "exp_avg_absmax",
            "exp_avg_sq_absmax", "max_exp_avg_sq_absmax")


@torch.library.custom_op("fusedtrain_ref::adam_", mutates_args=_MUTATED)
def _reference_op(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
                  master_params: list[torch.Tensor], exp_avg_absmax: list[torch.Tensor],
                  exp_avg_sq_absmax: list[torch.Tensor], max_exp_avg_sq_absmax: list[torch.Tensor], lr: float,
                  lr_tensor: Optional[torch.Tensor], beta1: float,
                  beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                  decoupled_weight_decay: bool, grad_mult: Optional[torch.Tensor],
                  found_inf: Optional[torch.Tensor], sr_seed: int = 0, sr_params: bool = False,
                  sr_exp_avg_sq: bool = False) -> None:
    # a direct call: the lengths and 8-bit scales at least (the reference takes any dtype, float64 included)
    t = AdamTensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, exp_avg_absmax,
                    exp_avg_sq_absmax, max_exp_avg_sq_absmax)
    _check_lengths(t, amsgrad)
    _check_absmax(t, amsgrad)
    check_sr(sr_seed, sr_params, sr_exp_avg_sq, params, exp_avgs, master_params)
    reference.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params,
                    exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax,
                    lr=lr_tensor if lr_tensor is not None else lr, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                    decoupled_weight_decay=decoupled_weight_decay, grad_mult=grad_mult, found_inf=found_inf,
                    sr_seed=sr_seed, sr_params=sr_params, sr_exp_avg_sq=sr_exp_avg_sq)


_OPS = _backend.family_ops("adam_", _fake, "adam")


# ---- validation: in the ops (csrc/include/fusedtrain/adam_lists.h), repeated here for the
# Triton and reference ops, with the same messages ------------------------------------------

def _fail(msg, exc=RuntimeError):
    raise exc(f"fusedtrain adam: {msg}")


def _check_lengths(t: AdamTensors, amsgrad: bool, one_call: bool = True):
    """The lists' lengths; one_call=False: a list of several calls' tensors (a param group's,
    before prepare() cuts it), whose absmax lists may hold None for the params without 8-bit states."""
    n = len(t.params)
    if not (len(t.grads) == len(t.exp_avgs) == len(t.exp_avg_sqs) == len(t.steps) == n):
        _fail(f"params, grads, exp_avgs, exp_avg_sqs, steps differ in length "
              f"({n}, {len(t.grads)}, {len(t.exp_avgs)}, {len(t.exp_avg_sqs)}, {len(t.steps)})", ValueError)
    if amsgrad and len(t.max_exp_avg_sqs) != n:
        _fail(f"amsgrad needs one max_exp_avg_sq per param ({len(t.max_exp_avg_sqs)} for {n})", ValueError)
    if t.master_params and len(t.master_params) != n:
        _fail(f"master_params: {len(t.master_params)} for {n} params", ValueError)
    if one_call:
        na = n if n and t.exp_avgs[0].dtype == torch.uint8 else 0
    else:
        na = n if t.exp_avg_absmax else 0
    lens = (len(t.exp_avg_absmax), len(t.exp_avg_sq_absmax), len(t.max_exp_avg_sq_absmax))
    if lens != (na, na, na if amsgrad else 0):
        _fail(f"exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax have lengths {lens}; expected {na} each"
              f"{'' if amsgrad else ' (the last 0 without amsgrad)'}"
              f"{' for 8-bit states' if na else ': they are for 8-bit (uint8) states only'}", ValueError)


def _check_absmax(t: AdamTensors, amsgrad: bool):
    """The 8-bit states' absmax tensors: contiguous fp32, one per block, on the params' device."""
    lists = [("exp_avg_absmax", t.exp_avg_absmax), ("exp_avg_sq_absmax", t.exp_avg_sq_absmax)] + \
        ([("max_exp_avg_sq_absmax", t.max_exp_avg_sq_absmax)] if amsgrad else [])
    for i, p in enumerate(t.params if t.exp_avg_absmax else ()):
        blocks = reference.q8_num_blocks(p.numel())
        for name, lst in lists:
            a = lst[i]
            if (a.layout != torch.strided or a.device != p.device or a.dtype != torch.float32
                    or tuple(a.shape) != (blocks,) or not a.is_contiguous()):
                _fail(f"{name} of param {i} is {a.dtype} {list(a.shape)} on {a.device}; expected a contiguous "
                      f"float32 [{blocks}] on {p.device} (one per block of {reference.Q8_BLOCK} elements)")


def check_lists(t: AdamTensors, amsgrad: bool):
    """Raise a clear error unless the lists are what fusedtrain::adam_ takes: equal lengths,
    one device and dtype, dense grads of their params' dtype and shape, states in the params'
    dtype, fp32, bf16 or uint8 (8-bit, with their absmax tensors; master weights: not in
    fp16), fp32 one-element steps."""
    _check_lengths(t, amsgrad)
    if not t.params:
        return
    device, pdtype, sdtype = t.params[0].device, t.params[0].dtype, t.exp_avgs[0].dtype
    states = [("exp_avg", t.exp_avgs, sdtype), ("exp_avg_sq", t.exp_avg_sqs, sdtype)]
    if amsgrad:
        states.append(("max_exp_avg_sq", t.max_exp_avg_sqs, sdtype))
    if t.master_params:
        states.append(("master param", t.master_params, torch.float32))
    _check_absmax(t, amsgrad)
    for i, (p, g, s) in enumerate(zip(t.params, t.grads, t.steps)):
        if not (torch.is_tensor(p) and torch.is_tensor(g)):
            _fail(f"param {i} and its grad must be tensors, got {type(p).__name__} and {type(g).__name__} "
                  "(skip params whose grad is None)", TypeError)
        if not torch.is_tensor(s):
            _fail(f"step of param {i} must be a one-element fp32 tensor on {device}, got {type(s).__name__}",
                  TypeError)
        if p.device != device:
            _fail(f"param {i} is on {p.device}, param 0 on {device}: one call takes one device")
        if p.dtype != pdtype:
            _fail(f"param {i} is {p.dtype}, param 0 {pdtype}: one call takes one dtype", TypeError)
        if g.layout != torch.strided:
            _fail("Adam does not support sparse gradients, please consider SparseAdam instead "
                  f"(param {i} has a {g.layout} grad)")
        if g.device != device:
            _fail(f"grad of param {i} is on {g.device} but the param is on {device}")
        if g.dtype != pdtype:
            _fail(f"grad of param {i} is {g.dtype} but the param is {pdtype}")
        if g.shape != p.shape:
            _fail(f"grad of param {i} has shape {tuple(g.shape)} but the param {tuple(p.shape)}")
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            _fail(f"step of param {i} must be a one-element fp32 tensor on {device}, got {s.dtype} on {s.device}")
        for name, lst, dt in states:
            x = lst[i]
            if x.layout != torch.strided or x.device != device or x.dtype != dt or x.shape != p.shape:
                _fail(f"{name} of param {i} is {x.dtype} {tuple(x.shape)} on {x.device}; expected "
                      f"{dt} {tuple(p.shape)} on {device}")
    low = pdtype in LOW_PRECISION
    if sdtype != pdtype and not (sdtype == torch.float32 and low) and sdtype not in (torch.bfloat16, torch.uint8):
        _fail(f"states must be in the param dtype, fp32, bf16 or uint8 (8-bit) (params {pdtype}, states {sdtype})",
              TypeError)
    if t.master_params and not (low and sdtype != torch.float16):
        _fail("master_params are for fp16/bf16 params with fp32, bf16 or 8-bit states", TypeError)


def check_sr(sr_seed: int, sr_params: bool, sr_exp_avg_sq: bool, params, exp_avgs, master_params) -> None:
    """adam_lists.h check_sr: stochastic rounding of bf16 params without master copies, of a bf16
    exp_avg_sq; a 32-bit seed."""
    if not (sr_params or sr_exp_avg_sq) or not params:
        return
    if not 0 <= sr_seed <= 0xFFFFFFFF:
        _fail(f"sr_seed must be in [0, 2**32), got {sr_seed}", ValueError)
    if sr_params and (params[0].dtype != torch.bfloat16 or master_params
                      or exp_avgs[0].dtype not in (torch.bfloat16, torch.uint8)):
        _fail("stochastic rounding of the params is for bf16 params with bf16 or 8-bit states and without master "
              "weights, "
              f"got {params[0].dtype} params, {exp_avgs[0].dtype} states{', master weights' if master_params else ''}",
              ValueError)
    if sr_exp_avg_sq and exp_avgs[0].dtype != torch.bfloat16:
        _fail(f"stochastic rounding of exp_avg_sq is for bf16 states, got {exp_avgs[0].dtype}", ValueError)


def _check(t: AdamTensors, amsgrad: bool):
    """check_lists(), in C++ where the extension is built: the op's own checks and messages,
    about 15x faster than the Python ones at 1000 params (csrc/module.cpp)."""
    check = getattr(_ext._C, "adam_check_", None)
    if check is None or _tracing():
        return check_lists(t, amsgrad)
    try:
        check(*t, amsgrad)
    except TypeError:  # an entry that is not a tensor: the Python check says which
        check_lists(t, amsgrad)
        raise


def _check_hyper(hyper: AdamHyper):
    if not (0.0 <= hyper.beta1 < 1.0 and 0.0 <= hyper.beta2 < 1.0):
        _fail(f"betas must be in [0, 1), got ({hyper.beta1}, {hyper.beta2})", ValueError)


def _one_element(name, t, device):
    if t is None:
        return None
    if not torch.is_tensor(t):
        return torch.tensor(float(t), dtype=torch.float32, device=device)
    if t.numel() != 1:
        _fail(f"{name} must be a one-element tensor, got shape {tuple(t.shape)}", ValueError)
    if t.is_complex() or t.layout != torch.strided:
        _fail(f"{name} must be a real dense tensor", ValueError)
    # moved to each device without a host sync, as torch moves grad_scale/found_inf
    return t.reshape(1).to(device=device, dtype=torch.float32, non_blocking=True)


# ---- prepare and launch ---------------------------------------------------------------------

def device_dtype_buckets(params, states=None):
    """Index lists of the params of each (device, dtype, state dtype), in param order (a
    state_format="bf16" group keeps small tensors' moments in fp32: two calls)."""
    buckets = [idx for _, idx in torch._C._group_tensors_by_device_and_dtype([params], True).values()]
    if not states or len({s.dtype for s in states}) == 1:
        return buckets
    out = []
    for idx in buckets:
        by_state = {}
        for i in idx:
            by_state.setdefault(states[i].dtype, []).append(i)
        out += by_state.values()
    return out


def _split(t: AdamTensors, buckets):
    if len(buckets) == 1:
        return [t]
    return [AdamTensors(*([lst[i] for i in idx] if lst else [] for lst in t)) for idx in buckets]


def _contiguous(t: AdamTensors, writeback):
    """The kernels take contiguous tensors: a non-contiguous state is updated in a copy that
    is copied back after the kernel (into writeback); a grad is only read."""
    def staged(lst):
        if all(x.is_contiguous() for x in lst):
            return lst
        out = []
        for x in lst:
            c = x.contiguous()
            if c is not x:
                writeback.append((x, c))
            out.append(c)
        return out

    grads = t.grads if all(g.is_contiguous() for g in t.grads) else [g.contiguous() for g in t.grads]
    return AdamTensors(staged(t.params), grads, staged(t.exp_avgs), staged(t.exp_avg_sqs),
                       staged(t.max_exp_avg_sqs), t.steps, staged(t.master_params), *t[7:])


def _real_view(t: AdamTensors):
    # complex params are updated as their real views, as torch does
    return AdamTensors(*(lst if k >= 5 else [torch.view_as_real(x) for x in lst] for k, lst in enumerate(t)))


def _tracing():
    return (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() > 0)


def prepare(tensors: AdamTensors, hyper: AdamHyper, grad_mult=None, found_inf=None, check=False) -> list:
    """Cut one call into one AdamCall per (device, dtype) of the params and pick its op.
    Raises before anything is written: the Triton and reference lists are checked here
    (_check), a native call's by the op as it runs (check_calls() checks the later native
    calls of a step of several calls before the first launch).

    Args:
        tensors: the lists (AdamTensors).
        hyper: the hyper-parameters (AdamHyper).
        grad_mult: optional one-element fp32 tensor every grad is multiplied by as it is read.
        found_inf: optional one-element fp32 tensor; nonzero skips the whole step on the device.
        check: check the native calls' lists here too (the functional adam_(), whose
            buckets are launched one after the other).
    """
    if not tensors.params:
        return []
    _check_hyper(hyper)
    if not hyper.amsgrad:
        tensors = tensors._replace(max_exp_avg_sqs=[], max_exp_avg_sq_absmax=[])
    _check_lengths(tensors, hyper.amsgrad, one_call=False)
    calls = []
    for t in _split(tensors, device_dtype_buckets(tensors.params, tensors.exp_avgs)):
        if t.master_params and t.master_params[0] is None:  # params of this dtype keep no fp32 copy
            t = t._replace(master_params=[])
        if t.exp_avg_absmax and t.exp_avg_absmax[0] is None:  # states that are not 8-bit
            t = t._replace(exp_avg_absmax=[], exp_avg_sq_absmax=[], max_exp_avg_sq_absmax=[])
        device, dtype = t.params[0].device, t.params[0].dtype
        real = dtype.to_real() if dtype.is_complex else dtype
        if not real.is_floating_point:
            _fail(f"params must be floating point or complex, got {dtype}", TypeError)
        backend = _backend.select(device, OP, real, KERNEL_DTYPES)
        if dtype.is_complex:
            t = _real_view(t)
        writeback = []
        op = _OPS[backend]
        if backend != "native" or check:
            _check(t, hyper.amsgrad)
            if backend == "triton":
                t = _contiguous(t, writeback)
        h = hyper._replace(lr=_one_element("lr", hyper.lr, device)) if torch.is_tensor(hyper.lr) else hyper
        if h.sr_params or h.sr_exp_avg_sq:  # each call its own seed; exp_avg_sq: calls with bf16 states
            h = h._replace(sr_seed=reference.sr_call_seed(h.sr_seed, len(calls)),
                           sr_exp_avg_sq=h.sr_exp_avg_sq and t.exp_avgs[0].dtype == torch.bfloat16)
        calls.append(AdamCall(backend, op, t, h, _one_element("grad_mult", grad_mult, device),
                              _one_element("found_inf", found_inf, device), writeback))
    return calls


def _args(c: AdamCall, found_inf):
    h = c.hyper
    lr, lr_tensor = (0.0, h.lr) if torch.is_tensor(h.lr) else (float(h.lr), None)
    return (*c.tensors, lr, lr_tensor, h.beta1, h.beta2, h.eps, h.weight_decay, h.amsgrad, h.maximize,
            h.decoupled_weight_decay, c.grad_mult, found_inf, h.sr_seed, h.sr_params, h.sr_exp_avg_sq)


def check_calls(calls) -> None:
    """Raise now if a call of a step would raise once an earlier one has written: the native
    op checks its lists as it runs, so every native call after the first is checked here
    (prepare() checked the Triton and reference calls)."""
    for c in calls[1:]:
        if c.backend == "native":
            _check(c.tensors, c.hyper.amsgrad)


def launch(c: AdamCall) -> None:
    """Run a prepared call: one kernel launch (on CPU one parallel region)."""
    c.op(*_args(c, c.found_inf))
    for orig, staged in c.writeback:
        orig.copy_(staged)


# ---- plans: a group's calls kept from one step to the next (csrc/adam_plan.cpp) ----------

class GroupPlan(NamedTuple):
    """What FusedAdam keeps of a param group between steps."""

    group: dict      # the param group it was built for
    plan: object     # fusedtrain._C.AdamPlan
    backend: str     # of every call
    device: torch.device
    dtypes: tuple    # of each call's params
    flags: tuple     # the group's (amsgrad, master_weights) when it was built
    triton: list     # Triton calls: per call its KeptTables, (block, iters), whether it has master params


def _state_keys(amsgrad, master_weights, q8):
    return ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()) + \
        (("master_param",) if master_weights else ()) + \
        (("exp_avg_absmax", "exp_avg_sq_absmax") + (("max_exp_avg_sq_absmax",) if amsgrad else ()) if q8 else ())


def plan_group(group, state, calls) -> Optional[GroupPlan]:
    """A plan of the group's `calls` of this step (its prepare() result), gathered and checked
    for this step; or None where the group is not one a plan can keep: calls on the reference
    backend, on several devices or backends, tensors staged in copies, or tensors that are
    not the group's own params (complex params update their real views, DTensor params their
    local shards); a state that is not exactly a dict; params with a __torch_function__ of
    their own; or under torch.compile."""
    plan_type = getattr(_ext._C, "AdamPlan", None)
    if (plan_type is None or not calls or _tracing() or type(group["params"]) is not list
            or not (type(state) is dict or type(state) is collections.defaultdict)):
        return None
    backend = calls[0].backend
    q8 = any(c.tensors.exp_avg_absmax for c in calls)
    # 8-bit states on Triton: its launch from a plan (addresses()) has no absmax columns
    if q8 and backend != "native":
        return None
    if (backend not in ("native", "triton") or any(c.backend != backend or c.writeback for c in calls)
            or len({c.tensors.params[0].device for c in calls}) != 1):
        return None
    position = {id(p): i for i, p in enumerate(group["params"])}
    try:
        index = [[position[id(p)] for p in c.tensors.params] for c in calls]
    except KeyError:
        return None
    if any(type(state[group["params"][i]]) is not dict for idx in index for i in idx):
        return None
    # a param subclass with its own __torch_function__ (nn.Parameter's is disabled) sees the
    # Python path's op call; a plan calls from C++, past it
    if torch.overrides.has_torch_function(tuple(p for c in calls for p in c.tensors.params)):
        return None
    amsgrad, master_weights = bool(group["amsgrad"]), bool(group.get("master_weights"))
    triton = backend == "triton"
    plan = plan_type(group["params"], state, _state_keys(amsgrad, master_weights, q8),
                     [(i, bool(c.tensors.master_params)) for i, c in zip(index, calls)], amsgrad, triton)
    device = calls[0].tensors.params[0].device
    kept = []
    if triton:  # the kernel reads contiguous tensors from tables, which the plan keeps
        from fusedtrain.triton import adam as triton_adam, multi_tensor
        for c in calls:
            numels = [p.numel() for p in c.tensors.params]
            block, iters = triton_adam.tile(max(numels))
            tables = multi_tensor.KeptTables(block * iters, True, device, triton_adam.peel_sizes(c.tensors))
            kept.append((tables, (block, iters), bool(c.tensors.master_params)))
    return GroupPlan(group, plan, backend, device, tuple(c.tensors.params[0].dtype for c in calls),
                     (amsgrad, master_weights), kept)


def gather(p: GroupPlan, group, state, hyper: AdamHyper) -> bool:
    """Whether the plan still describes the group (and the backend it would run on now) and
    passes the op's checks; if so it holds this step's lists for launch_plan()."""
    _check_hyper(hyper)
    return (p.group is group and p.flags == (bool(group["amsgrad"]), bool(group.get("master_weights")))
            and all(_backend.select(p.device, OP, d, KERNEL_DTYPES) == p.backend for d in p.dtypes)
            # stochastic rounding of params it may not round: the Python path raises
            and not (hyper.sr_params and (p.flags[1] or any(d != torch.bfloat16 for d in p.dtypes)))
            and p.plan.gather(group["params"], state))


def plan_scalars(p: GroupPlan, hyper: AdamHyper, grad_mult=None, found_inf=None) -> tuple:
    """(lr, lr_tensor, grad_mult, found_inf) of a plan's launch, on its device: made before
    the step's first launch, since a bad one raises."""
    lr, lr_tensor = (0.0, _one_element("lr", hyper.lr, p.device)) if torch.is_tensor(hyper.lr) else (hyper.lr, None)
    return lr, lr_tensor, _one_element("grad_mult", grad_mult, p.device), _one_element("found_inf", found_inf,
                                                                                         p.device)


def launch_plan(p: GroupPlan, hyper: AdamHyper, scalars) -> None:
    """Run a gathered plan's calls with this step's hyper-parameters and plan_scalars()."""
    lr, lr_tensor, grad_mult, found_inf = scalars
    if p.backend == "native":
        p.plan.launch(lr, lr_tensor, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay, hyper.maximize,
                      hyper.decoupled_weight_decay, grad_mult, found_inf, hyper.sr_seed, hyper.sr_params,
                      hyper.sr_exp_avg_sq)
        return
    from fusedtrain.triton import adam as triton_adam
    try:
        for k, (kept, (block, iters), master) in enumerate(p.triton):
            tables = kept.update(p.plan.addresses(k, triton_adam.COLUMNS))
            with torch.profiler.record_function("fusedtrain_triton::adam_"):  # the op's kernel, launched directly
                refs = p.plan.refs(k)
                sr_v = hyper.sr_exp_avg_sq and refs[1].dtype == torch.bfloat16
                triton_adam.launch(tables, block, iters, refs, lr, lr_tensor, hyper.beta1, hyper.beta2,
                                   hyper.eps, hyper.weight_decay, hyper.amsgrad, master, hyper.maximize,
                                   hyper.decoupled_weight_decay, grad_mult, found_inf,
                                   reference.sr_call_seed(hyper.sr_seed, k), hyper.sr_params, sr_v)
        p.plan.bump_versions()  # as the op would (csrc/include/fusedtrain/versions.h)
    finally:
        p.plan.release()


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params=(), exp_avg_absmax=(),
          exp_avg_sq_absmax=(), max_exp_avg_sq_absmax=(), *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
          decoupled_weight_decay, grad_mult=None, found_inf=None, sr_seed=0, sr_params=False,
          sr_exp_avg_sq=False) -> None:
    """One Adam (decoupled_weight_decay=False) or AdamW step, in place.

    Args:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params,
            exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax: the tensor lists of
            AdamTensors (any devices and dtypes; one launch per each pair).
        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as
            torch.optim.Adam; lr may be a one-element tensor.
        grad_mult, found_inf: see prepare().
        sr_seed, sr_params, sr_exp_avg_sq: stochastic rounding of bf16 params (without master
            copies) and of a bf16 exp_avg_sq (csrc/ops.cpp); each call gets its own seed from sr_seed.
    """
    tensors = AdamTensors(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                          list(max_exp_avg_sqs or ()), list(steps), list(master_params or ()),
                          list(exp_avg_absmax or ()), list(exp_avg_sq_absmax or ()), list(max_exp_avg_sq_absmax or ()))
    hyper = AdamHyper(lr if torch.is_tensor(lr) else float(lr), float(beta1), float(beta2), float(eps),
                      float(weight_decay), bool(amsgrad), bool(maximize), bool(decoupled_weight_decay), int(sr_seed),
                      bool(sr_params), bool(sr_exp_avg_sq))
    for c in prepare(tensors, hyper, grad_mult, found_inf, check=True):
        launch(c)
