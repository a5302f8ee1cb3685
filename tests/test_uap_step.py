"""uap_step on every backend (torch, cpp, triton, cuda) and device: perturb, the sign step and the
perturbed first Linear against plain definitions written out here, and float64 gradcheck."""
from __future__ import annotations

import pytest
import torch

from fastjac.ops import uap_step as ops
from tests.helpers import assert_close, backend_devices, close, interpreted

F64, F32 = torch.float64, torch.float32
BACKENDS = backend_devices()


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


def kink_free(b, k, shape, dtype=F64, device="cpu"):
    """x [B, *shape], delta [K, *shape] whose sums clamp on both sides but stay 0.08 away from the clamp's
    kinks 0 and 1 (gradcheck's perturbations cannot cross them, float32 rounding cannot flip them)."""
    x = torch.tensor([0.1, 0.5, 0.9], dtype=dtype)[torch.randint(0, 3, (b, *shape))]
    delta = torch.tensor([-0.3, 0.02, 0.3], dtype=dtype)[torch.randint(0, 3, (k, *shape))]
    return x.to(device), delta.to(device)


def perturbed_linear_launchers(backend):
    """The backend's perturbed-linear launchers, or a skip naming why it has none."""
    try:
        return ops.perturbed_linear_launchers(backend)
    except ValueError as error:
        pytest.skip(f"no perturbed-linear launchers on {backend!r}: {error}")


# ------------------------------------------------------------------------------ perturb, sign step
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("b,k,shape", [(1, 1, (5,)), (3, 3, (7,)), (3, 1, (2, 3))], ids=str)
def test_perturb_matches_reference(backend, device, b, k, shape):
    perturb_forward, perturb_backward, _ = ops.launchers(backend)
    x, delta = kink_free(b, k, shape, F32, device)
    out = perturb_forward(x, delta)
    expected = torch.stack([torch.clamp(x + delta[i], 0.0, 1.0) for i in range(k)])  # [K, B, *shape]
    assert torch.equal(out, expected)  # the same elementwise operations: bit for bit
    grad = torch.randn(k, b, *shape, dtype=F64, device=device)
    leaf = delta.double().requires_grad_()
    torch.stack([torch.clamp(x.double() + leaf[i], 0.0, 1.0) for i in range(k)]).backward(grad)
    close(perturb_backward(grad.float(), x, delta), leaf.grad, F32, length=b, name="grad_delta")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_perturb_backward_bounds_inclusive(backend, device):
    """x + delta exactly 0 or 1 passes the gradient (torch.clamp's convention); outside does not."""
    _, perturb_backward, _ = ops.launchers(backend)
    x = torch.tensor([[0.0, 1.0, 0.25, 0.5, 1.0, 0.0]], device=device)
    delta = torch.tensor([[0.0, 0.0, -0.25, 0.5, 0.5, -0.5]], device=device)
    grad = torch.ones(1, 1, 6, device=device)
    assert torch.equal(perturb_backward(grad, x, delta).cpu(), torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(4,), (2, 2)], ids=str)
def test_perturb_gradcheck_float64(backend, device, shape):
    x, delta = kink_free(3, 2, shape, device=device)
    assert torch.autograd.gradcheck(lambda d: ops.perturb(x, d, backend), (delta.requires_grad_(),),
                                    fast_mode=interpreted(backend, device))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("k,shape", [(1, (5,)), (3, (7,)), (3, (2, 3))], ids=str)
def test_sign_step_matches_reference(backend, device, dtype, k, shape):
    generator = torch.Generator().manual_seed(0)
    delta = (torch.randn(k, *shape, generator=generator, dtype=dtype) * 0.1).to(device)
    grad = torch.randn(k, *shape, generator=generator, dtype=dtype).to(device)
    grad.view(-1)[::3] = 0.0  # sign 0: the entry only gets projected
    step = (torch.rand(k, generator=generator) * 0.05).to(device)
    eps = (torch.rand(k, generator=generator) * 0.1 + 0.01).to(device)  # smaller than some |delta|: clamp active
    out = ops.sign_step(delta, grad, step, eps, backend)
    expected = torch.stack([torch.clamp(delta[i] + step[i].to(dtype) * torch.sign(grad[i]), -eps[i].to(dtype),
                                        eps[i].to(dtype)) for i in range(k)])
    assert out.dtype == dtype and torch.equal(out, expected)
    assert (out.reshape(k, -1).abs().amax(dim=1) <= eps.to(dtype)).all()


# ---------------------------------------------------------------------------------- perturbed linear
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("b,k,shape,out_features,m", [(1, 1, (5,), 3, 1), (3, 3, (7,), 6, 2), (2, 3, (2, 3), 4, 2),
                                                      (17, 2, (18,), 17, 2)], ids=str)
def test_perturbed_linear_forward_matches_reference(backend, device, b, k, shape, out_features, m, has_bias, relu):
    """float32 against float64 (IN terms per output); the masks agree: the pre-activations are kept
    1e-3 away from 0 by choosing the seed."""
    forward, _ = perturbed_linear_launchers(backend)
    fan_in = torch.Size(shape).numel()
    for seed in range(100):
        generator = torch.Generator().manual_seed(seed)
        x, delta = torch.rand(b, *shape, generator=generator), torch.rand(k, *shape, generator=generator) - 0.5
        weight = torch.randn(m, out_features, fan_in, generator=generator)
        bias = torch.randn(m, out_features, generator=generator) if has_bias else None
        expected, expected_mask = reference_perturbed_linear(x.double(), delta.double(), weight.double(),
                                                             None if bias is None else bias.double(), False)
        if expected.abs().min() > 1e-3:
            break
    else:
        raise AssertionError("no seed kept the pre-activations away from the ReLU kink")
    if relu:
        expected, expected_mask = expected.relu(), (expected > 0).reshape(m, -1)
    out, mask = forward(*(t if t is None else t.to(device) for t in (x, delta, weight, bias)), relu)
    assert out.shape == (m, k * b, out_features) and out.dtype == F32
    close(out, expected, F32, length=fan_in, name="out")
    if relu:
        assert mask.dtype == torch.bool and mask.shape == (m, k * b * out_features)
        assert torch.equal(mask.cpu(), expected_mask)
    else:
        assert mask is None


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("has_bias,relu", [(True, True), (False, False), (True, False)], ids=str)
@pytest.mark.parametrize("b,k,fan_in,out_features", [(3, 2, 5, 4), (17, 2, 18, 17)], ids=str)
def test_perturbed_linear_backward_matches_autograd_of_reference(backend, device, has_bias, relu, b, k, fan_in,
                                                                 out_features):
    """float64; 17 samples, 18 inputs and 17 outputs leave partial tiles in a tiled kernel."""
    forward, backward = perturbed_linear_launchers(backend)
    x, delta = kink_free(b, k, (fan_in,), device=device)
    weight = torch.randn(2, out_features, fan_in, dtype=F64, device=device)
    bias = torch.randn(2, out_features, dtype=F64, device=device) if has_bias else None
    out, mask = forward(x, delta, weight, bias, relu)
    grad_out = torch.randn_like(out)
    got = backward(grad_out, x, delta, weight, mask)
    leaf = delta.cpu().clone().requires_grad_()
    ref_out, _ = reference_perturbed_linear(x.cpu(), leaf, weight.cpu(), None if bias is None else bias.cpu(), relu)
    (ref_out * grad_out.cpu()).sum().backward()
    assert got.shape == delta.shape
    assert_close(got, leaf.grad, rtol=1e-12, atol=1e-12, name="grad_delta")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_perturbed_linear_backward_through_inclusive_clamp(backend, device):
    """A sum exactly on a bound passes the gradient (torch.clamp's convention), one past it does not."""
    _, backward = perturbed_linear_launchers(backend)
    x = torch.tensor([[0.0, 1.0, 0.5, 0.25]], device=device)
    delta = torch.tensor([[0.0, 0.0, 0.75, -0.25]], device=device)  # sums 0, 1 (on the bounds), 1.25, 0
    weight = torch.ones(1, 1, 4, device=device)
    grad = backward(torch.ones(1, 1, 1, device=device), x, delta, weight, None)
    assert torch.equal(grad.cpu(), torch.tensor([[1.0, 1.0, 0.0, 1.0]]))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("shape", [(4,), (2, 2)], ids=str)
def test_perturbed_linear_gradcheck_float64(backend, device, relu, shape):
    perturbed_linear_launchers(backend)
    x, delta = kink_free(2, 3, shape, device=device)
    weight = torch.randn(2, 3, x[0].numel(), dtype=F64, device=device)
    bias = torch.randn(2, 3, dtype=F64, device=device)
    assert torch.autograd.gradcheck(lambda d: ops.perturbed_linear(x, d, weight, bias, relu=relu, backend=backend)[0],
                                    (delta.requires_grad_(),), fast_mode=interpreted(backend, device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_perturbed_linear_is_differentiable_in_delta_only(backend, device):
    perturbed_linear_launchers(backend)
    x, delta = kink_free(2, 2, (3,), device=device)
    weight = torch.randn(2, 4, 3, dtype=F64, device=device, requires_grad=True)
    bias = torch.randn(2, 4, dtype=F64, device=device, requires_grad=True)
    delta.requires_grad_()
    out, mask = ops.perturbed_linear(x, delta, weight, bias, relu=True, backend=backend)
    assert not mask.requires_grad
    out.sum().backward()
    assert delta.grad is not None and weight.grad is None and bias.grad is None


def test_perturbed_linear_rejects_bad_arguments():
    x, delta, weight = torch.rand(2, 5), torch.rand(3, 5), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.perturbed_linear(x, delta, weight, backend="nope")
    with pytest.raises(ValueError, match="features"):
        ops.perturbed_linear(x, delta, torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="share"):
        ops.perturbed_linear(x, torch.rand(3, 4), weight)
    with pytest.raises(ValueError, match="bias"):
        ops.perturbed_linear(x, delta, weight, torch.randn(4))
    with pytest.raises(TypeError, match="dtype"):
        ops.perturbed_linear(x, delta.double(), weight)
