"""The CUDA sources (csrc/*.cu, csrc/cuda_ops.cpp) and, on a GPU, the fastjac._C op they build (the cuda
backend's fused UAP update; its GEMMs and other ops are ATen's).

Without a GPU only the compile check (scripts/check_cuda.sh, needs nvcc) and source-level checks run;
the op tests skip with "no CUDA device". On a GPU they run on every visible CUDA device.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import torch

from fastjac.ops import uap_step as ops_uap

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


# ------------------------------------------------------------------------------------- sources, no GPU

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_check_cuda_script_compiles_every_cu_file():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda.sh")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"check_cuda.sh failed:\n{result.stdout}\n{result.stderr}"
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "no csrc/*.cu files"
    for source in sources:
        assert f"ok    csrc/{source.name}" in result.stdout, result.stdout


def test_cuda_sources_include_no_torch_headers():
    for path in [*CSRC.glob("*.cu"), CSRC / "cuda_launchers.h"]:
        includes = re.findall(r"^\s*#\s*include\s*[<\"]([^>\"]+)[>\"]", path.read_text(), flags=re.M)
        bad = [name for name in includes if name.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
        assert not bad, f"{path.name} includes {bad}: the CUDA launchers must stay torch-free"


def test_cuda_ops_cpp_is_empty_without_cuda():
    """The CPU build compiles every csrc/*.cpp: cuda_ops.cpp must be all inside #ifdef FASTJAC_WITH_CUDA."""
    code = [line.strip() for line in (CSRC / "cuda_ops.cpp").read_text().splitlines()
            if line.strip() and not line.strip().startswith("//")]
    assert code[0] == "#ifdef FASTJAC_WITH_CUDA", code[0]
    assert code[-1].startswith("#endif"), code[-1]


# ----------------------------------------------------------------------------------- the ops, on a GPU

# Every visible CUDA device (cuda:1 exercises the op's device guard), or one visible skip.
CUDA_DEVICES = [f"cuda:{index}" for index in range(torch.cuda.device_count())] or [
    pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device"))]


@pytest.fixture
def ext():
    try:
        from fastjac import _C
    except ImportError as error:
        pytest.skip(f"fastjac._C is not built ({error})")
    if not getattr(_C, "WITH_CUDA", False) or not hasattr(_C, "uap_step"):
        pytest.skip("fastjac._C was built without its CUDA ops (torch without CUDA, or no nvcc at build time)")
    return _C


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("shape", [(1, 5), (3, 7), (4, 2, 33)])
def test_uap_step_bit_identical(ext, device, shape):
    k = shape[0]
    delta = torch.randn(shape, device=device) * 0.1
    grad = torch.randn(shape, device=device)
    grad.view(-1)[::3] = 0.0
    step = torch.rand(k, device=device) * 0.05
    eps = torch.rand(k, device=device) * 0.1 + 0.01
    out = ext.uap_step(delta, grad, step, eps)
    assert out.device == delta.device
    assert torch.equal(out, ops_uap.uap_step(delta, grad, step, eps))
    assert (out.reshape(k, -1).abs().amax(dim=1) <= eps).all()
    assert torch.equal(ops_uap.sign_step(delta, grad, step, eps, backend="cuda"), out)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_uap_step_checks_arguments(ext, device):
    delta = torch.zeros(2, 3, device=device)
    ok = torch.ones(2, device=device)
    with pytest.raises(RuntimeError, match="delta"):
        ext.uap_step(delta.cpu(), delta, ok, ok)
    with pytest.raises(RuntimeError, match="float32"):
        ext.uap_step(delta, delta.double(), ok, ok)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.uap_step(delta, torch.zeros(3, 2, device=device).t(), ok, ok)
    with pytest.raises(RuntimeError, match="step"):
        ext.uap_step(delta, delta, torch.ones(3, device=device), ok)
