"""stream_epilogue on every backend (torch, cpp, triton, cuda) and device: launchers against a plain float64
reference, float64 gradcheck of the autograd Function on each backend's launchers, the cpp errors.

Layout: y [O, S, I] with I = Q*NB*rep; bias [O, NB]; the bias index of element i is (i // rep) % NB.
"""
import pytest
import torch

import fastjac
from fastjac import backends
from fastjac.ops import stream_epilogue as se
from tests.helpers import backend_devices, close, interpreted, needs_backend

F64, F32 = torch.float64, torch.float32
BACKENDS = backend_devices()

# (O, S, Q, NB, rep): odd sizes, O = 1 and O = M = 4, one and three streams, rep 1 and 4. The last case
# has I = 7168 and 43008 elements: above the C++ parallel threshold and over a block boundary (4096) that
# is not a multiple of NB*rep, so the bias-index walk restarts mid-period (too large for the Triton
# interpreter).
CASES = [(1, 1, 1, 5, 1), (1, 3, 3, 7, 4), (4, 3, 1, 5, 4), (4, 1, 3, 7, 1), (4, 3, 3, 5, 1), (2, 3, 64, 7, 16)]
INTERPRETER_ELEMENTS = 2048
KINK_MARGIN = 0.1


def make_inputs(case, has_bias, dtype, device="cpu", seed=0):
    """Random y, bias; stream 0 pushed so that |y0 + bias| >= KINK_MARGIN, away from the ReLU kink: float32
    and float64 then agree on the mask, and gradcheck's finite differences never cross it."""
    o, s, q, nb, rep = case
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(o, s, q * nb * rep, generator=g, dtype=F64)
    bias = torch.randn(o, nb, generator=g, dtype=F64) if has_bias else None
    primal = y[:, 0] + (0 if bias is None else bias[:, bias_index(y.shape[2], nb, rep)])
    y[:, 0] += torch.where(primal >= 0, KINK_MARGIN, -KINK_MARGIN)
    return y.to(device, dtype), None if bias is None else bias.to(device, dtype)


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


def skip_if_too_large(backend, device, case):
    o, s, q, nb, rep = case
    if interpreted(backend, device) and o * s * q * nb * rep > INTERPRETER_ELEMENTS:
        pytest.skip(f"{o * s * q * nb * rep} elements: too large for the Triton CPU interpreter")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_launchers_match_reference(backend, device, case, has_bias, relu, dtype):
    skip_if_too_large(backend, device, case)
    rep = case[4]
    y, bias = make_inputs(case, has_bias, dtype, device)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    y64 = y.cpu().to(F64).requires_grad_()
    b64 = None if bias is None else bias.cpu().to(F64).requires_grad_()
    ref_out, ref_mask = reference(y64, b64, rep, relu)
    ref_out.backward(upstream)

    forward, backward = backends.get(backend).stream_epilogue
    out, mask = forward(y, bias, rep, relu)
    grad_y, grad_bias = backward(upstream.to(device, dtype), mask, 0 if bias is None else bias.shape[1], rep,
                                 has_bias)
    for name, value in (("out", out), ("grad_y", grad_y)):
        assert value.shape == y.shape and value.dtype == dtype and value.is_contiguous(), name
    close(out, ref_out, dtype, name="out")  # elementwise: one rounding
    close(grad_y, y64.grad, dtype, name="grad_y")
    assert (mask is None) == (ref_mask is None)
    if mask is not None:
        assert mask.dtype == torch.bool and torch.equal(mask.cpu(), ref_mask)
    if has_bias:  # the only sum: I/NB positions per bias value
        close(grad_bias, b64.grad, dtype, length=y.shape[2] // bias.shape[1], name="grad_bias")
    else:
        assert grad_bias is None


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", [(1, 3, 3, 5, 4), (4, 3, 1, 7, 1)], ids=str)
def test_gradcheck_float64(backend, device, relu, has_bias, case):
    y, bias = make_inputs(case, has_bias, F64, device)
    launchers = backends.get(backend).stream_epilogue
    rep = case[4]
    inputs = (y.requires_grad_(),) + ((bias.requires_grad_(),) if has_bias else ())

    def f(y, bias=None):
        return se.stream_epilogue(y, bias, rep, relu, launchers)[0]

    assert torch.autograd.gradcheck(f, inputs, fast_mode=interpreted(backend, device))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", [(1, 1, 3, 5, 1), (4, 3, 1, 7, 4)], ids=str)
def test_masked_streams(backend, device, case):
    """The ReLU derivative on tangent / cotangent rows: g * mask on every stream, equal to the float
    product, and its float64 gradcheck (the map is linear in g: its backward is the same product)."""
    o, s, q, nb, rep = case
    generator = torch.Generator().manual_seed(2)
    g = torch.randn(o, s, q * nb * rep, generator=generator, dtype=F64).to(device)
    mask = (torch.rand(o, q * nb * rep, generator=generator) > 0.5).to(device)
    launchers = backends.get(backend).stream_epilogue
    out = se.masked_streams(g, mask, launchers)
    assert torch.equal(out, g * mask.unsqueeze(1))
    assert torch.autograd.gradcheck(lambda g: se.masked_streams(g, mask, launchers), (g.requires_grad_(),),
                                    fast_mode=interpreted(backend, device))
    with pytest.raises(ValueError, match="mask a bool"):
        se.masked_streams(g, mask.to(F64), launchers)
    with pytest.raises(ValueError, match="mask a bool"):
        se.masked_streams(g, mask[:, 1:], launchers)


def test_launchers_selection():
    assert backends.get("torch").stream_epilogue == se.TORCH_LAUNCHERS
    with pytest.raises(backends.BackendUnavailable, match="unknown backend"):
        backends.get("fortran")


@needs_backend("cuda")
def test_cuda_launchers_are_atens():
    assert backends.get("cuda").stream_epilogue == se.TORCH_LAUNCHERS  # no CUDA kernel of its own


@needs_backend("cpp")
def test_launchers_cpp_are_the_extension_ops():
    """The extension's kernels through the dispatcher (torch.ops.fastjac: visible to torch.compile)."""
    assert backends.get("cpp").stream_epilogue == (torch.ops.fastjac.stream_epilogue_forward,
                                                   torch.ops.fastjac.stream_epilogue_backward)


@needs_backend("cpp")
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
