"""What the engine, layer, graph, model and generic-path tests share: inputs, explicit projections, the
reference penalty on unstacked members, restacked gradients, and the float64 comparison of a fast
penalty (and every parameter gradient) with the reference."""
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from fastjac import jacobian_penalty, reference
from tests.helpers import assert_close

F64, F32 = torch.float64, torch.float32
# float64: both sides sum the same products in different orders; for sums of up to ~1e3 terms of mixed
# sign the relative difference stays below ~1e3 * eps64 ~ 2e-13 of the largest term. 1e-10 leaves margin and
# is still ~1e7 times smaller than any real defect (a missing member, a wrong scale, a dropped stream).
RTOL64 = 1e-10


def make_input(batch, dtype=F64, seed=1, shape=(1, 28, 28), low=0.0):
    """x [B, *shape] uniform in [low, 1)."""
    g = torch.Generator().manual_seed(seed)
    return low + (1 - low) * torch.rand(batch, *shape, generator=g, dtype=dtype)


def make_projections(mode, nproj, x, classes, seed=2):
    g = torch.Generator().manual_seed(seed)
    if mode == "vjp":
        return reference.sphere_projections(nproj, x.shape[0], classes, generator=g, dtype=x.dtype)
    return reference.gaussian_projections(nproj, x.shape, generator=g, dtype=x.dtype)


def batchnorm_in_training(members) -> bool:
    return any(isinstance(m, _BatchNorm) and m.training for member in members for m in member.modules())


def penalty_jvp_double_vjp(f, x, u):
    """The input-space estimator with J u from autograd's double-vjp trick (``autograd.functional.jvp``):
    the oracle where torch.func.jvp refuses to run (a BatchNorm updating its running statistics in
    train mode); differentiable w.r.t. the parameters (create_graph)."""
    total = x.new_zeros(())
    for direction in u:
        _, tangent = torch.autograd.functional.jvp(f, x, direction, create_graph=True)
        total = total + tangent.pow(2).sum()
    return total / (u.shape[0] * x.shape[0])


def reference_penalty(members, x, mode, target, projections):
    """[M] (members) or scalar (ensemble) from the reference estimators on the unstacked members."""
    if mode == "vjp":
        fn = reference.penalty_vjp
    else:
        fn = penalty_jvp_double_vjp if batchnorm_in_training(members) else reference.penalty_jvp
    if target == "members":
        return torch.stack([fn(member, x, projections) for member in members])
    return fn(reference.ensemble_model(members), x, projections)


def engine_grads(ensemble, value):
    grads = torch.autograd.grad(value, list(ensemble.params().values()), allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g
            for (name, p), g in zip(ensemble.params().items(), grads)}


def reference_grads(members, value):
    """Gradients of ``value`` w.r.t. every member parameter, restacked [M, ...] by name (None -> zeros)."""
    names = [name for name, _ in members[0].named_parameters()]
    flat = [p for member in members for p in member.parameters()]
    grads = torch.autograd.grad(value, flat, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, grads)]
    per_member = len(names)
    return {name: torch.stack([grads[m * per_member + i] for m in range(len(members))]) for i, name in enumerate(names)}


def assert_grads_close(actual, expected, *, rtol, atol_scale, name):
    assert actual.keys() == expected.keys()
    for key in expected:
        # atol relative to the tensor's largest gradient: exact zeros (dead units) come out as rounding
        # noise on the scale of the other terms
        atol = atol_scale * float(expected[key].abs().max()) + 1e-300
        assert_close(actual[key], expected[key], rtol=rtol, atol=atol, name=f"{name} d/d{key}")


def upstream(count, dtype, seed=3):
    """One shared random upstream weight per member (so a swapped or dropped member shows up)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, generator=g, dtype=dtype) + 0.5


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
    w = upstream(len(mods), F64) if target == "members" else upstream(1, F64)[0]
    assert_grads_close(engine_grads(ensemble, (w.to(x_fast.device) * value).sum()),
                       reference_grads(mods, (w * expected).sum()),
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
    assert_grads_close(engine_grads(ensemble, (logits * grad_out).sum()),
                       reference_grads(mods, (expected * grad_out).sum()),
                       rtol=RTOL64, atol_scale=RTOL64, name=f"{label} member logits")
