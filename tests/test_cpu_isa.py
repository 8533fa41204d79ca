"""The two copies of the CPU kernels (csrc/cpu/cpu_isa.h): AVX2 and AVX-512, chosen per process by
torch's CPU capability. The rest of the suite runs the copy this machine picks (AVX-512 where the
CPU has it); here the other copy, reached with ATEN_CPU_CAPABILITY=avx2 in a child process, must
give the same values: elementwise outputs equal but for a rare difference in the last bit (the
compiler contracts a*b+c into an FMA differently for the two widths, and sleef's exp/log1p
differ in a last bit now and then), 8-bit codes and step counts equal, reductions equal up to
their summation order (8 lanes against 16)."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fusedtrain
from fusedtrain import _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason="native extension not loaded")

# Every CPU kernel family on inputs the child makes from fixed seeds: odd sizes (vector tails),
# broadcast weights, every storage dtype, the generic loss path (focal, ASL with a non-integer
# exponent, smoothing, an ignore value), the unit-gradient and the scaled backward, and Adam's
# state formats (fp32, bf16 with stochastic rounding, 8-bit, amsgrad, master weights).
_CHILD = r"""
import sys, torch, fusedtrain
from fusedtrain import _ext
import fusedtrain.functional as FF
torch.set_num_threads(2)
out = {"kernels": _ext._C.cpu_kernels()}
g = torch.Generator().manual_seed(0)
R, C = 333, 77
x64 = torch.randn(R, C, generator=g, dtype=torch.float64) * 4
y = (torch.rand(R, C, generator=g) < 0.3).double()
ysoft = torch.rand(R, C, generator=g, dtype=torch.float64)
w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
pw = torch.rand(C, generator=g, dtype=torch.float64) * 3
losses = {
    "bce": lambda x, t, red: FF.binary_cross_entropy_with_logits(x, t, weight=w.to(x.dtype), pos_weight=pw.to(x.dtype),
                                                                 reduction=red),
    "bce_smooth_ignore": lambda x, t, red: FF.binary_cross_entropy_with_logits(x, t, reduction=red,
                                                                               label_smoothing=0.1, ignore_index=-1.0),
    "focal": lambda x, t, red: FF.sigmoid_focal_loss(x, t, reduction=red),
    "asl": lambda x, t, red: FF.asymmetric_loss(x, t, gamma_neg=3.5, gamma_pos=1.0, reduction=red),
}
with fusedtrain.use_backend("native"):
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for name, fn in losses.items():
            t = ysoft if name == "asl" else y.clone()
            if name == "bce_smooth_ignore":
                t[::7, ::3] = -1.0
            for red, scale in (("none", None), ("mean", None), ("mean", 3.0), ("sum", 3.0)):
                x = x64.to(dt).requires_grad_()
                loss = fn(x, t.to(dt), red)
                (loss.sum() if red == "none" else loss * (scale or 1.0)).backward()
                out[f"{name} {dt} {red} {scale}"] = (loss.detach(), x.grad)
    # Adam: 3 steps of each format on sizes past the 8-bit threshold and off the vector width
    shapes = [(70001,), (4099,), (3, 5)]
    for fmt, pdt, kw in (("fp32", torch.float32, {}), ("bf16", torch.float32, {"amsgrad": True}),
                         ("bf16", torch.bfloat16, {"stochastic_rounding": True}), ("8bit", torch.float32, {}),
                         ("8bit", torch.float32, {"amsgrad": True}), ("8bit", torch.bfloat16, {"master_weights": True}),
                         ("8bit", torch.bfloat16, {"stochastic_rounding": True}),
                         ("fp32", torch.float16, {"master_weights": True})):
        gp = torch.Generator().manual_seed(1)
        ps = [torch.randn(s, generator=gp).to(pdt).requires_grad_() for s in shapes]
        opt = fusedtrain.FusedAdamW(ps, lr=1e-2, weight_decay=0.1, state_format=fmt, **kw)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gp).to(pdt)
            opt.step()
        key = f"adam {fmt} {pdt} {sorted(kw)}"
        out[key] = [p.detach().clone() for p in ps] + [v for p in ps for v in opt.state[p].values()
                                                       if torch.is_tensor(v)]
    # 8-bit exp_avg codes at every tie between codes (test_adam_8bit.py checks those of the copy
    # the suite runs against an independent encoder)
    sys.path.insert(0, sys.argv[2])
    from helpers import q8_exp_avg_edge_values
    from test_adam_8bit import exp_avg_codes_after_one_step
    out["adam 8bit exp_avg codes at ties"] = exp_avg_codes_after_one_step(q8_exp_avg_edge_values(), "cpu")[::2]
    # unscale + check + norm, every dtype, one grad holding an inf
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        gs = [torch.randn(n, generator=g).to(dt) * 1000 for n in (100003, 17, 1)]
        found = torch.zeros(1)
        norm = fusedtrain.unscale_and_check_(gs, torch.tensor([1 / 1024.0]), found, compute_norm=True)
        out[f"unscale {dt}"] = (gs, found, norm)
    # the many-label head's epilogue (the matmul is oneDNN's, the same in both processes)
    torch.manual_seed(2)
    head = fusedtrain.FusedLinearBCEWithLogits(40, 1001, pos_weight=torch.rand(1001) + 0.5)
    h = torch.randn(64, 40, requires_grad=True)
    tgt = (torch.rand(64, 1001) < 0.05).float()
    loss = head(h, tgt)
    loss.backward()
    out["head"] = (loss.detach(), h.grad, head.weight.grad, head.bias.grad)
torch.save(out, sys.argv[1])
"""


def _run_child(path, capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, FUSEDTRAIN_EXT_WARNING="0")
    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), tests], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(path)


def test_cpu_ops_run_the_copy_torch_picks():
    built = _ext._C.cpu_capability
    running = _ext._C.cpu_kernels()
    assert built in ("AVX2+AVX512", "AVX2", "DEFAULT")
    want = "AVX512" if (torch.backends.cpu.get_cpu_capability() == "AVX512" and "AVX512" in built) else (
        "AVX2" if built.startswith("AVX2") else "DEFAULT")
    assert running == want
    assert f"running {running}" in _ext.describe()


def _flat(v):
    if torch.is_tensor(v):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for item in v for t in _flat(item)]
    return []


@pytest.mark.skipif(_ext._C is not None and _ext._C.cpu_kernels() != "AVX512",
                    reason="this CPU (or torch) does not run the AVX-512 copy: only one copy can run here")
def test_avx2_copy_gives_the_avx512_copys_bits(tmp_path):
    avx512 = _run_child(tmp_path / "avx512.pt", "avx512")
    avx2 = _run_child(tmp_path / "avx2.pt", "avx2")
    assert (avx512.pop("kernels"), avx2.pop("kernels")) == ("AVX512", "AVX2")
    assert avx512.keys() == avx2.keys() and len(avx512) == 61
    for key in avx512:
        a, b = _flat(avx512[key]), _flat(avx2[key])
        assert len(a) == len(b) and a, key
        for i, (ta, tb) in enumerate(zip(a, b)):
            what = f"{key} [{i}]"
            if not ta.dtype.is_floating_point:  # step counts aside, 8-bit codes
                assert torch.equal(ta, tb), what
            elif ta.dim() == 0 or key == "head":  # a loss reduction, a norm: lanes summed in another order
                torch.testing.assert_close(tb, ta, rtol=16 * torch.finfo(ta.dtype).eps, atol=0, msg=what)
            else:  # elementwise: the same formulas, rounded alike but for a rare last bit (FMA contraction, sleef)
                torch.testing.assert_close(tb, ta, rtol=2 * torch.finfo(ta.dtype).eps, atol=1e-30, equal_nan=True,
                                           msg=what)
                # a last bit now and then (up to 7% of focal's gradients), not everywhere
                assert (ta != tb).float().mean() < 0.25, f"{what}: more than 25% of the elements differ"


# AVX-512 code, by encoding: an instruction whose first byte (after an address-size or segment
# prefix) is 0x62 is EVEX-encoded, which in 64-bit mode means AVX-512; and the mask-register
# instructions (VEX-encoded k* ops), by their %k operands.
_PREFIXES = {"67", "26", "2e", "36", "3e", "64", "65"}
_MASK_REG = re.compile(r"%k[0-7]\b")


def _is_avx512(line):
    parts = line.split("\t")
    if len(parts) < 3:
        return False
    code = [b for b in parts[1].split() if b not in _PREFIXES]
    return (bool(code) and code[0] == "62") or bool(_MASK_REG.search(parts[2]))


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None, reason="binutils not installed")
def test_no_linker_merged_function_holds_avx512_code():
    """An inline function both copies emit is one symbol after linking: the copy the linker kept
    must be the AVX2 one, or an AVX2-only CPU would run AVX-512 code from a shared helper. And
    what runs when the library loads, on every CPU (the static initializers of the AVX-512
    translation units: <iostream>'s among them), must hold no AVX-512 code either."""
    so = _ext._C.__file__
    if "AVX512" not in _ext._C.cpu_capability:
        pytest.skip("this build has no AVX-512 copy")
    weak = set()
    for line in subprocess.run(["nm", "--defined-only", so], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in ("W", "V", "u"):
            weak.add(parts[2])
    dis = subprocess.run(["objdump", "-d", "-w", so], capture_output=True, text=True, check=True).stdout
    offenders, avx512_functions = [], 0
    for block in re.split(r"\n(?=[0-9a-f]+ <)", dis):
        m = re.match(r"[0-9a-f]+ <([^>]+)>:", block)
        if not m or not any(_is_avx512(line) for line in block.splitlines()[1:]):
            continue
        avx512_functions += 1
        name = m.group(1)
        if (name in weak and "AVX512" not in name) or name.startswith(("_GLOBAL__sub_I", "__static_init")):
            offenders.append(name)
    assert avx512_functions > 50, "no AVX-512 code found: the AVX-512 copies were not built, or the pattern is wrong"
    assert not offenders, f"linker-merged functions with AVX-512 code (an AVX-512 object linked first?): {offenders[:20]}"


def test_avx512_copies_link_after_every_other_object():
    """What the linker-merge test checks in the built library, checked in the build's source list:
    setuptools links in sorted path order, `fusedtrain build` (torch's JIT) in the list's order and
    names objects by basename."""
    from fusedtrain import _build_spec

    csrc = _build_spec.csrc_dir(os.path.dirname(fusedtrain.__file__))
    for cuda in (False, True):
        srcs = [os.path.relpath(p, csrc) for p in _build_spec.sources(csrc, cuda)]
        avx512 = [p for p in srcs if p.startswith("x86_avx512" + os.sep)]
        assert len(avx512) == 4, srcs
        for order in (srcs, sorted(srcs)):
            assert order[-len(avx512):] == sorted(avx512), f"an AVX-512 copy is not linked last: {order}"
        names = [os.path.basename(p).rsplit(".", 1)[0] + (".cuda" if p.endswith(".cu") else "") for p in srcs]
        assert len(set(names)) == len(names), f"two sources share an object name: {names}"
