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
@pytest.mark.parametrize("affine", [True, False])
def test_statistics_match_atens_batch_norm(shape, affine, launchers):
    x = rows(shape, 0) * 3 + 1
    gamma, beta = (rows((shape[1], shape[2], 1), seed) for seed in (14, 15)) if affine else (None, None)
    y, x_hat, inv_std, mean, var = op.batch_statistics(x, gamma, beta, EPS, launchers)
    want_hat, want_inv = plain_statistics(x, EPS)
    assert_close(y, want_hat * gamma + beta if affine else want_hat, rtol=1e-12, atol=1e-12, name="y")
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
    """Every output's gradient at once (y, x_hat and inv_std all feed the penalty), with and without the
    affine map, and each output's alone (the Function's backward gets None for the others)."""
    x = (rows((3, 2, 2, 5), 9) * 2 + 0.5).requires_grad_(True)
    gamma, beta = (rows((2, 2, 1), seed).requires_grad_(True) for seed in (16, 17))

    def function(value, gamma=None, beta=None):
        return op.batch_statistics(value, gamma, beta, EPS, launchers)[:3]

    assert torch.autograd.gradcheck(function, (x, gamma, beta))
    assert torch.autograd.gradcheck(function, (x,))
    for index in range(3):
        assert torch.autograd.gradcheck(lambda *a: function(*a)[index], (x, gamma, beta))
    # a member-layout view (permuted strides), as the engine passes it
    y = rows((2, 3, 2, 5), 10).permute(1, 0, 2, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(function, (y, gamma, beta))


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
    g_y, gamma = rows((m, b, c, length), 25, torch.float32).permute(1, 0, 2, 3), rows((m, c, 1), 26, torch.float32)
    for g_out, g_hat, g_std, gain in ((None, g[0], g_inv, None), (None, g[0], None, None), (None, None, g_inv, None),
                                      (g_y, g[0], g_inv, gamma), (g_y, None, None, gamma), (g_y, g[1], None, None),
                                      (None, None, None, gamma)):
        got = native_ops.statistics_backward(g_out, g_hat, g_std, x_hat, inv_std, gain)
        want = op.statistics_backward(g_out, g_hat, g_std, x_hat, inv_std, gain)
        for name, a, e in zip(("grad_x", "grad_gamma", "grad_beta"), got, want):
            assert (a is None) == (e is None), name
            if e is not None:
                assert_close(a, e, rtol=1e-4, atol=1e-4, name=name)


@needs_extension
def test_native_ops_pass_opcheck():
    ops = native.OPS
    x = rows((3, 2, 2, 5), 30)
    x_hat, inv_std, _, _ = op.statistics_forward(x, EPS)
    t, g = rows((2, 3, 2, 2, 5), 31), rows((2, 3, 2, 2, 5), 32)
    _, (mean_t, mean_tx) = op.linearization_forward(t, x_hat, inv_std)
    gamma = rows((2, 2, 1), 33)
    for fn, args in ((ops.batch_norm_statistics_backward, (None, x_hat, inv_std.clone(), x_hat, inv_std, None)),
                     (ops.batch_norm_statistics_backward, (None, None, inv_std.clone(), x_hat, inv_std, None)),
                     (ops.batch_norm_statistics_backward, (x, x_hat, inv_std.clone(), x_hat, inv_std, gamma)),
                     (ops.batch_norm_linearization_forward, (t, x_hat, inv_std)),
                     (ops.batch_norm_linearization_backward, (g, t, x_hat, inv_std, mean_t, mean_tx))):
        torch.library.opcheck(fn, args)


@needs_extension
def test_native_ops_name_bad_input():
    ops = native.OPS
    x = rows((3, 2, 2, 5), 40)
    x_hat, inv_std, _, _ = op.statistics_forward(x, EPS)
    with pytest.raises(RuntimeError, match="x_hat must have 4 dimensions"):
        ops.batch_norm_statistics_backward(None, None, inv_std, x_hat[0], inv_std, None)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.batch_norm_statistics_backward(None, None, inv_std, x_hat.half(), inv_std, None)
    with pytest.raises(RuntimeError, match="last .spatial. axis"):
        ops.batch_norm_statistics_backward(None, None, inv_std, x_hat.transpose(2, 3), inv_std, None)
    with pytest.raises(RuntimeError, match=r"grad_y must be \[3, 2, 2, 5\]"):
        ops.batch_norm_statistics_backward(x[:2], None, None, x_hat, inv_std, inv_std)
    with pytest.raises(RuntimeError, match=r"gamma must be \[2, 2, 1\]"):
        ops.batch_norm_statistics_backward(x, None, None, x_hat, inv_std, inv_std[:1])
    with pytest.raises(RuntimeError, match=r"scale must be \[2, 2, 1\]"):
        ops.batch_norm_linearization_forward(x.unsqueeze(0), x_hat, inv_std[:1])
    with pytest.raises(RuntimeError, match="x_hat must be Double"):
        ops.batch_norm_linearization_forward(x.unsqueeze(0), x_hat.float(), inv_std)


# ---- the jvp mode's whole layer: primal rows and tangent streams in one Function ----

def plain_streams(x, gamma, beta):
    """normalized_streams by plain differentiable expressions: BatchNorm of x[0], the linearization of x[1:]."""
    x0 = x[0]
    mean = x0.mean(dim=(0, 3), keepdim=True)
    inv_std = torch.rsqrt(x0.var(dim=(0, 3), keepdim=True, correction=0) + EPS)
    x_hat = (x0 - mean) * inv_std
    scale = inv_std if gamma is None else inv_std * gamma
    primal = x_hat if gamma is None else x_hat * gamma + beta
    return torch.cat([primal.unsqueeze(0), plain_linearization(x[1:], x_hat, scale)])


def stream_rows(shape, streams, seed, layout):
    """[S, B, M, C, L] rows as the engine hands them: contiguous ("rows"), a permuted view of [M, S, B, C, L]
    ("members"), or one member's rows expanded over M ("shared")."""
    b, m, c, length = shape
    if layout == "members":
        return rows((m, streams, b, c, length), seed).permute(1, 2, 0, 3, 4) * 2 + 0.5
    if layout == "shared":
        return (rows((streams, b, 1, c, length), seed) * 2 + 0.5).expand(-1, -1, m, -1, -1)
    return rows((streams, *shape), seed) * 2 + 0.5


@pytest.mark.parametrize("shape", [(3, 2, 3, 7), (4, 1, 2, 1), (2, 3, 1, 5)])
@pytest.mark.parametrize("streams", [1, 2, 4])
@pytest.mark.parametrize("layout", ["rows", "members", "shared"])
@pytest.mark.parametrize("affine", [True, False])
def test_normalized_streams_match_plain_expressions_and_gradients(shape, streams, layout, affine, launchers):
    x = stream_rows(shape, streams, 50, layout).requires_grad_(True)
    gamma = (rows((shape[1], shape[2], 1), 51) + 1.5).requires_grad_(True) if affine else None
    beta = rows((shape[1], shape[2], 1), 52).requires_grad_(True) if affine else None
    y, mean, var = op.normalized_streams(x, gamma, beta, EPS, launchers)
    expected = plain_streams(x, gamma, beta)
    assert_close(y, expected, rtol=1e-11, atol=1e-11, name="y")
    assert y.stride() == x.stride() or layout == "shared"  # x's memory order: the engine's view stays a view
    assert_close(mean, x[0].mean(dim=(0, 3)).unsqueeze(-1), rtol=1e-12, atol=1e-12, name="mean")
    assert_close(var, x[0].var(dim=(0, 3), correction=0).unsqueeze(-1), rtol=1e-12, atol=1e-12, name="var")
    upstream = rows(y.shape, 53)
    inputs = (x, gamma, beta) if affine else (x,)
    got = torch.autograd.grad((y * upstream).sum(), inputs)
    want = torch.autograd.grad((expected * upstream).sum(), inputs)
    for name, a, e in zip(("x", "gamma", "beta"), got, want):
        assert_close(a, e, rtol=1e-9, atol=1e-10, name=f"d/d{name}")


def test_gradcheck_normalized_streams(launchers):
    x = (rows((3, 3, 2, 2, 4), 60) * 2 + 0.5).requires_grad_(True)
    gamma = (rows((2, 2, 1), 61) + 1.5).requires_grad_(True)
    beta = rows((2, 2, 1), 62).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: op.normalized_streams(*a, EPS, launchers)[0], (x, gamma, beta))
    assert torch.autograd.gradcheck(lambda a: op.normalized_streams(a, None, None, EPS, launchers)[0], (x[:2],))


@needs_extension
@pytest.mark.parametrize("streams", [1, 3])
def test_native_streams_match_aten_in_float32(streams):
    """The C++ streams launchers against ATen's on float32 rows in the engine's member layout, every output."""
    native_ops = op.native_launchers(native.OPS)
    b, m, c, length = 16, 2, 4, 49
    x = rows((m, streams, b, c, length), 70, torch.float32).permute(1, 2, 0, 3, 4) * 2 + 1
    gamma, beta = rows((m, c, 1), 71, torch.float32) + 1, rows((m, c, 1), 72, torch.float32)
    g = rows((m, streams, b, c, length), 73, torch.float32).permute(1, 2, 0, 3, 4)
    got = native_ops.streams_forward(x, gamma, beta, EPS)
    want = op.streams_forward(x, gamma, beta, EPS)
    assert got[0].stride() == x.stride()
    for name, a, e in zip(("y", "mean", "var", "inv_std", "mean_t", "mean_tx"), got, want):
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)
    grads = native_ops.streams_backward(g, x, want[1], want[3], gamma, *want[4:])
    want_grads = op.streams_backward(g, x, want[1], want[3], gamma, *want[4:])
    for name, a, e in zip(("grad_x", "grad_gamma", "grad_beta"), grads, want_grads):
        assert_close(a, e, rtol=1e-4, atol=1e-4, name=name)


@needs_extension
def test_native_streams_pass_opcheck_and_name_bad_input():
    ops = native.OPS
    x, g = rows((3, 3, 2, 2, 5), 80), rows((3, 3, 2, 2, 5), 81)
    gamma, beta = rows((2, 2, 1), 82), rows((2, 2, 1), 83)
    _, mean, _, inv_std, mean_t, mean_tx = ops.batch_norm_streams_forward(x, gamma, beta, EPS)
    for fn, args in ((ops.batch_norm_streams_forward, (x, gamma, beta, EPS)),
                     (ops.batch_norm_streams_forward, (x, None, None, EPS)),
                     (ops.batch_norm_streams_backward, (g, x, mean, inv_std, gamma, mean_t, mean_tx)),
                     (ops.batch_norm_streams_backward, (g, x, mean, inv_std, None, mean_t, mean_tx))):
        torch.library.opcheck(fn, args)
    with pytest.raises(RuntimeError, match="x must have 5 dimensions"):
        ops.batch_norm_streams_forward(x[0], gamma, beta, EPS)
    with pytest.raises(RuntimeError, match="gamma and beta must be given together"):
        ops.batch_norm_streams_forward(x, gamma, None, EPS)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        ops.batch_norm_streams_forward(x, gamma, beta, 0.0)
    with pytest.raises(RuntimeError, match=r"gamma must be \[2, 2, 1\]"):
        ops.batch_norm_streams_forward(x, gamma[:1], beta, EPS)
    with pytest.raises(RuntimeError, match="beta must be Double"):
        ops.batch_norm_streams_forward(x, gamma, beta.float(), EPS)
    with pytest.raises(RuntimeError, match="grad_y must be"):
        ops.batch_norm_streams_backward(g[:2], x, mean, inv_std, gamma, mean_t, mean_tx)
    with pytest.raises(RuntimeError, match=r"mean_t must be \[2, 1, 2, 2, 1\]"):
        ops.batch_norm_streams_backward(g, x, mean, inv_std, gamma, mean_t[:1], mean_tx)
