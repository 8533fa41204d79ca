"""The multi-tensor kernels' address tables (csrc/include/fusedtrain/multi_tensor_tables.h,
fusedtrain/triton/multi_tensor.py): who owns them, CUDA-graph capture, and tensors that start
inside a buffer (misaligned views).

Here (CPU, Triton interpreter): the tables an optimizer's plan keeps are uploaded once for any
number of groups, again only for a group whose addresses changed; Adam and unscale on views at
every element offset match torch in float64. With a GPU: a captured step replays correctly
after other pinned allocations and other optimizers' steps, and a steady-state step copies
nothing from the host.
"""
import pytest
import torch

import fusedtrain
from fusedtrain import reference
from fusedtrain.ops.adam import adam_
from helpers import INTERPRET, assert_close, seed_for

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False,
             decoupled_weight_decay=True)


def _groups(n_groups, device, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 7, 300, 4097]
    return [[(torch.randn(sizes[(k + j) % 4], generator=g)).to(device).requires_grad_() for j in range(2)]
            for k in range(n_groups)]


def _torch_twin(groups):
    params = [[p.detach().double().requires_grad_() for p in ps] for ps in groups]
    opt = torch.optim.AdamW([{"params": ps} for ps in params], lr=HYPER["lr"], betas=(0.9, 0.99),
                            weight_decay=0.1, foreach=False)
    return params, opt


@pytest.fixture
def uploads(backend_device, monkeypatch):
    """The Triton tables' uploads (their sizes in words) while the test runs."""
    if backend_device[0] != "triton":
        pytest.skip("the Triton kernels' tables are counted here; the CUDA ones by the GPU test below")
    from fusedtrain.triton import multi_tensor

    seen = []
    real = multi_tensor.upload
    monkeypatch.setattr(multi_tensor, "upload", lambda words, dev: seen.append(words.numel()) or real(words, dev))
    return seen


@pytest.mark.parametrize("n_groups", [3, 70])  # 70: more than any cache of earlier versions held
def test_plan_tables_uploaded_once_for_any_number_of_groups(backend_device, n_groups, uploads):
    _, device = backend_device
    groups = _groups(n_groups, device, seed_for("tables", n_groups))
    theirs, topt = _torch_twin(groups)
    opt = fusedtrain.FusedAdamW([{"params": ps} for ps in groups], lr=HYPER["lr"], betas=(0.9, 0.99),
                                weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    per_step = []
    for step in range(6):
        for ps, qs in zip(groups, theirs):
            for p, q in zip(ps, qs):
                grad = torch.randn(p.shape, generator=g)
                if step != 4 and p.grad is not None:
                    p.grad.copy_(grad.to(device))  # same addresses
                else:
                    p.grad = grad.to(device)  # step 4 (and 0): every grad at a new address
                q.grad = grad.double()
        if step == 5:  # one group's grad elsewhere: that group's table only
            groups[1][0].grad = groups[1][0].grad.clone()
        before = len(uploads)
        opt.step()
        topt.step()
        per_step.append(len(uploads) - before)
    assert per_step[0] == n_groups, "one upload per group at the first step"
    assert per_step[1:4] == [0, 0, 0], f"a steady-state step uploaded tables: {per_step}"
    assert per_step[4] == n_groups and per_step[5] == 1, per_step
    for ps, qs in zip(groups, theirs):
        for p, q in zip(ps, qs):
            assert_close(p.detach(), q.detach(), torch.float32, what="param")


@pytest.mark.parametrize("clip", ["one-read", "clip_grad_norm_"])
def test_scaler_passes_use_tables_kept_on_the_optimizer(backend_device, clip, uploads):
    """The GradScaler's passes over an optimizer's grads (the norm pass of the one-read step,
    the check and scaling passes of clip_grad_norm_) keep their tables on the optimizer too:
    nothing uploaded in a steady-state step."""
    _, device = backend_device
    groups = _groups(40, device, seed_for("scaler tables", clip))
    opt = fusedtrain.FusedAdamW([{"params": ps} for ps in groups], lr=1e-3)
    scaler = fusedtrain.GradScaler(device, init_scale=1024.0)
    per_step = []
    for step in range(4):
        for ps in groups:
            for p in ps:
                grad = torch.randn(p.shape) * 1024.0
                if p.grad is None:
                    p.grad = grad.to(device)
                else:
                    p.grad.copy_(grad)
        scaler.scale(torch.ones((), device=device))
        before = len(uploads)
        if clip == "one-read":
            scaler.step(opt, max_norm=1.0)
        else:
            scaler.clip_grad_norm_(opt, 1.0)
            scaler.step(opt)
        scaler.update()
        per_step.append(len(uploads) - before)
    assert per_step[0] > 40 and per_step[1:] == [0, 0, 0], per_step
    assert all(torch.isfinite(p).all() for ps in groups for p in ps)


def _views(sizes, offsets, dtype, device, seed):
    """Tensors of `sizes` that start `offsets` elements into buffers of their own (a bucket's
    views): filled with randn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, off in zip(sizes, offsets):
        buf = torch.empty(n + off + 3, dtype=dtype, device=device)
        v = buf[off:off + n]
        v.copy_(torch.randn(n, generator=g).to(dtype))
        out.append(v)
    return out


SIZES = [5, 4099, 20000, 1]  # 20000: more than one CUDA block (16384) and Triton tile


@pytest.mark.parametrize("dtype,variant", [(torch.float32, "plain"), (torch.bfloat16, "plain"),
                                           (torch.float32, "amsgrad"), (torch.bfloat16, "master")],
                         ids=["fp32", "bf16", "fp32-amsgrad", "bf16-master"])
@pytest.mark.parametrize("grad_offset", [0, 1, 3], ids=lambda o: f"grads+{o}")
@pytest.mark.parametrize("offset", [0, 1, 2, 7], ids=lambda o: f"all+{o}")
def test_adam_on_views_at_any_offset(backend_device, dtype, variant, offset, grad_offset):
    """Every list at `offset` elements into its buffer (a head to peel before vector steps),
    the grads `grad_offset` further (a grad in a bucket at another offset than its param:
    element by element). "master": bf16 params with fp32 states and master params."""
    _, device = backend_device
    seed = seed_for("adam views", dtype, variant, offset, grad_offset)
    n = len(SIZES)
    sdt = torch.float32 if variant == "master" else dtype
    params = _views(SIZES, [offset] * n, dtype, device, seed)
    grads = _views(SIZES, [offset + grad_offset] * n, dtype, device, seed + 1)
    m = _views(SIZES, [offset] * n, sdt, device, seed + 2)
    v = [t.abs_() for t in _views(SIZES, [offset] * n, sdt, device, seed + 3)]
    vmax = [t.abs_() * 1.5 for t in _views(SIZES, [offset] * n, sdt, device, seed + 4)] if variant == "amsgrad" else []
    masters = _views(SIZES, [offset] * n, torch.float32, device, seed + 5) if variant == "master" else []
    vmax = [_views([t.numel()], [offset], sdt, device, 0)[0].copy_(t) for t in vmax]  # views again
    steps = [torch.full((), 3.0, device=device) for _ in SIZES]
    start = masters if masters else params
    ref_p = [t.double().requires_grad_() for t in start]
    topt = torch.optim.AdamW(ref_p, lr=HYPER["lr"], betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                             amsgrad=variant == "amsgrad", foreach=False)
    for k, (p, g, a, b) in enumerate(zip(ref_p, grads, m, v)):
        p.grad = g.double()
        topt.state[p] = {"step": torch.tensor(3.0), "exp_avg": a.double(), "exp_avg_sq": b.double()}
        if vmax:
            topt.state[p]["max_exp_avg_sq"] = vmax[k].double()
    adam_(params, grads, m, v, vmax, steps, masters, **{**HYPER, "amsgrad": variant == "amsgrad"})
    topt.step()
    what = f"(offset {offset}, grads +{grad_offset})"
    for k, (p, q, a, b) in enumerate(zip(params, ref_p, m, v)):
        assert_close(p, q.detach(), dtype, what=f"param {what}")
        if masters:
            assert_close(masters[k], q.detach(), torch.float32, what=f"master {what}")
        assert_close(a, topt.state[q]["exp_avg"], sdt, what=f"exp_avg {what}")
        assert_close(b, topt.state[q]["exp_avg_sq"], sdt, what=f"exp_avg_sq {what}")
        if vmax:
            assert_close(vmax[k], topt.state[q]["max_exp_avg_sq"], sdt, what=f"max_exp_avg_sq {what}")
    assert all(s.item() == 4.0 for s in steps)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0, the interpreter's probe
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_unscale_on_views_at_every_offset(backend_device, dtype):
    _, device = backend_device
    offsets = list(range(9))  # 0..8 elements: every position in a 16-byte vector of any dtype
    ts = _views([20000 + k for k in offsets], offsets, dtype, device, seed_for("unscale views", dtype))
    before = [t.clone() for t in ts]
    inv = torch.tensor(1 / 3000.0, device=device)
    found = torch.zeros((), device=device)
    expect, bad, norm64 = reference.unscale_and_check_float64(before, inv)
    norm = fusedtrain.unscale_and_check_(ts, inv, found, compute_norm=True)
    assert found.item() == 0.0 and not bad
    for t, e in zip(ts, expect):
        assert_close(t, e, dtype, what="unscaled")
    assert_close(norm, torch.tensor(norm64, dtype=torch.float64), rtol=1e-5, atol=0, what="norm")
    ts[1][1] = float("inf")  # in the scalar head of the view that starts 1 element in (any dtype)
    fusedtrain.unscale_and_check_(ts, inv, found, write=False)
    assert found.item() == 1.0, "an inf in a view's head"


def test_triton_launches_split_by_alignment():
    """The Triton kernels are told their addresses are 16-byte aligned (128-bit accesses; a
    misaligned one would fault on a GPU, and the interpreter cannot tell): only rows whose
    every address is are tiled by the aligned launch, each tensor by exactly one launch, and
    every launch keeps the whole table (a row's index is its tensor's position in the call,
    which Adam's stochastic rounding hashes)."""
    pytest.importorskip("triton")
    from fusedtrain.triton import multi_tensor

    offsets = [0, 1, 2, 4, 0, 3]
    a = _views([100] * 6, offsets, torch.float32, "cpu", 0)
    b = _views([100] * 6, [0, 0, 2, 4, 1, 3], torch.float32, "cpu", 1)  # a second list, offsets of its own
    launches = multi_tensor.tables([a, b], 64, empty_tiles=False)
    assert sorted(flag for *_, flag in launches) == [False, True]
    seen = []
    for rows, tile_t, tile_off, aligned in launches:
        assert rows[:, 0].tolist() == [t.data_ptr() for t in a]  # the whole table, in call order
        for t in sorted(set(tile_t.tolist())):
            addr_a, addr_b, _ = rows[t].tolist()
            assert (addr_a % 16 == 0 and addr_b % 16 == 0) == aligned
            seen.append(t)
    assert sorted(seen) == list(range(6))  # each tensor tiled by one launch
    fresh = [torch.randn(100) for _ in range(3)]
    assert [flag for *_, flag in multi_tensor.tables([fresh], 64, empty_tiles=False)] == [True]


def _search_head(addrs, sizes, numel):
    """The first e < 16 after which every address is 16-byte aligned (capped at numel); else
    the numel of a tensor shorter than 16 (all head), or -1."""
    for e in range(16):
        if all((a + s * e) % 16 == 0 for a, s in zip(addrs, sizes)):
            return min(e, numel)
    return numel if numel < 16 else -1


def test_heads_align_every_streamed_list():
    """multi_tensor.heads (tensor ops over the whole table) against a plain search, on random
    addresses: lists at one element offset (peelable), at several, empty lists (size 0),
    tensors shorter than their head, and a step column that is not streamed."""
    pytest.importorskip("triton")
    from fusedtrain.triton import multi_tensor

    g = torch.Generator().manual_seed(seed_for("heads"))
    for sizes in ((4,), (2,), (1,), (4, 4, 2, 2, 0, 4), (2, 2, 4, 4, 4, 0), (2, 2, 0, 0, 0, 4)):
        rows = []
        for k in range(300):
            same = k % 2 == 0  # half the rows: every list at one element offset
            off = torch.randint(0, 16, (len(sizes),), generator=g)
            if same:
                off[:] = off[0]
            addrs = [0 if s == 0 else 4096 * (j + 1) + s * int(o) for j, (s, o) in enumerate(zip(sizes, off))]
            step = 4096 * 99 + int(torch.randint(0, 4, (1,), generator=g)) * 4  # never streamed
            rows.append(addrs + [step, int(torch.randint(0, 40, (1,), generator=g))])
        table = torch.tensor(rows, dtype=torch.int64)
        got = multi_tensor.heads(table, sizes).tolist()
        want = [_search_head(r[:len(sizes)], sizes, r[-1]) for r in rows]
        assert got == want, sizes
        if len(sizes) == 1 or len(set(sizes)) == 1:  # one element size: every row can be peeled
            assert min(got) >= 0, sizes


def test_triton_peels_views_at_one_offset():
    """With sizes, a tensor whose lists sit at one element offset in their buffers stays in the
    aligned launch: its tiles start at its head h (tile_off % 16 = h, the kernels' cue) and
    step by the chunk; lists at different offsets go to the scalar launch, tiles from 0."""
    pytest.importorskip("triton")
    from fusedtrain.triton import multi_tensor

    n = 300
    offsets = [0, 1, 2, 3, 7, 5]
    a = _views([n] * 6, offsets, torch.float32, "cpu", 0)
    b = _views([n] * 6, offsets[:4] + [6, 5], torch.float16, "cpu", 1)  # row 4: fp32 +7 vs fp16 +6
    launches = multi_tensor.tables([a, b], 64, empty_tiles=False, sizes=(4, 2))
    assert sorted(flag for *_, flag in launches) == [False, True]
    for rows, tile_t, tile_off, aligned in launches:
        for t in sorted(set(tile_t.tolist())):
            offs = tile_off[tile_t == t].tolist()
            h = multi_tensor.heads(rows[t:t + 1], (4, 2)).item()
            assert aligned == (t != 4), t
            if aligned:
                assert offs == list(range(h, n, 64)) and all(o % 16 == h for o in offs), (t, h, offs)
                assert (a[t].data_ptr() + 4 * h) % 16 == 0 and (b[t].data_ptr() + 2 * h) % 16 == 0
            else:
                assert offs == list(range(0, n, 64))
    short = _views([2], [1], torch.float32, "cpu", 2)  # all head: one tile at its head
    (rows, tile_t, tile_off, aligned), = multi_tensor.tables([short], 64, empty_tiles=False, sizes=(4,))
    assert aligned and tile_off.tolist() == [multi_tensor.heads(rows, (4,)).item()] == [2]


def _twin_views(t, offset):
    """t's values in a view `offset` elements into a buffer of its own."""
    buf = torch.empty(t.numel() + offset + 5, dtype=t.dtype, device=t.device)
    return buf[offset:offset + t.numel()].copy_(t)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0, the interpreter's probe
@pytest.mark.parametrize("offset", [1, 3, 6, 7], ids=lambda o: f"+{o}")
def test_triton_peeled_step_gives_the_aligned_bits(backend_device, offset):
    """A Triton step on views at one offset (peeled: scalar head, 128-bit body) writes the bits
    of the same step on aligned copies: bf16 params and moments with stochastic rounding of
    both (whose bits hash each element's index in its tensor, head and body alike), and the
    unscale pass (its norm within fp32 rounding: the head adds its own partial)."""
    backend, device = backend_device
    if backend != "triton":
        pytest.skip("the Triton kernels' peeling")
    g = torch.Generator().manual_seed(seed_for("peeled bits", offset))
    sizes = [3, 17, 4099, 9000]
    lists = [[torch.randn(n, generator=g).to(device, torch.bfloat16) for n in sizes] for _ in range(4)]
    lists[3] = [t.abs() for t in lists[3]]
    steps = [[torch.full((), 2.0, device=device) for _ in sizes] for _ in range(2)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False,
              decoupled_weight_decay=True, sr_seed=0xC0FFEE, sr_params=True, sr_exp_avg_sq=True)
    aligned = [[t.clone() for t in lst] for lst in lists]
    views = [[_twin_views(t, offset) for t in lst] for lst in lists]
    from fusedtrain.triton import adam as triton_adam, multi_tensor

    op_lists = [*views, [], steps[1], [], [], [], []]  # the op's ten lists (AdamTensors)
    (_, _, tile_off, flag), = multi_tensor.tables([op_lists[c] for c in triton_adam.COLUMNS], 64, True,
                                                  sizes=triton_adam.peel_sizes(op_lists))
    assert flag and (tile_off % 16 != 0).any(), "the views were not peeled"
    adam_(*aligned, [], steps[0], **kw)
    adam_(*views, [], steps[1], **kw)
    for name, x, y in zip(("param", "grad", "exp_avg", "exp_avg_sq"), aligned, views):
        for k, (a, b) in enumerate(zip(x, y)):
            assert torch.equal(a, b), f"{name} {k} (+{offset})"
    assert [s.item() for s in steps[1]] == [3.0] * len(sizes)
    grads = [t.float() * 4096 for t in lists[1]]
    if offset == 7:
        grads[1][0] = float("inf")  # in the head (fp32 at +7 elements: a head of 1)
    gv = [_twin_views(t, offset) for t in grads]
    inv = torch.tensor(1 / 4096.0, device=device)
    found = [torch.zeros((), device=device) for _ in range(2)]
    norms = [fusedtrain.unscale_and_check_(ts, inv, f, compute_norm=True) for ts, f in zip((grads, gv), found)]
    for a, b in zip(grads, gv):
        assert torch.equal(a, b)
    assert found[0].item() == found[1].item() == (1.0 if offset == 7 else 0.0)
    if offset != 7:
        assert_close(norms[1], norms[0].double(), rtol=1e-6, atol=0, what="norm")


# ---- with a GPU --------------------------------------------------------------------------------

def _gpu_backend(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ok, why = fusedtrain._backend.availability(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(f"{backend}: {why}")


def _one_read_step(model, opt, scaler, x, y):
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt, max_norm=1.0)  # the one-read clipped step: a norm pass, then Adam
    scaler.update()


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(20)]).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_captured_step_replays_after_other_work(backend):
    """A graph reads only tables that live as long as it does: after capture, 100 pinned
    allocations and eager steps of other optimizers (which build and free tables of their
    own) must not change what a replay computes. Compared bit for bit with an eager twin."""
    _gpu_backend(backend)
    with fusedtrain.use_backend(backend):
        models = [_model(0), _model(0)]
        opts = [fusedtrain.FusedAdamW([{"params": [p]} for p in m.parameters()], lr=1e-3, capturable=True)
                for m in models]  # a group per param: 40 groups
        scalers = [fusedtrain.GradScaler("cuda") for _ in models]
        x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 64, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (torch.cuda.graphs' recipe), both twins alike
            for _ in range(3):
                for m, o, s in zip(models, opts, scalers):
                    o.zero_grad(set_to_none=True)
                    _one_read_step(m, o, s, x, y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opts[0].zero_grad(set_to_none=True)  # the captured backward allocates the grads (torch's recipe)
        with torch.cuda.graph(graph):
            _one_read_step(models[0], opts[0], scalers[0], x, y)
        # other work: pinned buffers and other optimizers' steps reuse what the capture freed
        pinned = [torch.randn(4096).pin_memory() for _ in range(100)]
        other = _model(1)
        oopt = fusedtrain.FusedAdamW([{"params": [p]} for p in other.parameters()], lr=1e-3)
        oscaler = fusedtrain.GradScaler("cuda")
        for _ in range(5):
            oopt.zero_grad()
            _one_read_step(other, oopt, oscaler, x, y)
        del pinned
        for r in range(10):
            x.copy_(torch.randn(32, 64) * (1 + r))
            y.copy_(torch.randn(32, 64))
            graph.replay()
            opts[1].zero_grad(set_to_none=True)
            _one_read_step(models[1], opts[1], scalers[1], x, y)
        torch.cuda.synchronize()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b), "a replay differs from the eager step"
        assert torch.equal(scalers[0]._scale, scalers[1]._scale)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["step", "one-read"])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_steady_state_step_copies_nothing_from_the_host(backend, how):
    """70 param groups (more than the table caches of earlier versions held): after the first
    steps, a step (opt.step(), or the GradScaler's one-read clipped step with its norm pass)
    makes no host-to-device copy."""
    _gpu_backend(backend)
    from torch.profiler import ProfilerActivity, profile

    with fusedtrain.use_backend(backend):
        params = [torch.randn(1000 + k, device="cuda", requires_grad=True) for k in range(140)]
        opt = fusedtrain.FusedAdamW([{"params": params[k:k + 2]} for k in range(0, 140, 2)], lr=1e-3)
        scaler = fusedtrain.GradScaler("cuda")
        for p in params:
            p.grad = torch.randn_like(p)

        def step():
            if how == "step":
                opt.step()
            else:
                scaler.scale(torch.ones((), device="cuda"))
                scaler.step(opt, max_norm=1.0)
                scaler.update()

        step()
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any("adam" in n.lower() for n in names), "the profiler recorded no Adam kernel: the count means nothing"
    copies = [n for n in names if "HtoD" in n]
    assert not copies, f"{len(copies)} host-to-device copies in 3 steady-state steps: {copies[:3]}"
