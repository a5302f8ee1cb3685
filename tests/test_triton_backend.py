"""The stacked engine on the Triton backend against the reference: logits, penalties and parameter
gradients (both modes, both targets), and SGD-UAP with the fused perturbed first layer.

The Triton tensors live on the backend's device (``fastjac.verify.backend_device``: a GPU when one
exists, else the CPU under the interpreter); the reference runs in float64 on the CPU, on copies of the
same values. Tiny odd shapes keep the interpreter fast."""
import copy

import pytest
import torch
from torch import nn

from fastjac import reference
from fastjac.ensemble import Ensemble
from fastjac.jacobian import jacobian_penalty, make_projections
from fastjac.uap import sgd_uap
from fastjac.verify import backend_device
from tests.helpers import assert_close, needs_backend

pytestmark = needs_backend("triton")
DEVICE = backend_device("triton")


def tiny_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))


def tiny_convnet():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 2 * 3, 5), nn.ReLU(), nn.Linear(5, 3))


def _grads(loss, tensors):
    return [torch.zeros_like(t) if g is None else g
            for g, t in zip(torch.autograd.grad(loss, tensors, allow_unused=True), tensors)]


@pytest.mark.parametrize("build, input_shape", [(tiny_mlp, (12,)), (tiny_convnet, (1, 4, 6))], ids=["mlp", "conv"])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
def test_penalty_values_and_gradients_match_reference(build, input_shape, mode, target):
    torch.manual_seed(1)
    members = [build().double() for _ in range(2)]
    ensemble = Ensemble([copy.deepcopy(m) for m in members]).to(DEVICE)
    x = torch.rand(3, *input_shape, dtype=torch.float64)
    projections = make_projections(mode, 2, x.shape, 3, dtype=torch.float64)
    fast = jacobian_penalty(ensemble, x.to(DEVICE), mode=mode, target=target, projections=projections.to(DEVICE),
                            backend="triton")
    assert fast.device.type == DEVICE.type
    functions = members if target == "members" else [reference.ensemble_model(members)]
    estimator = reference.penalty_vjp if mode == "vjp" else reference.penalty_jvp
    slow = torch.stack([estimator(f, x, projections) for f in functions]).reshape(fast.shape)
    # float64 throughout (the interpreter runs tl.dot in float64, a GPU in IEEE float64): rounding-level agreement
    assert_close(fast, slow, rtol=1e-10, atol=1e-12, name="penalty")
    fast_grads = _grads(fast.sum(), list(ensemble.params().values()))
    per_member = [dict(m.named_parameters()) for m in members]
    flat = [per_member[i][name] for name in ensemble.names for i in range(len(members))]
    slow_flat = _grads(slow.sum(), flat)
    for k, name in enumerate(ensemble.names):
        expected = torch.stack(slow_flat[k * len(members):(k + 1) * len(members)])
        assert_close(fast_grads[k], expected, rtol=1e-9, atol=1e-12, name=f"grad {name}")
    logits = ensemble.member_logits(x.to(DEVICE), backend="triton")
    assert_close(logits, reference.member_logits(members, x), rtol=1e-12, atol=1e-12, name="logits")


@pytest.mark.parametrize("build, input_shape", [(tiny_mlp, (12,)), (tiny_convnet, (1, 4, 6))], ids=["mlp", "conv"])
def test_sgd_uap_on_triton_equals_reference(build, input_shape):
    torch.manual_seed(2)
    members = [build().double() for _ in range(2)]
    ensemble = Ensemble([copy.deepcopy(m) for m in members]).to(DEVICE)
    batches = [(torch.rand(4, *input_shape, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(3)]
    eps, targets = [0.05, 0.2], [None, 1]
    fast = sgd_uap(ensemble, [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches], eps=eps, target=targets, epochs=2,
                   backend="triton")
    assert fast.delta.device.type == DEVICE.type
    f = reference.ensemble_model(members)
    for k, (e, t) in enumerate(zip(eps, targets)):
        expected, _ = reference.sgd_uap(f, batches, e, epochs=2, target=t)
        # float64 on both paths: the signs of the batch gradients agree, so the perturbations are equal
        assert torch.equal(fast.delta[k].cpu(), expected), f"perturbation {k} differs"
