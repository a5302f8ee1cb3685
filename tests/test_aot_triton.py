"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90 (scripts/aot_triton.py): no GPU and
no interpreter needed, so CI catches a kernel that would not compile, or would not fit a GPU's shared
memory, before anyone runs it on a GPU.

The quick matrix (every config each kernel keeps, float32 and float64, on its heaviest flags) runs in
the suite; FASTJAC_AOT=full runs the full matrix (every launch variant: 30+ minutes on 2 cores).
The script runs in a subprocess because tests/conftest.py sets TRITON_INTERPRET=1 in this one, and a
kernel decorated under the interpreter cannot be compiled.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

KERNELS = ["_linear_fwd_kernel", "_linear_grad_input_kernel", "_linear_grad_weight_kernel", "_epilogue_fwd_kernel",
           "_epilogue_grad_kernel", "_bias_grad_kernel", "_perturb_fwd_kernel", "_perturb_bwd_kernel",
           "_uap_step_kernel"]


def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    full = os.environ.get("FASTJAC_AOT") == "full"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = [sys.executable, str(ROOT / "scripts" / "aot_triton.py"), "--arch", "80", "90"]
    result = subprocess.run(command + ([] if full else ["--quick"]), capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=7200 if full else 900)
    assert result.returncode == 0, f"aot_triton failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert "aot_triton: ok" in result.stdout
    for kernel in KERNELS:  # every kernel reached by a launcher, for both targets
        for target in ("sm_80", "sm_90"):
            assert f"| {kernel} | {target} | f32 |" in result.stdout, (kernel, target, result.stdout)
