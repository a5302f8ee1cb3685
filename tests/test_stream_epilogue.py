"""stream_epilogue: torch launchers vs a plain float64 reference, cpp launchers vs torch launchers, gradcheck.

Layout: y [O, S, I] with I = Q*NB*rep; bias [O, NB]; the bias index of element i is (i // rep) % NB.
"""
import pytest
import torch

import fastjac
from fastjac.ops import stream_epilogue as se

from tests.helpers import needs_backend

needs_cpp = needs_backend("cpp")

F64, F32 = torch.float64, torch.float32

# (O, S, Q, NB, rep): odd sizes, O = 1 and O = M = 4, one and three streams, rep 1 and 4. The last case
# has I = 7168 and 43008 elements: above the C++ parallel threshold and over a block boundary (4096) that
# is not a multiple of NB*rep, so the bias-index walk restarts mid-period.
CASES = [(1, 1, 1, 5, 1), (1, 3, 3, 7, 4), (4, 3, 1, 5, 4), (4, 1, 3, 7, 1), (4, 3, 3, 5, 1), (2, 3, 64, 7, 16)]
KINK_MARGIN = 0.1


def make_inputs(case, has_bias, dtype, seed=0):
    """Random y, bias; stream 0 pushed so that |y0 + bias| >= KINK_MARGIN, away from the ReLU kink: float32
    and float64 then agree on the mask, and gradcheck's finite differences never cross it."""
    o, s, q, nb, rep = case
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(o, s, q * nb * rep, generator=g, dtype=F64)
    bias = torch.randn(o, nb, generator=g, dtype=F64) if has_bias else None
    primal = y[:, 0] + (0 if bias is None else bias[:, bias_index(y.shape[2], nb, rep)])
    y[:, 0] += torch.where(primal >= 0, KINK_MARGIN, -KINK_MARGIN)
    return y.to(dtype), None if bias is None else bias.to(dtype)


def bias_index(length, nb, rep):
    return (torch.arange(length) // rep) % nb


def reference(y, bias, rep, relu):
    """Plain float64 definition: primal = y[:, 0] + bias[:, (i // rep) % NB]; mask = primal > 0;
    out[:, 0] = relu(primal), out[:, s] = y[:, s] * mask for the tangent streams (no bias)."""
    primal = y[:, 0] if bias is None else y[:, 0] + bias[:, bias_index(y.shape[2], bias.shape[1], rep)]
    if not relu:
        return torch.cat([primal.unsqueeze(1), y[:, 1:]], dim=1), None
    mask = primal > 0
    return torch.cat([torch.relu(primal).unsqueeze(1), y[:, 1:] * mask.unsqueeze(1)], dim=1), mask


def tol(dtype, length=1):
    """float64: 1e-10. float32 against float64: 4 * eps32 * L, L the longest sum feeding the value (1 for
    elementwise): the rounding error of a float32 sum grows about linearly with L for O(1) terms."""
    return 1e-10 if dtype == F64 else 4 * torch.finfo(F32).eps * length


def close(actual, expected, dtype, length=1):
    t = tol(dtype, length)
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=t, atol=t)


def run_launchers(launchers, y, bias, rep, relu, upstream):
    forward, backward = launchers
    out, mask = forward(y, bias, rep, relu)
    nb = 0 if bias is None else bias.shape[1]
    grad_y, grad_bias = backward(upstream, mask, nb, rep, bias is not None)
    return out, mask, grad_y, grad_bias


grid = pytest.mark.parametrize(
    "case,has_bias,relu,dtype",
    [(c, b, r, d) for c in CASES for b in (True, False) for r in (True, False) for d in (F64, F32)],
)


@grid
def test_torch_launchers_match_reference(case, has_bias, relu, dtype):
    rep = case[4]
    y, bias = make_inputs(case, has_bias, dtype)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)

    y64 = y.to(F64).requires_grad_()
    b64 = None if bias is None else bias.to(F64).requires_grad_()
    ref_out, ref_mask = reference(y64, b64, rep, relu)
    ref_out.backward(upstream)

    out, mask, grad_y, grad_bias = run_launchers(se.TORCH_LAUNCHERS, y, bias, rep, relu, upstream.to(dtype))
    close(out, ref_out.detach(), dtype)
    assert (mask is None) == (ref_mask is None)
    if mask is not None:
        assert mask.dtype == torch.bool and torch.equal(mask, ref_mask)
    close(grad_y, y64.grad, dtype)
    if has_bias:
        close(grad_bias, b64.grad, dtype, length=y.shape[2] // bias.shape[1])  # I/NB positions per bias value
    else:
        assert grad_bias is None


@needs_cpp
@grid
def test_cpp_launchers_match_torch(case, has_bias, relu, dtype):
    rep = case[4]
    y, bias = make_inputs(case, has_bias, dtype)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    expected = run_launchers(se.TORCH_LAUNCHERS, y, bias, rep, relu, upstream)
    actual = run_launchers(se.launchers("cpp"), y, bias, rep, relu, upstream)

    for name, a, e in zip(("out", "mask", "grad_y", "grad_bias"), actual, expected):
        assert (a is None) == (e is None), name
        if e is None:
            continue
        assert a.shape == e.shape and a.dtype == e.dtype and a.is_contiguous(), name
        if name == "mask":
            assert torch.equal(a, e)
        else:  # grad_bias is the only sum (I/NB terms); the C++ one accumulates in double
            close(a, e, dtype, length=y.shape[2] // bias.shape[1] if name == "grad_bias" else 1)


BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("case", [(1, 3, 3, 5, 4), (4, 3, 1, 7, 1)])
def test_gradcheck(backend, relu, has_bias, case):
    y, bias = make_inputs(case, has_bias, F64)
    y.requires_grad_()
    launchers = se.launchers(backend)
    rep = case[4]
    if has_bias:
        bias.requires_grad_()
        assert torch.autograd.gradcheck(lambda y, b: se.stream_epilogue(y, b, rep, relu, launchers)[0], (y, bias))
    else:
        assert torch.autograd.gradcheck(lambda y: se.stream_epilogue(y, None, rep, relu, launchers)[0], (y,))


def test_launchers_selection():
    assert se.launchers("torch") == se.TORCH_LAUNCHERS
    assert se.launchers("cuda") == se.TORCH_LAUNCHERS
    with pytest.raises(ValueError, match="unknown backend"):
        se.launchers("fortran")


@needs_cpp
def test_launchers_cpp_are_the_extension():
    assert se.launchers("cpp") == (fastjac._C.stream_epilogue_forward, fastjac._C.stream_epilogue_backward)


@needs_cpp
@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda: fastjac._C.stream_epilogue_forward(torch.zeros(2, 3, 10, dtype=torch.int64), None, 1, True), "y"),
        (lambda: fastjac._C.stream_epilogue_forward(torch.zeros(2, 10), None, 1, True), "y"),
        (lambda: fastjac._C.stream_epilogue_forward(torch.zeros(2, 10, 3).transpose(1, 2), None, 1, True), "y"),
        (lambda: fastjac._C.stream_epilogue_forward(torch.zeros(2, 3, 10), torch.zeros(3, 5), 1, True), "bias"),
        (lambda: fastjac._C.stream_epilogue_forward(torch.zeros(2, 3, 10), torch.zeros(2, 5, dtype=F64), 1, True), "bias"),
        (lambda: fastjac._C.stream_epilogue_forward(torch.zeros(2, 3, 10), torch.zeros(2, 3), 1, True), "NB\\*rep"),
        (lambda: fastjac._C.stream_epilogue_backward(torch.zeros(2, 3, 10), torch.zeros(2, 10), 5, 1, True), "mask"),
        (lambda: fastjac._C.stream_epilogue_backward(torch.zeros(2, 3, 10), torch.zeros(2, 9, dtype=torch.bool), 5, 1, True),
         "mask"),
        (lambda: fastjac._C.stream_epilogue_backward(torch.zeros(2, 3, 10, dtype=torch.int32), None, 5, 1, True), "grad_out"),
    ],
)
def test_cpp_errors_name_the_argument(call, argument):
    with pytest.raises(RuntimeError, match=argument):
        call()
