"""A few steps of every op family on CUDA, on both CUDA backends: the short run that
compute-sanitizer checks (scripts/gpu_check.py).

    python scripts/gpu_smoke.py [--device cuda] [--backends native,triton]

Families: BCE under AMP with the fused step, a CUDA graph of that step, unscale of views off a
16-byte boundary, the many-label head, focal loss and ASL (forward and backward, defaults and
with weight + ignore_index + label smoothing), a weighted BCE whose size leaves a tail past the
vector width (its full-shape weight and pos_weight end where their allocation ends, so that
memcheck sees a read past them), and the lean Adam states (bf16 moments, stochastic rounding,
master weights, amsgrad, and 8-bit moments where they are built: a "not built yet" error is
reported, not fatal). --device cpu runs the same code without the CUDA graph (tests run it so
that the first GPU session does not find a typo).
"""
import argparse
import sys

import torch

import fusedtrain
from fusedtrain import FusedAdamW, GradScaler

# An allocation of at least 10 MiB, a multiple of 2 MiB, gets a cudaMalloc segment of exactly
# its size from the caching allocator (a fresh pool has no cached block to carve it from).
_SEGMENT_BYTES = 10 << 20
_POOLS = []  # the pools of _at_segment_end's tensors, alive as long as the process


def _at_segment_end(t):
    """A copy of t whose last byte is the last byte of its own cudaMalloc segment (on CUDA), so
    that compute-sanitizer memcheck flags a read past its end (the caching allocator's slack
    would hide it); prints a note where the allocator does not give that layout."""
    if t.device.type != "cuda":
        return t
    nbytes = t.numel() * t.element_size()
    pool = torch.cuda.MemPool() if hasattr(torch.cuda, "MemPool") else None
    if pool is not None:
        _POOLS.append(pool)
        with torch.cuda.use_mem_pool(pool):
            buf = torch.empty(_SEGMENT_BYTES, dtype=torch.uint8, device=t.device)
    else:
        buf = torch.empty(_SEGMENT_BYTES, dtype=torch.uint8, device=t.device)
    out = buf[_SEGMENT_BYTES - nbytes:].view(t.dtype).view(t.shape)
    out.copy_(t)
    end = out.data_ptr() + nbytes
    segments = torch.cuda.memory_snapshot()
    if not any(s["address"] + s["total_size"] == end for s in segments):
        print("gpu smoke: note: a tail test's weight does not end at a segment end here (memcheck cannot see a "
              "read past it)", flush=True)
    return out


def _amp_step(dev, g):
    """BCE under autocast, the one-read AMP step with clipping, unscale of misaligned views, and
    a CUDA graph of the step (CUDA only)."""
    model = torch.nn.Linear(257, 129, device=dev)
    opt = FusedAdamW(model.parameters(), lr=1e-3, capturable=dev.type == "cuda")
    scaler = GradScaler(dev.type)
    crit = fusedtrain.FusedBCEWithLogits(pos_weight=torch.rand(129, device=dev, generator=g) + 0.5)
    for _ in range(3):
        x = torch.randn(64, 257, device=dev, generator=g)
        y = torch.rand(64, 129, device=dev, generator=g)
        with torch.autocast(dev.type, dtype=torch.float16):
            loss = crit(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt, max_norm=1.0)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    # views that start off a 16-byte boundary: the kernels' scalar heads
    buf = torch.randn(80000, device=dev, generator=g)
    ts = [buf[k:k + n] for k, n in ((1, 1), (3, 4097), (6, 70001))]
    fusedtrain.unscale_and_check_(ts, torch.full((), 0.5, device=dev), torch.zeros((), device=dev),
                                  compute_norm=True)
    if dev.type == "cuda":
        # a step captured in a CUDA graph (its tables built inside the graph), replayed
        x = torch.randn(64, 257, device=dev, generator=g)
        y = torch.rand(64, 129, device=dev, generator=g)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            scaler.scale(crit(model(x), y)).backward()
            scaler.step(opt, max_norm=1.0)
        for _ in range(2):
            graph.replay()


def _head(dev, g):
    """The many-label head: chunks that do not divide L, an unknown mask, sparse positives."""
    head = fusedtrain.FusedLinearBCEWithLogits(257, 3000, chunk_size=1000, device=dev)
    h = torch.randn(70, 257, device=dev, generator=g, requires_grad=True)
    yh = (torch.rand(70, 3000, device=dev, generator=g) < 0.01).float()
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        head(h, yh, unknown_mask=torch.rand(70, 3000, device=dev, generator=g) < 0.1).backward()
        head(h, yh.to_sparse_csr()).backward()


def _loss_family(dev, g):
    """Focal loss and ASL, forward and backward, in fp32, fp16 and bf16 over 37 x 129 elements (a
    tail past any vector width): their defaults, and a full-shape weight + ignore_index + label
    smoothing; every reduction; once with soft targets that require a gradient."""
    R, C = 37, 129
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(R, C, device=dev, generator=g).to(dtype).requires_grad_()
        y = (torch.rand(R, C, device=dev, generator=g) < 0.3).to(dtype)
        y_unknown = y.clone()
        y_unknown[::5, ::7] = -1.0
        options = dict(weight=torch.rand(R, C, device=dev, generator=g), ignore_index=-1.0, label_smoothing=0.1)
        for extra, target in (({}, y), (options, y_unknown)):
            for cls in (fusedtrain.FusedSigmoidFocalLoss, fusedtrain.FusedAsymmetricLoss):
                for reduction in ("none", "mean", "sum"):
                    loss = cls(reduction=reduction, **extra)(x, target)
                    (loss.sum() * 1024.0).backward()  # a scaled backward, as under AMP
        soft = torch.rand(R, C, device=dev, generator=g).to(dtype).requires_grad_()
        for cls in (fusedtrain.FusedSigmoidFocalLoss, fusedtrain.FusedAsymmetricLoss):
            cls(reduction="mean")(x, soft).backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all()), f"loss family {dtype}: gradient not finite"


def _weighted_bce_tail(dev, g):
    """Weighted BCE of sizes that leave a tail past the vector width (4 fp32 or 8 fp16/bf16
    elements per 16 bytes), with a full-shape weight and pos_weight that end where their
    allocation ends; reduced and not, flat and (R, C)."""
    for dtype, shape in ((torch.float32, (4099,)), (torch.float16, (4100,)), (torch.bfloat16, (4101,)),
                         (torch.float16, (33, 131))):
        x = torch.randn(shape, device=dev, generator=g).to(dtype).requires_grad_()
        y = torch.rand(shape, device=dev, generator=g).to(dtype)
        w = _at_segment_end(torch.rand(shape, device=dev, generator=g))
        pw = _at_segment_end(torch.rand(shape, device=dev, generator=g) + 0.5)
        for reduction in ("none", "mean", "sum"):
            loss = fusedtrain.FusedBCEWithLogits(weight=w, pos_weight=pw, reduction=reduction)(x, y)
            (loss.sum() * 1024.0).backward()
        assert bool(torch.isfinite(x.grad).all()), f"weighted BCE tail {dtype} {shape}: gradient not finite"


# (label, param dtype, FusedAdamW options): the lean states, each on params of which one is large
# enough for a lean format (>= 4096 elements, optim.LEAN_MIN_NUMEL), one has a tail, one is small
LEAN_ADAM = [
    ("state_format=bf16", torch.float32, dict(state_format="bf16")),
    ("state_format=bf16 amsgrad", torch.float32, dict(state_format="bf16", amsgrad=True)),
    ("state_format=bf16 bf16 params stochastic_rounding", torch.bfloat16,
     dict(state_format="bf16", stochastic_rounding=True)),
    ("bf16 params stochastic_rounding amsgrad", torch.bfloat16, dict(stochastic_rounding=True, amsgrad=True)),
    ("bf16 params master_weights", torch.bfloat16, dict(master_weights=True)),
    ("fp16 params master_weights amsgrad", torch.float16, dict(master_weights=True, amsgrad=True)),
    ("bf16 params master_weights state_format=bf16", torch.bfloat16, dict(master_weights=True, state_format="bf16")),
    ("amsgrad", torch.float32, dict(amsgrad=True)),
    ("state_format=8bit", torch.float32, dict(state_format="8bit")),
    ("state_format=8bit bf16 params amsgrad", torch.bfloat16, dict(state_format="8bit", amsgrad=True)),
]


def _not_built(e):
    return isinstance(e, (NotImplementedError, RuntimeError)) and "not built yet" in str(e)


def _lean_adam(dev, g, backend):
    """Three steps of each LEAN_ADAM case: two through the AMP step (grad_mult, found_inf), one
    plain. Returns the labels of the cases this build does not have yet ("not built yet")."""
    not_built = []
    for label, dtype, options in LEAN_ADAM:
        ps = [torch.randn(s, device=dev, generator=g).to(dtype).requires_grad_() for s in ((65, 129), (4099,), (7,))]
        opt = FusedAdamW(ps, lr=1e-3, **options)
        scaler = GradScaler(dev.type, init_scale=1024.0)
        try:
            for i in range(3):
                r = [torch.randn(p.shape, device=dev, generator=g) for p in ps]
                loss = sum((p.float() * ri).sum() for p, ri in zip(ps, r))
                if i < 2:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        except Exception as e:  # noqa: BLE001 - only "not built yet" is reported instead of raised
            if not _not_built(e):
                raise
            not_built.append(label)
            print(f"gpu smoke: {backend}: Adam {label}: not built yet ({type(e).__name__}: {e})", flush=True)
            continue
        assert all(bool(torch.isfinite(p.detach()).all()) for p in ps), f"Adam {label}: non-finite params"
    return not_built


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="native,triton", help="comma-separated; unavailable ones are skipped")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    ran, not_built = [], []
    for backend in args.backends.split(","):
        ok, why = fusedtrain.backends(dev)[backend]
        if not ok:
            print(f"gpu smoke: {backend}: skipped ({why})", flush=True)
            continue
        with fusedtrain.use_backend(backend):
            for name, fn in (("amp step", _amp_step), ("head", _head), ("loss family", _loss_family),
                             ("weighted BCE tail", _weighted_bce_tail)):
                fn(dev, g)
                print(f"gpu smoke: {backend}: {name}: ok", flush=True)
            missing = _lean_adam(dev, g, backend)
            not_built += [f"{backend}: {m}" for m in missing]
            print(f"gpu smoke: {backend}: lean Adam: ok"
                  + (f" ({len(missing)} case(s) not built yet)" if missing else ""), flush=True)
        ran.append(backend)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    if not ran:
        print("gpu smoke: no backend ran", flush=True)
        return 1
    print(f"gpu smoke: ok ({', '.join(ran)})"
          + (f"; not built yet: {'; '.join(not_built)}" if not_built else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
