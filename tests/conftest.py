"""Backend x device cases for every op-family test.

The normal pytest run covers native-cpu and reference-cpu (plus triton-cuda and native-cuda
where a GPU is present). The Triton kernels run on CPU tensors under the Triton interpreter
in pytest processes started with TRITON_INTERPRET=1 (it must be set before triton is
imported); those generate only the triton-cpu cases, marked triton_interp, and `make test`
selects them with -m triton_interp, in two processes of half of them each (--shard).
"""
import pytest
import torch

from helpers import INTERPRET

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_interp: Triton kernels executed by the interpreter on CPU")
    config.addinivalue_line("markers", "integration: with Transformers/Accelerate/Lightning (make test-integration)")


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run the I-th (from 0) of N interleaved slices of the selected tests "
                          "(make test runs the interpreter's tests as two such processes)")


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected theirs
def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if not shard:
        return
    try:
        i, n = (int(x) for x in shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"--shard expects I/N with 0 <= I < N, got {shard!r}") from None
    # interleaved, not contiguous: a test's parametrized cases (similar costs) spread over the slices
    config.hook.pytest_deselected(items=[it for k, it in enumerate(items) if k % n != i])
    items[:] = items[i::n]


def backend_cases():
    """pytest params of (backend, device) for the backends this process can run."""
    if INTERPRET:
        return [pytest.param(("triton", "cpu"), id="triton-cpu", marks=pytest.mark.triton_interp)]
    cases = [pytest.param(("native", "cpu"), id="native-cpu"),
             pytest.param(("reference", "cpu"), id="reference-cpu")]
    if HAS_CUDA:
        cases += [pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
                  pytest.param(("native", "cuda"), id="native-cuda", marks=pytest.mark.gpu)]
    return cases


@pytest.fixture(params=backend_cases())
def backend_device(request):
    """(backend, device) with the backend forced for the duration of the test."""
    import fusedtrain

    backend, device = request.param
    ok, why = fusedtrain._backend.availability(backend, torch.device(device))
    if not ok:
        pytest.skip(f"{backend} on {device}: {why}")
    with fusedtrain.use_backend(backend):
        yield backend, device
