"""fusedtrain.GradScaler against torch.amp.GradScaler: same scales, same skipped steps, same
parameters, on every backend present."""
import copy
import pickle

import pytest
import torch

import fusedtrain
from fusedtrain.amp import OptState
from helpers import INTERPRET

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")]

STEPS = 300
# The Triton interpreter costs milliseconds per launch: under it the 300-step race runs for the
# plain SGD loop, and the other loops run 100 steps.
SHORT = 100 if INTERPRET else STEPS


def _has_fused_adamw():
    try:
        fusedtrain.FusedAdamW([torch.nn.Parameter(torch.zeros(1))])
    except NotImplementedError:
        return False
    return True


def _model(dtype, device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device, dtype)


def _make_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if kind == "adam_fused":
        return torch.optim.Adam(params, lr=1e-3, fused=True)
    if kind == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    if kind == "fused_adamw":
        return fusedtrain.FusedAdamW(params, lr=1e-3, weight_decay=1e-2)
    raise ValueError(kind)


class _Run:
    """One model + optimizer + scaler, fed identical batches and identical injections."""

    def __init__(self, scaler_cls, opt_kind, dtype, device, mode):
        self.model = _model(dtype, device)
        self.opt = _make_opt(opt_kind, self.model.parameters())
        self.scaler = scaler_cls(device, init_scale=2.0**10, growth_interval=7)
        self.mode, self.device, self.dtype = mode, device, dtype
        self.scales, self.skipped, self.norms = [], [], []

    def step(self, batches, inject):
        self.opt.zero_grad(set_to_none=True)
        for k, (x, y) in enumerate(batches):
            loss = torch.nn.functional.mse_loss(self.model(x).float(), y)
            self.scaler.scale(loss).backward()
            for (when, pi, idx, val) in inject:
                if when == k:
                    p = list(self.model.parameters())[pi]
                    p.grad.view(-1)[idx % p.numel()] = val
        before = [p.detach().clone() for p in self.model.parameters()]
        if self.mode in ("plain", "accumulate"):
            self.scaler.step(self.opt)
        elif self.mode == "torch_clip":
            self.scaler.unscale_(self.opt)
            self.norms.append(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0).float())
            self.scaler.step(self.opt)
        elif self.mode == "fused_clip":
            if isinstance(self.scaler, fusedtrain.GradScaler):
                self.norms.append(self.scaler.clip_grad_norm_(self.opt, 1.0))
            else:
                self.scaler.unscale_(self.opt)
                self.norms.append(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0).float())
            self.scaler.step(self.opt)
        self.scaler.update()
        self.scales.append(self.scaler.get_scale())
        self.skipped.append(all(torch.equal(a, p) for a, p in zip(before, self.model.parameters())))


def _race(opt_kind, dtype, device, mode, exact=True, steps=SHORT, ours_opt_kind=None):
    ours = _Run(fusedtrain.GradScaler, ours_opt_kind or opt_kind, dtype, device, mode)
    ref = _Run(torch.amp.GradScaler, opt_kind, dtype, device, mode)
    g = torch.Generator().manual_seed(1234)
    n_params = len(list(ours.model.parameters()))
    n_micro = 2 if mode == "accumulate" else 1
    bad_values = [float("inf"), float("-inf"), float("nan")]
    for step in range(steps):
        batches = [(torch.randn(8, 16, generator=g).to(device, dtype), torch.randn(8, 4, generator=g).to(device))
                   for _ in range(n_micro)]
        inject = []
        if torch.rand((), generator=g) < 0.12:
            inject.append((int(torch.randint(n_micro, (), generator=g)), int(torch.randint(n_params, (), generator=g)),
                           int(torch.randint(10**6, (), generator=g)), bad_values[int(torch.randint(3, (), generator=g))]))
        ours.step(batches, inject)
        ref.step(batches, inject)
        assert ours.scales == ref.scales, f"step {step}: scales {ours.scales[-3:]} vs torch {ref.scales[-3:]}"
        assert ours.skipped == ref.skipped, f"step {step}: skipped steps differ"
        for a, b in zip(ours.model.parameters(), ref.model.parameters()):
            if exact:
                assert torch.equal(a, b), f"step {step}: parameters differ"
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"step {step}: parameters differ")
    assert any(ref.skipped) and not all(ref.skipped)
    pairs = list(zip(ref.scales, ref.scales[1:]))
    assert any(b > a for a, b in pairs) and any(b < a for a, b in pairs)  # it grew and backed off
    if ref.norms:
        for a, b in zip(ours.norms, ref.norms):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0, equal_nan=True)
    return ours, ref


@pytest.mark.parametrize("mode", ["plain", "accumulate", "torch_clip"])
def test_300_steps_match_torch_sgd(backend_device, mode):
    _, device = backend_device
    _race("sgd", torch.float32, device, mode, steps=STEPS if mode == "plain" else SHORT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_300_steps_match_torch_adam(backend_device, dtype):
    _, device = backend_device
    _race("adam", dtype, device, "plain")


def test_300_steps_match_torch_fused_adam(backend_device):
    """torch's own fused optimizer: torch's grad_scale/found_inf protocol, our check pass."""
    _, device = backend_device
    _race("adam_fused", torch.float32, device, "plain")


def test_300_steps_fused_clip_matches_torch_unscale_then_clip(backend_device):
    _, device = backend_device
    _race("sgd", torch.float32, device, "fused_clip", exact=False)


@pytest.mark.skipif(not _has_fused_adamw(), reason="fusedtrain.FusedAdamW is not built yet (NotImplementedError)")
@pytest.mark.parametrize("mode", ["plain", "torch_clip"])
def test_300_steps_fused_adamw_matches_torch(backend_device, mode):
    _, device = backend_device
    _race("adamw_torch", torch.float32, device, mode, exact=False, ours_opt_kind="fused_adamw")


# ---- the grad_mult protocol ------------------------------------------------------------------
class _ScaledOpt(torch.optim.SGD):
    """Records what GradScaler hands a fusedtrain-style optimizer through step()."""
    _step_supports_amp_scaling = True
    _step_supports_grad_mult = True

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.calls = []

    def step(self, closure=None):
        assert getattr(self, "grad_scale", None) is None, "torch's grad_scale protocol used instead"
        grad_mult = self.grad_mult
        self.calls.append((None if grad_mult is None else grad_mult.clone(), self.found_inf.clone()))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_step_scaled_protocol_reads_grads_only(backend_device, grad_dtype):
    _, device = backend_device
    p = torch.nn.Parameter(torch.ones(100, dtype=grad_dtype, device=device))
    opt = _ScaledOpt([p])
    scaler = fusedtrain.GradScaler(device, init_scale=4.0)
    scaler.scale(p.float().sum()).backward()
    g = p.grad.clone()
    scaler.step(opt)
    assert torch.equal(p.grad, g), "gradients must not be written"
    mult, found = opt.calls[-1]
    assert mult.item() == 0.25 and found.item() == 0.0
    scaler.update()
    assert scaler.get_scale() == 4.0
    # an inf: found_inf handed over, scale backs off
    scaler.scale(p.float().sum()).backward()
    p.grad[3] = float("inf")
    scaler.step(opt)
    assert opt.calls[-1][1].item() == 1.0
    scaler.update()
    assert scaler.get_scale() == 2.0
    # after unscale_ (fp32/bf16 only, as torch), grad_mult is None and grads are unscaled
    if grad_dtype != torch.float16:
        opt.zero_grad()
        scaler.scale(p.float().sum()).backward()
        scaler.unscale_(opt)
        assert torch.equal(p.grad, torch.ones_like(p.grad))
        scaler.step(opt)
        assert opt.calls[-1][0] is None and opt.calls[-1][1].item() == 0.0
        scaler.update()


def test_fp16_grads_unscale_raises_like_torch(backend_device):
    _, device = backend_device
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16, device=device))
    opt = torch.optim.SGD([p], lr=0.1)
    for cls in (torch.amp.GradScaler, fusedtrain.GradScaler):
        s = cls(device)
        s.scale(p.float().sum()).backward()
        with pytest.raises(ValueError, match="FP16"):
            s.unscale_(opt)
        p.grad = None


# ---- torch API details ---------------------------------------------------------------------
def test_state_dict_round_trips_with_torch(backend_device):
    _, device = backend_device
    ours, ref = _race("sgd", torch.float32, device, "plain", steps=40)
    sd = ours.scaler.state_dict()
    # torch's five entries, plus the step counts (tests/test_scaler_counters.py)
    counts = {"steps_taken": sum(not s for s in ref.skipped), "steps_skipped": sum(ref.skipped)}
    assert sd == {**ref.scaler.state_dict(), **counts}
    assert set(sd) == {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker",
                       "steps_taken", "steps_skipped"}
    t = torch.amp.GradScaler(device)
    t.load_state_dict(sd)  # torch reads its five entries and ignores the counts
    o = fusedtrain.GradScaler(device)
    o.load_state_dict(ref.scaler.state_dict())  # torch's: the counts start at 0
    assert {**t.state_dict(), "steps_taken": 0, "steps_skipped": 0} == o.state_dict()
    assert t.state_dict() == ref.scaler.state_dict()
    o2 = pickle.loads(pickle.dumps(ours.scaler))
    assert o2.state_dict() == sd and isinstance(o2, fusedtrain.GradScaler)
    assert isinstance(o2, torch.amp.GradScaler)


def test_stage_errors_like_torch(backend_device):
    _, device = backend_device
    p = torch.nn.Parameter(torch.ones(4, device=device))
    opt = torch.optim.SGD([p], lr=0.1)
    s = fusedtrain.GradScaler(device)
    s.scale(p.sum()).backward()
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        s.unscale_(opt)
    s.step(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        s.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        s.unscale_(opt)
    with pytest.raises(RuntimeError, match="Closure"):
        s.step(opt, closure=lambda: 0)
    s.update()


def test_disabled_is_a_passthrough(backend_device):
    _, device = backend_device
    p = torch.nn.Parameter(torch.ones(4, device=device))
    opt = torch.optim.SGD([p], lr=0.5)
    s = fusedtrain.GradScaler(device, enabled=False)
    loss = p.sum()
    assert s.scale(loss) is loss
    loss.backward()
    s.unscale_(opt)
    s.step(opt)
    s.update()
    assert torch.equal(p.detach(), torch.full((4,), 0.5, device=device))
    assert s.get_scale() == 1.0 and s.state_dict() == {} and not s.is_enabled()


def test_empty_parameter_list_and_none_grads(backend_device):
    _, device = backend_device
    s = fusedtrain.GradScaler(device, growth_interval=1, init_scale=8.0)
    s.scale(torch.ones((), device=device))
    for opt in (torch.optim.SGD([{"params": []}], lr=0.1),
                torch.optim.SGD([torch.nn.Parameter(torch.ones(3, device=device))], lr=0.1)):
        s.unscale_(opt)
        s.step(opt)
        assert s.clip_grad_norm_(torch.optim.SGD([{"params": []}], lr=0.1), 1.0).item() == 0.0
        s.update()
    assert s.get_scale() == 32.0


def test_sparse_grads_like_torch(backend_device):
    _, device = backend_device
    runs = []
    for cls in (fusedtrain.GradScaler, torch.amp.GradScaler):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(50, 8, sparse=True).to(device)
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        s = cls(device, init_scale=2.0**8)
        for step in range(6):
            opt.zero_grad()
            idx = torch.randint(50, (12,), generator=torch.Generator().manual_seed(step)).to(device)
            s.scale(emb(idx).square().sum()).backward()
            if step == 3:
                emb.weight.grad = torch.sparse_coo_tensor(emb.weight.grad._indices(),
                                                          emb.weight.grad._values().fill_(float("nan")),
                                                          emb.weight.grad.shape)
            s.step(opt)
            s.update()
        runs.append((emb.weight.detach().clone(), s.get_scale()))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_two_optimizers_one_scaler(backend_device):
    _, device = backend_device
    results = []
    for cls in (fusedtrain.GradScaler, torch.amp.GradScaler):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 4).to(device), torch.nn.Linear(4, 4).to(device)
        oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.Adam(b.parameters(), lr=0.1)
        s = cls(device, growth_interval=2)
        for step in range(8):
            oa.zero_grad(), ob.zero_grad()
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step)).to(device)
            s.scale(b(a(x)).sum()).backward()
            if step == 4:
                b.weight.grad[0, 0] = float("nan")
            s.step(oa)
            s.step(ob)
            s.update()
        results.append([p.detach().clone() for p in list(a.parameters()) + list(b.parameters())] + [s.get_scale()])
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(*results))


def test_clip_grad_norm_after_unscale_and_step_max_norm(backend_device):
    _, device = backend_device
    torch.manual_seed(0)
    m = torch.nn.Linear(32, 32).to(device)
    m2 = copy.deepcopy(m)
    x = torch.randn(16, 32, device=device)
    opt, opt2 = torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)
    s, s2 = fusedtrain.GradScaler(device, init_scale=1024.0), torch.amp.GradScaler(device, init_scale=1024.0)
    s.scale(m(x).square().sum()).backward()
    s2.scale(m2(x).square().sum()).backward()
    s.unscale_(opt)
    n = s.clip_grad_norm_(opt, 0.5)  # already unscaled: clip only
    s2.unscale_(opt2)
    n2 = torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.5)
    torch.testing.assert_close(n, n2, rtol=1e-5, atol=0)
    for p, q in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert s._per_optimizer_states[id(opt)]["stage"] is OptState.UNSCALED
    s.step(opt), s2.step(opt2), s.update(), s2.update()
    # step(max_norm=...) == clip_grad_norm_ then step
    for mm, o, sc in ((m, opt, s), (m2, opt2, s2)):
        o.zero_grad()
        sc.scale(mm(x).square().sum()).backward()
    s.step(opt, max_norm=0.5)
    s2.unscale_(opt2)
    torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.5)
    s2.step(opt2)
    for p, q in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_clip_grad_norm_nonfinite(backend_device):
    _, device = backend_device
    p = torch.nn.Parameter(torch.ones(8, device=device))
    opt = torch.optim.SGD([p], lr=0.1)
    s = fusedtrain.GradScaler(device)
    s.scale(p.sum()).backward()
    p.grad[2] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        s.clip_grad_norm_(opt, 1.0, error_if_nonfinite=True)
    s.update()
    s.scale(p.sum()).backward()
    p.grad[2] = float("nan")
    n = s.clip_grad_norm_(opt, 1.0)
    assert not torch.isfinite(n)
    s.step(opt)  # skipped
    s.update()
    assert torch.equal(p.detach(), torch.ones(8, device=device))


def test_cuda_default_device_without_cuda_disables_like_torch():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        s = fusedtrain.GradScaler()
    assert not s.is_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_host_sync_on_cuda(backend_device):
    _, device = backend_device
    if device != "cuda":
        pytest.skip("CUDA backends only")
    model = _model(torch.float32, device)
    opt = _ScaledOpt(model.parameters())
    s = fusedtrain.GradScaler(device)
    x = torch.randn(8, 16, device=device)
    s.scale(model(x).sum()).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s.step(opt)                      # read-only check + _step_scaled
        s.update()
        s.scale(model(x).sum()).backward()
        s.unscale_(opt)                  # fused unscale
        s.clip_grad_norm_(opt, 1.0)      # check + norm + clip
        s.step(opt)
        s.update()
    finally:
        torch.cuda.set_sync_debug_mode(0)
