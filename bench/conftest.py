"""pytest-benchmark suites over the closures of ``fastjac.benchmark`` (the one harness; nothing here
builds a model or a step of its own).

    pytest bench/ --benchmark-enable          # timed (pytest-benchmark's own calibration)
    pytest bench/                             # pyproject's addopts disable timing: each case runs once

The full table with ratios measured in one run, GFLOP/s against the GEMM peak and the targets is
``python -m fastjac bench`` (bench/RESULTS.md); these suites are for pytest-benchmark's tooling
(--benchmark-compare, --benchmark-json, ...).
"""
import dataclasses
import fnmatch

import pytest
import torch

from fastjac import benchmark as harness

SMOKE_BATCH = 8


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
    it is finite. The case's FLOPs go into the benchmark's extra_info (GFLOP/s = flops / time).

    With timing disabled (pyproject's default) each closure runs once as a smoke test, on a batch of
    ``SMOKE_BATCH`` so the whole suite stays quick.
    """

    def run(spec: harness.CaseSpec):
        if benchmark.disabled:
            spec = dataclasses.replace(spec, batch=SMOKE_BATCH)
        fn = harness.build(spec)
        benchmark.group = f"{spec.arch} M={spec.members}: {harness.LABELS[spec.kind].split(',')[0]}"
        benchmark.extra_info.update(kind=spec.kind, arch=spec.arch, members=spec.members, backend=spec.backend,
                                    k=spec.k, batch=spec.batch, flops=harness.flops(spec))
        result = benchmark(fn)
        assert torch.isfinite(result).all(), f"{spec}: non-finite result"
        return result

    return run
