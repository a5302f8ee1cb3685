"""The torch launchers of fastjac/ops/uap_step.py: perturb and the sign step (the perturbed first Linear exists on
the Triton backend only: tests/test_triton_kernels.py)."""
from __future__ import annotations

import torch

from fastjac.ops import uap_step as ops


def _kink_free(b, k, shape, dtype=torch.float64):
    """x, delta whose sums clamp on both sides but stay 0.08 away from the clamp's kinks 0 and 1."""
    x = torch.tensor([0.1, 0.5, 0.9], dtype=dtype)[torch.randint(0, 3, (b, *shape))]
    delta = torch.tensor([-0.3, 0.02, 0.3], dtype=dtype)[torch.randint(0, 3, (k, *shape))]
    return x, delta


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
