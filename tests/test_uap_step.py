"""The torch launchers of fastjac/ops/uap_step.py: perturb, the sign step, and the perturbed first Linear."""
from __future__ import annotations

import pytest
import torch

from fastjac.ops import uap_step as ops
from tests.helpers import assert_close


def reference_perturbed_linear(x, delta, weight, bias, relu):
    """Written out plainly: perturb each sample by each delta_k, then loop over the members."""
    rows = []
    for k in range(delta.shape[0]):
        for b in range(x.shape[0]):
            rows.append(torch.clamp(x[b] + delta[k], 0.0, 1.0).reshape(-1))
    inputs = torch.stack(rows)  # [K*B, IN], row k*B + b
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


def _kink_free(b, k, shape, dtype=torch.float64):
    """x, delta whose sums clamp on both sides but stay 0.08 away from the clamp's kinks 0 and 1."""
    x = torch.tensor([0.1, 0.5, 0.9], dtype=dtype)[torch.randint(0, 3, (b, *shape))]
    delta = torch.tensor([-0.3, 0.02, 0.3], dtype=dtype)[torch.randint(0, 3, (k, *shape))]
    return x, delta


@pytest.mark.parametrize("b,k,shape,out_features,m", [(1, 1, (5,), 3, 1), (3, 3, (7,), 6, 2), (2, 3, (2, 3), 4, 2)])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_perturbed_linear_forward_matches_reference(b, k, shape, out_features, m, has_bias, relu):
    x, delta = torch.rand(b, *shape), torch.rand(k, *shape) - 0.5
    fan_in = x[0].numel()
    weight, bias = torch.randn(m, out_features, fan_in), (torch.randn(m, out_features) if has_bias else None)
    out, mask = ops.perturbed_linear_forward(x, delta, weight, bias, relu)
    ref_out, ref_mask = reference_perturbed_linear(x, delta, weight, bias, relu)
    assert out.shape == (m, k * b, out_features)
    assert_close(out, ref_out, rtol=1e-5, atol=1e-5, name="out")
    if relu:
        assert mask.dtype == torch.bool and mask.shape == (m, k * b * out_features)
        assert torch.equal(mask, ref_mask)
    else:
        assert mask is None


@pytest.mark.parametrize("has_bias,relu", [(True, True), (False, False), (True, False)])
def test_perturbed_linear_backward_matches_autograd_of_reference(has_bias, relu):
    x, delta = _kink_free(3, 2, (5,))
    weight = torch.randn(2, 4, 5, dtype=torch.float64)
    bias = torch.randn(2, 4, dtype=torch.float64) if has_bias else None
    out, mask = ops.perturbed_linear_forward(x, delta, weight, bias, relu)
    grad_out = torch.randn_like(out)
    got = ops.perturbed_linear_backward(grad_out, x, delta, weight, mask)
    leaf = delta.clone().requires_grad_()
    ref_out, _ = reference_perturbed_linear(x, leaf, weight, bias, relu)
    (ref_out * grad_out).sum().backward()
    assert got.shape == delta.shape
    assert_close(got, leaf.grad, rtol=1e-12, atol=1e-12, name="grad_delta")


def test_perturbed_linear_backward_through_inclusive_clamp():
    """A sum exactly on a bound passes the gradient (torch.clamp's convention), one past it does not."""
    x = torch.tensor([[0.0, 1.0, 0.5]])
    delta = torch.tensor([[0.0, 0.0, 0.75]])  # sums 0, 1 (inside, on the bounds) and 1.25 (clamped)
    weight = torch.ones(1, 1, 3)
    grad = ops.perturbed_linear_backward(torch.ones(1, 1, 1), x, delta, weight, None)
    assert torch.equal(grad, torch.tensor([[1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", [(4,), (2, 2)])
def test_perturbed_linear_gradcheck_float64(relu, shape):
    x, delta = _kink_free(2, 3, shape)
    weight = torch.randn(2, 3, x[0].numel(), dtype=torch.float64)
    bias = torch.randn(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda d: ops.perturbed_linear(x, d, weight, bias, relu=relu, backend="torch")[0],
        (delta.requires_grad_(),))


def test_perturbed_linear_is_differentiable_in_delta_only():
    x, delta = _kink_free(2, 2, (3,))
    weight = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    delta.requires_grad_()
    out, mask = ops.perturbed_linear(x, delta, weight, bias, relu=True)
    assert not mask.requires_grad
    out.sum().backward()
    assert delta.grad is not None and weight.grad is None and bias.grad is None


@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda"])
def test_perturbed_linear_launchers_torch_for_non_triton(backend):
    assert ops.perturbed_linear_launchers(backend) == (ops.perturbed_linear_forward, ops.perturbed_linear_backward)


def test_perturbed_linear_rejects_bad_arguments():
    x, delta, weight = torch.rand(2, 5), torch.rand(3, 5), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.perturbed_linear_launchers("nope")
    with pytest.raises(ValueError, match="features"):
        ops.perturbed_linear_forward(x, delta, torch.randn(2, 4, 6), None, False)
    with pytest.raises(ValueError, match="share"):
        ops.perturbed_linear_forward(x, torch.rand(3, 4), weight, None, False)
    with pytest.raises(ValueError, match="bias"):
        ops.perturbed_linear_forward(x, delta, weight, torch.randn(4), False)
    with pytest.raises(TypeError, match="dtype"):
        ops.perturbed_linear_forward(x, delta.double(), weight, None, False)


# ------------------------------------------------------------------------- perturb and the sign step

def test_perturb_gradcheck_float64():
    x, delta = _kink_free(3, 2, (4,))
    assert torch.autograd.gradcheck(lambda d: ops.perturb(x, d), (delta.requires_grad_(),))


def test_sign_step_projects_onto_eps_ball():
    delta, grad = torch.randn(3, 6) * 0.2, torch.randn(3, 6)
    step, eps = torch.tensor([0.01, 0.05, 0.0]), torch.tensor([0.05, 0.1, 0.02])
    out = ops.sign_step(delta, grad, step, eps)
    expected = torch.stack([torch.clamp(delta[k] + step[k] * torch.sign(grad[k]), -eps[k], eps[k]) for k in range(3)])
    assert torch.equal(out, expected)
    assert (out.abs().amax(dim=1) <= eps).all()
