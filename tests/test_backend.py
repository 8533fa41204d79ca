"""Backend availability, defaults and explicit choice (docs/design.md §2)."""
import subprocess
import sys

import pytest
import torch

import fusedtrain
from fusedtrain import _backend
from helpers import normal_only

pytestmark = normal_only


def test_backends_reports_every_backend_with_a_reason():
    b = fusedtrain.backends("cpu")
    assert set(b) == {"triton", "native", "reference"}
    assert b["reference"] == (True, "")
    for name, (ok, why) in b.items():
        assert ok or why, f"{name} unavailable without a reason"
    assert b["triton"][0] is False and "TRITON_INTERPRET" in b["triton"][1]


def test_default_choice_on_cpu():
    expected = "native" if fusedtrain.backends("cpu")["native"][0] else "reference"
    assert _backend.select(torch.device("cpu"), "op") == expected


def test_use_backend_forces_and_nests():
    with fusedtrain.use_backend("reference"):
        assert _backend.select(torch.device("cpu"), "op") == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        with fusedtrain.use_backend("cuda"):
            pass


def test_explicit_backend_that_cannot_run_says_why():
    with fusedtrain.use_backend("triton"):
        with pytest.raises(fusedtrain.BackendError, match="triton.*cannot run on cpu.*TRITON_INTERPRET"):
            _backend.select(torch.device("cpu"), "bce")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FUSEDTRAIN_BACKEND", "reference")
    assert _backend.select(torch.device("cpu"), "op") == "reference"
    monkeypatch.setenv("FUSEDTRAIN_BACKEND", "bogus")
    with pytest.raises(fusedtrain.BackendError, match="FUSEDTRAIN_BACKEND"):
        _backend.select(torch.device("cpu"), "op")


def test_package_imports_without_extension():
    # A pure-Python install (no compiler, FUSEDTRAIN_BUILD_EXT=0) must import and choose reference.
    code = ("import sys; sys.modules['fusedtrain._C'] = None\n"
            "import fusedtrain, torch\n"
            "ok, why = fusedtrain.backends('cpu')['native']\n"
            "assert not ok and 'not built' in why, why\n"
            "assert fusedtrain._backend.select(torch.device('cpu'), 'op') == 'reference'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the default order for CUDA tensors, with availability monkeypatched (no GPU needed) ----

@pytest.fixture
def fake_availability(monkeypatch):
    """set(triton=..., native=...) makes the triton package importable or not and the native
    CUDA kernels built or not, as availability() sees them."""
    monkeypatch.delenv("FUSEDTRAIN_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def set_(triton, native):
        monkeypatch.setattr(_backend, "_triton_importable", lambda: triton)
        monkeypatch.setattr(_backend, "_triton_import_error", "" if triton else "triton is not installed (pretend)")
        monkeypatch.setattr(_backend._ext, "native_cuda", lambda: (True, "") if native else (False, "no CUDA kernels"))
        monkeypatch.setattr(_backend._ext, "native_cpu", lambda: (True, "") if native else (False, "not built"))

    return set_


@pytest.mark.parametrize("triton,native,expected", [
    (True, True, "triton"),
    (True, False, "triton"),
    (False, True, "native"),
    (False, False, "reference"),
])
def test_default_order_for_cuda_tensors(fake_availability, triton, native, expected):
    fake_availability(triton, native)
    assert _backend.select(torch.device("cuda"), "op") == expected
    assert _backend.select(torch.device("cuda", 1), "op") == expected
    b = fusedtrain.backends("cuda")
    assert b["triton"][0] is triton and b["native"][0] is native and b["reference"] == (True, "")


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_default_order_for_cpu_tensors_never_picks_triton(fake_availability, monkeypatch, interpret):
    # under TRITON_INTERPRET=1 triton can run CPU tensors, but only when asked for
    fake_availability(True, True)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert fusedtrain.backends("cpu")["triton"][0] is (interpret == "1")
    assert _backend.select(torch.device("cpu"), "op") == "native"
    fake_availability(True, False)
    assert _backend.select(torch.device("cpu"), "op") == "reference"


def test_explicit_choice_on_cuda_that_cannot_run_says_why(fake_availability):
    fake_availability(False, False)
    for name, why in (("triton", "not installed"), ("native", "no CUDA kernels")):
        with fusedtrain.use_backend(name):
            with pytest.raises(fusedtrain.BackendError, match=f"{name}.*cannot run on cuda.*{why}"):
                _backend.select(torch.device("cuda"), "adam")
    with fusedtrain.use_backend("reference"):
        assert _backend.select(torch.device("cuda"), "adam") == "reference"
