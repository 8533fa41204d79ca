"""Integration tests with the trainers people use: Hugging Face Transformers and Accelerate,
PyTorch Lightning (`make test-integration`).

They are collected only when asked for -- the command line names tests/integration (or a file
in it), or a `-m` expression mentions `integration` -- so that `make test` (`pytest tests`)
neither imports these frameworks nor spends their time, installed or not. A module whose
framework is not installed skips itself (pytest.importorskip at its top).
"""
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _asked_for(config):
    if "integration" in (config.getoption("markexpr") or ""):
        return True
    for arg in config.args:  # paths, possibly followed by ::test ids
        path = os.path.abspath(os.path.join(str(config.invocation_params.dir), arg.split("::")[0]))
        if path == HERE or path.startswith(HERE + os.sep):
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    # called for the files of this folder only (a conftest's hooks see its own folder)
    if os.path.abspath(str(collection_path)).startswith(HERE + os.sep) and not _asked_for(config):
        return True
    return None


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The models here are tiny: a second intra-op thread buys nothing, and on a busy machine
    OpenMP's barriers made each tiny op wait for a descheduled thread (a 16-step Trainer run
    took 10 s with 2 threads under load, 0.5 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
