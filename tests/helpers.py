"""Test helpers shared by every test file: backends and devices as parameters that skip with the reason
they cannot run here, and the tolerance helpers (the comparisons themselves live in fastjac.testing,
shared with ``verify`` and the benchmarks)."""
import pytest
import torch

from fastjac import backends
from fastjac.testing import assert_close, sum_tolerance  # noqa: F401 (re-exported for the tests)


def needs_backend(name: str):
    """Skip marker for tests of one backend, with the reason it cannot run here (e.g. extension not built)."""
    reason = backends._why_unavailable(name)
    return pytest.mark.skipif(reason is not None, reason=f"backend {name!r} unavailable: {reason}")


def backend_devices(names=backends.NAMES, *, interpreter_skip: str | None = None):
    """pytest params (backend, device) for every backend in ``names`` on its device, plus 'torch' on a
    CUDA device; each that cannot run here is a skip naming the reason. ``interpreter_skip``: Triton on
    the CPU interpreter is a skip too, for this reason (e.g. in a benchmark)."""
    pairs = []
    for name in names:
        pairs.append((name, backends.device_for(name, "cpu").type))
        if name == "torch":
            pairs.append(("torch", "cuda"))
    params = []
    for name, device in pairs:
        reason = backends._why_unavailable(name)
        if reason is None and device == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device"
        if reason is None and interpreter_skip and interpreted(name, device):
            reason = interpreter_skip
        marks = pytest.mark.skip(reason=f"{name} on {device}: {reason}") if reason else ()
        params.append(pytest.param(name, device, marks=marks, id=f"{name}-{device}"))
    return params


def interpreted(backend: str, device: str) -> bool:
    """True for kernels running in an interpreter (Triton's, on the CPU): tests keep to small shapes there."""
    return backends._why_unavailable(backend) is None and backends.get(backend).interpreted


def close(actual, expected, dtype, length: int = 1, factor: float = 4.0, name: str = "value"):
    """``actual`` against a float64 ``expected`` with ``sum_tolerance(dtype, length)``: a value that sums
    ``length`` O(1) terms (1 for elementwise results)."""
    tolerance = sum_tolerance(dtype, length, factor)
    assert_close(actual, expected, rtol=tolerance, atol=tolerance, name=name)
