"""Benchmarks of the unscale-and-check pass and of GradScaler clipping.

Rows (same inputs, same process, median after warm-up):
* unscale+check: torch._amp_foreach_non_finite_check_and_unscale_ (one call per dtype
  group, what torch.amp.GradScaler.unscale_ runs) vs fusedtrain.unscale_and_check_.
* unscale+check+clip: torch.amp.GradScaler.unscale_ + torch.nn.utils.clip_grad_norm_ vs
  fusedtrain.GradScaler.clip_grad_norm_ (check+norm read pass, then one scaling pass).
* whole AMP step (unscale, check, clip, AdamW, update): torch's best composition
  (GradScaler.unscale_ + clip_grad_norm_(foreach=True) + GradScaler.step(AdamW(fused=True))
  + update) vs fusedtrain's one-read step (GradScaler.step(FusedAdamW, max_norm=...) +
  update): one read of the gradients, then the fused AdamW kernel.
on the 22M mix (4096x4096, 4096x1024, 1024x1024, 40x4096) and on 1000 tensors of 4096.
* host: the host's share of the Triton path at 1000 params of 4 elements, with every Triton
  kernel launch replaced by a no-op (what is left is Python and torch dispatch: issue #13
  item 6): the one-read step (GradScaler.step(FusedAdamW, max_norm) + update), the step
  without clipping (GradScaler.step(FusedAdamW) + update) and the functional
  fusedtrain.unscale_and_check_, each against torch's composition of the same step (its
  kernels run: at 4 elements a call is its dispatch). Where the Triton backend runs: CUDA, or
  CPU tensors under TRITON_INTERPRET=1 (the interpreter's own tile choice is switched off,
  so the host path is the GPU's less its pinned uploads).

The scale is 1 and max_norm large, so the gradients keep their values from call to call
(torch still multiplies by the clamped coefficient, and so do we).

    python -m fusedtrain.benchmarks.amp [--quick] [--device cpu|cuda] [--json out.json]
    TRITON_INTERPRET=1 python -m fusedtrain.benchmarks.amp --host --device cpu   # host rows only
"""
import contextlib
import sys
from collections import defaultdict

import torch

import fusedtrain

from .. import _backend
from . import harness
from .harness import Row

MIX = [(4096, 4096), (4096, 1024), (1024, 1024), (40, 4096)]


def _cases(quick):
    cases = [("22M mix", MIX), ("1000x4096", [(4096,)] * 1000)]
    if quick:
        cases = [("5M mix", [(2048, 2048), (1024, 1024)]), ("200x4096", [(4096,)] * 200)]
    return cases


def _params(shapes, dtype, device):
    g = torch.Generator().manual_seed(0)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device))
        p.grad = torch.randn(s, generator=g).to(dtype=dtype, device=device)
        ps.append(p)
    return ps


def _ours_backends(device):
    names = ["triton", "native"] if torch.device(device).type == "cuda" else ["native"]
    return [n for n in names if _backend.availability(n, torch.device(device))[0]]


def _best_of(fns, device, reps, rounds):
    """Time each fn `rounds` times, interleaved, and keep each one's best median: on a
    shared machine a busy neighbour then penalizes neither side systematically."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], harness.time_ms(fn, device, reps=reps))
    return best


def _alternating(fn, invs):
    """fn(inv) with inv alternating between 2**-8 and 2**8: realistic scales, and the values
    come back every two calls (no drift to denormals or overflow)."""
    state = [0]

    def call():
        state[0] ^= 1
        return fn(invs[state[0]])

    return call


def run(device, quick):
    """The unscale, clipping and whole-step rows (harness.Row) of this device.

    Args:
        device: "cpu" or "cuda".
        quick: smaller workloads and fewer repetitions.
    """
    dev = torch.device(device)
    reps = 5 if quick else 15
    rounds = 1 if quick else 3
    rows = []
    for case, shapes in _cases(quick):
        numel = sum(torch.Size(s).numel() for s in shapes)
        for dtype in (torch.float32, torch.bfloat16):
            ps = _params(shapes, dtype, device)
            grads = [p.grad for p in ps]
            invs = [torch.tensor(2.0**-8, device=dev), torch.tensor(2.0**8, device=dev)]
            found = torch.zeros((), dtype=torch.float32, device=dev)
            base_fn = _alternating(lambda inv: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv), invs)
            ours_fn = _alternating(lambda inv: fusedtrain.unscale_and_check_(grads, inv, found), invs)
            for b in _ours_backends(device):
                with fusedtrain.use_backend(b):
                    base, ours = _best_of([base_fn, ours_fn], device, reps, rounds)
                rows.append(Row("amp", f"unscale+check {case}", str(dtype).replace("torch.", ""),
                                "_amp_foreach_non_finite_check_and_unscale_", base, b, ours,
                                bytes_moved=2 * numel * ps[0].element_size()))
        # clipping: fp32 grads (torch's GradScaler refuses fp16 grads in unscale_)
        ps = _params(shapes, torch.float32, device)
        opt = torch.optim.SGD(ps, lr=0.0)
        max_norm = 1e30

        tscaler = torch.amp.GradScaler(dev.type, init_scale=1.0)
        tscaler.scale(torch.ones((), device=dev))

        def torch_clip():
            tscaler._per_optimizer_states = defaultdict(torch.amp.grad_scaler._refresh_per_optimizer_state)
            tscaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(ps, max_norm)

        oscaler = fusedtrain.GradScaler(dev.type, init_scale=1.0)
        oscaler.scale(torch.ones((), device=dev))

        def ours_clip():
            oscaler._per_optimizer_states = defaultdict(torch.amp.grad_scaler._refresh_per_optimizer_state)
            oscaler.clip_grad_norm_(opt, max_norm)

        for b in _ours_backends(device):
            with fusedtrain.use_backend(b):
                base, ours = _best_of([torch_clip, ours_clip], device, reps, rounds)
            # clipping is inactive here (max_norm huge): on CPU ours unscales inside the norm
            # pass and skips the scaling pass (1 read + 1 write); on a GPU 2 reads + 1 write
            words = 2 if dev.type == "cpu" else 3
            rows.append(Row("amp", f"unscale+check+clip {case}", "float32",
                            "GradScaler.unscale_ + clip_grad_norm_", base, b, ours,
                            bytes_moved=words * numel * 4,
                            note=f"ours: {words} fp32 words per element; torch: 3 reads + 2 writes"))
        rows += _whole_step_rows(case, shapes, numel, device, reps, rounds)
    return rows + host_run(device, quick)


def _whole_step_rows(case, shapes, numel, device, reps, rounds):
    dev = torch.device(device)
    max_norm = 1e30  # gradients keep their values from call to call
    tps, ops_ = _params(shapes, torch.float32, device), _params(shapes, torch.float32, device)
    lean_ps = _params(shapes, torch.float32, device)
    topt = torch.optim.AdamW(tps, lr=1e-6, fused=True)
    oopt = fusedtrain.FusedAdamW(ops_, lr=1e-6)
    lean_opt = fusedtrain.FusedAdamW(lean_ps, lr=1e-6, state_format="bf16")
    q8_ps = _params(shapes, torch.float32, device)
    q8_opt = fusedtrain.FusedAdamW(q8_ps, lr=1e-6, state_format="8bit")
    tscaler = torch.amp.GradScaler(dev.type, init_scale=1.0, growth_interval=10**9)
    oscaler = fusedtrain.GradScaler(dev.type, init_scale=1.0, growth_interval=10**9)
    one = torch.ones((), device=dev)

    def torch_step():
        tscaler.scale(one)
        tscaler.unscale_(topt)
        torch.nn.utils.clip_grad_norm_(tps, max_norm, foreach=True)
        tscaler.step(topt)
        tscaler.update()

    def ours_step(opt=oopt):
        oscaler.scale(one)
        oscaler.step(opt, max_norm=max_norm)
        oscaler.update()

    rows = []
    for b in _ours_backends(device):
        with fusedtrain.use_backend(b):
            base, ours, lean, q8 = _best_of([torch_step, ours_step, lambda: ours_step(lean_opt),
                                             lambda: ours_step(q8_opt)], device, reps, rounds)
        rows.append(Row("amp", f"whole AMP step {case}", "float32",
                        "unscale_+clip(foreach)+AdamW(fused)", base, b, ours, bytes_moved=32 * numel,
                        note="fp32 words per param: ours 8 (grad read twice, p/m/v read+write), torch 13"))
        rows.append(Row("amp", f"whole AMP step {case}, bf16 moments", "float32",
                        "unscale_+clip(foreach)+AdamW(fused)", base, f"{b} state_format=bf16", lean,
                        bytes_moved=24 * numel, note="bytes per param: ours 24 (grad twice, p r+w, bf16 m/v r+w)"))
        rows.append(Row("amp", f"whole AMP step {case}, 8bit moments", "float32",
                        "unscale_+clip(foreach)+AdamW(fused)", base, f"{b} state_format=8bit", q8,
                        bytes_moved=20 * numel, note="bytes per param: ours ~20 (grad twice, p r+w, 8-bit m/v r+w)"))
    return rows


@contextlib.contextmanager
def _no_triton_launches():
    """Every Triton kernel of the AMP step (unscale, Adam) launches nothing inside the block:
    their host work (argument checks, tables, launch arguments) still runs. Under the
    interpreter, multi_tensor.tile takes the GPU's tile (no scan of the tensors' sizes)."""
    from fusedtrain.triton import adam as triton_adam
    from fusedtrain.triton import multi_tensor
    from fusedtrain.triton import unscale as triton_unscale

    kernels = [triton_unscale.unscale_kernel, triton_adam._adam_kernel]
    saved = [k.__dict__.get("run") for k in kernels]
    interpret = multi_tensor._INTERPRET
    try:
        for k in kernels:
            k.run = lambda *args, **kwargs: None  # what kernel[grid](...) calls
        multi_tensor._INTERPRET = False
        yield
    finally:
        multi_tensor._INTERPRET = interpret
        for k, r in zip(kernels, saved):
            if r is None:
                del k.run
            else:
                k.run = r


def _host_rows(device, quick):
    """The host rows (module docstring): 1000 fp32 params of 4 elements."""
    dev = torch.device(device)
    reps, rounds = (20, 2) if quick else (50, 5)
    shapes = [(4,)] * 1000
    ps, tps = _params(shapes, torch.float32, device), _params(shapes, torch.float32, device)
    one = torch.ones((), device=dev)
    max_norm = 1e30
    topt = torch.optim.AdamW(tps, lr=1e-6, fused=True)
    oopt = fusedtrain.FusedAdamW(ps, lr=1e-6)
    tscaler = torch.amp.GradScaler(dev.type, init_scale=1.0, growth_interval=10**9)
    oscaler = fusedtrain.GradScaler(dev.type, init_scale=1.0, growth_interval=10**9)

    def torch_step(clip):
        tscaler.scale(one)
        tscaler.unscale_(topt)
        if clip:
            torch.nn.utils.clip_grad_norm_(tps, max_norm, foreach=True)
        tscaler.step(topt)
        tscaler.update()

    def ours_step(clip):
        oscaler.scale(one)
        oscaler.step(oopt, max_norm=max_norm if clip else None)
        oscaler.update()

    grads, tgrads = [p.grad for p in ps], [p.grad for p in tps]
    inv = torch.ones((), device=dev)
    found = torch.zeros((), device=dev)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny host ops: one thread (a busy host's spinning OpenMP team adds ms of noise)
    try:
        rows = _host_pairs(device, reps, rounds, torch_step, ours_step, tgrads, grads, inv, found)
    finally:
        torch.set_num_threads(threads)
    return rows


def _host_pairs(device, reps, rounds, torch_step, ours_step, tgrads, grads, inv, found):
    rows = []
    with fusedtrain.use_backend("triton"), _no_triton_launches():
        for clip, what in ((True, "one-read step (GradScaler.step max_norm + update)"),
                           (False, "GradScaler.step + update")):
            base, ours = _best_of([lambda: torch_step(clip), lambda: ours_step(clip)], device, reps, rounds)
            rows.append(Row("amp", f"host: {what}, 1000 params of 4", "float32",
                            "torch GradScaler + AdamW(fused)" + (" + clip(foreach)" if clip else ""), base,
                            "triton (no-op launches)", ours))
        base, ours = _best_of([lambda: torch._amp_foreach_non_finite_check_and_unscale_(tgrads, found, inv),
                               lambda: fusedtrain.unscale_and_check_(grads, inv, found)], device, reps, rounds)
        rows.append(Row("amp", "host: unscale_and_check_, 1000 tensors of 4", "float32",
                        "_amp_foreach_non_finite_check_and_unscale_", base, "triton (no-op launch)", ours))
    return rows


def host_run(device, quick):
    """The host rows alone (empty where the Triton backend does not run on `device`)."""
    if not _backend.availability("triton", torch.device(device))[0]:
        print(f"host rows: the triton backend does not run on {device} here "
              f"({_backend.availability('triton', torch.device(device))[1]})", file=sys.stderr)
        return []
    return _host_rows(device, quick)


if __name__ == "__main__":
    if "--host" in sys.argv:
        sys.argv.remove("--host")
        harness.main(host_run)
    else:
        harness.main(run)
