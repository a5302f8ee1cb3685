"""Shared test set-up: seeds and the Triton interpreter on CPU-only machines (assert helper: tests/helpers.py)."""
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # one config per GEMM kernel, no autotuning: compiles, not tests, took most of the GPU suite's time
    os.environ.setdefault("FASTJAC_TRITON_CONFIGS", "first")

# Tests run with the automatic backend choice unless a test names one.
os.environ.pop("FASTJAC_BACKEND", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield



@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a small
    shared machine, intra-op threads only spin against other processes. Module scope, so it is in force
    for the module's fixtures too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fashion():
    """Real Fashion-MNIST: (x_train, y_train, x_test, y_test)."""
    import fastjac.data

    x, y = fastjac.data.load("fashion-mnist", "train")
    x_test, y_test = fastjac.data.load("fashion-mnist", "test")
    return x, y, x_test, y_test


@pytest.fixture(params=["by member", "stacked"])
def passes(request, monkeypatch):
    """Both ways an ensemble with BatchNorm runs: member by member (``Engine.by_member``: the CPU's way)
    and stacked (every other device's); each must give the reference's values. Other models run stacked
    under both."""
    import fastjac.engine

    if request.param == "stacked":
        monkeypatch.setattr(fastjac.engine.Engine, "by_member", lambda self, device: False)
    return request.param
