"""fusedtrain.unscale_and_check_ on every backend against the float64 reference and against
torch._amp_foreach_non_finite_check_and_unscale_ (bit for bit)."""
import math

import pytest
import torch

import fusedtrain
from fusedtrain import reference
from fusedtrain._compare import ulp_at_one
from helpers import FLOAT_DTYPES, INTERPRET, NORM_RTOL, assert_close, seed_for

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")]


def _inputs(sizes, dtype, device, seed, scale=100.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * scale).to(dtype).to(device) for n in sizes]


def _scalars(device, inv=1 / 1024.0):
    return (torch.tensor(inv, dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.float32, device=device))


def _norm_rtol(dtype):
    return NORM_RTOL  # fp32 accumulation of fp32 products, whatever the storage dtype


SIZES = [1, 7, 4097, 33000, 0, 2 * 16384 + 5]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("write,compute_norm", [(True, False), (True, True), (False, True), (False, False)])
def test_matches_float64_reference(backend_device, dtype, write, compute_norm):
    _, device = backend_device
    ts = _inputs(SIZES, dtype, device, seed=1)
    before = [t.clone() for t in ts]
    inv_scale, found_inf = _scalars(device, inv=1 / 3000.0)  # not a power of two: real rounding
    expect, bad, norm64 = reference.unscale_and_check_float64(before, inv_scale)
    norm = fusedtrain.unscale_and_check_(ts, inv_scale, found_inf, compute_norm=compute_norm, write=write)
    assert found_inf.item() == 0.0 and not bad
    for t, b, e in zip(ts, before, expect):
        if write:
            assert_close(t, e, dtype=dtype, what="unscaled")
        else:
            assert torch.equal(t, b), "write=False must leave the tensors untouched"
    if compute_norm:
        assert norm.dtype == torch.float32 and norm.dim() == 0 and norm.device == found_inf.device
        assert_close(norm, torch.tensor(norm64, dtype=torch.float64), rtol=_norm_rtol(dtype), atol=0, what="norm")
    else:
        assert norm is None


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_bit_identical_to_torch(backend_device, dtype):
    _, device = backend_device
    ts = _inputs([5, 1000, 40000], dtype, device, seed=2, scale=1e3)
    ts.append(_inputs([600], dtype, device, seed=3)[0].view(20, 30).t())  # dense, not contiguous
    ref = [t.clone() for t in ts]
    for inv in (1 / 65536.0, 1 / 3.0, 1.0, 7.5):
        inv_scale, found_inf = _scalars(device, inv)
        fusedtrain.unscale_and_check_(ts, inv_scale, found_inf)
        f2 = torch.zeros((), device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(ref, f2, inv_scale)
        for a, b in zip(ts, ref):
            assert torch.equal(a, b), f"differs from torch at inv_scale={inv}"
        assert found_inf.item() == f2.item() == 0.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("write", [True, False])
def test_nonfinite_sets_found_inf(backend_device, dtype, bad_value, write):
    _, device = backend_device
    g = torch.Generator().manual_seed(4)
    sizes = [3, 100, 16384 * 2 + 3, 17]
    for trial in range(3):
        ts = _inputs(sizes, dtype, device, seed=10 + trial)
        which = int(torch.randint(len(sizes), (1,), generator=g))
        pos = [0, sizes[which] - 1, int(torch.randint(sizes[which], (1,), generator=g))][trial]
        ts[which][pos] = bad_value
        inv_scale, found_inf = _scalars(device)
        norm = fusedtrain.unscale_and_check_(ts, inv_scale, found_inf, compute_norm=True, write=write)
        assert found_inf.item() == 1.0, f"missed {bad_value} at tensor {which}, index {pos}"
        assert not math.isfinite(norm.item())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_large_finite_values_never_set_found_inf(backend_device, dtype):
    _, device = backend_device
    big = torch.finfo(dtype).max
    t = torch.tensor([big, -big, big, 1.0, -big] * 7, dtype=dtype, device=device)
    inv_scale, found_inf = _scalars(device, 1.0)
    fusedtrain.unscale_and_check_([t], inv_scale, found_inf, compute_norm=True)
    assert found_inf.item() == 0.0
    # an unscale that makes a finite value overflow is not an inf in the grads (torch agrees)
    t2 = torch.full((9,), big, dtype=dtype, device=device)
    fusedtrain.unscale_and_check_([t2], torch.tensor(4.0, device=device), found_inf)
    assert found_inf.item() == 0.0


def test_found_inf_is_only_set_never_cleared(backend_device):
    _, device = backend_device
    ts = _inputs([10, 20], torch.float32, device, seed=5)
    inv_scale = torch.tensor(0.5, device=device)
    found_inf = torch.ones((), device=device)
    fusedtrain.unscale_and_check_(ts, inv_scale, found_inf)
    assert found_inf.item() == 1.0


def test_many_tiny_tensors_mixed_dtypes(backend_device):
    _, device = backend_device
    g = torch.Generator().manual_seed(6)
    n = 1000
    sizes = torch.randint(1, 40 if INTERPRET else 300, (n,), generator=g).tolist()
    dtypes = [FLOAT_DTYPES[i % 3] for i in range(n)]
    ts = [(torch.randn(s, generator=g) * 10).to(dt).to(device) for s, dt in zip(sizes, dtypes)]
    before = [t.clone() for t in ts]
    inv_scale, found_inf = _scalars(device, 1 / 7.0)
    expect, _, norm64 = reference.unscale_and_check_float64(before, inv_scale)
    norm = fusedtrain.unscale_and_check_(ts, inv_scale, found_inf, compute_norm=True)
    assert found_inf.item() == 0.0
    for t, e in zip(ts, expect):
        assert_close(t, e, what="tiny")
    assert_close(norm, torch.tensor(norm64, dtype=torch.float64), rtol=1e-5, atol=0, what="norm")
    ts[777].view(-1)[-1] = float("nan")
    fusedtrain.unscale_and_check_(ts, inv_scale, found_inf)
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16], ids=str)
def test_one_huge_tensor(backend_device, dtype):
    """One tensor of 2^24 + 3 elements (past fp32's exact integers, not a multiple of any
    block): every element unscaled as torch does (bit for bit) and within half an ulp of the
    float64 truth, the norm within a few fp32 ulps of float64, and a NaN or inf past element
    2^24 sets found_inf."""
    _, device = backend_device
    n = (1 << 20) + 3 if INTERPRET else (1 << 24) + 3
    seed = seed_for("unscale huge", dtype, n)
    x = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 65536.0).to(dtype)  # AMP's scale
    t = x.to(device, copy=True)
    inv_scale, found_inf = _scalars(device, 1 / 65536.0 / 3)  # not a power of two: real rounding
    norm = fusedtrain.unscale_and_check_([t], inv_scale, found_inf, compute_norm=True)
    what = f"seed {seed}"
    assert found_inf.item() == 0.0, what
    ref, f_torch = x.to(device, copy=True), torch.zeros((), device=device)
    torch._amp_foreach_non_finite_check_and_unscale_([ref], f_torch, inv_scale)
    assert torch.equal(t, ref), f"differs from torch in {int((t != ref).sum())} elements ({what})"
    del ref
    inv = float(inv_scale)  # the fp32 inv_scale's value
    norm64 = x.double().mul_(inv).norm().item()
    assert_close(norm, torch.tensor(norm64, dtype=torch.float64), rtol=1e-6, atol=0, what=f"norm ({what})")
    # against float64 on the head, everything past 2^24 - 2^15, and a random sample
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.arange(1 << 16), torch.arange(max(n - (1 << 15) - 3, 0), n),
                     torch.randint(n, (1 << 16,), generator=g)])
    assert_close(t.cpu()[idx], x[idx].double() * inv, dtype=dtype, rtol=0.5 * ulp_at_one(dtype), atol=0,
                 what=f"unscaled ({what})")
    for pos, bad in ((n - 1, float("inf")), ((1 << 24) + 1 if n > (1 << 24) else n - 2, float("nan"))):
        found_inf.zero_()
        t[pos] = bad
        fusedtrain.unscale_and_check_([t], inv_scale, found_inf, write=False)
        assert found_inf.item() == 1.0, f"missed {bad} at {pos} ({what})"
        t[pos] = 1.0


def test_norm_is_deterministic(backend_device):
    _, device = backend_device
    ts = _inputs([100_000, 3, 50_000], torch.float32, device, seed=8)
    outs = []
    threads = torch.get_num_threads()
    for nt in (threads, 1, threads):
        torch.set_num_threads(nt)
        inv_scale, found_inf = _scalars(device)
        outs.append(fusedtrain.unscale_and_check_(ts, inv_scale, found_inf, compute_norm=True, write=False).item())
    torch.set_num_threads(threads)
    assert outs[0] == outs[1] == outs[2]


def test_empty_list_and_none_entries(backend_device):
    _, device = backend_device
    inv_scale, found_inf = _scalars(device)
    norm = fusedtrain.unscale_and_check_([], inv_scale, found_inf, compute_norm=True)
    assert norm.item() == 0.0 and found_inf.item() == 0.0
    assert fusedtrain.unscale_and_check_([None, torch.empty(0, device=device)], inv_scale, found_inf) is None
    t = torch.full((4,), 8.0, device=device)
    fusedtrain.unscale_and_check_([None, t], torch.tensor(0.5, device=device), found_inf)
    assert torch.equal(t, torch.full((4,), 4.0, device=device))


def test_non_dense_tensor_is_copied_back(backend_device):
    _, device = backend_device
    base = torch.arange(60, dtype=torch.float32, device=device).view(6, 10)
    view = base[:, 2:5]  # gaps: not dense
    inv_scale, found_inf = _scalars(device, 0.5)
    norm = fusedtrain.unscale_and_check_([view], inv_scale, found_inf, compute_norm=True)
    expect = torch.arange(60, dtype=torch.float64).view(6, 10)
    expect[:, 2:5] *= 0.5
    assert torch.equal(base.double().cpu(), expect)
    assert abs(norm.item() - expect[:, 2:5].norm().item()) < 1e-4


def test_sparse_values(backend_device):
    _, device = backend_device
    i = torch.tensor([[0, 1, 1], [2, 0, 2]])
    v = torch.tensor([3.0, 4.0, 5.0])
    s = torch.sparse_coo_tensor(i, v, (2, 3)).coalesce().to(device)
    inv_scale, found_inf = _scalars(device, 0.5)
    norm = fusedtrain.unscale_and_check_([s], inv_scale, found_inf, compute_norm=True)
    assert torch.equal(s._values().cpu(), v * 0.5)
    assert abs(norm.item() - (v * 0.5).norm().item()) < 1e-6
    with pytest.raises(ValueError, match="uncoalesced"):
        fusedtrain.unscale_and_check_([torch.sparse_coo_tensor(i, v, (2, 3)).to(device)], inv_scale, found_inf,
                                      compute_norm=True)


def test_validation_errors(backend_device):
    _, device = backend_device
    t = torch.ones(3, device=device)
    inv_scale, found_inf = _scalars(device)
    with pytest.raises(ValueError, match="inv_scale"):
        fusedtrain.unscale_and_check_([t], inv_scale.double(), found_inf)
    with pytest.raises(ValueError, match="found_inf"):
        fusedtrain.unscale_and_check_([t], inv_scale, torch.zeros(2, device=device))
    with pytest.raises(ValueError, match="dtype"):
        fusedtrain.unscale_and_check_([torch.ones(3, dtype=torch.int32, device=device)], inv_scale, found_inf)
    with pytest.raises(TypeError):
        fusedtrain.unscale_and_check_([3.0], inv_scale, found_inf)


def test_float64_needs_the_reference_backend(backend_device):
    backend, device = backend_device
    t = torch.full((5,), 4.0, dtype=torch.float64, device=device)
    inv_scale, found_inf = _scalars(device, 0.25)
    if backend == "reference":
        fusedtrain.unscale_and_check_([t], inv_scale, found_inf)
        assert torch.equal(t, torch.ones(5, dtype=torch.float64, device=device))
    else:
        with pytest.raises(fusedtrain.BackendError, match="float64"):
            fusedtrain.unscale_and_check_([t], inv_scale, found_inf)


def test_default_backend_and_explicit_impossible_choice():
    t = torch.ones(3)
    inv_scale, found_inf = _scalars("cpu")
    fusedtrain.unscale_and_check_([t], inv_scale, found_inf)  # default choice works
    if not INTERPRET:
        with fusedtrain.use_backend("triton"), pytest.raises(fusedtrain.BackendError, match="triton"):
            fusedtrain.unscale_and_check_([t], inv_scale, found_inf)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fusedtrain.ops import unscale as ops

    with FakeTensorMode():
        t = torch.ones(4)
        out = ops._fake([t], torch.ones(()), torch.zeros(()), True, True)
        assert out.shape == () and out.dtype == torch.float32
        assert ops._fake([t], torch.ones(()), torch.zeros(()), False, True).shape == (0,)


def _compile_case(device, seed, bad):
    """Grads as a model has them: two dtype groups, a transposed (dense) and a sliced (not
    dense, copied and written back) tensor; an inf in one of them when `bad`."""
    g = torch.Generator().manual_seed(seed)
    ts = [(torch.randn(n, generator=g) * 300).to(dt).to(device)
          for n, dt in [(1000, torch.float32), (77, torch.bfloat16), (5000, torch.bfloat16), (1, torch.float32)]]
    ts.append((torch.randn(40, 30, generator=g) * 300).to(device).t())
    ts.append((torch.randn(20, 30, generator=g) * 300).to(device)[:, 3:17])
    if bad:
        ts[2][4321] = float("inf")
    return ts


def _unscale_norm(grads, inv_scale, found_inf):
    return fusedtrain.unscale_and_check_(grads, inv_scale, found_inf, compute_norm=True)


@pytest.mark.parametrize("bad", [False, True], ids=["finite", "inf"])
def test_torch_compile_fullgraph_matches_eager(backend_device, bad):
    """torch.compile(fullgraph=True) (a graph break raises) of the public call: the graph
    holds the op as an in-place (auto-functionalized) op, and the compiled call must write
    the very tensors it was given, set found_inf and return the norm, as eager does."""
    _, device = backend_device
    seed = seed_for("unscale compile", device, bad)
    eager, compiled = _compile_case(device, seed, bad), _compile_case(device, seed, bad)
    views = [t.clone() for t in compiled]  # the inputs, kept
    inv_scale = torch.tensor(1 / 3000.0, device=device)
    f_eager, f_compiled = torch.zeros((), device=device), torch.zeros((), device=device)
    n_eager = _unscale_norm(eager, inv_scale, f_eager)
    fn = torch.compile(_unscale_norm, fullgraph=True, backend="aot_eager")
    n_compiled = fn(compiled, inv_scale, f_compiled)
    what = f"seed {seed}"
    assert f_compiled.item() == f_eager.item() == float(bad), what
    assert n_compiled.dtype == torch.float32 and n_compiled.shape == (), what
    assert torch.equal(n_compiled, n_eager) or (bad and not n_compiled.isfinite() and not n_eager.isfinite()), what
    for i, (a, b, v) in enumerate(zip(compiled, eager, views)):
        assert torch.equal(a, b), f"tensor {i} differs from eager ({what})"
        assert bad or not torch.equal(a, v), f"tensor {i} was not written by the compiled call ({what})"


@pytest.mark.skipif(INTERPRET or fusedtrain._ext._C is None, reason="native backend, normal test process")
def test_torch_compile_inductor_default_backend():
    """The same through Inductor (its re-inplacing of the functionalized op), default backend."""
    seed = seed_for("unscale compile inductor")
    eager, compiled = _compile_case("cpu", seed, False), _compile_case("cpu", seed, False)
    inv_scale = torch.tensor(1 / 3000.0)
    f_eager, f_compiled = torch.zeros(()), torch.zeros(())
    n_eager = _unscale_norm(eager, inv_scale, f_eager)
    n_compiled = torch.compile(_unscale_norm, fullgraph=True)(compiled, inv_scale, f_compiled)
    assert f_compiled.item() == f_eager.item() == 0.0
    assert_close(n_compiled, n_eager.double(), rtol=ulp_at_one(torch.float32), atol=0, what=f"norm (seed {seed})")
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert torch.equal(a, b), f"tensor {i} differs from eager (seed {seed})"


@pytest.mark.skipif(fusedtrain._ext._C is None, reason="extension not built")
def test_native_op_direct_contract():
    """The raw op: one dtype group, returns the sum of squares (not its root)."""
    ts = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    inv_scale, found_inf = _scalars("cpu", 1.0)
    s = torch.ops.fusedtrain.unscale_and_check_(ts, inv_scale, found_inf, True, False)
    assert s.item() == 169.0
    assert torch.ops.fusedtrain.unscale_and_check_(ts, inv_scale, found_inf, False, False).numel() == 0


def test_one_call_per_device_dtype_group(backend_device, monkeypatch):
    _, device = backend_device
    from fusedtrain.ops import unscale as ops

    calls = []
    for name, op in list(ops._OPS.items()):
        monkeypatch.setitem(ops._OPS, name, lambda ts, *a, op=op, name=name: calls.append((name, len(ts))) or op(ts, *a))
    ts = [torch.ones(n, dtype=FLOAT_DTYPES[n % 3], device=device) for n in range(1, 61)]
    fusedtrain.unscale_and_check_(ts, *_scalars(device), compute_norm=True)
    assert sorted(n for _, n in calls) == [20, 20, 20]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_one_kernel_launch_per_group(backend_device):
    backend, device = backend_device
    if device != "cuda":
        pytest.skip("CUDA backends only")
    from torch.profiler import ProfilerActivity, profile

    ts = [torch.randn(n, device=device) for n in [4096] * 200 + [1 << 22]]
    inv_scale, found_inf = _scalars(device)
    fusedtrain.unscale_and_check_(ts, inv_scale, found_inf, compute_norm=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fusedtrain.unscale_and_check_(ts, inv_scale, found_inf, compute_norm=True)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "unscale" in e.name]
    assert len(kernels) == 1, kernels
