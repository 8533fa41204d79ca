"""The one-read AMP step: scaler.step(opt, max_norm=...) / fusedtrain.clipped_step_ against
torch's scaler.unscale_(opt); clip_grad_norm_(params, max_norm); scaler.step(opt);
scaler.update() with torch.optim.AdamW, over 300 steps with inf/NaN injected."""
import pytest
import torch

import fusedtrain
from helpers import INTERPRET

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

STEPS = 60 if INTERPRET else 300
SHAPES = [(33, 17), (64,), (5, 3, 7), (1,)]
LR, WD = 2e-3, 0.05


class TorchScaler(torch.amp.GradScaler):
    """torch's scaler, allowed to unscale fp16 gradients (torch refuses them in unscale_; the
    composition is otherwise exactly torch's)."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def _grads(step, dtype, scale, device, g):
    """Synthetic scaled gradients for one step (independent of the params, so both runs see
    identical gradients), some steps with an inf or a NaN in a random element."""
    grads = [(torch.randn(s, generator=g) * scale).to(device, dtype) for s in SHAPES]
    r = torch.rand(3, generator=g)
    if r[0] < 0.08:
        i = int(r[1] * len(SHAPES))
        grads[i].view(-1)[int(r[2] * grads[i].numel())] = float("inf") if r[2] < 0.5 else float("nan")
    return grads


def _race(device, dtype, master, max_norm, unscale_first=False, eps=1e-8):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    ours = [p.to(device, dtype).clone().requires_grad_() for p in init]
    # torch side: fp32 params when ours keep fp32 masters (the master is what torch's fp32
    # params are), otherwise the same dtype as ours
    tdtype = torch.float32 if master else dtype
    theirs = [p.to(dtype).to(device, tdtype).clone().requires_grad_() for p in init]
    opt = fusedtrain.FusedAdamW(ours, lr=LR, weight_decay=WD, eps=eps, master_weights=master)
    topt = torch.optim.AdamW(theirs, lr=LR, weight_decay=WD, eps=eps, foreach=False)
    scaler = fusedtrain.GradScaler(device, init_scale=2.0 ** 8, growth_interval=9)
    tscaler = TorchScaler(device, init_scale=2.0 ** 8, growth_interval=9)
    norms, tnorms, scales, tscales = [], [], [], []
    one = torch.ones((), device=device)
    for step in range(STEPS):
        scaler.scale(one), tscaler.scale(one)  # as a loss would be scaled (creates the scale lazily)
        grads = _grads(step, dtype, scaler.get_scale(), device, g)
        for p, q, gr in zip(ours, theirs, grads):
            p.grad = gr.clone()
            q.grad = gr.to(tdtype)
        if unscale_first:
            scaler.unscale_(opt)
        norms.append(scaler.step(opt, max_norm=max_norm))
        scaler.update()
        tscaler.unscale_(topt)
        tnorms.append(torch.nn.utils.clip_grad_norm_(theirs, max_norm))
        tscaler.step(topt)
        tscaler.update()
        scales.append(scaler.get_scale())
        tscales.append(tscaler.get_scale())
    return opt, topt, ours, theirs, torch.stack(norms), torch.stack(tnorms).float(), scales, tscales


CASES = [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
         (torch.bfloat16, True), (torch.float16, True)]


@pytest.mark.parametrize("dtype,master", CASES, ids=[f"{str(d)[6:]}{'-master' if m else ''}" for d, m in CASES])
@pytest.mark.parametrize("clip", ["active", "inactive"])
def test_matches_torch_unscale_clip_step_update(backend_device, dtype, master, clip):
    _, device = backend_device
    max_norm = 0.5 if clip == "active" else 1e9
    opt, topt, ours, theirs, norms, tnorms, scales, tscales = _race(device, dtype, master, max_norm)
    assert scales == tscales, "loss-scale sequences differ"
    finite = torch.isfinite(tnorms)
    assert torch.equal(finite, torch.isfinite(norms)), "a skipped step was not reported by a nonfinite norm"
    assert (~finite).sum() > 3 and finite.sum() > STEPS // 2, "the injections did not exercise both paths"
    # torch takes the norm of low-precision grads in their dtype (foreach_norm rounds): compare
    # to that rounding; fp32 to fp32 rounding
    rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(norms[finite].cpu(), tnorms[finite].cpu(), rtol=rtol, atol=0)
    if clip == "active":
        assert (tnorms[finite] > max_norm).all(), "clipping was not active"
    for i, (p, q) in enumerate(zip(ours, theirs)):
        if master:
            m = opt.state[p]["master_param"]
            assert m.dtype == torch.float32
            # the fp32 master follows torch's fp32 params (grads differ only by the
            # low-precision rounding of the norm in torch's clip), and the param is its rounding
            torch.testing.assert_close(m, q.detach(), rtol=1e-3, atol=1e-4, msg=f"master {i}")
            assert torch.equal(p.detach(), m.to(dtype)), f"param {i} is not its master rounded"
        elif dtype == torch.float32:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=2e-6, msg=f"param {i}")
        elif dtype == torch.float16:
            # torch's all-fp16 AdamW does its arithmetic in fp16, where eps=1e-8 is 0 and small
            # second moments underflow (test_fp16_default_eps_stays_finite): its parameters are
            # no yardstick. Ours must equal the same algorithm on the reference backend (fp32
            # math, one rounding per store) to within one unit in the last place.
            if i == 0:
                with fusedtrain.use_backend("reference"):
                    ref_params = _race(device, dtype, master, max_norm)[2]
            ulp = torch.finfo(dtype).eps * ref_params[i].detach().float().abs().max().item()
            diff = (p.detach().float() - ref_params[i].detach().float()).abs().max().item()
            assert diff <= ulp, f"param {i}: max diff {diff:.3e} from the reference backend > 1 ulp ({ulp:.3e})"
            continue
        else:
            # torch rounds every intermediate to the param dtype, we round once: the
            # trajectories may part by a rounding now and then; allow two units in the last
            # place of the tensor's largest value
            ulp = torch.finfo(dtype).eps * q.detach().float().abs().max().item()
            diff = (p.detach().float() - q.detach().float()).abs().max().item()
            assert diff <= 2 * ulp, f"param {i}: max diff {diff:.3e} > 2 ulp ({ulp:.3e})"
        if dtype == torch.float32 or master:
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][k], topt.state[q][k], rtol=1e-4, atol=1e-7)


def test_fp16_default_eps_stays_finite(backend_device):
    """All-fp16 params and states with the default eps=1e-8: a gradient so small that its
    second moment underflows fp16 leaves torch's fp16 arithmetic dividing by 0 + 0 (eps rounds
    to 0 in fp16); fusedtrain computes in fp32 and stays finite."""
    _, device = backend_device
    p = torch.ones(64, device=device, dtype=torch.float16, requires_grad=True)
    opt = fusedtrain.FusedAdamW([p], lr=1e-3)
    scaler = fusedtrain.GradScaler(device, init_scale=2.0 ** 8)
    for step in range(20):
        scaler.scale(torch.ones((), device=device))
        p.grad = torch.full((64,), 1e-6 * 2 ** 8, device=device, dtype=torch.float16)
        p.grad[::2] = 0.01 * 2 ** 8
        scaler.step(opt, max_norm=1.0)
        scaler.update()
    assert torch.isfinite(p).all()
    assert torch.isfinite(opt.state[p]["exp_avg_sq"]).all()


def test_unscale_first_then_clipped_step(backend_device):
    _, device = backend_device
    opt, topt, ours, theirs, norms, tnorms, scales, tscales = _race(device, torch.float32, False, 0.5, unscale_first=True)
    assert scales == tscales
    finite = torch.isfinite(tnorms)
    torch.testing.assert_close(norms[finite].cpu(), tnorms[finite].cpu(), rtol=1e-5, atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=2e-6)


def test_grads_left_as_the_user_left_them(backend_device):
    _, device = backend_device
    p = torch.randn(100, device=device, requires_grad=True)
    opt = fusedtrain.FusedAdamW([p], lr=1e-2)
    scaler = fusedtrain.GradScaler(device, init_scale=1024.0)
    scaler.scale(torch.ones((), device=device))
    p.grad = torch.randn(100, device=device) * 1024
    scaled = p.grad.clone()
    scaler.step(opt, max_norm=0.1)
    assert torch.equal(p.grad, scaled), "the one-read step wrote the gradients"
    scaler.update()
    scaler.scale(torch.ones((), device=device))
    p.grad = torch.randn(100, device=device) * 1024
    scaler.unscale_(opt)
    unscaled = p.grad.clone()
    scaler.step(opt, max_norm=0.1)
    assert torch.equal(p.grad, unscaled)


def test_no_host_read_in_the_step(backend_device, monkeypatch):
    """Nothing in scale -> backward -> step(max_norm) -> update reads a tensor on the host
    (on CUDA that would be a sync; here every host read is made to fail)."""
    _, device = backend_device
    model = torch.nn.Linear(8, 4).to(device)
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=1e-3)
    scaler = fusedtrain.GradScaler(device)
    x = torch.randn(16, 8, device=device)
    for _ in range(2):  # the first step creates the optimizer state
        loss = model(x).square().mean()
        scaler.scale(loss).backward()

        def no_host_read(*a, **k):
            raise AssertionError("host read of a tensor during the AMP step")

        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
                m.setattr(torch.Tensor, name, no_host_read)
            norm = scaler.step(opt, max_norm=1.0)
            scaler.update()
        assert norm.shape == () and norm.dtype == torch.float32 and norm.device.type == torch.device(device).type
        opt.zero_grad()


def test_functional_form_and_errors(backend_device):
    _, device = backend_device
    p = torch.randn(10, device=device, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = fusedtrain.FusedAdamW([p], lr=1e-2)
    topt = torch.optim.AdamW([q], lr=1e-2, foreach=False)
    p.grad = torch.randn(10, device=device) * 4
    q.grad = p.grad.clone() / 4
    found = torch.zeros((), device=device)
    norm = fusedtrain.clipped_step_(opt, 1.0, inv_scale=torch.full((), 0.25, device=device), found_inf=found)
    tnorm = torch.nn.utils.clip_grad_norm_([q], 1.0)
    topt.step()
    torch.testing.assert_close(norm, tnorm)
    torch.testing.assert_close(p, q)
    assert found.item() == 0
    with pytest.raises(TypeError, match="optimizer must be a fusedtrain"):
        fusedtrain.clipped_step_(torch.optim.SGD([q], lr=0.1), 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_of_the_whole_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 8).cuda()
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=1e-3, capturable=True)
    scaler = fusedtrain.GradScaler("cuda")
    x = torch.randn(64, 32, device="cuda")

    def step():
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt, max_norm=1.0)
        scaler.update()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        step()
    before = [p.detach().clone() for p in model.parameters()]
    graph.replay()
    torch.cuda.synchronize()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_cuda_graph_capture_with_lean_states_matches_eager(fmt):
    """The one-read clipped step with lean states captured in a CUDA graph: three replays give
    the bits of three eager steps of a twin (8192-element weight: lean states)."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8)).cuda()
        opt = fusedtrain.FusedAdamW(model.parameters(), lr=1e-3, capturable=True, state_format=fmt, amsgrad=True)
        return model, opt, fusedtrain.GradScaler("cuda", init_scale=2.0 ** 10)

    x = torch.randn(64, 64, device="cuda")

    def step(model, opt, scaler):
        opt.zero_grad(set_to_none=False)  # captured too: every replay starts from zero grads
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt, max_norm=1.0)
        scaler.update()

    models = [make(), make()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for m in models:
            for _ in range(3):
                step(*m)
    torch.cuda.current_stream().wait_stream(s)
    model, opt, scaler = models[0]
    assert opt.state[model[0].weight]["exp_avg"].dtype == (torch.uint8 if fmt == "8bit" else torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt, scaler)
    twin, topt, tscaler = models[1]
    for _ in range(3):
        graph.replay()
        step(twin, topt, tscaler)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, topt.state[twin[0].weight][k]), k


def test_scaler_clip_grad_norm_as_clipping_turns_on_and_off(backend_device):
    """GradScaler.clip_grad_norm_ plans its passes from the previous call (on CPU: unscale in
    the norm pass while clipping is off); every on/off sequence must give torch's gradients."""
    _, device = backend_device
    g = torch.Generator().manual_seed(5)
    ours = [torch.zeros(s, device=device, requires_grad=True) for s in SHAPES]
    theirs = [torch.zeros(s, device=device, requires_grad=True) for s in SHAPES]
    opt, topt = torch.optim.SGD(ours, lr=0.0), torch.optim.SGD(theirs, lr=0.0)
    scaler = fusedtrain.GradScaler(device, init_scale=2.0 ** 6)
    tscaler = torch.amp.GradScaler(device, init_scale=2.0 ** 6)
    for max_norm in [1e9, 1e9, 0.1, 0.1, 1e9, 0.1, 1e9]:
        scaler.scale(torch.ones((), device=device)), tscaler.scale(torch.ones((), device=device))
        for p, q in zip(ours, theirs):
            p.grad = (torch.randn(p.shape, generator=g) * 64).to(device)
            q.grad = p.grad.clone()
        norm = scaler.clip_grad_norm_(opt, max_norm)
        tscaler.unscale_(topt)
        tnorm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        torch.testing.assert_close(norm, tnorm, rtol=1e-6, atol=0)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)
        scaler.step(opt), tscaler.step(topt)
        scaler.update(), tscaler.update()


def test_step_goes_through_optimizer_step(backend_device):
    """GradScaler reaches FusedAdamW through optimizer.step(): step hooks run and LR
    schedulers see the step (no "lr_scheduler.step() before optimizer.step()" warning)."""
    import warnings

    _, device = backend_device
    p = torch.randn(10, device=device, requires_grad=True)
    opt = fusedtrain.FusedAdamW([p], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    scaler = fusedtrain.GradScaler(device, init_scale=4.0)
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for max_norm in (None, 1.0):
            scaler.scale(p.sum()).backward()
            scaler.step(opt, max_norm=max_norm)
            scaler.update()
            sched.step()
            opt.zero_grad()
    assert len(seen) == 2
