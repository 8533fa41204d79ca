"""The "host:" rows of fusedtrain/benchmarks/amp.py (issue #13 item 6): the host's share of the
Triton AMP step with its kernel launches replaced by no-ops, measured here under the
interpreter; the launches are real again afterwards."""
import pytest

from helpers import INTERPRET

pytestmark = [pytest.mark.triton_interp,
              pytest.mark.skipif(not INTERPRET, reason="the Triton backend runs CPU tensors under the interpreter")]


def test_host_rows_time_the_step_without_its_launches():
    from fusedtrain.benchmarks import amp
    from fusedtrain.triton import adam as triton_adam
    from fusedtrain.triton import multi_tensor
    from fusedtrain.triton import unscale as triton_unscale

    rows = amp.host_run("cpu", quick=True)
    assert [r.case.split(",")[0] for r in rows] == [
        "host: one-read step (GradScaler.step max_norm + update)", "host: GradScaler.step + update",
        "host: unscale_and_check_"]
    assert all(r.ours_ms > 0 and r.baseline_ms > 0 for r in rows)
    for k in (triton_unscale.unscale_kernel, triton_adam._adam_kernel):
        assert "run" not in k.__dict__, "a kernel's launch is still a no-op after the rows"
    assert multi_tensor._INTERPRET
