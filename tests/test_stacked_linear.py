"""stacked_linear: torch launchers vs a plain float64 per-member reference, cpp launchers vs torch, gradcheck.

Shapes: x [R, IN] shared or [M, R, IN] per member, R = S*B (stream s = rows [s*B, (s+1)*B)); weight
[M, OUT, IN]; bias [M, OUT]; out [M, R, OUT]; mask [M, B*OUT].
"""
import pytest
import torch

import fastjac
from fastjac.ops import stacked_linear as sl

from tests.helpers import needs_backend

needs_cpp = needs_backend("cpp")

F64, F32 = torch.float64, torch.float32
IN = 6

# (M, B, S, OUT): odd sizes, M 1 and 4, batch 1 and 3, one and three streams, OUT 5 and 7. The last case
# has 38400 output elements, above the C++ epilogue's parallel threshold.
CASES = [(1, 1, 1, 5), (4, 3, 3, 7), (4, 1, 3, 5), (1, 3, 3, 7), (4, 3, 1, 5), (2, 64, 3, 100)]


def primal_preactivation(x, weight, bias, streams):
    """[M, B, OUT] float64 pre-activation of the primal rows."""
    rows = x.shape[-2] // streams
    y = torch.matmul(x[..., :rows, :].to(F64), weight.to(F64).transpose(1, 2))
    return y if bias is None else y + bias.to(F64).unsqueeze(1)


def make_inputs(case, shared, has_bias, dtype, margin=1e-4, seed=0):
    """Random x, weight, bias (float64 rounded to dtype) whose primal pre-activations are all at least
    ``margin`` from the ReLU kink, by trying seeds in turn: float32 rounding (~1e-6 here) then cannot flip
    the mask, and gradcheck's perturbations (1e-6) cannot cross it."""
    m, b, s, out = case
    for attempt in range(seed, seed + 1000):
        g = torch.Generator().manual_seed(attempt)
        x = torch.randn((s * b, IN) if shared else (m, s * b, IN), generator=g, dtype=F64).to(dtype)
        weight = torch.randn(m, out, IN, generator=g, dtype=F64).to(dtype)
        bias = torch.randn(m, out, generator=g, dtype=F64).to(dtype) if has_bias else None
        if primal_preactivation(x, weight, bias, s).abs().min() > margin:
            return x, weight, bias
    raise AssertionError("no seed kept the pre-activations away from the ReLU kink")


def reference(x, weight, bias, streams, relu):
    """Plain float64 definition, member by member: y = x_m @ W_m^T; bias on the first B (primal) rows only;
    mask from the primal rows, applied to every stream. Returns (out [M, R, OUT], mask [M, B*OUT] | None)."""
    outs, masks = [], []
    for m in range(weight.shape[0]):
        y = (x if x.dim() == 2 else x[m]) @ weight[m].T  # [R, OUT]
        rows = y.shape[0] // streams
        if bias is not None:
            y = torch.cat([y[:rows] + bias[m], y[rows:]])
        if relu:
            mask = y[:rows] > 0
            y = y * mask.repeat(streams, 1)
            masks.append(mask.reshape(-1))
        outs.append(y)
    return torch.stack(outs), torch.stack(masks) if relu else None


def tol(dtype, length=1):
    """float64: 1e-10. float32 against float64: 4 * eps32 * L, L the reduction length of the value (IN for
    out, R for grad_weight, M*OUT or OUT for grad_x, B for grad_bias): the rounding error of a float32
    dot product grows about linearly with L for O(1) terms."""
    return 1e-10 if dtype == F64 else 4 * torch.finfo(F32).eps * length


def close(actual, expected, dtype, length=1):
    t = tol(dtype, length)
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=t, atol=t)


def run_launchers(backend, x, weight, bias, streams, relu, upstream, needs_x_grad=True):
    forward, backward = sl.launchers(backend)
    out, mask = forward(x, weight, bias, streams, relu)
    grads = backward(upstream, x, weight, mask, streams, bias is not None, needs_x_grad)
    return (out, mask, *grads)


def reduction_lengths(x, weight, streams):
    m, out, fan_in = weight.shape
    rows = x.shape[-2]
    return {"out": fan_in, "mask": 1, "grad_x": m * out if x.dim() == 2 else out, "grad_weight": rows,
            "grad_bias": rows // streams}


NAMES = ("out", "mask", "grad_x", "grad_weight", "grad_bias")

grid = pytest.mark.parametrize(
    "case,shared,has_bias,relu,dtype",
    [(c, sh, b, r, d) for c in CASES for sh in (True, False) for b in (True, False) for r in (True, False)
     for d in (F64, F32)],
)


@grid
def test_torch_launchers_match_reference(case, shared, has_bias, relu, dtype):
    streams = case[2]
    x, weight, bias = make_inputs(case, shared, has_bias, dtype)
    leaves = [t.to(F64).requires_grad_() for t in (x, weight)] + ([bias.to(F64).requires_grad_()] if has_bias else [])
    ref_out, ref_mask = reference(*leaves[:2], leaves[2] if has_bias else None, streams, relu)
    upstream = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref_grads = torch.autograd.grad(ref_out, leaves, upstream)
    expected = dict(zip(NAMES, (ref_out.detach(), ref_mask, *ref_grads, *([None] if not has_bias else []))))

    actual = dict(zip(NAMES, run_launchers("torch", x, weight, bias, streams, relu, upstream.to(dtype))))
    lengths = reduction_lengths(x, weight, streams)
    for name in NAMES:
        assert (actual[name] is None) == (expected[name] is None), name
        if name == "mask" and relu:
            assert torch.equal(actual[name], expected[name])
        elif expected[name] is not None:
            assert actual[name].shape == expected[name].shape, name
            close(actual[name], expected[name], dtype, lengths[name])


@needs_cpp
@grid
def test_cpp_launchers_match_torch(case, shared, has_bias, relu, dtype):
    streams = case[2]
    x, weight, bias = make_inputs(case, shared, has_bias, dtype)
    m, b, s, out = case
    upstream = torch.randn(m, s * b, out, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    expected = run_launchers("torch", x, weight, bias, streams, relu, upstream)
    actual = run_launchers("cpp", x, weight, bias, streams, relu, upstream)

    lengths = reduction_lengths(x, weight, streams)
    for name, a, e in zip(NAMES, actual, expected):
        assert (a is None) == (e is None), name
        if e is None:
            continue
        assert a.shape == e.shape and a.dtype == e.dtype and a.is_contiguous(), name
        if name == "mask":
            assert torch.equal(a, e)
        else:
            close(a, e, dtype, lengths[name])


@needs_cpp
@pytest.mark.parametrize("shared", [True, False])
def test_cpp_skips_grad_x_when_not_needed(shared):
    x, weight, bias = make_inputs((4, 3, 3, 5), shared, True, F64)
    upstream = torch.randn(4, 9, 5, dtype=F64)
    actual = run_launchers("cpp", x, weight, bias, 3, True, upstream, needs_x_grad=False)
    expected = run_launchers("torch", x, weight, bias, 3, True, upstream, needs_x_grad=False)
    assert actual[2] is None and expected[2] is None
    close(actual[3], expected[3], F64)


BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck(backend, relu, has_bias, shared):
    streams = 3
    x, weight, bias = make_inputs((4, 1, streams, 5), shared, has_bias, F64, margin=1e-3)
    inputs = (x.requires_grad_(), weight.requires_grad_()) + ((bias.requires_grad_(),) if has_bias else ())

    def f(x, weight, bias=None):
        return sl.stacked_linear(x, weight, bias, streams, relu, backend)[0]

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_without_x_grad(backend):
    """x that needs no gradient (an input batch): grad_x is not computed, weight and bias still get theirs."""
    x, weight, bias = make_inputs((4, 3, 3, 5), True, True, F64)
    weight.requires_grad_()
    bias.requires_grad_()
    sl.stacked_linear(x, weight, bias, 3, True, backend)[0].square().sum().backward()
    assert x.grad is None and weight.grad is not None and bias.grad is not None


@needs_cpp
@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda: fastjac._C.stacked_linear_forward(torch.zeros(6, 4, dtype=torch.int64), torch.zeros(2, 3, 4), None, 2,
                                           True), "x"),
        (lambda: fastjac._C.stacked_linear_forward(torch.zeros(6, 4), torch.zeros(3, 4), None, 2, True), "weight"),
        (lambda: fastjac._C.stacked_linear_forward(torch.zeros(6, 5), torch.zeros(2, 3, 4), None, 2, True), "x"),
        (lambda: fastjac._C.stacked_linear_forward(torch.zeros(3, 6, 4), torch.zeros(2, 3, 4), None, 2, True), "x"),
        (lambda: fastjac._C.stacked_linear_forward(torch.zeros(6, 4, dtype=F64), torch.zeros(2, 3, 4), None, 2, True), "x"),
        (lambda: fastjac._C.stacked_linear_forward(torch.zeros(6, 4), torch.zeros(2, 3, 4), None, 4, True), "streams"),
        (lambda: fastjac._C.stacked_linear_forward(torch.zeros(6, 4), torch.zeros(2, 3, 4), torch.zeros(2, 4), 2, True),
         "bias"),
        (lambda: fastjac._C.stacked_linear_backward(torch.zeros(2, 6, 4), torch.zeros(6, 4), torch.zeros(2, 3, 4), None, 2,
                                            False, True), "grad_out"),
        (lambda: fastjac._C.stacked_linear_backward(torch.zeros(2, 6, 3), torch.zeros(6, 4), torch.zeros(2, 3, 4),
                                            torch.zeros(2, 8, dtype=torch.bool), 2, False, True), "mask"),
    ],
)
def test_cpp_errors_name_the_argument(call, argument):
    with pytest.raises(RuntimeError, match=argument):
        call()
