"""What the engine, layer, graph, model and generic-path tests share beyond ``fastjac.testing``: inputs,
explicit projections, a reference penalty that BatchNorm in train mode cannot fool (see
``batch_statistics_by_ops``), a gradient comparison with a floor for gradients that are zero as a whole,
and the float64 comparison of fast logits / penalties (and every parameter gradient) with the
reference."""
import contextlib
import types

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from fastjac import jacobian_penalty, reference
from fastjac.testing import RTOL64, member_grads, stacked_grads, upstream_weights
from tests.helpers import assert_close

F64, F32 = torch.float64, torch.float32


def make_input(batch, dtype=F64, seed=1, shape=(1, 28, 28), low=0.0):
    """x [B, *shape] uniform in [low, 1)."""
    g = torch.Generator().manual_seed(seed)
    return low + (1 - low) * torch.rand(batch, *shape, generator=g, dtype=dtype)


def make_projections(mode, nproj, x, classes, seed=2):
    g = torch.Generator().manual_seed(seed)
    if mode == "vjp":
        return reference.sphere_projections(nproj, x.shape[0], classes, generator=g, dtype=x.dtype)
    return reference.gaussian_projections(nproj, x.shape, generator=g, dtype=x.dtype)


def _normalize_by_ops(self, x):
    """nn.BatchNorm*d's output with its batch's statistics, in elementary ops (no running statistics)."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + self.eps)
    if self.weight is None:
        return y
    shape = [1, -1] + [1] * (x.dim() - 2)
    return y * self.weight.reshape(shape) + self.bias.reshape(shape)


@contextlib.contextmanager
def batch_statistics_by_ops(members):
    """Within the block, every BatchNorm of ``members`` that normalizes with its batch's statistics (train
    mode, or no running statistics) computes in elementary ops: ATen's batch_norm gives wrong gradients of
    its forward-mode JVP in training mode (pytorch/pytorch#196699; also wrong third derivatives through
    autograd.functional.jvp, measured against finite differences), and torch.func.jvp refuses its in-place
    running-statistics update. The parameters stay the members' own."""
    patched = [m for member in members for m in member.modules()
               if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats)]
    for module in patched:
        module.forward = types.MethodType(_normalize_by_ops, module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def reference_penalty(members, x, mode, target, projections):
    """[M] (members) or scalar (ensemble) from the reference estimators on the unstacked members."""
    fn = {"vjp": reference.penalty_vjp, "jvp": reference.penalty_jvp}[mode]
    with batch_statistics_by_ops(members):
        if target == "members":
            return torch.stack([fn(member, x, projections) for member in members])
        return fn(reference.ensemble_model(members), x, projections)


def assert_grads_close(actual, expected, *, rtol, atol_scale, name):
    assert actual.keys() == expected.keys()
    largest = max(float(e.abs().max()) for e in expected.values())
    for key in expected:
        # atol relative to the tensor's largest gradient: exact zeros (dead units) come out as rounding
        # noise on the scale of the other terms. A gradient that is zero as a whole (a bias before a
        # train-mode BatchNorm) is pure noise: there, 1e-3 of the largest gradient of any tensor sets it.
        atol = atol_scale * max(float(expected[key].abs().max()), 1e-3 * largest) + 1e-300
        assert_close(actual[key], expected[key], rtol=rtol, atol=atol, name=f"{name} d/d{key}")


def assert_penalty_matches_reference(mods, ensemble, x, mode, target, projections, backend, label, x_fast=None):
    """The fast penalty of ``ensemble`` (float64 copies of ``mods``) equals the reference estimator on the
    unstacked members (on the CPU), and so do its gradients w.r.t. every parameter. ``x_fast``: the input
    on the ensemble's device (default ``x``). Returns the fast penalty."""
    x_fast = x if x_fast is None else x_fast
    value = jacobian_penalty(ensemble, x_fast, nproj=projections.shape[0], mode=mode, target=target,
                             projections=projections.to(x_fast.device), backend=backend)
    expected = reference_penalty(mods, x, mode, target, projections)
    assert value.shape == ((len(mods),) if target == "members" else ())
    assert float(expected.detach().abs().min()) > 0, "degenerate case: a zero Jacobian tests nothing"
    assert_close(value, expected, rtol=RTOL64, atol=0, name=f"{label} {mode}/{target} penalty")
    w = upstream_weights(len(mods), F64) if target == "members" else upstream_weights(1, F64)[0]
    assert_grads_close(stacked_grads(ensemble, (w.to(x_fast.device) * value).sum()),
                       member_grads(mods, (w * expected).sum()),
                       rtol=RTOL64, atol_scale=RTOL64, name=f"{label} {mode}/{target} penalty")
    return value


def assert_logits_match_reference(mods, ensemble, x, backend, label):
    """Member logits [M, B, C] and their gradients w.r.t. every parameter (one random upstream) equal a
    loop of the unstacked members."""
    logits = ensemble.member_logits(x, backend=backend)
    expected = reference.member_logits(mods, x)
    scale = float(expected.detach().abs().max())
    assert_close(logits, expected, rtol=RTOL64, atol=RTOL64 * scale, name=f"{label} member logits")
    grad_out = torch.randn(expected.shape, dtype=expected.dtype, generator=torch.Generator().manual_seed(4))
    assert_grads_close(stacked_grads(ensemble, (logits * grad_out).sum()),
                       member_grads(mods, (expected * grad_out).sum()),
                       rtol=RTOL64, atol_scale=RTOL64, name=f"{label} member logits")
