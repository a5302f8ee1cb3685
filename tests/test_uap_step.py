"""uap_step on every backend (torch, cpp, triton, cuda) and device: perturb and the sign step against plain
definitions written out here, and float64 gradcheck (the perturbed first Linear, a Triton-only fusion, is
tested in tests/test_triton_kernels.py)."""
from __future__ import annotations

import pytest
import torch

from fastjac import backends
from fastjac.ops import uap_step as ops
from tests.helpers import backend_devices, close, interpreted

F64, F32 = torch.float64, torch.float32
BACKENDS = backend_devices()


def kink_free(b, k, shape, dtype=F64, device="cpu"):
    """x [B, *shape], delta [K, *shape] whose sums clamp on both sides but stay 0.08 away from the clamp's
    kinks 0 and 1 (gradcheck's perturbations cannot cross them, float32 rounding cannot flip them)."""
    x = torch.tensor([0.1, 0.5, 0.9], dtype=dtype)[torch.randint(0, 3, (b, *shape))]
    delta = torch.tensor([-0.3, 0.02, 0.3], dtype=dtype)[torch.randint(0, 3, (k, *shape))]
    return x.to(device), delta.to(device)


# ------------------------------------------------------------------------------ perturb, sign step
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("b,k,shape", [(1, 1, (5,)), (3, 3, (7,)), (3, 1, (2, 3))], ids=str)
def test_perturb_matches_reference(backend, device, b, k, shape):
    perturb_forward, perturb_backward = backends.get(backend).perturb
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
    _, perturb_backward = backends.get(backend).perturb
    x = torch.tensor([[0.0, 1.0, 0.25, 0.5, 1.0, 0.0]], device=device)
    delta = torch.tensor([[0.0, 0.0, -0.25, 0.5, 0.5, -0.5]], device=device)
    grad = torch.ones(1, 1, 6, device=device)
    assert torch.equal(perturb_backward(grad, x, delta).cpu(), torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(4,), (2, 2)], ids=str)
def test_perturb_gradcheck_float64(backend, device, shape):
    x, delta = kink_free(3, 2, shape, device=device)
    assert torch.autograd.gradcheck(lambda d: ops.perturb(x, d, backends.get(backend).perturb), (delta.requires_grad_(),),
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
    out = ops.sign_step(delta, grad, step, eps, backends.get(backend).sign_step)
    expected = torch.stack([torch.clamp(delta[i] + step[i].to(dtype) * torch.sign(grad[i]), -eps[i].to(dtype),
                                        eps[i].to(dtype)) for i in range(k)])
    assert out.dtype == dtype and torch.equal(out, expected)
    assert (out.reshape(k, -1).abs().amax(dim=1) <= eps.to(dtype)).all()
