"""fusedtrain/benchmarks/stream_floor.c, the Adam rows' memory floor: one pass must read and
write every byte the step does (a floor that skipped some would flatter the ratio it bounds),
for fp32, bf16 and 8-bit moments, split between threads as the kernels are."""
import pytest
import torch

from fusedtrain.benchmarks import stream_floor

pytestmark = pytest.mark.skipif(not stream_floor.available(), reason="no C compiler for the floor")

SIZES = [1, 4095, 4096 * 3 + 7, 100_003]  # odd tails, and runs that cross tensors between threads


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_pass_reads_and_writes_every_element(state_dtype, threads):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(n, generator=g) for n in SIZES]
    gs = [torch.randn(n, generator=g) for n in SIZES]
    if state_dtype == torch.uint8:
        ms = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in SIZES]
        vs = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in SIZES]
    else:
        ms = [torch.randn(n, generator=g).to(state_dtype) for n in SIZES]
        vs = [torch.rand(n, generator=g).to(state_dtype) for n in SIZES]
    before = [[t.clone() for t in lst] for lst in (ps, ms, vs)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stream_floor.make_pass(ps, gs, ms, vs)()
    finally:
        torch.set_num_threads(old)
    if state_dtype == torch.float32:
        for p, p0, grad, m, m0, v, v0 in zip(ps, before[0], gs, ms, before[1], vs, before[2]):
            torch.testing.assert_close(m, 0.9 * m0 + 0.1 * grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v, 0.999 * v0 + 0.001 * grad * grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p, 0.999 * p0 - 1e-3 * m, rtol=1e-5, atol=1e-6)
        return
    bits = torch.int16 if state_dtype == torch.bfloat16 else torch.uint8
    for p, p0, grad in zip(ps, before[0], gs):
        torch.testing.assert_close(p, 0.999 * p0 - 1e-3 * grad, rtol=1e-6, atol=1e-6)
    for lst, lst0 in zip((ms, vs), before[1:]):
        for t, t0 in zip(lst, lst0):
            assert torch.equal(t.view(bits) ^ t0.view(bits), torch.ones_like(t0.view(bits))), \
                "a moment element was not flipped exactly once"


def test_rejects_what_it_cannot_stream():
    p, grad = torch.zeros(8), torch.zeros(8)
    with pytest.raises(ValueError, match="one element size"):
        stream_floor.make_pass([p, p], [grad, grad], [torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)],
                               [torch.zeros(8), torch.zeros(8)])
    with pytest.raises(ValueError, match="float32"):
        stream_floor.make_pass([p.double()], [grad], [torch.zeros(8)], [torch.zeros(8)])
    with pytest.raises(ValueError, match="param's size"):
        stream_floor.make_pass([p], [grad], [torch.zeros(9)], [torch.zeros(8)])
    with pytest.raises(ValueError, match="contiguous"):
        stream_floor.make_pass([p], [grad], [torch.zeros(16)[::2]], [torch.zeros(8)])
