"""stacked_linear on every backend (torch, cpp, triton, cuda) and device: launchers against a plain float64
per-member reference, float64 gradcheck of the autograd Function, the cpp errors.

Shapes: x [R, IN] shared or [M, R, IN] per member, R = S*B (stream s = rows [s*B, (s+1)*B)); weight
[M, OUT, IN]; bias [M, OUT]; out [M, R, OUT]; mask [M, B*OUT].
"""
import pytest
import torch

import fastjac
from fastjac import backends
from fastjac.ops import stacked_linear as sl
from tests.helpers import backend_devices, close, interpreted, needs_backend

F64, F32 = torch.float64, torch.float32
BACKENDS = backend_devices()
IN = 6

# (M, B, S, OUT): odd sizes, M 1 and 4, batch 1 and 3, one and three streams, OUT 5 and 7. The last case
# has 38400 output elements, above the C++ epilogue's parallel threshold (too many for the Triton
# interpreter).
CASES = [(1, 1, 1, 5), (4, 3, 3, 7), (4, 1, 3, 5), (1, 3, 3, 7), (4, 3, 1, 5), (2, 64, 3, 100)]
INTERPRETER_OUTPUTS = 2048


def primal_preactivation(x, weight, bias, streams):
    """[M, B, OUT] float64 pre-activation of the primal rows."""
    rows = x.shape[-2] // streams
    y = torch.matmul(x[..., :rows, :].to(F64), weight.to(F64).transpose(1, 2))
    return y if bias is None else y + bias.to(F64).unsqueeze(1)


def make_inputs(case, shared, has_bias, dtype, margin=1e-4, seed=0, device="cpu"):
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
            return x.to(device), weight.to(device), None if bias is None else bias.to(device)
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


def run_launchers(backend, x, weight, bias, streams, relu, upstream, needs_x_grad=True):
    forward, backward = backends.get(backend).stacked_linear
    out, mask = forward(x, weight, bias, streams, relu)
    grads = backward(upstream, x, weight, mask, streams, bias is not None, needs_x_grad)
    return (out, mask, *grads)


def reduction_lengths(x, weight, streams):
    """The number of terms each output sums (its float32 error grows with it): IN for out, the members'
    outputs for a shared x's gradient, the rows for grad_weight, the primal rows for grad_bias."""
    m, out, fan_in = weight.shape
    rows = x.shape[-2]
    return {"out": fan_in, "mask": 1, "grad_x": m * out if x.dim() == 2 else out, "grad_weight": rows,
            "grad_bias": rows // streams}


def skip_if_too_large(backend, device, case):
    m, b, s, out = case
    if interpreted(backend, device) and m * b * s * out > INTERPRETER_OUTPUTS:
        pytest.skip(f"{m * b * s * out} outputs: too many for the Triton CPU interpreter")


NAMES = ("out", "mask", "grad_x", "grad_weight", "grad_bias")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_member"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_launchers_match_reference(backend, device, case, shared, has_bias, relu, dtype):
    skip_if_too_large(backend, device, case)
    streams = case[2]
    x, weight, bias = make_inputs(case, shared, has_bias, dtype, device=device)
    leaves = [t.cpu().to(F64).requires_grad_() for t in (x, weight)]
    leaves += [bias.cpu().to(F64).requires_grad_()] if has_bias else []
    ref_out, ref_mask = reference(*leaves[:2], leaves[2] if has_bias else None, streams, relu)
    upstream = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref_grads = torch.autograd.grad(ref_out, leaves, upstream)
    expected = dict(zip(NAMES, (ref_out.detach(), ref_mask, *ref_grads, *([None] if not has_bias else []))))

    actual = dict(zip(NAMES, run_launchers(backend, x, weight, bias, streams, relu, upstream.to(device, dtype))))
    lengths = reduction_lengths(x, weight, streams)
    for name in NAMES:
        assert (actual[name] is None) == (expected[name] is None), name
        if expected[name] is None:
            continue
        assert actual[name].shape == expected[name].shape and actual[name].is_contiguous(), name
        if name == "mask":
            assert actual[name].dtype == torch.bool and torch.equal(actual[name].cpu(), expected[name])
        else:
            assert actual[name].dtype == dtype, name
            close(actual[name], expected[name], dtype, lengths[name], name=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_member"])
def test_backward_skips_grad_x_when_not_needed(backend, device, shared):
    x, weight, bias = make_inputs((4, 3, 3, 5), shared, True, F64, device=device)
    upstream = torch.randn(4, 9, 5, dtype=F64, device=device)
    without = run_launchers(backend, x, weight, bias, 3, True, upstream, needs_x_grad=False)
    with_x = run_launchers(backend, x, weight, bias, 3, True, upstream, needs_x_grad=True)
    assert without[2] is None and with_x[2] is not None
    close(without[3], with_x[3], F64, name="grad_weight")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_member"])
def test_gradcheck_float64(backend, device, relu, has_bias, shared):
    streams = 3
    x, weight, bias = make_inputs((4, 1, streams, 5), shared, has_bias, F64, margin=1e-3, device=device)
    inputs = (x.requires_grad_(), weight.requires_grad_()) + ((bias.requires_grad_(),) if has_bias else ())

    def f(x, weight, bias=None):
        return sl.stacked_linear(x, weight, bias, streams, relu, backends.get(backend))[0]

    assert torch.autograd.gradcheck(f, inputs, fast_mode=interpreted(backend, device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autograd_without_x_grad(backend, device):
    """x that needs no gradient (an input batch): grad_x is not computed, weight and bias still get theirs."""
    x, weight, bias = make_inputs((4, 3, 3, 5), True, True, F64, device=device)
    weight.requires_grad_()
    bias.requires_grad_()
    sl.stacked_linear(x, weight, bias, 3, True, backends.get(backend))[0].square().sum().backward()
    assert x.grad is None and weight.grad is not None and bias.grad is not None


@needs_backend("cpp")
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
