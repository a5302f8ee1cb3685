"""fastjac/ops/conv_transpose.py: a stride-1 convolution whose input gradient (the transposed convolution)
runs by ATen's kernel or as a forward convolution with the flipped kernel. Both methods against ATen's
F.conv2d / F.conv_transpose2d in value, float64 gradcheck and gradgradcheck of both Functions, the timed
choice (made once per configuration), and that the first backward of the vjp mode forms no weight gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from fastjac.ops import conv_transpose
from tests.helpers import assert_close

F64 = torch.float64
# (CIN, COUT, kernel, padding, dilation): odd and non-square kernels, no padding, dilation 2, a 1x1
CONFIGS = [(1, 3, (3, 3), (1, 1), (1, 1)), (2, 3, (3, 3), (0, 0), (2, 2)), (3, 2, (3, 2), (1, 0), (1, 1)),
           (2, 2, (1, 1), (0, 0), (1, 1)), (1, 4, (5, 5), (2, 2), (1, 1))]


@pytest.fixture(params=conv_transpose.METHODS)
def method(request, monkeypatch):
    monkeypatch.setattr(conv_transpose, "transpose_method", lambda *args: request.param)
    return request.param


def _case(config, dtype=F64, batch=2, seed=0):
    cin, cout, kernel, padding, dilation = config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, 7, 6, generator=g, dtype=dtype)
    w = torch.randn(cout, cin, *kernel, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype)
    return x, w, b, padding, dilation


@pytest.mark.parametrize("config", CONFIGS)
def test_values_match_aten(config, method):
    """float32 values against float64 ATen, within a small multiple of float32 ATen's own error."""
    x, w, b, padding, dilation = _case(config)
    y64 = F.conv2d(x, w, b, 1, padding, dilation)
    t64 = F.conv_transpose2d(y64, w, None, 1, padding, 0, 1, dilation)
    f32 = [t.float() for t in (x, w, b)]
    y = conv_transpose.conv2d(*f32, padding, dilation)
    t = conv_transpose.conv_transpose2d(y64.float(), f32[1], padding, dilation)
    assert t.shape == x.shape, "the transpose maps back onto x's shape"
    aten_error = (F.conv_transpose2d(y64.float(), f32[1], None, 1, padding, 0, 1, dilation).double() - t64).abs().max()
    assert_close(y.double(), y64, rtol=1e-5, atol=1e-5, name="conv2d")
    assert float((t.double() - t64).abs().max()) <= 4 * float(aten_error) + 1e-6, f"{method} transpose error"


@pytest.mark.parametrize("config", CONFIGS)
def test_gradcheck_and_gradgradcheck(config, method):
    x, w, b, padding, dilation = _case(config, batch=1)
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    conv = lambda x, w, b: conv_transpose.conv2d(x, w, b, padding, dilation)  # noqa: E731
    assert gradcheck(conv, (x, w, b)) and gradgradcheck(conv, (x, w, b))
    g = F.conv2d(x, w, None, 1, padding, dilation).detach().normal_().requires_grad_(True)
    transpose = lambda g, w: conv_transpose.conv_transpose2d(g, w, padding, dilation)  # noqa: E731
    assert gradcheck(transpose, (g, w)) and gradgradcheck(transpose, (g, w))


def test_penalty_gradients_match_aten_double_backward(method):
    """The vjp mode's use: ||d<v, conv(x)>/dx||^2, its gradients w.r.t. weight, bias and x, against ATen."""
    x, w, b, padding, dilation = _case(CONFIGS[-1])
    v = torch.randn(F.conv2d(x, w, b, 1, padding, dilation).shape, dtype=F64)

    def penalty(conv):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        (gx,) = torch.autograd.grad(conv(xs, ws, bs), xs, v, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + conv(xs, ws, bs).pow(2).sum(), (xs, ws, bs))

    got = penalty(lambda x, w, b: conv_transpose.conv2d(x, w, b, padding, dilation))
    want = penalty(lambda x, w, b: F.conv2d(x, w, b, 1, padding, dilation))
    for name, a, e in zip(("x", "weight", "bias"), got, want):
        assert_close(a, e, rtol=1e-12, atol=1e-12 * float(e.abs().max()), name=f"penalty grad {name}")


def test_first_backward_forms_no_weight_gradient(monkeypatch):
    """autograd.grad(y, x) through a non-leaf weight (the generic path's per-member slice of the stacked
    weight) runs no weight-gradient kernel; asking for the weight does."""
    calls = []
    original = conv_transpose.weight_gradient
    monkeypatch.setattr(conv_transpose, "weight_gradient", lambda *a: calls.append(1) or original(*a))
    x, w, b, padding, dilation = _case(CONFIGS[0])
    stacked = w.unsqueeze(0).requires_grad_(True)
    x.requires_grad_(True)
    y = conv_transpose.conv2d(x, stacked[0], b, padding, dilation)
    torch.autograd.grad(y.sum(), x, retain_graph=True)
    assert calls == []
    (grad,) = torch.autograd.grad(y.sum(), stacked)
    assert len(calls) == 1
    assert_close(grad[0], torch.autograd.grad(F.conv2d(x, w.requires_grad_(True), b, 1, padding, dilation).sum(), w)[0],
                 rtol=1e-12, atol=1e-12, name="weight gradient")


def test_output_can_be_modified_in_place():
    x, w, b, padding, dilation = _case(CONFIGS[0])
    x.requires_grad_(True)
    y = conv_transpose.conv2d(x, w, b, padding, dilation)
    torch.relu_(y)
    y.sum().backward()
    expected = F.conv2d(x, w, b, 1, padding, dilation)
    (want,) = torch.autograd.grad(torch.relu(expected).sum(), x)
    assert_close(x.grad, want, rtol=1e-12, atol=1e-12, name="x grad after in-place relu")


def test_transpose_method_is_timed_once_per_configuration(monkeypatch):
    timed = []
    seconds = dict(zip(conv_transpose.METHODS, (2.0, 3.0, 1.0)))  # in METHODS' order: "fold" is the fastest
    monkeypatch.setattr(conv_transpose, "_CHOSEN", {})
    monkeypatch.setattr(conv_transpose, "_time",
                        lambda fn: timed.append(fn) or seconds[conv_transpose.METHODS[(len(timed) - 1) % 3]])
    g, w = torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3)
    assert conv_transpose.transpose_method(g, w, (1, 1), (1, 1)) == "fold"
    assert len(timed) == 3
    assert conv_transpose.transpose_method(g, w, (1, 1), (1, 1)) == "fold"
    assert len(timed) == 3, "kept, not timed again"
    conv_transpose.transpose_method(g[:1], w, (1, 1), (1, 1))
    assert len(timed) == 6, "a new shape is timed"


def test_another_method_must_beat_atens_by_the_margin(monkeypatch):
    timed = []
    seconds = dict(zip(conv_transpose.METHODS, (1.0, 0.95, 2.0)))  # "flipped" 5% faster: not enough
    monkeypatch.setattr(conv_transpose, "_CHOSEN", {})
    monkeypatch.setattr(conv_transpose, "_time",
                        lambda fn: timed.append(fn) or seconds[conv_transpose.METHODS[(len(timed) - 1) % 3]])
    g, w = torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3)
    assert conv_transpose.transpose_method(g, w, (1, 1), (1, 1)) == "aten"


def test_transpose_method_falls_back_to_aten_where_flipping_does_not_apply():
    # padding 2 > dilation * (kernel - 1) = 0 for a 1x1 kernel: the flipped form would need negative padding
    assert conv_transpose.transpose_method(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 1, 1), (2, 2), (1, 1)) == "aten"
    g, w = torch.randn(1, 2, 4, 4, device="meta"), torch.randn(2, 2, 3, 3, device="meta")
    assert conv_transpose.transpose_method(g, w, (1, 1), (1, 1)) == "aten"  # off the CPU
    g, w = torch.randn(1, 2, 8, 8), torch.randn(2, 2, 1, 1)
    assert_close(conv_transpose.conv_transpose2d(g, w, (2, 2), (1, 1)), F.conv_transpose2d(g, w, None, 1, 2),
                 rtol=1e-6, atol=1e-6, name="large padding")


def test_under_torch_compile_both_are_atens_ops():
    """Regression: the timed choice and the engine queries do not trace (inductor failed on ResNet-8's
    compiled vjp step), so under torch.compile both functions are ATen's convolutions."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, w, g):
        return conv_transpose.conv2d(x, w, None, (1, 1), (1, 1)), conv_transpose.conv_transpose2d(g, w, (1, 1), (1, 1))

    x, w, g = torch.randn(2, 1, 6, 6, requires_grad=True), torch.randn(3, 1, 3, 3), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(f, backend=backend, fullgraph=True)(x, w, g)
    code = graphs[0].code
    assert "conv2d" in code and "conv_transpose2d" in code
    assert "autograd_function" not in code and "_Transpose" not in code and "_Conv2d" not in code
    for a, e in zip(compiled, f(x, w, g)):
        assert_close(a, e, rtol=1e-6, atol=1e-6, name="compiled")
