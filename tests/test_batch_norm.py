"""fastjac/ops/batch_norm.py: the launchers against plain ATen expressions of the same math (values and,
through autograd on those expressions, gradients) and a float64 gradcheck of each autograd Function.
Odd sizes, one sample, several streams; a [B, M, C, L] view permuted like the engine's member layout.
Every test runs on both launcher sets: ATen's ops, and the C++ ops of csrc/batch_norm.cpp (cpp backend)."""
import pytest
import torch
import torch.nn.functional as F

from fastjac.ops import batch_norm as op
from fastjac.ops import native
from tests.helpers import assert_close

F64 = torch.float64
EPS = 1e-5


def rows(shape, seed, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def plain_statistics(x, eps):
    """x_hat, inv_std by ATen's batch_norm over [B, M*C, L] (each member's channels are its own)."""
    b, m, c, length = x.shape
    x_hat = F.batch_norm(x.reshape(b, m * c, length), None, None, training=True, eps=eps).view_as(x)
    var = x.var(dim=(0, 3), correction=0)
    return x_hat, torch.rsqrt(var + eps).unsqueeze(-1)


def plain_linearization(t, x_hat, scale):
    dims = (1, 4)
    return scale * (t - t.mean(dims, keepdim=True) - x_hat * (t * x_hat).mean(dims, keepdim=True))


SHAPES = [(1, 1, 1, 5), (3, 2, 3, 7), (4, 5, 2, 1)]  # B, M, C, L: one sample, odd sizes, BatchNorm1d (L = 1)
needs_extension = pytest.mark.skipif(native.OPS is None, reason="the C++ extension fastjac._C is not built")


@pytest.fixture(params=["aten", pytest.param("cpp", marks=needs_extension)])
def launchers(request):
    return op.ATEN if request.param == "aten" else op.native_launchers(native.OPS)


@pytest.mark.parametrize("shape", SHAPES)
def test_statistics_match_atens_batch_norm(shape, launchers):
    x = rows(shape, 0) * 3 + 1
    x_hat, inv_std, mean, var = op.batch_statistics(x, EPS, launchers)
    want_hat, want_inv = plain_statistics(x, EPS)
    assert_close(x_hat, want_hat, rtol=1e-12, atol=1e-12, name="x_hat")
    assert_close(inv_std, want_inv, rtol=1e-12, atol=0, name="inv_std")
    assert_close(mean, x.mean(dim=(0, 3)).unsqueeze(-1), rtol=1e-12, atol=1e-12, name="mean")
    assert_close(var, x.var(dim=(0, 3), correction=0).unsqueeze(-1), rtol=1e-12, atol=1e-12, name="var")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("streams", [1, 3])
@pytest.mark.parametrize("permuted", [False, True])
def test_linearization_matches_plain_expression_and_its_gradients(shape, streams, permuted, launchers):
    if permuted:  # the engine's member layout: [M, S, B, C, L] storage seen as [S, B, M, C, L]
        t = rows((shape[1], streams, shape[0], shape[2], shape[3]), 1).permute(1, 2, 0, 3, 4).requires_grad_(True)
        x_hat = plain_statistics(rows(shape, 2), EPS)[0].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
        x_hat.requires_grad_(True)
    else:
        t = rows((streams, *shape), 1).requires_grad_(True)
        x_hat = plain_statistics(rows(shape, 2), EPS)[0].requires_grad_(True)
    scale = rows((shape[1], shape[2], 1), 3).requires_grad_(True)
    out = op.normalized_linearization(t, x_hat, scale, launchers)
    expected = plain_linearization(t, x_hat, scale)
    assert_close(out, expected, rtol=1e-12, atol=1e-12, name="linearization")
    upstream = rows(out.shape, 4)
    got = torch.autograd.grad((out * upstream).sum(), (t, x_hat, scale))
    want = torch.autograd.grad((expected * upstream).sum(), (t, x_hat, scale))
    for name, a, e in zip(("t", "x_hat", "scale"), got, want):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"d/d{name}")


def test_linearization_is_self_adjoint(launchers):
    """<L t, g> = <t, L g> per stream: one map serves tangents (jvp) and cotangents (vjp)."""
    shape = (3, 2, 3, 7)
    t, g = rows((2, *shape), 5), rows((2, *shape), 6)
    x_hat = plain_statistics(rows(shape, 7), EPS)[0]
    scale = rows((2, 3, 1), 8)
    left = (op.normalized_linearization(t, x_hat, scale, launchers) * g).sum()
    right = (t * op.normalized_linearization(g, x_hat, scale, launchers)).sum()
    assert_close(left, right, rtol=1e-12, atol=1e-12, name="adjoint")


def test_gradcheck_batch_statistics(launchers):
    x = (rows((3, 2, 2, 5), 9) * 2 + 0.5).requires_grad_(True)

    def function(value):
        x_hat, inv_std, _, _ = op.batch_statistics(value, EPS, launchers)
        return x_hat, inv_std

    assert torch.autograd.gradcheck(function, (x,))
    # a member-layout view (permuted strides), as the engine passes it
    y = rows((2, 3, 2, 5), 10).permute(1, 0, 2, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(function, (y,))


def test_gradcheck_normalized_linearization(launchers):
    shape = (3, 2, 2, 4)
    t = rows((2, *shape), 11).requires_grad_(True)
    x_hat = plain_statistics(rows(shape, 12), EPS)[0].requires_grad_(True)
    scale = rows((2, 2, 1), 13).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: op.normalized_linearization(*a, launchers), (t, x_hat, scale))


@needs_extension
def test_native_launchers_match_aten_in_float32():
    """The C++ launchers against ATen's on the engine's float32 shapes (a member-layout view), every output."""
    native_ops = op.native_launchers(native.OPS)
    b, m, c, length, streams = 16, 3, 4, 49, 2
    x = rows((m, b, c, length), 20, torch.float32).permute(1, 0, 2, 3) * 2 + 1
    t = rows((m, streams, b, c, length), 21, torch.float32).permute(1, 2, 0, 3, 4)
    g = rows((streams, b, m, c, length), 22, torch.float32)
    scale = rows((m, c, 1), 23, torch.float32)
    x_hat, inv_std = op.statistics_forward(x, EPS)[:2]
    got, means = native_ops.linearization_forward(t, x_hat, scale)
    want, want_means = op.linearization_forward(t, x_hat, scale)
    assert_close(got, want, rtol=1e-5, atol=1e-5, name="linearization")
    for a, e in zip(means, want_means):
        assert_close(a, e, rtol=1e-5, atol=1e-6, name="means")
    grads = native_ops.linearization_backward(g, t, x_hat, scale, *means)
    want_grads = op.linearization_backward(g, t, x_hat, scale, *means)
    for name, a, e in zip(("grad_t", "grad_x_hat", "grad_scale"), grads, want_grads):
        assert_close(a, e, rtol=1e-4, atol=1e-4, name=name)
    g_inv = rows((m, c, 1), 24, torch.float32)
    for g_hat, g_std in ((g[0], g_inv), (g[0], None), (None, g_inv)):
        assert_close(native_ops.statistics_backward(g_hat, g_std, x_hat, inv_std),
                     op.statistics_backward(g_hat, g_std, x_hat, inv_std), rtol=1e-4, atol=1e-5, name="grad_x")


@needs_extension
def test_native_ops_pass_opcheck():
    ops = native.OPS
    x = rows((3, 2, 2, 5), 30)
    x_hat, inv_std, _, _ = op.statistics_forward(x, EPS)
    t, g = rows((2, 3, 2, 2, 5), 31), rows((2, 3, 2, 2, 5), 32)
    _, (mean_t, mean_tx) = op.linearization_forward(t, x_hat, inv_std)
    for fn, args in ((ops.batch_norm_statistics_backward, (x_hat, inv_std.clone(), x_hat, inv_std)),
                     (ops.batch_norm_statistics_backward, (None, inv_std.clone(), x_hat, inv_std)),
                     (ops.batch_norm_linearization_forward, (t, x_hat, inv_std)),
                     (ops.batch_norm_linearization_backward, (g, t, x_hat, inv_std, mean_t, mean_tx))):
        torch.library.opcheck(fn, args)


@needs_extension
def test_native_ops_name_bad_input():
    ops = native.OPS
    x = rows((3, 2, 2, 5), 40)
    x_hat, inv_std, _, _ = op.statistics_forward(x, EPS)
    with pytest.raises(RuntimeError, match="x_hat must have 4 dimensions"):
        ops.batch_norm_statistics_backward(None, inv_std, x_hat[0], inv_std)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.batch_norm_statistics_backward(None, inv_std, x_hat.half(), inv_std)
    with pytest.raises(RuntimeError, match="last .spatial. axis"):
        ops.batch_norm_statistics_backward(None, inv_std, x_hat.transpose(2, 3), inv_std)
    with pytest.raises(RuntimeError, match=r"scale must be \[2, 2, 1\]"):
        ops.batch_norm_linearization_forward(x.unsqueeze(0), x_hat, inv_std[:1])
    with pytest.raises(RuntimeError, match="x_hat must be Double"):
        ops.batch_norm_linearization_forward(x.unsqueeze(0), x_hat.float(), inv_std)
