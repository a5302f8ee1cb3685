"""Triton kernels (kernels/*.py) against the torch launchers of fastjac/ops, which define the semantics
(the perturbed first Linear, Triton-only, against a plain loop written out here), and the kernels'
launch policy: autotune keys, pruning of tiles, dot precision, the device guard, split reductions.

The tensors live on the Triton backend's device: a GPU when one exists; else the CPU, where
tests/conftest.py sets TRITON_INTERPRET=1 before any kernel import, so the kernels run in Triton's
interpreter: the shapes here are tiny and odd (B 1 and 3, IN 5/7, OUT 3/6, M 1 and 2, 1 and 3 streams,
K 1 and 3) so that every tile is partial and the suite stays fast.

Tolerances: a float32 result that sums L products differs from another summation order by at most about
L * eps32 * sum|terms| (eps32 = 2**-23, unit values here), so float32 comparisons use rtol = atol =
8 * L * eps32 with L the reduction length of that output (IN for the forward, rows or members*OUT for the
gradients). Elementwise kernels (stream epilogue, perturb forward, uap_step) do exactly torch's
operations and are compared bit for bit. gradcheck runs in float64 through the autograd Functions with
backend="triton": the interpreter supports float64 ``tl.dot`` (numpy underneath), and on a GPU Triton
lowers float64 dots too.
"""
from __future__ import annotations

import importlib.util
import itertools
import os

import pytest
import torch

from tests.helpers import assert_close

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET=1 is not set: Triton kernels cannot run",
                allow_module_level=True)

import triton.language as tl  # noqa: E402 (after the skips)

from fastjac import backends  # noqa: E402
from fastjac.kernels import _common  # noqa: E402
from fastjac.kernels import stacked_linear as k_linear  # noqa: E402
from fastjac.kernels import stream_epilogue as k_epilogue  # noqa: E402
from fastjac.kernels import uap_step as k_uap  # noqa: E402
from fastjac.ops import stacked_linear as ops_linear  # noqa: E402
from fastjac.ops import stream_epilogue as ops_epilogue  # noqa: E402
from fastjac.ops import uap_step as ops_uap  # noqa: E402
from fastjac.backends import device_for  # noqa: E402

DEVICE = device_for("triton")
EPS32 = torch.finfo(torch.float32).eps
gpu_configs = _common.gpu_configs


def tol(length: int) -> dict:
    """rtol/atol for a float32 sum of ``length`` unit-sized products (see the module docstring)."""
    return {"rtol": 8 * max(length, 1) * EPS32, "atol": 8 * max(length, 1) * EPS32}


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def assert_mask(mask, expected, pre, *, length, name="mask"):
    """Masks must match except where the reference pre-activation is within rounding of 0."""
    assert mask.dtype == torch.bool and mask.shape == expected.shape, f"{name}: {mask.dtype} {tuple(mask.shape)}"
    differ = mask != expected
    ambiguous = pre.abs() <= tol(length)["atol"] * (1 + pre.abs())
    assert not (differ & ~ambiguous).any(), f"{name}: {int((differ & ~ambiguous).sum())} elements differ"


# ------------------------------------------------------------------------------------------ stacked linear

def _linear_case(b, fan_in, out_features, m, streams, has_bias, shared, dtype=torch.float32):
    rows = streams * b
    x = randn(rows, fan_in, dtype=dtype) if shared else randn(m, rows, fan_in, dtype=dtype)
    weight = randn(m, out_features, fan_in, dtype=dtype)
    bias = randn(m, out_features, dtype=dtype) if has_bias else None
    return x, weight, bias


def _check_linear(b, fan_in, out_features, m, streams, has_bias, relu, shared):
    x, weight, bias = _linear_case(b, fan_in, out_features, m, streams, has_bias, shared)
    out, mask = k_linear.stacked_linear_forward(x, weight, bias, streams, relu)
    ref_out, ref_mask = ops_linear.stacked_linear_forward(x, weight, bias, streams, relu)
    assert_close(out, ref_out, name="out", **tol(fan_in))
    if relu:
        pre, _ = ops_linear.stacked_linear_forward(x, weight, bias, streams, False)
        assert_mask(mask, ref_mask, pre[:, :b].reshape(m, -1), length=fan_in)
    else:
        assert mask is None
    grad_out = randn(*ref_out.shape)
    got = k_linear.stacked_linear_backward(grad_out, x, weight, ref_mask, streams, has_bias, True)
    want = ops_linear.stacked_linear_backward(grad_out, x, weight, ref_mask, streams, has_bias, True)
    lengths = {"grad_x": m * out_features if shared else out_features, "grad_weight": streams * b, "grad_bias": b}
    for name, g, w in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
        if w is None:
            assert g is None, name
        else:
            assert_close(g, w, name=name, **tol(lengths[name]))
    assert k_linear.stacked_linear_backward(grad_out, x, weight, ref_mask, streams, has_bias, False)[0] is None


@pytest.mark.parametrize("shared", [True, False])
def test_stacked_linear_stream_groups_and_partial_tiles(monkeypatch, shared):
    """MAX_SLOTS=2 splits 3 tangent streams over 3 programs that recompute the primal tile; 17 rows,
    18 inputs and 17 outputs leave a partial second tile in every dimension (interpreter blocks are 16)."""
    monkeypatch.setattr(k_linear, "MAX_SLOTS", 2)
    _check_linear(17, 18, 17, 2, 4, True, True, shared)


def _kept(prune, table, **meta):
    return [(c.kwargs, c.num_warps, c.num_stages) for c in prune(gpu_configs(table), {}, **meta)]


def test_forward_pruning_caps_the_tile_registers():
    """Registers per thread = (accumulator SLOTS*BLOCK_B x BLOCK_N + operand tiles SLOTS*BLOCK_B x BLOCK_K
    and BLOCK_K x BLOCK_N) / (32 * warps), twice for float64, at most 72. SLOTS = 1: every config fits
    (the largest, 64 x 64 x 64 on 8 warps: 3*4096/256 = 48). SLOTS = 8 in float32 or 4 in float64: none
    fits (16 x 64 x 32 on 4 warps: (8192 + 4096 + 2048)/128 = 112), so only the cheapest runs."""
    table = k_linear.FORWARD_CONFIGS
    assert len(_kept(k_linear.prune_forward_configs, table, SLOTS=1, ACC=tl.float32)) == len(table)
    cheapest = [({"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3)]
    assert _kept(k_linear.prune_forward_configs, table, SLOTS=8, ACC=tl.float32) == cheapest
    assert _kept(k_linear.prune_forward_configs, table, SLOTS=4, ACC=tl.float64) == cheapest
    # float64 doubles the count: the 32 x 64 x 32 tile on 4 warps ((2048 + 1024 + 2048)/128 = 40) drops out
    tile = ({"BLOCK_B": 32, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3)
    assert tile in _kept(k_linear.prune_forward_configs, table, SLOTS=1, ACC=tl.float32)
    assert tile not in _kept(k_linear.prune_forward_configs, table, SLOTS=1, ACC=tl.float64)


def test_pruning_caps_the_shared_memory():
    """A 64 x 64 x 64 grad-weight config on 16 warps with 4 stages: 4 * (64*64 + 64*64) elements of
    shared memory, 128 KB in float32 (kept, within sm_80's 163 KB), 256 KB in float64 (dropped: over
    sm_90's 227 KB too), while its registers fit in both ((3 * 4096) * 2 / 512 = 48)."""
    wide = [({"BLOCK_R": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 16, 4)]
    small = [({"BLOCK_R": 16, "BLOCK_N": 16, "BLOCK_K": 16}, 4, 1)]
    table = wide + small
    assert _kept(k_linear.prune_grad_weight_configs, table, ACC=tl.float32) == table
    assert _kept(k_linear.prune_grad_weight_configs, table, ACC=tl.float64) == small
    assert _kept(k_linear.prune_grad_input_configs, table, ACC=tl.float64) == small


def test_first_config_only_keeps_the_first_that_pruning_keeps(monkeypatch):
    """FASTJAC_TRITON_CONFIGS=first (the suite on a GPU host): one config per launch, the first one kept."""
    table = k_linear.FORWARD_CONFIGS
    every_f32 = _kept(k_linear.prune_forward_configs, table, SLOTS=1, ACC=tl.float32)
    every_f64 = _kept(k_linear.prune_forward_configs, table, SLOTS=1, ACC=tl.float64)
    monkeypatch.setattr(_common, "FIRST_CONFIG_ONLY", True)
    assert _kept(k_linear.prune_forward_configs, table, SLOTS=1, ACC=tl.float32) == every_f32[:1]
    assert _kept(k_linear.prune_forward_configs, table, SLOTS=1, ACC=tl.float64) == every_f64[:1]
    assert _kept(k_linear.prune_forward_configs, table, SLOTS=8, ACC=tl.float32) == [
        ({"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3)]  # none fits: still the cheapest


def test_float64_caps_the_stream_slots():
    """float64 row tiles hold at most MAX_SLOTS_FLOAT64 (4) streams; float32 up to MAX_SLOTS (8)."""
    assert k_linear._slots(9, torch.float32) == (8, 2)  # 1 primal + 7 tangents per group: 8 tangents -> 2 groups
    assert k_linear._slots(9, torch.float64) == (4, 3)  # 3 tangents per group -> 3 groups
    assert k_linear._slots(1, torch.float64) == (1, 1)


def test_stacked_linear_float64_stream_groups():
    """float64 with 6 streams runs in groups of 4 slots (primal recomputed per group): results exact."""
    x, weight, bias = _linear_case(3, 7, 6, 2, 6, True, False, dtype=torch.float64)
    out, mask = k_linear.stacked_linear_forward(x, weight, bias, 6, True)
    ref_out, ref_mask = ops_linear.stacked_linear_forward(x, weight, bias, 6, True)
    assert_close(out, ref_out, rtol=1e-12, atol=1e-12, name="out")
    assert torch.equal(mask, ref_mask)


# ------------------------------------------------------------------------------------------ stream epilogue

# --------------------------------------------------------------------------------------------- uap ops

def _away_from_kinks(shape_x, shape_delta, dtype=torch.float32):
    """x and delta whose sums clamp on both sides but never lie within 0.08 of the kinks 0 and 1."""
    x = torch.tensor([0.1, 0.5, 0.9], dtype=dtype)[torch.randint(0, 3, shape_x)]
    delta = torch.tensor([-0.3, 0.02, 0.3], dtype=dtype)[torch.randint(0, 3, shape_delta)]
    return x.to(DEVICE), delta.to(DEVICE)


# ------------------------------------------------------------------------------------ perturbed linear
# Only the Triton backend has this op; its reference is written out here, plainly, and its gradient is
# autograd's through that reference (torch.clamp and relu: bounds inclusive, relu'(0) = 0, as the kernels).

def reference_perturbed_linear(x, delta, weight, bias, relu):
    """Perturb each sample by each delta_k, then loop over the members: (out [M, K*B, OUT], mask
    [M, K*B*OUT] | None), row k*B + b."""
    rows = [torch.clamp(x[b] + delta[k], 0.0, 1.0).reshape(-1) for k in range(delta.shape[0]) for b in range(x.shape[0])]
    inputs = torch.stack(rows)  # [K*B, IN]
    outs, masks = [], []
    for m in range(weight.shape[0]):
        y = inputs @ weight[m].t()
        if bias is not None:
            y = y + bias[m]
        if relu:
            masks.append((y > 0).reshape(-1))
            y = torch.relu(y)
        outs.append(y)
    return torch.stack(outs), (torch.stack(masks) if relu else None)


def reference_grad_delta(grad_out, x, delta, weight, bias, relu):
    """d sum(out * grad_out) / d delta through the reference."""
    leaf = delta.detach().clone().requires_grad_()
    out, _ = reference_perturbed_linear(x, leaf, weight, bias, relu)
    (out * grad_out).sum().backward()
    return leaf.grad


PERTURBED_CASES = [
    (b, k, fan_in, out_features, m, has_bias, relu)
    for (b, k, fan_in, out_features, m), (has_bias, relu) in zip(
        [(1, 1, 5, 3, 1), (3, 3, 7, 6, 2), (3, 1, 7, 3, 2), (1, 3, 5, 6, 1)] * 2,
        list(itertools.product((True, False), (True, False))) + list(itertools.product((False, True), (True, False))),
    )
]


@pytest.mark.parametrize("b,k,fan_in,out_features,m,has_bias,relu", PERTURBED_CASES)
def test_perturbed_linear_matches_reference(b, k, fan_in, out_features, m, has_bias, relu):
    x = torch.rand(b, fan_in, device=DEVICE)
    delta = (torch.rand(k, fan_in, device=DEVICE) - 0.5) * 0.8  # some sums clamp at 0 or 1
    weight, bias = randn(m, out_features, fan_in), (randn(m, out_features) if has_bias else None)
    out, mask = k_uap.perturbed_linear_forward(x, delta, weight, bias, relu)
    ref_out, ref_mask = reference_perturbed_linear(x, delta, weight, bias, relu)
    assert out.shape == (m, k * b, out_features)
    assert_close(out, ref_out, name="out", **tol(fan_in))
    if relu:
        pre, _ = reference_perturbed_linear(x, delta, weight, bias, False)
        assert_mask(mask, ref_mask, pre.reshape(m, -1), length=fan_in)
    else:
        assert mask is None
    grad_out = randn(m, k * b, out_features)
    assert_close(k_uap.perturbed_linear_backward(grad_out, x, delta, weight, ref_mask),
                 reference_grad_delta(grad_out, x, delta, weight, bias, relu),
                 name="grad_delta", **tol(b * m * out_features))


def test_perturbed_linear_larger_tiles():
    """17 samples (two row tiles per perturbation in the backward), 18 inputs, 17 outputs."""
    x, delta = torch.rand(17, 18, device=DEVICE), (torch.rand(2, 18, device=DEVICE) - 0.5)
    weight, bias = randn(2, 17, 18), randn(2, 17)
    out, mask = k_uap.perturbed_linear_forward(x, delta, weight, bias, True)
    ref_out, ref_mask = reference_perturbed_linear(x, delta, weight, bias, True)
    assert_close(out, ref_out, name="out", **tol(18))
    grad_out = randn(*ref_out.shape)
    assert_close(k_uap.perturbed_linear_backward(grad_out, x, delta, weight, ref_mask),
                 reference_grad_delta(grad_out, x, delta, weight, bias, True),
                 name="grad_delta", **tol(17 * 2 * 17))


def test_perturbed_linear_backward_bounds_inclusive():
    """Sums exactly on 0 or 1 pass the gradient through the fused clamp; a clamped one does not."""
    x = torch.tensor([[0.0, 1.0, 0.5, 0.25]], device=DEVICE)
    delta = torch.tensor([[0.0, 0.0, 0.75, -0.25]], device=DEVICE)
    weight, grad_out = torch.ones(1, 1, 4, device=DEVICE), torch.ones(1, 1, 1, device=DEVICE)
    expected = torch.tensor([[1.0, 1.0, 0.0, 1.0]], device=DEVICE)
    assert torch.equal(k_uap.perturbed_linear_backward(grad_out, x, delta, weight, None), expected)
    assert torch.equal(reference_grad_delta(grad_out, x, delta, weight, None, False), expected)


def test_perturbed_linear_triton_gradcheck_float64():
    x, delta = _away_from_kinks((2, 2, 2), (3, 2, 2), dtype=torch.float64)  # [B, *in] inputs, IN = 4
    weight, bias = randn(2, 3, 4, dtype=torch.float64), randn(2, 3, dtype=torch.float64)
    for relu in (True, False):
        assert torch.autograd.gradcheck(
            lambda d: ops_uap.perturbed_linear(x, d, weight, bias, relu, backends.get("triton"))[0],
            (delta.clone().requires_grad_(),), fast_mode=True)


def test_perturbed_linear_is_differentiable_in_delta_only():
    x, delta = _away_from_kinks((2, 3), (2, 3), dtype=torch.float64)
    weight = randn(2, 4, 3, dtype=torch.float64).requires_grad_()
    bias = randn(2, 4, dtype=torch.float64).requires_grad_()
    delta.requires_grad_()
    out, mask = ops_uap.perturbed_linear(x, delta, weight, bias, True, backends.get("triton"))
    assert not mask.requires_grad
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    assert weight.grad is None and bias.grad is None
    assert_close(delta.grad, reference_grad_delta(grad_out, x, delta, weight.detach(), bias.detach(), True),
                 rtol=1e-12, atol=1e-12, name="grad_delta float64")


def test_perturbed_linear_checks_its_arguments_before_any_launch():
    x, delta, weight = torch.rand(2, 5), torch.rand(3, 5), torch.randn(2, 4, 5)
    triton = backends.get("triton")
    with pytest.raises(ValueError, match="backend 'torch' has no fused perturbed first layer"):
        ops_uap.perturbed_linear(x, delta, weight, None, False, backends.get("torch"))
    with pytest.raises(ValueError, match="features"):
        ops_uap.perturbed_linear(x, delta, torch.randn(2, 4, 6), None, False, triton)
    with pytest.raises(ValueError, match="share"):
        ops_uap.perturbed_linear(x, torch.rand(3, 4), weight, None, False, triton)
    with pytest.raises(ValueError, match="bias"):
        ops_uap.perturbed_linear(x, delta, weight, torch.randn(4), False, triton)
    with pytest.raises(TypeError, match="dtype"):
        ops_uap.perturbed_linear(x, delta.double(), weight, None, False, triton)


# ------------------------------------------------------------------------------ precision, keys, devices

PRECISION_SCRIPT = """
import torch
from fastjac.kernels._common import dot_precision
out = [dot_precision(torch.float32)]            # nothing set: IEEE, like torch's default
torch.backends.cuda.matmul.fp32_precision = "tf32"
out.append(dot_precision(torch.float32))        # the legacy allow_tf32 flag would raise from here on
torch.backends.cuda.matmul.fp32_precision = "ieee"
out.append(dot_precision(torch.float32))
torch.backends.cuda.matmul.fp32_precision = "none"
torch.backends.fp32_precision = "tf32"          # 'none' inherits the global setting
out.append(dot_precision(torch.float32))
out.append(dot_precision(torch.float64))
print(" ".join(out))
"""


def test_dot_precision_reads_the_fp32_precision_api():
    """Regression: once torch's fp32_precision API is used, reading allow_tf32 raises; dot_precision must
    follow the new settings instead. A subprocess, since the settings are process-wide and sticky."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", PRECISION_SCRIPT], capture_output=True, text=True, cwd=root,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ieee", "tf32", "ieee", "tf32", "tf32"]


def test_dot_precision_legacy_setting():
    """Without the new API, torch.set_float32_matmul_precision('high') allows TF32."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert _common.dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert _common.dot_precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)


def test_autotune_key_buckets_the_batch(monkeypatch):
    """Through Triton's own autotuner (two configs, a stub timer): batch sizes 17 and 30 share one tuning
    key (bucket 32), 33 makes a second; a flag that changes the kernel (relu) or the dtype a third/fourth."""
    import triton

    kernel = k_linear._linear_fwd_kernel
    two = [triton.Config({"BLOCK_B": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1),
           triton.Config({"BLOCK_B": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    monkeypatch.setattr(kernel, "configs", two)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_do_bench", lambda call, quantiles: (call(), [1.0, 1.0, 1.0])[1])
    monkeypatch.setattr(kernel, "early_config_prune", None)

    def launch(batch, relu=False, dtype=torch.float32):
        x, weight, _ = _linear_case(batch, 5, 3, 1, 1, False, True, dtype=dtype)
        k_linear.stacked_linear_forward(x, weight, None, 1, relu)

    launch(17)
    launch(30)
    assert len(kernel.cache) == 1
    launch(33)
    assert len(kernel.cache) == 2
    launch(17, relu=True)
    launch(17, dtype=torch.float64)
    assert len(kernel.cache) == 4


class _On:
    """A stand-in tensor: launch_device only reads ``.device``."""

    def __init__(self, device):
        self.device = torch.device(device)


def test_launch_device_guards_the_tensors_device(monkeypatch):
    guard = _common.launch_device(_On("cuda:1"), None, _On("cuda:1"))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # not the current device
    with pytest.raises(RuntimeError, match="one"):
        _common.launch_device(_On("cuda:0"), _On("cuda:1"))
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        _common.launch_device(_On("cpu"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_on_the_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the launch follows the tensors."""
    x = torch.randn(6, 7, device="cuda:1")
    weight, bias = torch.randn(2, 3, 7, device="cuda:1"), torch.randn(2, 3, device="cuda:1")
    with torch.cuda.device(0):
        out, mask = k_linear.stacked_linear_forward(x, weight, bias, 2, True)
    ref_out, ref_mask = ops_linear.stacked_linear_forward(x, weight, bias, 2, True)
    assert out.device == torch.device("cuda:1")
    assert_close(out, ref_out, name="out", **tol(7))


# --------------------------------------------------------------------------------- split reductions

@pytest.fixture
def split_everything(monkeypatch):
    """Make every reduction split as on a large GPU: many programs wanted, chunks of a few terms."""
    monkeypatch.setattr(_common, "PROGRAMS_OFF_GPU", 10_000)
    monkeypatch.setattr(k_linear, "MIN_CHUNK_ROWS", 4)
    monkeypatch.setattr(k_epilogue, "MIN_CHUNK", 5)
    monkeypatch.setattr(k_uap, "MIN_CHUNK_SAMPLES", 2)
    splits = []

    def spy(*args):
        splits.append(_common.reduction_splits(*args))
        return splits[-1]

    for module in (k_linear, k_epilogue, k_uap):
        monkeypatch.setattr(module, "reduction_splits", spy)
    return splits


def test_perturbed_linear_backward_split_batch(split_everything):
    """K = 1, 19 samples in 4 chunks (5, 5, 5, 4): the partial sums add up to the reference's gradient."""
    x, delta = torch.rand(19, 18, device=DEVICE), (torch.rand(1, 18, device=DEVICE) - 0.5)
    weight = randn(2, 17, 18)
    _, mask = reference_perturbed_linear(x, delta, weight, None, True)
    grad_out = randn(2, 19, 17)
    got = k_uap.perturbed_linear_backward(grad_out, x, delta, weight, mask)
    assert split_everything == [4]
    assert_close(got, reference_grad_delta(grad_out, x, delta, weight, None, True), name="grad_delta",
                 **tol(19 * 2 * 17))


def test_bias_grad_split(split_everything):
    """A convolution-like epilogue (O = 1, NB = 3, rep = 4, 7 repeats): 28 elements per entry in 5 chunks
    (6, 6, 6, 6, 4), which cut through the rep runs."""
    nb, rep, repeats = 3, 4, 7
    grad_out, mask = randn(1, 2, nb * rep * repeats), torch.rand(1, nb * rep * repeats, device=DEVICE) > 0.5
    grad_y, grad_bias = k_epilogue.stream_epilogue_backward(grad_out, mask, nb, rep, True)
    assert split_everything == [5]
    ref_grad_y, ref_grad_bias = ops_epilogue.stream_epilogue_backward(grad_out, mask, nb, rep, True)
    assert torch.equal(grad_y, ref_grad_y)
    assert_close(grad_bias, ref_grad_bias, name="grad_bias", **tol(rep * repeats))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perturb_backward_split(split_everything, dtype):
    """7 samples in 3 chunks (3, 3, 1), K = 2."""
    x, delta = torch.rand(7, 2, 3, device=DEVICE, dtype=dtype), torch.rand(2, 2, 3, device=DEVICE, dtype=dtype) - 0.5
    grad = randn(2, 7, 2, 3, dtype=dtype)
    got = k_uap.perturb_backward(grad, x, delta)
    assert split_everything == [3]
    assert_close(got, ops_uap.perturb_backward(grad, x, delta), name="grad_delta", **tol(7))
