"""Lean optimizer state. state_format="bf16": bf16 exp_avg / exp_avg_sq / max_exp_avg_sq for
params of at least 4096 elements, on every backend, against a float64 simulation of the same
math (fp64 update from the stored bf16 moments, each moment rounded to bf16 once per step);
formats per param group, small tensors in fp32, master weights, found_inf, state_dict round
trips and conversion from and to torch.optim.AdamW checkpoints, bad options.
stochastic_rounding=True: unbiased (the mean of many roundings is the exact value within a
stated statistical bound), reproducible (seed, resume, thread count), the same bits on every
backend, clear errors."""
import pytest
import torch

import fusedtrain
from fusedtrain import FusedAdam, FusedAdamW
from fusedtrain.optim import LEAN_MIN_NUMEL, torch_state_dict
from helpers import INTERPRET, assert_unchanged, snapshot

BIG = 4099 if not INTERPRET else 4096  # not a multiple of a vector (tails)
STEPS = 20 if not INTERPRET else 3


def sim_step(p, g, m, v, vmax, t, lr, betas, eps, wd, amsgrad, decoupled=True):
    """One float64 Adam(W) step from the stored (bf16) moments, as adam_math.h orders it: the
    param update reads the unrounded moments (returned unrounded; the store rounds them)."""
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    b1, b2 = betas
    if decoupled:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = m + (1 - b1) * (g - m)
    v = v * b2 + (1 - b2) * g * g
    den_v = v
    if amsgrad:
        vmax = torch.maximum(vmax.double(), v)
        den_v = vmax
    p = p - lr / (1 - b1 ** t) * m / (den_v.sqrt() / (1 - b2 ** t) ** 0.5 + eps)
    return p, m, v, vmax  # the moments before their rounding to bf16


def sr_bits_v(step, shape, group=0, call=0, tensor=0, seed=0):
    """The 16 random bits exp_avg_sq's stochastic rounding draws (fusedtrain/reference.py,
    adam_math.h) for each element of a tensor."""
    from fusedtrain import reference

    call_seed = reference.sr_call_seed(reference.sr_group_seed(seed, group), call)
    return reference.sr_bits(reference.sr_key(call_seed, torch.tensor(float(step)), tensor), shape, reference.SR_V)


def assert_one_bf16_rounding(got, want, name, bits16=None):
    """got is one bf16 rounding of the float64 `want`: to nearest, or stochastically with the
    bits every backend draws (the fp32 value rounded may differ from want's in its last bit,
    which flips a rare element)."""
    from fusedtrain import reference

    got = got.double().cpu()
    assert ((got - want).abs() <= want.abs() * 2.0 ** -7 + 1e-38).all(), f"{name}: more than one bf16 ulp off"
    exact = want.to(torch.bfloat16).double() if bits16 is None else reference.sr_round(want.float(), bits16).double()
    assert (got == exact).double().mean() > (0.97 if bits16 is None else 0.999), f"{name}: too many elements off"


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_bf16_moments_match_float64_step_by_step(backend_device, amsgrad, decoupled):
    """Teacher forcing: every step is compared with a float64 step from the very state our
    optimizer holds, so each is held to one bf16 rounding of the moments and fp32 noise of the
    param (a second rounding, or math in bf16, fails it)."""
    _, device = backend_device
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(BIG, device=device))
    small = torch.nn.Parameter(torch.randn(7, device=device))
    cls = FusedAdamW if decoupled else FusedAdam
    lr, wd = 1e-2, 0.1
    opt = cls([p, small], lr=lr, weight_decay=wd, amsgrad=amsgrad, state_format="bf16")
    for t in range(1, STEPS + 1):
        g = torch.randn(BIG, device=device) * (0.1 + t)
        p.grad = g.clone()
        small.grad = torch.randn(7, device=device)
        st = opt.state[p]
        zeros = torch.zeros(BIG, dtype=torch.float64)
        m0 = st["exp_avg"].cpu() if st else zeros
        v0 = st["exp_avg_sq"].cpu() if st else zeros
        x0 = (st["max_exp_avg_sq"].cpu() if st else zeros) if amsgrad else None
        want_p, want_m, want_v, want_x = sim_step(p.detach().cpu(), g.cpu(), m0, v0, x0, t, lr, (0.9, 0.999), 1e-8,
                                                  wd, amsgrad, decoupled)
        opt.step()
        st = opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
        assert_one_bf16_rounding(st["exp_avg"], want_m, f"step {t} exp_avg")
        assert_one_bf16_rounding(st["exp_avg_sq"], want_v, f"step {t} exp_avg_sq", sr_bits_v(t, (BIG,)))
        if amsgrad:  # the max of the unrounded exp_avg_sq, to nearest
            assert st["max_exp_avg_sq"].dtype == torch.bfloat16
            assert_one_bf16_rounding(st["max_exp_avg_sq"], want_x, f"step {t} max_exp_avg_sq")
        err = (p.detach().double().cpu() - want_p).abs()
        bound = 2e-6 * want_p.abs() + 1e-6 * lr
        assert (err <= bound).all(), f"step {t}: param off by {err.max():.3e}"
    assert opt.state[small]["exp_avg"].dtype == torch.float32  # below LEAN_MIN_NUMEL


def test_formats_per_param_group_and_state_bytes(backend_device):
    _, device = backend_device
    a = torch.nn.Parameter(torch.randn(64, 128, device=device))
    b = torch.nn.Parameter(torch.randn(64, 128, device=device))
    c = torch.nn.Parameter(torch.randn(10, device=device))
    opt = FusedAdamW([{"params": [a], "state_format": "fp32"}, {"params": [b, c]}], state_format="bf16")
    for t in (a, b, c):
        t.grad = torch.randn_like(t)
    opt.step()
    assert opt.param_groups[0]["state_format"] == "fp32" and opt.param_groups[1]["state_format"] == "bf16"

    def bytes_per_param(t):
        st = opt.state[t]
        return sum(st[k].numel() * st[k].element_size() for k in ("exp_avg", "exp_avg_sq")) / t.numel()

    assert bytes_per_param(a) == 8 and bytes_per_param(b) == 4 and bytes_per_param(c) == 8


def test_bf16_params_with_master_weights_and_bf16_moments(backend_device):
    _, device = backend_device
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(BIG, device=device).to(torch.bfloat16))
    opt = FusedAdamW([p], lr=1e-3, master_weights=True, state_format="bf16")
    grads = [torch.randn(BIG, device=device) for _ in range(STEPS)]
    for g in grads:
        p.grad = g.to(torch.bfloat16)
        opt.step()
    st = opt.state[p]
    assert st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(p.detach(), st["master_param"].to(torch.bfloat16))
    # the master follows fp32 math from the bf16 moments (one step of it checked exactly)
    g = torch.randn(BIG, device=device).to(torch.bfloat16)
    want_p, want_m, _, _ = sim_step(st["master_param"].cpu(), g.cpu(), st["exp_avg"].cpu(), st["exp_avg_sq"].cpu(),
                                    None, STEPS + 1, 1e-3, (0.9, 0.999), 1e-8, 1e-2, False)
    p.grad = g
    opt.step()
    assert_one_bf16_rounding(st["exp_avg"], want_m, "exp_avg")
    assert ((st["master_param"].double().cpu() - want_p).abs() <= 2e-6 * want_p.abs() + 1e-9).all()
    assert torch.equal(p.detach(), st["master_param"].to(torch.bfloat16))


def test_found_inf_skips_bit_identically(backend_device):
    _, device = backend_device
    p = torch.nn.Parameter(torch.randn(BIG, device=device))
    opt = FusedAdamW([p], state_format="bf16", amsgrad=True)
    p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(opt, [p])
    scaler = fusedtrain.GradScaler(device, init_scale=4.0)
    scaler.scale(torch.ones((), device=device))
    p.grad = torch.randn_like(p)
    p.grad[3] = float("inf")
    scaler.step(opt)
    assert_unchanged(before, opt, [p], "a skipped step")


def test_state_dict_round_trip_is_bit_exact(backend_device):
    _, device = backend_device
    torch.manual_seed(2)

    def make():
        p = torch.nn.Parameter(torch.arange(BIG, device=device, dtype=torch.float32) / BIG)
        return p, FusedAdamW([p], lr=1e-2, state_format="bf16")

    grads = [torch.randn(BIG, device=device) for _ in range(6)]
    p1, o1 = make()
    for g in grads:
        p1.grad = g.clone()
        o1.step()
    p2, o2 = make()
    for g in grads[:3]:
        p2.grad = g.clone()
        o2.step()
    sd = o2.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == torch.bfloat16 and sd["param_groups"][0]["state_format"] == "bf16"
    p3, o3 = make()
    with torch.no_grad():
        p3.copy_(p2)
    o3.load_state_dict(sd)
    assert o3.state[p3]["exp_avg"].dtype == torch.bfloat16
    for g in grads[3:]:
        p3.grad = g.clone()
        o3.step()
    assert torch.equal(p1, p3)
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(o1.state[p1][k], o3.state[p3][k])


def test_torch_checkpoints_convert_both_ways():
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(BIG))
    ref = torch.optim.AdamW([p], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        ref.step()
    q = torch.nn.Parameter(p.detach().clone())
    ours = FusedAdamW([q], lr=1e-2, state_format="bf16")
    ours.load_state_dict(ref.state_dict())  # quantizes torch's fp32 moments to bf16
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours.state[q][k], ref.state[p][k].to(torch.bfloat16))
    back = torch.optim.AdamW([torch.nn.Parameter(q.detach().clone())], lr=1e-2)
    back.load_state_dict(torch_state_dict(ours.state_dict()))
    st = next(iter(back.state.values()))
    assert st["exp_avg"].dtype == torch.float32
    assert torch.equal(st["exp_avg"], ours.state[q]["exp_avg"].float())


def test_bad_formats_are_clear_errors():
    p = torch.nn.Parameter(torch.randn(LEAN_MIN_NUMEL))
    with pytest.raises(ValueError, match="state_format must be one of"):
        FusedAdamW([p], state_format="int4")
    with pytest.raises(ValueError, match="state_format must be one of"):
        FusedAdamW([{"params": [p], "state_format": "fp8"}])
    c = torch.nn.Parameter(torch.randn(LEAN_MIN_NUMEL, dtype=torch.complex64))
    c.grad = torch.randn_like(c)
    opt = FusedAdamW([c], state_format="bf16")
    with pytest.raises(ValueError, match="state_format='bf16' is for float32"):
        opt.step()
    assert not opt.state[c]  # nothing created


def test_op_accepts_bf16_states_and_rejects_others(backend_device):
    _, device = backend_device
    p = [torch.randn(33, device=device)]
    g = [torch.randn(33, device=device)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled_weight_decay=True)
    steps = [torch.zeros((), device=device)]
    fusedtrain.ops.adam.adam_(p, g, [torch.zeros(33, device=device, dtype=torch.bfloat16)],
                              [torch.zeros(33, device=device, dtype=torch.bfloat16)], [], steps, **kw)
    assert steps[0].item() == 1
    backend, _ = backend_device
    op = fusedtrain.ops.adam._OPS[backend]  # the op itself (the functional form rounds the bf16-state calls only)
    with pytest.raises(ValueError, match="stochastic rounding of exp_avg_sq is for bf16 states"):
        op(p, g, [torch.zeros(33, device=device)], [torch.zeros(33, device=device)], [], steps, [], [], [], [], 1e-3,
           None, 0.9,
           0.999, 1e-8, 0.0, False, False, True, None, None, 5, False, True)
    with pytest.raises(TypeError, match="param dtype, fp32, bf16 or uint8"):
        fusedtrain.ops.adam.adam_(p, g, [torch.zeros(33, device=device, dtype=torch.float16)],
                                  [torch.zeros(33, device=device, dtype=torch.float16)], [], steps, **kw)


# ---- stochastic rounding -----------------------------------------------------------------------

def _sr_step(device, n, seed, lr=2.0 ** -10, value=1.0, steps=1, threads=None):
    p = torch.nn.Parameter(torch.full((n,), value, device=device, dtype=torch.bfloat16))
    opt = FusedAdamW([p], lr=lr, weight_decay=0.0, stochastic_rounding=True, sr_seed=seed)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
    finally:
        torch.set_num_threads(old)
    return p.detach(), opt


def test_stochastic_rounding_is_unbiased(backend_device):
    """One AdamW step from 1.0 with a constant gradient moves every element by lr (1/8 of a bf16
    ulp below 1.0): round-to-nearest leaves 1.0 everywhere; stochastic rounding gives 1 - 2^-8
    with probability 1/4, so the mean is 1 - lr within a few standard errors."""
    _, device = backend_device
    n = 1 << 16 if not INTERPRET else 1 << 13
    lr = 2.0 ** -10
    p, _ = _sr_step(device, n, seed=7, lr=lr)
    vals = set(p.float().unique().tolist())
    assert vals <= {1.0, 1.0 - 2.0 ** -8}, vals
    exact = 1.0 - lr / (1 + 1e-8)
    q = (1.0 - exact) / 2.0 ** -8  # the probability of rounding down
    se = 2.0 ** -8 * (q * (1 - q) / n) ** 0.5
    mean = p.double().mean().item()
    assert abs(mean - exact) < 5 * se, f"mean {mean!r}, exact {exact!r}, standard error {se:.2e}"
    nearest = torch.nn.Parameter(torch.ones(n, device=device, dtype=torch.bfloat16))
    opt = FusedAdamW([nearest], lr=lr, weight_decay=0.0)
    nearest.grad = torch.ones_like(nearest)
    opt.step()
    assert (nearest == 1).all()  # what stochastic rounding is for


def test_stochastic_rounding_is_reproducible(backend_device):
    _, device = backend_device
    n = 5000
    a, _ = _sr_step(device, n, seed=3, steps=3)
    b, _ = _sr_step(device, n, seed=3, steps=3, threads=1)
    c, _ = _sr_step(device, n, seed=4, steps=3)
    assert torch.equal(a, b)  # same seed: the same bits, whatever the thread count
    assert not torch.equal(a, c)
    # a resume from a state_dict rounds as the uninterrupted run does
    p1, o1 = _sr_step(device, n, seed=9, steps=1)
    sd = o1.state_dict()
    assert sd["param_groups"][0]["sr_seed"] == 9 and sd["param_groups"][0]["stochastic_rounding"] is True
    p2 = torch.nn.Parameter(p1.clone())
    o2 = FusedAdamW([p2], lr=2.0 ** -10, weight_decay=0.0, stochastic_rounding=True, sr_seed=123)
    o2.load_state_dict(sd)
    for _ in range(2):
        p2.grad = torch.ones_like(p2)
        o2.step()
    p3, _ = _sr_step(device, n, seed=9, steps=3)
    assert torch.equal(p2.detach(), p3)


def test_stochastic_rounding_bits_agree_with_the_reference(backend_device):
    """The hash is integer arithmetic: every backend draws the reference's bits for every
    tensor, an unaligned view among them (the Triton backend launches those separately), with
    lean moments too (the fp32 value they round may differ from the reference's in its last
    bit from FMA contraction: then an element rounds the other way, rarely)."""
    backend, device = backend_device
    torch.manual_seed(5)
    sizes = (4099, 4100, 5000)
    out = {}
    for b in (backend, "reference"):
        torch.manual_seed(6)
        with fusedtrain.use_backend(b):
            buf = torch.randn(sum(sizes) + 1, device=device).to(torch.bfloat16)
            views = [buf[0:4099], buf[4100:8200], buf[8200:13200]]  # the second starts off 16 bytes
            ps = [torch.nn.Parameter(v) for v in views]
            opt = FusedAdamW(ps, lr=1e-3, stochastic_rounding=True, sr_seed=11, state_format="bf16")
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()
            out[b] = [(p.detach().clone(), opt.state[p]["exp_avg_sq"].clone()) for p in ps]
    for k, ((p, v), (rp, rv)) in enumerate(zip(out[backend], out["reference"])):
        assert (p == rp).double().mean().item() > 0.999, f"param {k}"
        assert (v == rv).double().mean().item() > 0.999, f"exp_avg_sq {k}"


def test_stochastic_rounding_keeps_nan_and_inf(backend_device):
    """Non-finite grads through the stochastically rounded stores (bf16 params without master
    copies, a bf16 exp_avg_sq), in the vector body and in the last partial vector: the param
    and exp_avg_sq are NaN / inf exactly where the reference's are (an inf grad makes the param
    NaN, inf / inf, and exp_avg_sq +inf), and nothing else turns non-finite."""
    backend, device = backend_device
    n = LEAN_MIN_NUMEL + 37
    bad = {5: float("nan"), 700: float("inf"), 1500: -float("inf"), n - 3: float("nan"), n - 1: float("inf")}
    out = {}
    for b in (backend, "reference"):
        with fusedtrain.use_backend(b):
            gen = torch.Generator().manual_seed(3)
            p = torch.nn.Parameter(torch.randn(n, generator=gen).to(device, torch.bfloat16))
            opt = FusedAdamW([p], lr=1e-3, stochastic_rounding=True, state_format="bf16")
            g = torch.randn(n, generator=gen)
            for i, x in bad.items():
                g[i] = x
            p.grad = g.to(device, torch.bfloat16)
            opt.step()
            out[b] = (p.detach().float().cpu(), opt.state[p]["exp_avg_sq"].float().cpu())
    where = torch.zeros(n, dtype=torch.bool)
    where[list(bad)] = True
    for what, got, want in zip(("param", "exp_avg_sq"), out[backend], out["reference"]):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), what
        assert torch.equal(got[got.isinf()], want[want.isinf()]), what  # the sign of an inf
        assert torch.equal(~got.isfinite(), where), what
    assert out[backend][1].isinf().sum() == 3  # exp_avg_sq +inf at the three inf grads


def test_no_two_tensors_share_rounding_bits():
    """Two identical tensors in two param groups, and two in one group, round independently
    (the bits hash the group's and the call's index and the tensor's position)."""
    def decisions(groups):
        params = [torch.nn.Parameter(torch.full((8192,), 1.0, dtype=torch.bfloat16)) for _ in range(2)]
        opt = FusedAdamW([{"params": [p]} for p in params] if groups else params, lr=2.0 ** -10,
                         weight_decay=0.0, stochastic_rounding=True)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        return [(p != 1).double() for p in params]

    for groups in (True, False):
        a, b = decisions(groups)
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 0.05, (groups, corr)


def test_stochastic_rounding_errors_name_the_option():
    with pytest.raises(ValueError, match="stochastic_rounding=True is for bf16 params"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3))], stochastic_rounding=True)
    with pytest.raises(ValueError, match="master_weights"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3).bfloat16())], stochastic_rounding=True, master_weights=True)
    p = [torch.randn(3)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled_weight_decay=True)
    for backend in ("native", "reference"):
        with fusedtrain.use_backend(backend):
            with pytest.raises(ValueError, match="stochastic rounding"):
                fusedtrain.ops.adam.adam_(p, [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], [],
                                          [torch.zeros(())], **kw, sr_seed=1, sr_params=True)


def test_bf16_exp_avg_sq_decays_as_fp32_does(backend_device):
    """exp_avg_sq moves by (1 - beta2) = 1e-3 of itself a step, less than half a bf16 ulp:
    rounded to nearest it would never decay (a running max); stochastically rounded (the lean
    format's, and bf16 params' own under stochastic_rounding) it follows the fp32 run."""
    _, device = backend_device
    # (the interpreter: 200 steps, 47 s -> ~15 s; fp32 then decays to ~0.83 of its start, and
    # rounded to nearest the bf16 run would stay at 1.0)
    n, steps, decayed = (8192, 600, 0.6) if not INTERPRET else (4096, 200, 0.86)
    runs = {}
    for fmt in ("fp32", "bf16", "bf16 params, stochastic rounding"):
        sr = fmt.startswith("bf16 params")
        p = torch.nn.Parameter(torch.zeros(n, device=device, dtype=torch.bfloat16 if sr else torch.float32))
        opt = FusedAdamW([p], lr=0.0, weight_decay=0.0, **({"stochastic_rounding": True} if sr else
                                                             {"state_format": fmt}))
        for t in range(steps):
            p.grad = torch.full_like(p, 1.0 if t < 10 else 0.01)
            opt.step()
        runs[fmt] = opt.state[p]["exp_avg_sq"].double().mean().item()
    assert runs["fp32"] < decayed * 9.95e-3  # it decayed
    assert abs(runs["bf16"] / runs["fp32"] - 1) < 0.02, runs
    # bf16 params keep bf16 moments: with stochastic_rounding their exp_avg_sq is rounded so too
    assert abs(runs["bf16 params, stochastic rounding"] / runs["fp32"] - 1) < 0.02, runs


def test_loading_a_checkpoint_without_our_keys_keeps_the_groups_settings():
    p = torch.nn.Parameter(torch.randn(BIG))
    ref = torch.optim.AdamW([p])
    p.grad = torch.randn_like(p)
    ref.step()
    q = torch.nn.Parameter(p.detach().clone())
    ours = FusedAdamW([{"params": [q], "state_format": "bf16", "sr_seed": 77}])
    ours.load_state_dict(ref.state_dict())
    g = ours.param_groups[0]
    assert g["state_format"] == "bf16" and g["sr_seed"] == 77
    assert ours.state[q]["exp_avg"].dtype == torch.bfloat16


def test_a_refused_param_group_leaves_nothing_behind():
    opt = FusedAdamW([torch.nn.Parameter(torch.randn(3).bfloat16())], stochastic_rounding=True)
    for bad, exc in (({"stochastic_rounding": True, "params": [torch.nn.Parameter(torch.randn(3))]}, ValueError),
                     ({"state_format": "int4", "params": [torch.nn.Parameter(torch.randn(3))]}, ValueError),
                     ({"sr_seed": -1, "params": [torch.nn.Parameter(torch.randn(3).bfloat16())]}, ValueError),
                     ({"sr_seed": 2 ** 32, "params": [torch.nn.Parameter(torch.randn(3).bfloat16())]}, ValueError)):
        with pytest.raises(exc):
            opt.add_param_group(bad)
    assert len(opt.param_groups) == 1
