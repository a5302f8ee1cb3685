"""The table's cases (``fastjac.benchmark.cases``) as pytest parameters for the pytest-benchmark suites:
exactly the rows ``python -m fastjac bench`` runs, every backend by name; a backend not benchmarked here
is a skip naming the reason, and a case of the benchmark's unfused member is an expected failure while
the generic path cannot run it (the table reports the same failure as its row)."""
from __future__ import annotations

import functools

import pytest
import torch

from fastjac import backends
from fastjac import benchmark as harness
from fastjac.ensemble import Ensemble

DEVICE = "cpu"
# torch 2.13, CPU: fails in the full suite's process (after other compiled cases), passes run alone; open upstream
COMPILED_JVP_BUG = ("torch.compile of the backward of torch.func.jvp can fail with 'ZeroTensors are immutable' "
                    "(pytorch/pytorch#177261, open)")


@functools.cache
def generic_path_failure(arch: str) -> str | None:
    """Why an Ensemble of ``arch`` members cannot run its forward on the generic path (None: it can)."""
    try:
        Ensemble(harness.make_members(arch, 2)).member_logits(torch.rand(2, 1, 28, 28))
    except Exception as error:  # noqa: BLE001 (the reason is the message)
        return harness._first_line(error)
    return None


def case_params(kinds, archs=None, members=harness.MEMBERS) -> list:
    """pytest params: every CaseSpec of ``kinds`` the table runs for ``archs`` x ``members``."""
    params = []
    for arch in archs or harness.arch_names():
        for m in members:
            for spec in harness.cases(arch, m, backends.NAMES):
                if spec.kind not in kinds:
                    continue
                marks = []
                reason = None if spec.backend in ("auto", "-") else harness.not_benchmarked(spec.backend, DEVICE)
                if reason:
                    marks.append(pytest.mark.skip(reason=f"backend {spec.backend!r}: {reason}"))
                fastjac_case = spec.backend != "-"  # "-": plain PyTorch, no Ensemble
                failure = generic_path_failure(arch) if arch in harness.UNFUSED_ARCHS and fastjac_case else None
                if failure:
                    marks.append(pytest.mark.xfail(reason=f"the generic path cannot run {arch} yet: {failure}",
                                                   strict=False))
                if spec.kind == "peer_jvp_compiled":  # a PyTorch bug in the peer, not fastjac code
                    marks.append(pytest.mark.xfail(reason=COMPILED_JVP_BUG, raises=RuntimeError, strict=False))
                params.append(pytest.param(spec, marks=marks, id=f"{spec.kind}-{arch}-M{m}-{spec.backend}-K{spec.k}"))
    return params


# ------------------------------------------------------------------------------------- fused ops
def op_backends() -> list:
    """pytest params (backend, device) for the per-op suites: every backend on its device, each that
    cannot run here a skip with the reason (Triton's CPU interpreter is a correctness tool, not timed)."""
    from tests.helpers import backend_devices

    return backend_devices(interpreter_skip="Triton runs in its CPU interpreter here (tests only, not timed)")


def skip_if_same_launchers(backend: str, launchers, torch_launchers) -> None:
    """A backend that runs this op with the torch launchers has nothing of its own to time."""
    if backend != "torch" and launchers == torch_launchers:
        pytest.skip(f"{backend!r} runs this op with the torch launchers")


def check_like_torch(actual, expected, length: int = 1, name: str = "value") -> None:
    """A fast op's float32 result against the torch launcher's: ``sum_tolerance`` for a value summing
    ``length`` terms (checked once before timing, so a benchmark never times a wrong kernel)."""
    from fastjac.testing import assert_close, sum_tolerance

    tolerance = sum_tolerance(torch.float32, length, factor=8.0)
    for a, e in zip(actual if isinstance(actual, tuple) else (actual,), expected if isinstance(expected, tuple)
                    else (expected,)):
        if e is None:
            assert a is None, name
        elif e.dtype == torch.bool:
            assert torch.equal(a, e), name
        else:
            assert_close(a, e, rtol=tolerance, atol=tolerance * float(e.abs().max()), name=name)
