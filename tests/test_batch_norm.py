"""fastjac/ops/batch_norm.py: the launchers against plain ATen expressions of the same math (values and,
through autograd on those expressions, gradients) and a float64 gradcheck of each autograd Function.
Odd sizes, one sample, several streams; a [B, M, C, L] view permuted like the engine's member layout."""
import pytest
import torch
import torch.nn.functional as F

from fastjac.ops import batch_norm as op
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


@pytest.mark.parametrize("shape", SHAPES)
def test_statistics_match_atens_batch_norm(shape):
    x = rows(shape, 0) * 3 + 1
    x_hat, inv_std, mean, var = op.batch_statistics(x, EPS)
    want_hat, want_inv = plain_statistics(x, EPS)
    assert_close(x_hat, want_hat, rtol=1e-12, atol=1e-12, name="x_hat")
    assert_close(inv_std, want_inv, rtol=1e-12, atol=0, name="inv_std")
    assert_close(mean, x.mean(dim=(0, 3)).unsqueeze(-1), rtol=1e-12, atol=1e-12, name="mean")
    assert_close(var, x.var(dim=(0, 3), correction=0).unsqueeze(-1), rtol=1e-12, atol=1e-12, name="var")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("streams", [1, 3])
def test_linearization_matches_plain_expression_and_its_gradients(shape, streams):
    t = rows((streams, *shape), 1).requires_grad_(True)
    x_hat = plain_statistics(rows(shape, 2), EPS)[0].requires_grad_(True)
    scale = rows((shape[1], shape[2], 1), 3).requires_grad_(True)
    out = op.normalized_linearization(t, x_hat, scale)
    expected = plain_linearization(t, x_hat, scale)
    assert_close(out, expected, rtol=1e-12, atol=1e-12, name="linearization")
    upstream = rows(out.shape, 4)
    got = torch.autograd.grad((out * upstream).sum(), (t, x_hat, scale))
    want = torch.autograd.grad((expected * upstream).sum(), (t, x_hat, scale))
    for name, a, e in zip(("t", "x_hat", "scale"), got, want):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"d/d{name}")


def test_linearization_is_self_adjoint():
    """<L t, g> = <t, L g> per stream: one map serves tangents (jvp) and cotangents (vjp)."""
    shape = (3, 2, 3, 7)
    t, g = rows((2, *shape), 5), rows((2, *shape), 6)
    x_hat = plain_statistics(rows(shape, 7), EPS)[0]
    scale = rows((2, 3, 1), 8)
    left = (op.normalized_linearization(t, x_hat, scale) * g).sum()
    right = (t * op.normalized_linearization(g, x_hat, scale)).sum()
    assert_close(left, right, rtol=1e-12, atol=1e-12, name="adjoint")


def test_gradcheck_batch_statistics():
    x = (rows((3, 2, 2, 5), 9) * 2 + 0.5).requires_grad_(True)

    def function(value):
        x_hat, inv_std, _, _ = op.batch_statistics(value, EPS)
        return x_hat, inv_std

    assert torch.autograd.gradcheck(function, (x,))
    # a member-layout view (permuted strides), as the engine passes it
    y = rows((2, 3, 2, 5), 10).permute(1, 0, 2, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(function, (y,))


def test_gradcheck_normalized_linearization():
    shape = (3, 2, 2, 4)
    t = rows((2, *shape), 11).requires_grad_(True)
    x_hat = plain_statistics(rows(shape, 12), EPS)[0].requires_grad_(True)
    scale = rows((2, 2, 1), 13).requires_grad_(True)
    assert torch.autograd.gradcheck(op.normalized_linearization, (t, x_hat, scale))
