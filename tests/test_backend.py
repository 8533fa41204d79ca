"""Backend availability, defaults and explicit choice (DESIGN §2)."""
import os
import subprocess
import sys

import pytest
import torch

import fusedtrain
from fusedtrain import _backend

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs in the normal test process")


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
