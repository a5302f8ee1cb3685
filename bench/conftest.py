"""pytest-benchmark suites over the closures of ``fastjac.benchmark`` (the one harness: the step,
inference and UAP suites build nothing of their own) and one suite per fused op (bench_<op>.py).

    pytest bench/ --benchmark-enable          # timed (pytest-benchmark's own calibration)
    pytest bench/                             # pyproject's addopts disable timing: each case runs once

The full table with ratios measured in one run and GFLOP/s against the GEMM peak is ``python -m fastjac
bench`` (bench/RESULTS.md); the targets are ``python -m bench.targets``, the estimator variance
``python -m bench.variance``. These suites are for pytest-benchmark's tooling (--benchmark-compare,
--benchmark-json, ...).
"""
import dataclasses
import fnmatch

import pytest
import torch

from fastjac import benchmark as harness

SMOKE_BATCH = 8
# torch.compile takes tens of seconds per case on a small CPU: a smoke run compiles one group only
SMOKE_COMPILED = ("mlp", 1)


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py (the project's python_files only names test_*.py). pytest's own collector
    already takes a file named on the command line, or one python_files matches."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path) or any(
            fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def run_case(benchmark):
    """run_case(spec) -> the result of the timed closure ``fastjac.benchmark.build(spec)``, after checking
    it is finite. The case's FLOPs (``count_flops``) go into the benchmark's extra_info.

    With timing disabled (pyproject's default) each closure runs once as a smoke test, on a batch of
    ``SMOKE_BATCH`` so the whole suite stays quick; compiled cases then run for ``SMOKE_COMPILED`` only.
    """

    def run(spec: harness.CaseSpec):
        compiled = harness.KINDS[spec.kind].eager_twin is not None
        if benchmark.disabled:
            if compiled and (spec.arch, spec.members) != SMOKE_COMPILED:
                pytest.skip(f"torch.compile takes tens of seconds per case: the smoke run compiles "
                            f"{SMOKE_COMPILED[0]} M={SMOKE_COMPILED[1]} only (--benchmark-enable runs all)")
            spec = dataclasses.replace(spec, batch=SMOKE_BATCH)
        if compiled:
            torch._dynamo.reset()  # each compiled case compiles afresh (Dynamo's recompile limit)
        fn = harness.build(spec)
        benchmark.group = f"{spec.arch} M={spec.members}: {harness.KINDS[spec.kind].label.split(',')[0]}"
        benchmark.extra_info.update(kind=spec.kind, arch=spec.arch, members=spec.members, backend=spec.backend,
                                    k=spec.k, batch=spec.batch, flops=harness.count_flops(spec))
        result = benchmark(fn)
        assert torch.isfinite(result).all(), f"{spec}: non-finite result"
        return result

    return run
