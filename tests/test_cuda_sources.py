"""The CUDA sources (csrc/*.cu, csrc/cuda_ops.cpp) and, on a GPU, the fastjac._C ops they build.

Without a GPU only the compile check (scripts/check_cuda.sh, needs nvcc) and source-level checks run;
the op tests skip with "no CUDA device". The Philox-4x32-10 reference below (numpy) is checked against
Random123's known-answer vectors here, and on a GPU the CUDA Gaussians are checked against it.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fastjac.ops import uap_step as ops_uap
from tests.helpers import assert_close

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


# ------------------------------------------------------------------------ Philox reference (numpy, CPU)

MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(block, offset: int, seed: int):
    """Philox-4x32-10 of counters (block [array of uint64], offset) under key seed: four uint64 arrays of words."""
    block = np.asarray(block, dtype=np.uint64)
    c0, c1 = block & MASK32, block >> np.uint64(32)
    c2 = np.full_like(block, offset & 0xFFFFFFFF)
    c3 = np.full_like(block, (offset >> 32) & 0xFFFFFFFF)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & MASK32, (k1 + np.uint64(0xBB67AE85)) & MASK32
    return c0, c1, c2, c3


def reference_gaussian(n: int, d: int, seed: int, offset: int) -> np.ndarray:
    """What csrc/projections.cu computes: element e is component e % 4 of Philox block e // 4, Box-Muller."""
    words = philox4x32_10(np.arange((n * d + 3) // 4, dtype=np.uint64), offset, seed)

    def box_muller(a, b):
        u1 = ((a >> np.uint64(8)) + np.uint64(1)).astype(np.float64) / 2.0**24
        u2 = (b >> np.uint64(8)).astype(np.float64) / 2.0**24
        radius = np.sqrt(-2.0 * np.log(u1))
        return radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)

    z0, z1 = box_muller(words[0], words[1])
    z2, z3 = box_muller(words[2], words[3])
    return np.stack([z0, z1, z2, z3], axis=1).reshape(-1)[: n * d].reshape(n, d)


def test_philox_reference_known_answers():
    """Random123's philox4x32_10 known-answer vectors (kat_vectors): the reference the GPU test trusts."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expected in cases:
        words = philox4x32_10([ctr[0] | ctr[1] << 32], ctr[2] | ctr[3] << 32, key[0] | key[1] << 32)
        assert tuple(int(w[0]) for w in words) == expected


# ----------------------------------------------------------------------------------- the ops, on a GPU

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def ext():
    try:
        from fastjac import _C
    except ImportError as error:
        pytest.skip(f"fastjac._C is not built ({error})")
    if not getattr(_C, "WITH_CUDA", False) or not hasattr(_C, "uap_step"):
        pytest.skip("fastjac._C was built without its CUDA ops (torch without CUDA, or no nvcc at build time)")
    return _C


@requires_cuda
@pytest.mark.parametrize("shape", [(1, 5), (3, 7), (4, 2, 33)])
def test_uap_step_bit_identical(ext, shape):
    k = shape[0]
    delta = torch.randn(shape, device="cuda") * 0.1
    grad = torch.randn(shape, device="cuda")
    grad.view(-1)[::3] = 0.0
    step = torch.rand(k, device="cuda") * 0.05
    eps = torch.rand(k, device="cuda") * 0.1 + 0.01
    out = ext.uap_step(delta, grad, step, eps)
    assert torch.equal(out, ops_uap.uap_step(delta, grad, step, eps))
    assert (out.reshape(k, -1).abs().amax(dim=1) <= eps).all()
    assert torch.equal(ops_uap.sign_step(delta, grad, step, eps, backend="cuda"), out)


@requires_cuda
def test_uap_step_checks_arguments(ext):
    delta = torch.zeros(2, 3, device="cuda")
    ok = torch.ones(2, device="cuda")
    with pytest.raises(RuntimeError, match="delta"):
        ext.uap_step(delta.cpu(), delta, ok, ok)
    with pytest.raises(RuntimeError, match="float32"):
        ext.uap_step(delta, delta.double(), ok, ok)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.uap_step(delta, torch.zeros(3, 2, device="cuda").t(), ok, ok)
    with pytest.raises(RuntimeError, match="step"):
        ext.uap_step(delta, delta, torch.ones(3, device="cuda"), ok)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (3, 1000), (7, 2, 5), (0, 4)])
def test_sq_norms(ext, shape, dtype):
    t = torch.randn(shape, device="cuda", dtype=dtype)
    expected = t.reshape(shape[0], -1).pow(2).sum(dim=1)
    eps = torch.finfo(dtype).eps
    length = max(1, t[0].numel() if shape[0] else 1)
    assert_close(ext.sq_norms(t), expected, rtol=8 * length * eps, atol=8 * length * eps, name="sq_norms")


@requires_cuda
def test_projections_gaussian_statistics_and_determinism(ext):
    n, d = 512, 301  # d % 4 != 0: Philox blocks straddle rows
    u = ext.projections_gaussian(n, d, 1234, 0, torch.device("cuda"))
    assert u.shape == (n, d) and u.dtype == torch.float32 and u.is_cuda
    count = n * d
    values = u.double()
    assert abs(values.mean().item()) < 5 / count**0.5  # 5 standard errors of the mean
    assert abs(values.var().item() - 1) < 5 * (2 / count) ** 0.5  # 5 standard errors of the variance
    assert torch.equal(u, ext.projections_gaussian(n, d, 1234, 0, "cuda"))
    assert not torch.equal(u, ext.projections_gaussian(n, d, 1234, 1, "cuda"))
    assert not torch.equal(u, ext.projections_gaussian(n, d, 1235, 0, "cuda"))
    # Counter-based: a pure function of (seed, offset, element index), whatever the shape.
    assert torch.equal(u.reshape(-1)[: 7 * 13], ext.projections_gaussian(7, 13, 1234, 0, "cuda").reshape(-1))


@requires_cuda
def test_projections_gaussian_matches_philox_reference(ext):
    n, d, seed, offset = 9, 37, 2**40 + 17, 2**33 + 5
    u = ext.projections_gaussian(n, d, seed, offset, "cuda").cpu().double()
    # the extension is built with --use_fast_math: logf/sincospif are approximate (near u1 = 1 above all)
    assert_close(u, torch.from_numpy(reference_gaussian(n, d, seed, offset)), rtol=1e-3, atol=2e-3,
                 name="gaussian vs Philox reference")


@requires_cuda
def test_projections_sphere(ext):
    n, c = 300, 10
    v = ext.projections_sphere(n, c, 99, 3, torch.device("cuda"))
    assert v.shape == (n, c) and v.dtype == torch.float32
    assert_close(v.norm(dim=1), torch.ones(n, device="cuda"), rtol=0, atol=1e-5, name="row norms")
    assert torch.equal(v, ext.projections_sphere(n, c, 99, 3, "cuda"))
    assert not torch.equal(v, ext.projections_sphere(n, c, 99, 4, "cuda"))
    gaussian = ext.projections_gaussian(n, c, 99, 3, "cuda")
    assert_close(v, gaussian / gaussian.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6, name="normalised rows")
    # uniform on the sphere: the mean of the rows is near 0 (each coordinate has variance 1/c)
    assert (v.double().mean(dim=0).abs() < 5 / (n * c) ** 0.5).all()
    wide = ext.projections_sphere(3, 5000, 1, 0, "cuda")  # several elements per thread in the reduction
    assert_close(wide.norm(dim=1), torch.ones(3, device="cuda"), rtol=0, atol=1e-5, name="wide row norms")


@requires_cuda
def test_projections_check_arguments(ext):
    with pytest.raises(RuntimeError, match="device must be a CUDA device"):
        ext.projections_gaussian(2, 3, 0, 0, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="n must be"):
        ext.projections_sphere(-1, 3, 0, 0, "cuda")
