"""Triton kernels (kernels/*.py) against the torch launchers of fastjac/ops, which define the semantics.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before any kernel import, so the
kernels run in Triton's interpreter on the CPU: the shapes here are tiny and odd (B 1 and 3, IN 5/7,
OUT 3/6, M 1 and 2, 1 and 3 streams, K 1 and 3) so that every tile is partial and the suite stays fast.

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

from fastjac.kernels import stacked_linear as k_linear  # noqa: E402 (after the skips)
from fastjac.kernels import stream_epilogue as k_epilogue  # noqa: E402
from fastjac.kernels import uap_step as k_uap  # noqa: E402
from fastjac.ops import stacked_linear as ops_linear  # noqa: E402
from fastjac.ops import stream_epilogue as ops_epilogue  # noqa: E402
from fastjac.ops import uap_step as ops_uap  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps


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

SHAPES = [(1, 5, 3, 1), (3, 7, 6, 2), (3, 5, 6, 2), (1, 7, 3, 2)]  # (B, IN, OUT, M)
LINEAR_CASES = [
    (*SHAPES[i % len(SHAPES)], streams, has_bias, relu, shared)
    for i, (streams, has_bias, relu, shared) in enumerate(itertools.product((1, 3), (True, False), (True, False),
                                                                            (True, False)))
]


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


@pytest.mark.parametrize("b,fan_in,out_features,m,streams,has_bias,relu,shared", LINEAR_CASES)
def test_stacked_linear_matches_torch(b, fan_in, out_features, m, streams, has_bias, relu, shared):
    _check_linear(b, fan_in, out_features, m, streams, has_bias, relu, shared)


@pytest.mark.parametrize("shared", [True, False])
def test_stacked_linear_stream_groups_and_partial_tiles(monkeypatch, shared):
    """MAX_SLOTS=2 splits 3 tangent streams over 3 programs that recompute the primal tile; 17 rows,
    18 inputs and 17 outputs leave a partial second tile in every dimension (interpreter blocks are 16)."""
    monkeypatch.setattr(k_linear, "MAX_SLOTS", 2)
    _check_linear(17, 18, 17, 2, 4, True, True, shared)


def test_forward_autotune_pruning_bounds_the_row_tile():
    import triton

    configs = [triton.Config({"BLOCK_B": b, "BLOCK_N": 64, "BLOCK_K": 32}) for b in (16, 32, 64)]
    assert [c.kwargs["BLOCK_B"] for c in k_linear.prune_forward_configs(configs, {}, SLOTS=8)] == [16, 32]
    assert [c.kwargs["BLOCK_B"] for c in k_linear.prune_forward_configs(configs, {}, SLOTS=1)] == [16, 32, 64]
    assert [c.kwargs["BLOCK_B"] for c in k_linear.prune_forward_configs(configs, {}, SLOTS=64)] == [16]


def test_stacked_linear_triton_gradcheck_float64():
    x, weight, bias = _linear_case(2, 3, 2, 2, 2, True, True, dtype=torch.float64)
    x2 = randn(2, 4, 3, dtype=torch.float64)
    for inputs in ((x, weight, bias), (x2, weight, bias)):
        inputs = tuple(t.clone().requires_grad_() for t in inputs)
        assert torch.autograd.gradcheck(
            lambda *a: ops_linear.stacked_linear(*a, streams=2, relu=True, backend="triton")[0], inputs,
            fast_mode=True)
    inputs = tuple(t.clone().requires_grad_() for t in (x, weight))
    assert torch.autograd.gradcheck(
        lambda *a: ops_linear.stacked_linear(*a, streams=1, relu=False, backend="triton")[0], inputs, fast_mode=True)


# ------------------------------------------------------------------------------------------ stream epilogue

@pytest.mark.parametrize("o,s,nb,rep,repeats", [(1, 1, 3, 1, 2), (2, 3, 3, 4, 1), (2, 2, 5, 2, 3)])
@pytest.mark.parametrize("has_bias,relu", [(True, True), (True, False), (False, True), (False, False)])
def test_stream_epilogue_matches_torch(o, s, nb, rep, repeats, has_bias, relu):
    length = nb * rep * repeats
    y, bias = randn(o, s, length), (randn(o, nb) if has_bias else None)
    out, mask = k_epilogue.stream_epilogue_forward(y, bias, rep, relu)
    ref_out, ref_mask = ops_epilogue.stream_epilogue_forward(y, bias, rep, relu)
    assert torch.equal(out, ref_out)  # same elementwise operations: bit-identical
    assert (mask is None and ref_mask is None) or (mask.dtype == torch.bool and torch.equal(mask, ref_mask))
    grad_out = randn(o, s, length)
    grad_y, grad_bias = k_epilogue.stream_epilogue_backward(grad_out, ref_mask, nb, rep, has_bias)
    ref_grad_y, ref_grad_bias = ops_epilogue.stream_epilogue_backward(grad_out, ref_mask, nb, rep, has_bias)
    assert torch.equal(grad_y, ref_grad_y)
    if has_bias:
        assert_close(grad_bias, ref_grad_bias, name="grad_bias", **tol(length // nb))
    else:
        assert grad_bias is None


def test_stream_epilogue_triton_gradcheck_float64():
    launchers = (k_epilogue.stream_epilogue_forward, k_epilogue.stream_epilogue_backward)
    y, bias = randn(2, 3, 12, dtype=torch.float64), randn(2, 3, dtype=torch.float64)
    inputs = (y.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, b: ops_epilogue.stream_epilogue(a, b, 2, True, launchers)[0], inputs, fast_mode=True)


# --------------------------------------------------------------------------------------------- uap ops

def _away_from_kinks(shape_x, shape_delta, dtype=torch.float32):
    """x and delta whose sums clamp on both sides but never lie within 0.08 of the kinks 0 and 1."""
    x = torch.tensor([0.1, 0.5, 0.9], dtype=dtype)[torch.randint(0, 3, shape_x)]
    delta = torch.tensor([-0.3, 0.02, 0.3], dtype=dtype)[torch.randint(0, 3, shape_delta)]
    return x.to(DEVICE), delta.to(DEVICE)


@pytest.mark.parametrize("b,k,shape", [(1, 1, (5,)), (3, 3, (7,)), (3, 1, (2, 3))])
def test_perturb_matches_torch(b, k, shape):
    x, delta = torch.rand(b, *shape, device=DEVICE), (torch.rand(k, *shape, device=DEVICE) - 0.5)
    out = k_uap.perturb_forward(x, delta)
    assert torch.equal(out, ops_uap.perturb_forward(x, delta))
    grad = randn(k, b, *shape)
    assert_close(k_uap.perturb_backward(grad, x, delta), ops_uap.perturb_backward(grad, x, delta),
                 name="grad_delta", **tol(b))


def test_perturb_backward_bounds_inclusive():
    """x + delta exactly 0 or 1 passes the gradient (torch.clamp's convention); outside does not."""
    x = torch.tensor([[0.0, 1.0, 0.25, 0.5, 1.0, 0.0]], device=DEVICE)
    delta = torch.tensor([[0.0, 0.0, -0.25, 0.5, 0.5, -0.5]], device=DEVICE)
    grad = torch.ones(1, 1, 6, device=DEVICE)
    expected = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]], device=DEVICE)
    assert torch.equal(k_uap.perturb_backward(grad, x, delta), expected)
    assert torch.equal(ops_uap.perturb_backward(grad, x, delta), expected)


def test_perturb_triton_gradcheck_float64():
    x, delta = _away_from_kinks((3, 4), (2, 4), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda d: ops_uap.perturb(x, d, backend="triton"), (delta.requires_grad_(),),
                                    fast_mode=True)


@pytest.mark.parametrize("k,shape", [(1, (5,)), (3, (7,)), (3, (2, 3))])
def test_uap_step_bit_identical_and_projected(k, shape):
    delta = randn(k, *shape) * 0.1
    grad = randn(k, *shape)
    grad.view(-1)[::3] = 0.0  # sign 0: the entry only gets projected
    step = torch.rand(k, device=DEVICE) * 0.05
    eps = torch.rand(k, device=DEVICE) * 0.1 + 0.01  # smaller than some |delta|: the clamp is active
    out = k_uap.uap_step(delta, grad, step, eps)
    ref = ops_uap.uap_step(delta, grad, step, eps)
    assert torch.equal(out, ref)
    assert (out.reshape(k, -1).abs().amax(dim=1) <= eps).all()
    assert torch.equal(ops_uap.sign_step(delta, grad, step, eps, backend="triton"), ref)


# ------------------------------------------------------------------------------------ perturbed linear

PERTURBED_CASES = [
    (b, k, fan_in, out_features, m, has_bias, relu)
    for (b, k, fan_in, out_features, m), (has_bias, relu) in zip(
        [(1, 1, 5, 3, 1), (3, 3, 7, 6, 2), (3, 1, 7, 3, 2), (1, 3, 5, 6, 1)] * 2,
        list(itertools.product((True, False), (True, False))) + list(itertools.product((False, True), (True, False))),
    )
]


@pytest.mark.parametrize("b,k,fan_in,out_features,m,has_bias,relu", PERTURBED_CASES)
def test_perturbed_linear_matches_torch(b, k, fan_in, out_features, m, has_bias, relu):
    x = torch.rand(b, fan_in, device=DEVICE)
    delta = (torch.rand(k, fan_in, device=DEVICE) - 0.5) * 0.8  # some sums clamp at 0 or 1
    weight, bias = randn(m, out_features, fan_in), (randn(m, out_features) if has_bias else None)
    out, mask = k_uap.perturbed_linear_forward(x, delta, weight, bias, relu)
    ref_out, ref_mask = ops_uap.perturbed_linear_forward(x, delta, weight, bias, relu)
    assert out.shape == (m, k * b, out_features)
    assert_close(out, ref_out, name="out", **tol(fan_in))
    if relu:
        pre, _ = ops_uap.perturbed_linear_forward(x, delta, weight, bias, False)
        assert_mask(mask, ref_mask, pre.reshape(m, -1), length=fan_in)
    else:
        assert mask is None
    grad_out = randn(m, k * b, out_features)
    assert_close(k_uap.perturbed_linear_backward(grad_out, x, delta, weight, ref_mask),
                 ops_uap.perturbed_linear_backward(grad_out, x, delta, weight, ref_mask),
                 name="grad_delta", **tol(b * m * out_features))


def test_perturbed_linear_larger_tiles():
    """17 samples (two row tiles per perturbation in the backward), 18 inputs, 17 outputs."""
    x, delta = torch.rand(17, 18, device=DEVICE), (torch.rand(2, 18, device=DEVICE) - 0.5)
    weight, bias = randn(2, 17, 18), randn(2, 17)
    out, mask = k_uap.perturbed_linear_forward(x, delta, weight, bias, True)
    ref_out, ref_mask = ops_uap.perturbed_linear_forward(x, delta, weight, bias, True)
    assert_close(out, ref_out, name="out", **tol(18))
    grad_out = randn(*ref_out.shape)
    assert_close(k_uap.perturbed_linear_backward(grad_out, x, delta, weight, ref_mask),
                 ops_uap.perturbed_linear_backward(grad_out, x, delta, weight, ref_mask),
                 name="grad_delta", **tol(17 * 2 * 17))


def test_perturbed_linear_backward_bounds_inclusive():
    """Sums exactly on 0 or 1 pass the gradient through the fused clamp; a clamped one does not."""
    x = torch.tensor([[0.0, 1.0, 0.5, 0.25]], device=DEVICE)
    delta = torch.tensor([[0.0, 0.0, 0.75, -0.25]], device=DEVICE)
    weight, grad_out = torch.ones(1, 1, 4, device=DEVICE), torch.ones(1, 1, 1, device=DEVICE)
    expected = torch.tensor([[1.0, 1.0, 0.0, 1.0]], device=DEVICE)
    assert torch.equal(k_uap.perturbed_linear_backward(grad_out, x, delta, weight, None), expected)
    assert torch.equal(ops_uap.perturbed_linear_backward(grad_out, x, delta, weight, None), expected)


def test_perturbed_linear_triton_gradcheck_float64():
    x, delta = _away_from_kinks((2, 2, 2), (3, 2, 2), dtype=torch.float64)  # [B, *in] inputs, IN = 4
    weight, bias = randn(2, 3, 4, dtype=torch.float64), randn(2, 3, dtype=torch.float64)
    for relu in (True, False):
        assert torch.autograd.gradcheck(
            lambda d: ops_uap.perturbed_linear(x, d, weight, bias, relu=relu, backend="triton")[0],
            (delta.clone().requires_grad_(),), fast_mode=True)
    # Also through the autograd Function: only delta gets a gradient, and it matches the torch backend.
    d1, d2 = delta.clone().requires_grad_(), delta.clone().requires_grad_()
    out1, _ = ops_uap.perturbed_linear(x, d1, weight, bias, relu=True, backend="triton")
    out2, _ = ops_uap.perturbed_linear(x, d2, weight, bias, relu=True, backend="torch")
    g = torch.randn_like(out1)
    (out1 * g).sum().backward()
    (out2 * g).sum().backward()
    assert_close(d1.grad, d2.grad, rtol=1e-12, atol=1e-12, name="grad_delta float64")
