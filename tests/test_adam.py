"""FusedAdam / FusedAdamW against torch.optim.Adam / AdamW (foreach=False) in float64.

Trajectories: 200 steps of one optimizer whose param groups span every flag combination
(Adam/AdamW x amsgrad x maximize x weight_decay {0, 0.1} x float/tensor lr x capturable).
Every step is checked against torch run in float64 from the very same state (teacher
forcing: before each step the float64 torch optimizer receives our params and states), so
the comparison holds each step to one rounding of the storage dtype, for fp16/bf16 as for
fp32, instead of letting rounding noise accumulate over 200 steps.
"""
import contextlib
import copy
import itertools

import pytest
import torch

import fusedtrain
from fusedtrain import FusedAdam, FusedAdamW
from fusedtrain.ops import adam as adam_ops
from helpers import INTERPRET, OpCalls, assert_close, assert_unchanged, snapshot

STEPS = 200
# The Triton interpreter pays ~3 ms per program: one small tensor per group there.
SHAPES = [(3, 5), (17,)] if not INTERPRET else [(3, 7)]

# (param dtype, master_weights)
DTYPE_CASES = [(torch.float32, False), (torch.float16, False), (torch.bfloat16, False),
               (torch.float16, True), (torch.bfloat16, True)]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp16-master", "bf16-master"]

FLAGS = [dict(decoupled_weight_decay=d, amsgrad=a, maximize=m, weight_decay=w, lr_tensor=lt, capturable=c)
         for d, a, m, w, lt, c in itertools.product((False, True), (False, True), (False, True), (0.0, 0.1),
                                                   (False, True), (False, True))]


def _grad(shape, gen, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _build(device, dtype, master, seed=0):
    """Our optimizer with one param group per flag combination, and torch's float64 twin."""
    gen = torch.Generator().manual_seed(seed)
    ours_groups, ref_groups, pairs = [], [], []
    for i, f in enumerate(FLAGS):
        lr = 1e-2 * (1 + i % 3)
        # eps large enough to matter in half the groups; beta1 < 0.5 (torch's other lerp branch) in half
        hyper = dict(eps=(1e-8, 1e-3)[i % 2], betas=((0.9, 0.999), (0.3, 0.95))[(i // 2) % 2])
        init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        ours = [x.to(device, dtype).requires_grad_() for x in init]
        ref = [x.to(dtype).double().requires_grad_() for x in init]
        pairs += [(o, r) for o, r in zip(ours, ref)]
        g = dict(params=ours, lr=torch.tensor(lr) if f["lr_tensor"] else lr, weight_decay=f["weight_decay"],
                 amsgrad=f["amsgrad"], maximize=f["maximize"], capturable=f["capturable"],
                 decoupled_weight_decay=f["decoupled_weight_decay"], **hyper)
        ours_groups.append(g)
        # torch's reference: float lr of the same (fp32-rounded) value; capturable off (CPU)
        ref_groups.append(dict(params=ref, lr=float(torch.tensor(lr)) if f["lr_tensor"] else lr,
                               weight_decay=f["weight_decay"], amsgrad=f["amsgrad"], maximize=f["maximize"],
                               decoupled_weight_decay=f["decoupled_weight_decay"], **hyper))
    opt = FusedAdam(ours_groups, master_weights=master)
    topt = torch.optim.Adam(ref_groups, foreach=False)
    return opt, topt, pairs


def _force(opt, topt, pairs):
    """Give torch's float64 optimizer our current params and states."""
    for o, r in pairs:
        so, sr = opt.state[o], topt.state[r]
        r.data.copy_(so["master_param"] if "master_param" in so else o.detach())
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if k in so:
                sr[k].copy_(so[k])
        sr["step"].copy_(so["step"])


def _compare(opt, topt, pairs, dtype, master, what):
    so = [opt.state[o] for o, _ in pairs]
    sr = [topt.state[r] for _, r in pairs]
    sdtype = torch.float32 if master else dtype
    cat = lambda xs: torch.cat([x.detach().reshape(-1).double().cpu() for x in xs])
    # the param: one rounding to its storage (fp32 for the master copy)
    ours_p = cat([s["master_param"] for s in so]) if master else cat([o for o, _ in pairs])
    assert_close(ours_p, cat([r for _, r in pairs]), sdtype, what=f"{what}: params")
    if master:
        for (o, _), s in zip(pairs, so):
            assert torch.equal(o.detach(), s["master_param"].to(dtype)), f"{what}: param != rounded master"
    for k in ("exp_avg", "exp_avg_sq"):
        assert_close(cat([s[k] for s in so]), cat([s[k] for s in sr]), sdtype, what=f"{what}: {k}")
    ams = [(s, t) for s, t in zip(so, sr) if "max_exp_avg_sq" in t]
    assert_close(cat([s["max_exp_avg_sq"] for s, _ in ams]), cat([t["max_exp_avg_sq"] for _, t in ams]), sdtype,
                 what=f"{what}: max_exp_avg_sq")
    assert torch.equal(cat([s["step"] for s in so]), cat([s["step"] for s in sr])), f"{what}: step"


@pytest.mark.parametrize("dtype,master", DTYPE_CASES, ids=DTYPE_IDS)
def test_200_steps_every_flag_combination_matches_torch(backend_device, dtype, master):
    backend, device = backend_device
    opt, topt, pairs = _build(device, dtype, master)
    gen = torch.Generator().manual_seed(1)
    # the interpreter (~3 ms per program, 64 groups a step; 200 steps took 167 s): 15 steps for
    # fp32, 5 for the other storage dtypes. Each step is checked on its own (teacher forcing);
    # the native kernels' 200 steps cover the long run of the shared math.
    steps = STEPS if not INTERPRET else 15 if dtype == torch.float32 else 5
    for step in range(steps):
        for o, r in pairs:
            g = _grad(o.shape, gen).to(dtype)
            o.grad = g.to(device)
            r.grad = g.double()
        if step:
            _force(opt, topt, pairs)
        opt.step()
        topt.step()
        _compare(opt, topt, pairs, dtype, master, f"{backend}-{device} {dtype} master={master} step {step + 1}")
    for o, _ in pairs:
        assert opt.state[o]["step"].device == o.device and opt.state[o]["step"].dtype == torch.float32
    for g, f in zip(opt.param_groups, FLAGS):
        assert torch.is_tensor(g["lr"]) == f["lr_tensor"]


def _free_run(make_opt, params, grads, device, dtype=torch.float32):
    ps = [p.detach().clone().to(device, dtype).requires_grad_() for p in params]
    opt = make_opt(ps)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.to(device, dtype)
        opt.step()
    return ps, opt


def _rand_params(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def _rand_grads(shapes, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-master"])
def test_found_inf_skips_bit_identically(backend_device, amsgrad, dtype, master):
    backend, device = backend_device
    params = [p.to(device, dtype).requires_grad_() for p in _rand_params([(4, 9), (33,), (1,)], 0)]
    opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, master_weights=master)
    for gs in _rand_grads([p.shape for p in params], 3, 1):
        for p, g in zip(params, gs):
            p.grad = g.to(device, dtype)
        opt.step()
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    before = snapshot(opt, params)
    # torch.amp.GradScaler's protocol: attributes on the optimizer
    opt.grad_scale = torch.tensor(1024.0, device=device)
    opt.found_inf = torch.tensor(1.0, device=device)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert_unchanged(before, opt, params)
    # fusedtrain.GradScaler's entry point
    opt._step_scaled(grad_mult=torch.tensor(0.5, device=device), found_inf=torch.tensor(1.0, device=device))
    assert_unchanged(before, opt, params)
    # found_inf == 0: the step happens and the count moves
    for p in params:
        p.grad = torch.ones_like(p)
    opt._step_scaled(found_inf=torch.zeros((), device=device))
    assert opt.state[params[0]]["step"].item() == 4.0
    assert not torch.equal(before[0][0], params[0].detach())


def test_grad_mult_unscales_inside_the_kernel(backend_device):
    backend, device = backend_device
    shapes = [(6, 7), (129,)]
    init = _rand_params(shapes, 3)
    grads = _rand_grads(shapes, 5, 4)
    ref, _ = _free_run(lambda ps: FusedAdam(ps, lr=1e-2, weight_decay=0.1), init, grads, device)
    ps = [p.detach().clone().to(device).requires_grad_() for p in init]
    opt = FusedAdam(ps, lr=1e-2, weight_decay=0.1)
    for gs in grads:
        scaled = [g * 4096.0 for g in gs]
        for p, g in zip(ps, scaled):
            p.grad = g.to(device)
        opt.grad_scale = torch.tensor(4096.0, device=device)  # what torch.amp.GradScaler sets
        opt.found_inf = torch.tensor(0.0, device=device)
        opt.step()
        for p, g in zip(ps, scaled):
            assert torch.equal(p.grad, g.to(device)), "grads must not be written"
    for a, b in zip(ps, ref):
        assert torch.equal(a, b), "a power-of-two grad_mult must give exactly the unscaled step"


def test_torch_amp_grad_scaler_drives_the_fused_step(backend_device):
    """torch.amp.GradScaler on CPU: no separate unscale pass, inf steps skipped."""
    backend, device = backend_device
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(device)
    tmodel = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-2, fused=True)
    s1 = torch.amp.GradScaler(device, init_scale=2.0 ** 8)
    s2 = torch.amp.GradScaler(device, init_scale=2.0 ** 8)
    x = torch.randn(16, 8, device=device)
    for it in range(6):
        for m, o, s in ((model, opt, s1), (tmodel, topt, s2)):
            o.zero_grad()
            loss = m(x).square().mean()
            if it == 2:
                loss = loss * float("inf")
            s.scale(loss).backward()
            s.step(o)
            s.update()
    for a, b in zip(model.parameters(), tmodel.parameters()):
        assert_close(a, b.double(), torch.float32, rtol=1e-5, atol=1e-6, what="GradScaler run")
    assert s1.get_scale() == s2.get_scale()
    assert opt.state[model.weight]["step"].item() == topt.state[tmodel.weight]["step"].item() == 5


@pytest.mark.parametrize("direction", ["torch->fused", "fused->torch"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip_mid_run(backend_device, direction, amsgrad):
    backend, device = backend_device
    shapes = [(5, 4), (19,)]
    init = _rand_params(shapes, 5)
    grads = _rand_grads(shapes, 12, 6)
    kw = dict(lr=1e-2, weight_decay=0.05, amsgrad=amsgrad)
    # the uninterrupted torch run
    ref, _ = _free_run(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw), init, grads, device)
    first, second = ((lambda ps: torch.optim.AdamW(ps, foreach=False, **kw)), (lambda ps: FusedAdamW(ps, **kw)))
    if direction == "fused->torch":
        first, second = second, first
    ps, opt = _free_run(first, init, grads[:6], device)
    sd = copy.deepcopy(opt.state_dict())
    ps2 = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = second(ps2)
    opt2.load_state_dict(sd)
    if isinstance(opt2, FusedAdam):
        for p in ps2:
            st = opt2.state[p]
            assert st["step"].dtype == torch.float32 and st["step"].device == p.device
            assert st["exp_avg"].dtype == p.dtype
    for gs in grads[6:]:
        for p, g in zip(ps2, gs):
            p.grad = g.to(device)
        opt2.step()
    for a, b in zip(ps2, ref):
        assert_close(a, b.double(), torch.float32, rtol=1e-5, atol=1e-6, what=direction)
    assert opt2.state[ps2[0]]["step"].item() == 12
    # and back again: the second optimizer's state loads into the first's class
    opt3 = first([p.detach().clone().requires_grad_() for p in ps2])
    opt3.load_state_dict(copy.deepcopy(opt2.state_dict()))
    assert float(opt3.state[opt3.param_groups[0]["params"][0]]["step"]) == 12


def test_master_weights_state_dict_round_trip(backend_device):
    backend, device = backend_device
    shapes = [(8, 3), (10,)]
    init = _rand_params(shapes, 7)
    grads = _rand_grads(shapes, 8, 8)
    mk = lambda ps: FusedAdamW(ps, lr=1e-2, master_weights=True)
    ref, ref_opt = _free_run(mk, init, grads, device, torch.bfloat16)
    ps, opt = _free_run(mk, init, grads[:4], device, torch.bfloat16)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["master_weights"] is True
    st = sd["state"][0]
    assert st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
    ps2 = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = mk(ps2)
    opt2.load_state_dict(sd)
    assert opt2.state[ps2[0]]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[ps2[0]]["master_param"], opt.state[ps[0]]["master_param"])
    for gs in grads[4:]:
        for p, g in zip(ps2, gs):
            p.grad = g.to(device, torch.bfloat16)
        opt2.step()
    for a, b in zip(ps2, ref):
        assert torch.equal(a, b), "resumed master-weights run differs from the uninterrupted one"
    for a, b in zip(ps2, ref):
        assert torch.equal(opt2.state[a]["master_param"], ref_opt.state[b]["master_param"])


@pytest.mark.parametrize("how", ["entries", "whole-dict", "deepcopy", "pickle"])
def test_state_replaced_by_hand_is_the_state_stepped(backend_device, how):
    """Moving state by reassignment (st[k] = v.to(...)), as offloading code does, between
    steps: the next step must update the new tensors, not the ones the plan cached."""
    import io
    import pickle

    backend, device = backend_device
    shapes = [(6, 5), (11,)]
    init = _rand_params(shapes, 21)
    grads = _rand_grads(shapes, 6, 22)
    kw = dict(lr=1e-2, weight_decay=0.05, amsgrad=True)
    ref, ref_opt = _free_run(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw), init, grads, "cpu")
    ps = [p.detach().clone().to(device).requires_grad_() for p in init]
    opt = FusedAdamW(ps, **kw)
    for i, gs in enumerate(grads):
        for p, g in zip(ps, gs):
            p.grad = g.to(device)
        opt.step()
        if how == "entries":
            for st in opt.state.values():
                for k, v in list(st.items()):
                    st[k] = v.clone()
        elif how == "whole-dict":
            for p in ps:
                opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}
        elif how == "deepcopy" and i == 2:
            ps = copy.deepcopy(ps)
            opt2 = FusedAdamW(ps, **kw)
            opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt = copy.deepcopy(opt2)
            ps = opt.param_groups[0]["params"]
        elif how == "pickle" and i == 2:
            opt = pickle.loads(pickle.dumps(opt))
            ps = opt.param_groups[0]["params"]
    for p, r in zip(ps, ref):
        assert_close(p, r.double(), torch.float32, rtol=1e-5, atol=1e-6, what=how)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_close(opt.state[p][k], ref_opt.state[r][k].double(), torch.float32, rtol=1e-5, atol=1e-7,
                         what=f"{how}: {k}")
        assert opt.state[p]["step"].item() == len(grads)
    # the checkpoint holds builtin containers only: it loads without fusedtrain's classes
    sd = opt.state_dict()
    assert all(type(v) is dict for v in sd["state"].values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["state"][0]["step"].item() == len(grads)


def _one_step_vs_torch(device, shapes, seed, steps=2, calls=None):
    """`calls`: an OpCalls that counts our optimizer's launches (only ours: profiling torch's
    for-loop over 1000 tensors too took 20 s)."""
    init = _rand_params(shapes, seed)
    grads = _rand_grads(shapes, steps, seed + 1)
    with calls if calls is not None else contextlib.nullcontext():
        ours, opt = _free_run(lambda ps: FusedAdamW(ps, lr=1e-2, weight_decay=0.1), init, grads, device)
    ref, _ = _free_run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
                       [p.double() for p in init], [[g.double() for g in gs] for gs in grads], "cpu", torch.float64)
    cat = lambda xs: torch.cat([x.detach().reshape(-1).double().cpu() for x in xs])
    assert_close(cat(ours), cat(ref), torch.float32, what=f"{len(shapes)} tensors")
    assert all(opt.state[p]["step"].item() == steps for p in ours), "every step counted, empty tensors too"
    return ours, opt


def test_1000_tensors_of_7_elements(backend_device):
    backend, device = backend_device
    calls = OpCalls("adam_")
    ours, opt = _one_step_vs_torch(device, [(7,)] * 1000, 11, calls=calls)
    assert len(calls) == 2, "one launch per (group, device, dtype) per step"
    assert all(opt.state[p]["step"].item() == 2 for p in ours)


@pytest.mark.parametrize("dtype, master, sr", [(torch.float32, False, False), (torch.bfloat16, False, False),
                                               (torch.float16, True, False), (torch.bfloat16, False, True)],
                         ids=["fp32", "bf16", "fp16-master", "bf16-sr"])
def test_an_element_gets_the_same_bits_wherever_it_sits(backend_device, dtype, master, sr):
    """Params of 1 to 100 elements against the same values at the start of 128-element params,
    10 steps: bit for bit. A vectorized loop's tail (the last n % 32 elements on AVX-512) must
    take the body's arithmetic: FSDP2 shards and DCP reshards move elements between the two.
    Our kernels only: the reference's bits are ATen's loops' (their scalar tails included)."""
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference runs ATen's kernels")
    gen = torch.Generator().manual_seed(3)
    sizes = (1, 7, 16, 33, 48, 100)
    longs = [torch.randn(128, generator=gen).to(device, dtype).requires_grad_() for _ in sizes]
    shorts = [x.detach()[:n].clone().requires_grad_() for x, n in zip(longs, sizes)]
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True, master_weights=master, stochastic_rounding=sr)
    opts = [FusedAdamW(ps, **kw) for ps in (longs, shorts)]
    for _ in range(10):
        for x, y in zip(longs, shorts):
            x.grad = torch.randn(128, generator=gen).to(device, dtype)
            y.grad = x.grad[:y.numel()].clone()
        for o in opts:
            o.step()
    for x, y, n in zip(longs, shorts, sizes):
        assert torch.equal(x.detach()[:n], y.detach()), f"{n} elements: param"
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") + (("master_param",) if master else ()):
            assert torch.equal(opts[0].state[x][k][:n], opts[1].state[y][k]), f"{n} elements: {k}"


def test_one_tensor_of_2_pow_24(backend_device):
    backend, device = backend_device
    _one_step_vs_torch(device, [(1 << 24,)], 12, steps=1)


def test_edge_shapes_and_non_contiguous(backend_device):
    backend, device = backend_device
    _one_step_vs_torch(device, [(1,), (0,), (15,), (16,), (17,), (1023,), (1025,), (3, 4097)], 13)
    # a non-contiguous param (a transposed view) and a non-contiguous grad
    base = torch.randn(6, 5)
    p = base.t().to(device).requires_grad_()
    r = p.detach().double().clone().requires_grad_()
    opt = FusedAdam([p], lr=1e-2)
    topt = torch.optim.Adam([r], lr=1e-2, foreach=False)
    g = torch.randn(6, 5).t()
    p.grad, r.grad = g.to(device), g.double()
    opt.step()
    topt.step()
    assert_close(p, r, torch.float32, what="non-contiguous")


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5, 8], gamma=0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12),
}


@pytest.mark.parametrize("lr_tensor", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers(backend_device, name, lr_tensor):
    backend, device = backend_device
    shapes = [(4, 4), (9,)]
    init = _rand_params(shapes, 20)
    grads = _rand_grads(shapes, 12, 21)
    runs = []
    for make in (lambda ps, lr: FusedAdamW(ps, lr=lr, weight_decay=0.1, capturable=lr_tensor),
                 lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1, foreach=False)):
        ps = [p.clone().to(device).requires_grad_() for p in init]
        opt = make(ps, torch.tensor(0.01) if lr_tensor else 0.01)
        sched = SCHEDULERS[name](opt)
        lrs = []
        for i, gs in enumerate(grads):
            for p, g in zip(ps, gs):
                p.grad = g.to(device)
            opt.step()
            if name == "ReduceLROnPlateau":
                sched.step(1.0)  # a plateau: the lr drops
            else:
                sched.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
        runs.append((ps, lrs))
    (ours, lrs), (ref, tlrs) = runs
    assert lrs == tlrs
    assert len(set(lrs)) > 1, "the schedule never changed the lr"
    for a, b in zip(ours, ref):
        assert_close(a, b.double(), torch.float32, rtol=1e-5, atol=1e-6, what=name)


def test_grad_none_params_are_skipped(backend_device):
    backend, device = backend_device
    a, b = (torch.randn(5, device=device, requires_grad=True) for _ in range(2))
    b0 = b.detach().clone()
    opt = FusedAdam([a, b], lr=1e-2)
    a.grad = torch.randn(5, device=device)
    opt.step()
    assert torch.equal(b, b0) and len(opt.state[b]) == 0 and opt.state[a]["step"].item() == 1


def test_complex_params_the_torch_way(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(30)
    init = torch.randn(7, 3, dtype=torch.complex64, generator=gen)
    p = init.clone().to(device).requires_grad_()
    r = init.to(torch.complex128).requires_grad_()
    opt = FusedAdamW([p], lr=1e-2, amsgrad=True)
    topt = torch.optim.AdamW([r], lr=1e-2, amsgrad=True, foreach=False)
    for _ in range(3):
        g = torch.randn(7, 3, dtype=torch.complex64, generator=gen)
        p.grad, r.grad = g.to(device), g.to(torch.complex128)
        opt.step()
        topt.step()
    assert_close(torch.view_as_real(p.detach()), torch.view_as_real(r.detach()), torch.float32, what="complex")
    assert opt.state[p]["exp_avg"].dtype == torch.complex64


def _bad_setup(device):
    params = [torch.randn(s, device=device, requires_grad=True) for s in [(5, 3), (7,), (4, 4)]]
    opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return params, opt


@pytest.mark.parametrize("bad", ["sparse", "wrong-shape", "wrong-dtype", "fresh-param-sparse"])
def test_bad_grad_is_a_clear_error_that_changes_nothing(backend_device, bad):
    backend, device = backend_device
    params, opt = _bad_setup(device)
    if bad == "sparse":
        params[2].grad = torch.randn(4, 4, device=device).to_sparse()
    elif bad == "wrong-shape":
        params[2].grad.data = torch.randn(3, device=device)
    elif bad == "wrong-dtype":
        params[2].grad.data = torch.randn(4, 4, dtype=torch.float64, device=device)
    else:  # a param without state yet, in its own group: no state may be created either
        q = torch.randn(4, 4, device=device, requires_grad=True)
        opt.add_param_group({"params": [q]})
        q.grad = torch.randn(4, 4, device=device).to_sparse()
        params = params + [q]
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="(?i)grad"):
        opt.step()
    assert_unchanged(before, opt, params)


def test_op_level_bad_input_changes_nothing(backend_device):
    """The op validates everything (devices, shapes, dtypes) before any write."""
    backend, device = backend_device
    ps = [torch.randn(8, device=device), torch.randn(3, device=device)]
    gs = [torch.randn(8, device=device), torch.randn(3, device=device)]
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    st = [torch.zeros((), device=device) for _ in ps]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled_weight_decay=True)
    before = [t.clone() for t in ps + ms + vs + st]
    cases = {
        "grad shape": (ps, [gs[0], torch.randn(4, device=device)], ms, vs, [], st),
        "grad on another device": (ps, [gs[0], torch.randn(3, device="meta")], ms, vs, [], st),
        "sparse grad": (ps, [gs[0], torch.randn(3, device=device).to_sparse()], ms, vs, [], st),
        "state on another device": (ps, gs, ms, [vs[0], torch.zeros(3, device="meta")], [], st),
        "step dtype": (ps, gs, ms, vs, [], [st[0], torch.zeros((), dtype=torch.float64, device=device)]),
        "list lengths": (ps, gs[:1], ms, vs, [], st),
    }
    for what, args in cases.items():
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            adam_ops.adam_(*args, **kw)
        after = [t.clone() for t in ps + ms + vs + st]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), f"{what}: something was written"
    with pytest.raises(ValueError, match="one-element"):
        adam_ops.adam_(ps, gs, ms, vs, [], st, **kw, found_inf=torch.zeros(2, device=device))


def test_constructor_matches_torch():
    p = [torch.randn(3, requires_grad=True)]
    FusedAdamW(p, fused=True)  # accepted, ignored (with foreach=True too: torch's RuntimeError)
    opt = FusedAdamW(p, foreach=True)  # accepted, ignored
    topt = torch.optim.AdamW([torch.randn(3, requires_grad=True)])
    assert set(topt.param_groups[0]) <= set(opt.param_groups[0])
    assert set(opt.param_groups[0]) - set(topt.param_groups[0]) == {"master_weights", "state_format",
                                                                    "stochastic_rounding", "sr_seed"}
    assert opt.param_groups[0]["decoupled_weight_decay"] is True and opt.param_groups[0]["weight_decay"] == 1e-2
    assert FusedAdam(p).param_groups[0]["weight_decay"] == 0 and FusedAdam(p).param_groups[0]["decoupled_weight_decay"] is False
    assert FusedAdam._step_supports_amp_scaling is True
    with pytest.raises(ValueError, match="differentiable"):
        FusedAdam(p, differentiable=True)
    for bad in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(weight_decay=-0.1),
                dict(lr=torch.tensor([1e-3, 1e-3]))):
        with pytest.raises(ValueError):
            FusedAdam(p, **bad)


@pytest.mark.gpu
def test_multi_device_groups_are_split_per_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device next to the CPU")
    a = torch.randn(5, requires_grad=True)
    b = torch.randn(5, device="cuda", requires_grad=True)
    ra, rb = (x.detach().double().cpu().requires_grad_() for x in (a, b))
    opt = FusedAdamW([a, b], lr=1e-2)
    topt = torch.optim.AdamW([ra, rb], lr=1e-2, foreach=False)
    for _ in range(2):
        g = torch.randn(5)
        a.grad, b.grad, ra.grad, rb.grad = g, g.cuda(), g.double(), g.double()
        opt.step()
        topt.step()
    assert_close(a, ra, torch.float32, what="cpu")
    assert_close(b, rb, torch.float32, what="cuda")
    assert opt.state[b]["step"].device.type == "cuda"


def test_hyper_parameters_are_not_specialized():
    """An LR schedule must not compile a new Triton kernel per value: the hyper-parameter
    arguments are do_not_specialize (checked here), and on a GPU three learning rates run
    one compiled variant."""
    pytest.importorskip("triton")
    from fusedtrain.triton import adam as tk

    names = {p.name for p in tk._adam_kernel.params if p.do_not_specialize}
    assert names == {"lr_bits", "beta1_bits", "beta2_bits", "eps", "wd_bits", "sr_seed"}
    # a seed's type is the i32 of the AOT specs for every 32-bit seed (the kernel keeps its bits)
    for seed in (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF):
        arg = tk.as_int32(seed)
        assert -2**31 <= arg < 2**31 and arg & 0xFFFFFFFF == seed, seed
    if not torch.cuda.is_available():
        return
    ps = [torch.randn(4096, device="cuda", requires_grad=True)]
    ps[0].grad = torch.randn_like(ps[0])
    opt = FusedAdamW(ps, lr=1e-3)
    with fusedtrain.use_backend("triton"):
        opt.step()
        caches = tk._adam_kernel.device_caches[torch.cuda.current_device()][0]
        before = len(caches)
        for lr in (3e-4, 7.5e-5, 1.2e-2):
            opt.param_groups[0]["lr"] = lr
            opt.step()
        assert len(caches) == before, "a new learning rate compiled a new kernel"
        bf = [torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)]
        bf[0].grad = torch.randn_like(bf[0])
        FusedAdamW(bf, lr=1e-3, stochastic_rounding=True, sr_seed=1).step()
        before = len(caches)
        for seed in (2, 2**31 + 5, 2**32 - 1):  # call seeds on both sides of 2^31
            FusedAdamW(bf, lr=1e-3, stochastic_rounding=True, sr_seed=seed).step()
    assert len(caches) == before, "a new seed compiled a new kernel"


@pytest.mark.parametrize("bad", ["second-group", "second-dtype", "new-param-group"])
def test_bad_grad_in_a_later_call_changes_nothing(backend_device, bad):
    """A step of several calls (groups, or (device, dtype) buckets of one group) raises before
    its first call writes, and removes the states it created."""
    backend, device = backend_device
    a = torch.randn(5, device=device, requires_grad=True)
    b = torch.randn(4, 4, device=device, requires_grad=True)
    if bad == "second-group":
        opt = FusedAdamW([{"params": [a]}, {"params": [b]}], lr=1e-2)
    elif bad == "second-dtype":
        b = torch.randn(4, 4, device=device, dtype=torch.bfloat16, requires_grad=True)
        opt = FusedAdamW([a, b], lr=1e-2)
    else:
        opt = FusedAdamW([a], lr=1e-2)
    for p in (a, b):
        p.grad = torch.randn_like(p)
    opt.step()
    if bad == "new-param-group":
        b = torch.randn(4, 4, device=device, requires_grad=True)
        opt.add_param_group({"params": [b]})
    a.grad = torch.randn_like(a)
    b.grad = torch.randn_like(b)
    b.grad.data = torch.randn(3, device=device, dtype=b.dtype)  # what only .data can do
    before = snapshot(opt, [a, b])
    with pytest.raises(RuntimeError, match="grad of param 0 has shape"):
        opt.step()
    assert_unchanged(before, opt, [a, b])
    assert len(opt.state.get(b, {})) == (0 if bad == "new-param-group" else 3)


def test_master_weights_in_a_group_of_mixed_dtypes(backend_device):
    """master_weights=True keeps an fp32 copy for the bf16 params of a group only, whichever
    param comes first."""
    backend, device = backend_device
    for first_bf16 in (False, True):
        a = torch.randn(5, device=device, requires_grad=True)
        b = torch.randn(8, device=device, dtype=torch.bfloat16, requires_grad=True)
        ref = b.detach().double().requires_grad_()
        opt = FusedAdamW([b, a] if first_bf16 else [a, b], lr=1e-1, master_weights=True)
        topt = torch.optim.AdamW([ref], lr=1e-1, foreach=False)
        for k in range(3):
            for p in (a, b, ref):
                p.grad = torch.full_like(p, 0.5 + k)
            opt.step()
            topt.step()
        assert "master_param" not in opt.state[a] and opt.state[b]["master_param"].dtype == torch.float32
        assert_close(opt.state[b]["master_param"], ref.detach(), torch.float32, what="master copy")
        assert torch.equal(b.detach(), opt.state[b]["master_param"].to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_two_optimizers_on_two_streams_count_their_own_steps(backend):
    """The kernels count per tensor which block writes the step: two optimizers stepping on
    two streams at once must not share those counters."""
    if not fusedtrain.backends("cuda")[backend][0]:
        pytest.skip(f"{backend} unavailable")
    opts = []
    for _ in range(2):
        ps = [torch.randn(1 << 16, device="cuda", requires_grad=True) for _ in range(8)]
        for p in ps:
            p.grad = torch.randn_like(p)
        opts.append((ps, FusedAdamW(ps, lr=1e-3)))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    with fusedtrain.use_backend(backend):
        for _ in range(100):
            for (ps, opt), s in zip(opts, streams):
                with torch.cuda.stream(s):
                    opt.step()
    torch.cuda.synchronize()
    for ps, opt in opts:
        assert [opt.state[p]["step"].item() for p in ps] == [100.0] * len(ps)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
def test_step_bumps_version_counters_as_torch(backend_device, master):
    """torch's AdamW writes params and states with in-place ops, whose version counters make
    autograd refuse a backward through a graph that saved a param before the step. The fused
    step, planned (second step) or not (first), must too: a silent backward with the new
    values would be a wrong gradient."""
    _, device = backend_device
    dtype = torch.bfloat16 if master else torch.float32
    p = torch.randn(10, device=device, dtype=dtype, requires_grad=True)
    opt = FusedAdamW([p], lr=0.1, master_weights=master)
    for step in range(3):
        p.grad = torch.randn(10, device=device, dtype=dtype)
        y = (p * p).sum()  # saves p
        before = p._version
        states = {k: v._version for k, v in opt.state[p].items()} if step else {}
        opt.step()
        assert p._version > before, f"step {step}: the param's version did not move"
        for k, v in states.items():
            assert opt.state[p][k]._version > v, f"step {step}: state {k}'s version did not move"
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def test_unscale_bumps_version_counters(backend_device):
    _, device = backend_device
    g = torch.randn(10, device=device, requires_grad=True)
    t = g * 1.0
    y = (t * t).sum()  # saves t
    found = torch.zeros((), device=device)
    before = t._version, found._version
    with torch.no_grad():
        fusedtrain.unscale_and_check_([t], torch.full((), 0.5, device=device), found)
    assert t._version > before[0] and found._version > before[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("bad", ["short grads", "non-contiguous param"])
def test_op_called_directly_checks_its_lists(backend_device, bad):
    """Each backend's registered op checks its lists itself (a direct call, torch.compile's
    graph), raising before it writes anything."""
    backend, device = backend_device
    n = 3
    params = [torch.randn(6, 4, device=device) for _ in range(n)]
    grads = [torch.randn(6, 4, device=device) for _ in range(n)]
    ms, vs = [torch.zeros(6, 4, device=device) for _ in range(n)], [torch.zeros(6, 4, device=device) for _ in range(n)]
    steps = [torch.zeros((), device=device) for _ in range(n)]
    if bad == "short grads":
        grads = grads[:-1]
        match = "differ in length"
    else:
        params[1] = torch.randn(4, 6, device=device).t()
        match = "contiguous"
    before = [t.clone() for t in params + ms + vs + steps]
    op = adam_ops._OPS[backend]
    if bad == "non-contiguous param" and backend != "triton":
        pytest.skip("the native and reference ops take non-contiguous tensors (they stage them)")
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        op(params, grads, ms, vs, [], steps, [], [], [], [], 1e-3, None, 0.9, 0.999, 1e-8, 0.0, False, False, True, None, None)
    assert all(torch.equal(a, b) for a, b in zip(before, params + ms + vs + steps))


def test_step_inside_inference_mode_bumps_versions(backend_device):
    """torch's in-place ops bump a normal tensor's version inside inference_mode too (only
    inference tensors track none): a backward through a graph saved before such a step raises."""
    _, device = backend_device
    w = torch.nn.Parameter(torch.randn(3, device=device))
    x = torch.randn(3, device=device, requires_grad=True)
    loss = (w * x).sum()  # saves w
    opt = FusedAdamW([w], lr=0.1)
    w.grad = torch.ones(3, device=device)
    before = w._version
    with torch.inference_mode():
        opt.step()
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
