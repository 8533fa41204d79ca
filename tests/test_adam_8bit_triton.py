"""The Triton op's 8-bit blockwise states (fusedtrain/triton/adam.py _adam_q8_kernel) against the
native CPU op (csrc/cpu/adam.cpp run_range_q8) on the same inputs: codes equal but for a few
off by one (the C++ build contracts some multiply-adds into FMAs; the float order is
otherwise the same), each block's absmax within 1e-5, params and masters within their
rounding, steps incremented; sizes around the block of 256 and the tile's 16-element
vectors, empty tensors, one call of many tensors, each param dtype with and without master
weights, amsgrad, stochastic rounding of bf16 params, the AMP scalars (a skipped step writes
nothing), non-finite values (a block with a NaN has a NaN absmax), tensors off a 16-byte
boundary, and the GPU's tile of 1024 x 4 elements. Run under the Triton interpreter (CPU
tensors, pytest -m triton_interp); on a GPU the Triton op runs on CUDA copies of the inputs.
Also: every launch of 8-bit, lean (bf16) and stochastically rounded AdamW has an AotSpec that
tests/test_gpu_compile.py compiles and checks for spills."""
import copy

import pytest
import torch

import fusedtrain
from fusedtrain import _ext, reference
from helpers import INTERPRET, seed_for

HAS_CUDA = torch.cuda.is_available()
if not INTERPRET and not HAS_CUDA:
    pytest.skip("the Triton op runs under the interpreter (TRITON_INTERPRET=1, -m triton_interp) or on a GPU",
                allow_module_level=True)
DEVICES = [pytest.param("cpu", id="triton-cpu", marks=pytest.mark.triton_interp)] if INTERPRET else \
    [pytest.param("cuda", id="triton-cuda", marks=pytest.mark.gpu)]
pytestmark = pytest.mark.skipif(_ext._C is None, reason="compares with the native op (extension not built)")

SIZES = [1, 255, 256, 257, 5000, 70000, 0, 4096, 17]
HYPER = dict(lr=1e-2, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False,
             maximize=False, decoupled_weight_decay=True, grad_mult=None, found_inf=None)
# the lists of the op (AdamTensors): params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
# steps, master_params, exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax
P, G, M, V, X, S, W, AM, AV, AX = range(10)
CODES = {M: True, V: False, X: False}  # list -> signed
ABSMAX = {M: AM, V: AV, X: AX}


@pytest.fixture(params=DEVICES)
def device(request):
    import fusedtrain.triton.adam  # noqa: F401  (registers fusedtrain_triton::adam_)

    return request.param


def _magnitudes(n, g):
    """Per element, a scale that varies from block to block over many binades (and one block of
    zeros), so that blocks encode very different absmax."""
    blocks = reference.q8_num_blocks(n)
    per = 10.0 ** (torch.rand(blocks, generator=g) * 6 - 4)
    if blocks > 2:
        per[1] = 0.0
    return per.repeat_interleave(reference.Q8_BLOCK)[:n]


def make_lists(sizes, pdtype, amsgrad, master, seed, step=3.0, offset=0):
    """The op's lists for params of `sizes`: codes and absmax from reference.q8_encode of
    float moments; offset > 0: every tensor a view `offset` elements into a buffer (an
    address off a 16-byte boundary)."""
    g = torch.Generator().manual_seed(seed)

    def view(x):
        if not offset:
            return x
        buf = torch.zeros(x.numel() + offset, dtype=x.dtype)
        buf[offset:] = x
        return buf[offset:]

    lists = [[] for _ in range(10)]
    for n in sizes:
        mag = _magnitudes(n, g)
        p = torch.randn(n, generator=g)
        lists[P].append(view(p.to(pdtype)))
        lists[G].append(view((torch.randn(n, generator=g) * mag).to(pdtype)))
        m = torch.randn(n, generator=g) * mag * 0.3
        v = torch.rand(n, generator=g) * (mag * mag) * 0.1
        codes, absmax = reference.q8_encode(m, True)
        lists[M].append(view(codes))
        lists[AM].append(view(absmax))
        codes, absmax = reference.q8_encode(v, False)
        lists[V].append(view(codes))
        lists[AV].append(view(absmax))
        if amsgrad:
            codes, absmax = reference.q8_encode(v * (1 + torch.rand(n, generator=g)), False)
            lists[X].append(view(codes))
            lists[AX].append(view(absmax))
        lists[S].append(torch.tensor([step]))
        if master:
            lists[W].append(view(p + torch.randn(n, generator=g) * 1e-3))
    return lists


def _to(lists, device):
    """The lists on `device`; a view into a buffer stays one (at the same offset)."""
    def move(t):
        if t.device.type == device or not t.storage_offset():
            return t.to(device)
        buf = torch.empty(t.numel() + t.storage_offset(), dtype=t.dtype, device=device)
        return buf[t.storage_offset():].copy_(t)

    return [[move(t) for t in lst] for lst in lists]


def run_both(lists, device, **kw):
    """(native's lists, Triton's lists) after one step of each from deep copies of `lists`."""
    hyper = dict(HYPER, **kw)
    native = copy.deepcopy(lists)
    torch.ops.fusedtrain.adam_(*native, **hyper)
    ours = copy.deepcopy(lists)
    if device != "cpu":
        ours = _to(ours, device)
        for k in ("lr_tensor", "grad_mult", "found_inf"):
            if hyper[k] is not None:
                hyper[k] = hyper[k].to(device)
    torch.ops.fusedtrain_triton.adam_(*ours, **hyper)
    return native, _to(ours, "cpu")


def _line(codes, signed):
    """Codes on a line where neighbours are one apart: a signed code's sign and magnitude as an
    integer (-0 and +0 both 0)."""
    c = codes.to(torch.int64)
    return torch.where(c >= 128, -(c - 128), c) if signed else c


def assert_codes(native, ours, what):
    """Codes equal, but for fewer than 0.1% off by one code."""
    for k, signed in CODES.items():
        if not native[k]:
            continue
        a = torch.cat([_line(t.reshape(-1), signed) for t in native[k]])
        b = torch.cat([_line(t.reshape(-1), signed) for t in ours[k]])
        d = (a - b).abs()
        assert d.numel() == 0 or d.max() <= 1, f"{what}: list {k} codes off by {d.max()} at {torch.nonzero(d > 1)[:5]}"
        frac = (d > 0).double().mean().item() if d.numel() else 0.0
        assert frac < 1e-3, f"{what}: list {k}: {frac:.2%} of the codes off by one"


def assert_absmax(native, ours, what):
    for k in ABSMAX.values():
        for i, (a, b) in enumerate(zip(native[k], ours[k])):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=0, equal_nan=True,
                                       msg=lambda m: f"{what}: absmax list {k}, tensor {i}: {m}")


def assert_params(native, ours, lr, what):
    """Params (and masters) within one unit of their dtype of the native op's (a value at a
    rounding boundary, or a stochastic rounding's threshold, may go either way after an fp32
    difference in the last bit), all but a few equal; NaN where the native op has NaN."""
    for k in (P, W):
        if not native[k]:
            continue
        a = torch.cat([t.reshape(-1) for t in native[k]])
        b = torch.cat([t.reshape(-1) for t in ours[k]])
        assert a.dtype == b.dtype
        nan = a.isnan()
        assert torch.equal(nan, b.isnan()), f"{what}: list {k}: NaN at other places"
        a, b = a[~nan].double(), b[~nan].double()
        tol = torch.finfo(native[k][0].dtype).eps * a.abs() + lr * 1e-5
        bad = (a - b).abs() > tol
        assert not bad.any(), f"{what}: list {k}: {int(bad.sum())} values off, at most {(a - b).abs().max():.3e}"
        if a.numel():
            assert (a == b).double().mean() > 0.99, f"{what}: list {k}: too many values differ"


def assert_match(lists, native, ours, what, lr=HYPER["lr"]):
    assert_codes(native, ours, what)
    assert_absmax(native, ours, what)
    assert_params(native, ours, lr, what)
    for s0, a, b in zip(lists[S], native[S], ours[S]):
        assert a.item() == b.item() == s0.item() + 1, f"{what}: step {b.item()}, native {a.item()}, was {s0.item()}"


def _cases():
    out = []
    for pdtype, modes in ((torch.float32, ("plain",)), (torch.bfloat16, ("plain", "master", "sr_params")),
                          (torch.float16, ("plain", "master"))):
        for mode in modes:
            for amsgrad in (False, True):
                name = f"{str(pdtype)[6:]}-{mode}{'-amsgrad' if amsgrad else ''}"
                out.append(pytest.param(pdtype, mode, amsgrad, id=name))
    return out


@pytest.mark.parametrize("pdtype,mode,amsgrad", _cases())
def test_step_matches_the_native_op(device, pdtype, mode, amsgrad):
    """One call over tensors of 1, 255, 256, 257, 5000, 70000, 0, 4096 and 17 elements."""
    seed = seed_for("q8-triton", pdtype, mode, amsgrad)
    lists = make_lists(SIZES, pdtype, amsgrad, mode == "master", seed)
    kw = dict(amsgrad=amsgrad)
    if mode == "sr_params":
        kw.update(sr_seed=0x9E3779B9, sr_params=True)
    native, ours = run_both(lists, device, **kw)
    assert_match(lists, native, ours, f"seed {seed}")
    for k in (M, V):  # the step re-encoded the moments (a kernel that wrote nothing fails)
        changed = torch.cat([(a != b).reshape(-1) for a, b in zip(lists[k], ours[k])]).double().mean()
        assert changed > 0.05, f"list {k}: only {changed:.1%} of the codes changed"


@pytest.mark.parametrize("variant", ["adam-l2", "maximize+lr_tensor", "wd=0+lerp-high", "grad_mult"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-master"])
def test_hyper_parameters_match_the_native_op(device, variant, pdtype):
    master = pdtype == torch.bfloat16
    lists = make_lists([257, 5000, 1], pdtype, True, master, seed_for("q8-hyper", variant, pdtype))
    kw = dict(amsgrad=True)
    if variant == "adam-l2":
        kw.update(decoupled_weight_decay=False, weight_decay=0.05)
    elif variant == "maximize+lr_tensor":
        kw.update(maximize=True, lr=0.0, lr_tensor=torch.tensor([3e-3]))
    elif variant == "wd=0+lerp-high":  # 1 - beta1 >= 0.5: the lerp's other branch
        kw.update(weight_decay=0.0, beta1=0.3, beta2=0.9)
    else:
        kw.update(grad_mult=torch.tensor([1.0 / 1024]), found_inf=torch.tensor([0.0]))
    native, ours = run_both(lists, device, **kw)
    assert_match(lists, native, ours, variant, lr=3e-3 if "lr_tensor" in variant else HYPER["lr"])


@pytest.mark.parametrize("tile", [(1024, 4), (256, 3)], ids=["gpu-1024x4", "256x3"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_tiles_of_several_iterations(device, monkeypatch, tile, amsgrad):
    """The GPU's tile (4 blocks per iteration, 4 iterations; the interpreter's own tile is one
    iteration as wide as the largest tensor), and one block per iteration: iterations all in
    the tensor, the one that holds its end, those past it, empty tiles."""
    from fusedtrain.triton import adam as tk

    monkeypatch.setattr(tk, "tile", lambda n, q8=False: tile)
    sizes = [1, 255, 256, 257, 1023, 1024, 1025, 4095, 4096, 4097, 5000, 8191, 0, 12304]
    lists = make_lists(sizes, torch.bfloat16, amsgrad, True, seed_for("q8-tiles", tile, amsgrad))
    native, ours = run_both(lists, device, amsgrad=amsgrad, grad_mult=torch.tensor([0.5]),
                            found_inf=torch.tensor([0.0]))
    assert_match(lists, native, ours, f"tile {tile}")


@pytest.mark.parametrize("offset", [1, 3], ids=["off-by-1", "off-by-3"])
def test_tensors_off_a_16_byte_boundary(device, offset):
    """Views into buffers (scalar accesses), alone and with aligned tensors in the same call
    (two launches, each bumping its own tensors' steps)."""
    seed = seed_for("q8-views", offset)
    views = make_lists([5000, 257, 1], torch.float32, True, False, seed, offset=offset)
    aligned = make_lists([300, 4096], torch.float32, True, False, seed + 1)
    for lists in (views, [a + b for a, b in zip(views, aligned)]):
        native, ours = run_both(lists, device, amsgrad=True)
        assert_match(lists, native, ours, f"offset {offset}")


@pytest.mark.parametrize("amsgrad", [False, True])
def test_found_inf_writes_nothing(device, amsgrad):
    lists = make_lists(SIZES, torch.bfloat16, amsgrad, True, seed_for("q8-skip", amsgrad))
    ours = _to(copy.deepcopy(lists), device)
    torch.ops.fusedtrain_triton.adam_(*ours, **dict(HYPER, amsgrad=amsgrad,
                                                    grad_mult=torch.tensor([0.25], device=device),
                                                    found_inf=torch.tensor([1.0], device=device)))
    for k, (before, after) in enumerate(zip(lists, _to(ours, "cpu"))):
        for i, (a, b) in enumerate(zip(before, after)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"list {k} tensor {i} was written"


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy's, in the interpreter
def test_non_finite_values_match_the_native_op(device):
    """A NaN or inf grad makes its block's absmax NaN or inf and its codes 0 (the native op's
    rule), a block whose stored absmax is NaN decodes to NaN; other blocks are untouched by
    them (a max that dropped the NaN, or a block of the wrong size, fails)."""
    lists = make_lists([5000, 70000, 300], torch.float32, True, False, seed_for("q8-nonfinite"))
    lists[G][0][3] = float("nan")         # block 0
    lists[G][0][256 * 7 + 255] = float("inf")  # block 7, its last element
    lists[G][1][256 * 100 + 128] = float("-inf")
    lists[G][1][69999] = float("nan")     # the last (partial) block
    lists[AV][2][1] = float("nan")        # a block stored non-finite
    lists[AM][1][5] = float("inf")
    native, ours = run_both(lists, device, amsgrad=True)
    assert_match(lists, native, ours, "non-finite")
    assert ours[AM][0][0].isnan() and ours[AV][0][0].isnan() and ours[AX][0][0].isnan()
    assert ours[AM][0][7].isinf() and ours[AM][1][-1].isnan() and ours[AV][2][1].isnan()
    assert ours[AM][0][1].isfinite() and ours[AM][0][6].isfinite() and ours[AM][1][-2].isfinite()


def _boundary_values():
    """|values| at and next to the signed map's rounding boundaries, for a block whose absmax is
    Q8_SIGNED_MAX (inv = 1): exact ties (to even), a quarter ulp of 1 + x off a tie (rounding
    1 + x first, then to 3 bits, rounded these twice), just below 1 and the codes above it."""
    t = 2.0 ** -25
    vals = [0.0, 2.0 ** -30, 1e-40, 1 / 32, 1 - 2.0 ** -24, 15 / 16, 1.0, 1 + 1 / 16, 1 + 3 / 16, 1.0625 + 2.0 ** -23,
            2.0 ** 13 * (1 + 15 / 16), 30000.0, 30719.0]
    for k in range(8):
        vals += [(2 * k + 1) / 16, (2 * k + 1) / 16 - t, (2 * k + 1) / 16 + t, (2 * k + 1) / 16 - 2 * t]
    return vals


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(beta) of 0, in the interpreter
def test_codes_at_rounding_boundaries_match_exactly(device):
    """beta1 = beta2 = 0: the new exp_avg is the grad, exp_avg_sq its square, and a block whose
    largest |grad| is Q8_SIGNED_MAX encodes |grad| itself; every code equals the native op's and
    reference.q8_encode's (adam_math.h q8_round8x: 8x rounded once below 1)."""
    vals = torch.tensor(_boundary_values(), dtype=torch.float64).float()
    g = torch.zeros(2 * reference.Q8_BLOCK)
    g[0], g[1:1 + len(vals)] = reference.Q8_SIGNED_MAX, vals
    g[256], g[257:257 + len(vals)] = -reference.Q8_SIGNED_MAX, -vals
    g[200:208] = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.75, 1.5, 2.5])  # squares exact
    n = g.numel()
    zeros = reference.q8_encode(torch.zeros(n), True)
    lists = [[torch.zeros(n)], [g], [zeros[0]], [reference.q8_encode(torch.zeros(n), False)[0]], [],
             [torch.tensor([0.0])], [], [zeros[1]], [zeros[1].clone()], []]
    native, ours = run_both(lists, device, beta1=0.0, beta2=0.0, weight_decay=0.0)
    for k, x in ((M, g), (V, g * g)):
        want = reference.q8_encode(x, k == M)
        assert torch.equal(ours[ABSMAX[k]][0], want[1]) and torch.equal(native[ABSMAX[k]][0], want[1])
        assert torch.equal(native[k][0], want[0]), f"list {k}: the native op's codes are not the reference's"
        bad = torch.nonzero(ours[k][0] != want[0]).reshape(-1)
        assert not bad.numel(), f"list {k}: codes {ours[k][0][bad].tolist()} for {x[bad].tolist()}, " \
            f"expected {want[0][bad].tolist()}"


def test_steps_are_teacher_forced_over_several_steps(device):
    """Three steps, each from the state the Triton op left (so each is held to the native op's
    step from the very same codes), the bias corrections changing with the step."""
    lists = make_lists([257, 5000, 70000], torch.bfloat16, True, True, seed_for("q8-steps"), step=0.0)
    g = torch.Generator().manual_seed(5)
    for t in range(3):
        native, ours = run_both(lists, device, amsgrad=True)
        assert_match(lists, native, ours, f"step {t + 1}")
        lists = ours
        lists[G] = [torch.randn(x.shape, generator=g).to(x.dtype) for x in lists[G]]


@pytest.mark.triton_interp
def test_hyper_parameters_are_not_specialized():
    """As _adam_kernel (tests/test_adam.py): an LR schedule compiles no new 8-bit kernel."""
    pytest.importorskip("triton")
    from fusedtrain.triton import adam as tk

    def names(kernel):  # a JITFunction's, or under the interpreter its decorator's arguments
        if hasattr(kernel, "params"):
            return {p.name for p in kernel.params if p.do_not_specialize}
        return set(kernel.kwargs.get("do_not_specialize", ()))

    assert names(tk._adam_q8_kernel) == {"lr_bits", "beta1_bits", "beta2_bits", "eps", "wd_bits", "sr_seed"}
    assert names(tk._adam_q8_kernel) == names(tk._adam_kernel)


# ---- every launch of common use has an AotSpec (tests/test_aot_specs.py's rule) ----------------

@pytest.fixture
def launches(monkeypatch):
    """(kernel, constexprs but BLOCK/ITERS, num_warps, maxnreg) of every interpreted launch."""
    if not INTERPRET:
        pytest.skip("captures launches under the Triton interpreter")
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = self.fn.__code__.co_varnames[:self.fn.__code__.co_argcount]
        ce = tuple(sorted((k, str(v)) for k, v in kwargs.items() if k in names and k.isupper()
                          and k not in ("BLOCK", "ITERS")))
        seen.append((self.fn.__name__, ce, kwargs.get("num_warps", 4), kwargs.get("maxnreg")))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def _spec_keys():
    from fusedtrain.triton import adam as tk

    return {(s.kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in s.constexprs.items()
                                                if k not in ("BLOCK", "ITERS"))),
             s.options.get("num_warps", 4), s.options.get("maxnreg")) for s in tk.AOT_SPECS}


USES = {  # dtype, optimizer options, whether stepped plainly too (else by a GradScaler only)
    "8bit-fp32": (torch.float32, dict(state_format="8bit"), True),
    "8bit-fp32-amsgrad": (torch.float32, dict(state_format="8bit", amsgrad=True), True),
    "8bit-bf16-master": (torch.bfloat16, dict(state_format="8bit", master_weights=True), True),
    "8bit-bf16-master-amsgrad": (torch.bfloat16, dict(state_format="8bit", master_weights=True, amsgrad=True), True),
    "8bit-fp16-master": (torch.float16, dict(state_format="8bit", master_weights=True), False),
    "8bit-fp16-master-amsgrad": (torch.float16, dict(state_format="8bit", master_weights=True, amsgrad=True), False),
    "8bit-bf16": (torch.bfloat16, dict(state_format="8bit"), True),
    "8bit-bf16-sr": (torch.bfloat16, dict(state_format="8bit", stochastic_rounding=True), True),
    "8bit-bf16-sr-amsgrad": (torch.bfloat16, dict(state_format="8bit", stochastic_rounding=True, amsgrad=True), True),
    "lean-fp32": (torch.float32, dict(state_format="bf16"), True),
    "sr-bf16": (torch.bfloat16, dict(stochastic_rounding=True), True),
}


@pytest.mark.triton_interp
@pytest.mark.parametrize("use", list(USES))
def test_every_launch_of_lean_and_8bit_adamw_has_a_spec(launches, use):
    """AdamW with 8-bit, bf16 (lean) or stochastically rounded states, stepped plainly and by a
    GradScaler (grad_mult and found_inf in the kernel), on params of at least LEAN_MIN_NUMEL."""
    dtype, options, plain = USES[use]
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in ((4096,), (80, 80))]
    opt = fusedtrain.FusedAdamW(ps, lr=1e-3, **options)
    scaler = fusedtrain.GradScaler("cpu", init_scale=1024.0)
    with fusedtrain.use_backend("triton"):
        for _ in range(2):
            if plain:
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()
                opt.zero_grad()
            scaler.scale(sum(p.float().square().sum() for p in ps)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    kernels = {k[0] for k in launches}
    assert ("_adam_q8_kernel" if "8bit" in use else "_adam_kernel") in kernels, kernels
    missing = sorted(set(k for k in launches if k[0].startswith("_adam")) - _spec_keys())
    assert not missing, "launches without an AotSpec:\n" + "\n".join(map(str, missing))
