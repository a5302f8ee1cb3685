"""Comparisons shared by the tests, ``python -m fastjac verify`` and the benchmarks: one definition of
"a fast path equals the reference" (no pytest needed; the tests wrap these in tests/helpers.py).

- ``assert_close``: a comparison whose failure names the worst index, both values, and NaN/inf mismatches.
- Tolerances with a reason: ``float64_rtol`` (two summation orders in float64), ``sum_tolerance`` (a
  float32 sum of L unit-sized terms), ``float32_atol`` (a small multiple of a plain float32 PyTorch
  run's own error against float64).
- ``stacked_grads`` / ``member_grads``: gradients of an Ensemble's stacked parameters, and of the unstacked
  members' parameters restacked to the same [M, ...] layout, by parameter name, so the two compare.
- ``compare_penalty`` / ``assert_penalty_matches_reference``: a fast penalty and its gradients w.r.t.
  every parameter against ``fastjac.reference`` on the unstacked members, with the same projections.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastjac import reference
from fastjac.jacobian import jacobian_penalty

# float64: the fast path and the reference sum the same products in different orders; for sums of up to
# ~1e3 terms of mixed sign the relative difference stays below ~1e3 * eps64 ~ 2e-13 of the largest term.
# 1e-10 leaves margin and is still ~1e7 times smaller than any real defect (a missing member, a wrong
# scale, a dropped stream).
RTOL64 = 1e-10
EPS32 = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------- assertions
def assert_close(actual, expected, *, rtol: float, atol: float, name: str = "value") -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, NaN/inf only where ``expected`` has the
    same; the failure names the worst index, both values and the allowance. Python numbers compare in
    float64 (a float32 default would round a float64 comparison away)."""
    actual, expected = (v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
                        for v in (actual, expected))
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nonfinite = ~torch.isfinite(a) | ~torch.isfinite(e)
    if nonfinite.any():
        mismatch = nonfinite & ~((a == e) | (torch.isnan(a) & torch.isnan(e)))
        assert not mismatch.any(), (
            f"{name}: NaN/inf disagreement at {mismatch.nonzero()[0].tolist()}: "
            f"{a[mismatch][0].item()} vs {e[mismatch][0].item()}")
    error = (a - e).abs().nan_to_num(0.0)
    allowed = atol + rtol * e.abs().nan_to_num(0.0)
    excess = error - allowed
    if (excess > 0).any():
        worst = int(excess.flatten().argmax())
        index = [int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)] if a.dim() else []
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {a.numel()} elements differ; worst at {index}: "
            f"{a.flatten()[worst].item():.10g} vs expected {e.flatten()[worst].item():.10g} "
            f"(|diff| {error.flatten()[worst].item():.3g} > allowed {allowed.flatten()[worst].item():.3g})")


def assert_grads_close(actual: dict, expected: dict, *, rtol: float, atol_scale: float, name: str) -> None:
    """Per parameter name: ``actual[k]`` close to ``expected[k]`` with atol = atol_scale * max|expected[k]|:
    exact zeros (dead units) come out as rounding noise on the scale of the tensor's other terms."""
    assert actual.keys() == expected.keys(), f"{name}: parameters {sorted(actual)} != {sorted(expected)}"
    for key in expected:
        atol = atol_scale * float(expected[key].abs().max()) + 1e-300
        assert_close(actual[key], expected[key], rtol=rtol, atol=atol, name=f"{name} d/d{key}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (what ``verify`` prints)."""
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------- tolerances
def sum_tolerance(dtype: torch.dtype, length: int = 1, factor: float = 4.0) -> float:
    """rtol = atol for a value that sums ``length`` O(1) terms: float64 RTOL64; float32 (against float64
    or another summation order) factor * eps32 * length: the rounding error of a float32 sum grows about
    linearly with the number of terms."""
    return RTOL64 if dtype == torch.float64 else factor * EPS32 * max(length, 1)


def float32_atol(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """4x the error of a plain float32 PyTorch run against float64 (a fast path may be a small multiple
    worse, STYLE.md 4), floored at 16 * eps32 * max|ref64| for outputs where float32 happens to be exact."""
    ref32, ref64 = ref32.detach(), ref64.detach()
    plain_error = float((ref32.double() - ref64).abs().max())
    return 4 * plain_error + 16 * EPS32 * float(ref64.abs().max())


# ------------------------------------------------------------------------------------- gradients
def _grads_or_zeros(value: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(value, list(tensors), allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def stacked_grads(ensemble, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of ``value`` w.r.t. an Ensemble's stacked parameters {member-module name: [M, ...]}
    (unused parameters -> zeros)."""
    params = ensemble.params()
    return dict(zip(params, _grads_or_zeros(value, list(params.values()))))


def member_grads(members: Sequence[nn.Module], value: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of ``value`` w.r.t. every parameter of the unstacked ``members``, restacked [M, ...] by
    name: the layout of ``stacked_grads`` (unused parameters -> zeros)."""
    names = [name for name, _ in members[0].named_parameters()]
    per_member = [dict(member.named_parameters()) for member in members]
    flat = [params[name] for name in names for params in per_member]  # name-major: [name][member]
    grads = _grads_or_zeros(value, flat)
    count = len(members)
    return {name: torch.stack(grads[i * count:(i + 1) * count]) for i, name in enumerate(names)}


# ----------------------------------------------------------------------- penalty vs the reference
def reference_penalty(members: Sequence[nn.Module], x: torch.Tensor, mode: str, target: str,
                      projections: torch.Tensor) -> torch.Tensor:
    """[M] (target "members") or scalar ("ensemble") from ``fastjac.reference`` on the unstacked members;
    ``projections``: v [P, B, C] unit rows (vjp) or u [P, B, *input] (jvp)."""
    estimator = {"vjp": reference.penalty_vjp, "jvp": reference.penalty_jvp}[mode]
    if target == "members":
        return torch.stack([estimator(member, x, projections) for member in members])
    return estimator(reference.ensemble_model(members), x, projections)


def upstream_weights(count: int, dtype: torch.dtype = torch.float64, seed: int = 3) -> torch.Tensor:
    """[count] random weights in [0.5, 1.5), one per member: a swapped or dropped member changes the
    weighted sum whose gradients are compared."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, generator=generator, dtype=dtype) + 0.5


@dataclass
class PenaltyComparison:
    """A fast penalty and the reference's, both [M] or scalar, and the gradients of their weighted sums
    (the same weights) by parameter name, [M, ...] each."""
    fast: torch.Tensor
    expected: torch.Tensor
    fast_grads: dict
    expected_grads: dict


def compare_penalty(ensemble, members: Sequence[nn.Module], x: torch.Tensor, *, mode: str, target: str,
                    projections: torch.Tensor, backend: str | None = None) -> PenaltyComparison:
    """``jacobian_penalty`` of ``ensemble`` (an Ensemble of copies of ``members``) and the reference on
    ``members``, with the same ``projections`` [P, B, ...] and x [B, *input], and their gradients."""
    fast = jacobian_penalty(ensemble, x, nproj=projections.shape[0], mode=mode, target=target,
                            projections=projections, backend=backend)
    expected = reference_penalty(members, x, mode, target, projections)
    weights = upstream_weights(len(members) if target == "members" else 1, fast.dtype).to(fast.device)
    weights = weights if target == "members" else weights[0]
    return PenaltyComparison(fast, expected, stacked_grads(ensemble, (weights * fast).sum()),
                             member_grads(members, (weights * expected).sum()))


def assert_penalty_matches_reference(ensemble, members: Sequence[nn.Module], x: torch.Tensor, *, mode: str,
                                     target: str, projections: torch.Tensor, backend: str | None = None,
                                     label: str = "") -> torch.Tensor:
    """In float64: the fast penalty equals the reference estimator on the unstacked members (rtol
    RTOL64), and so do its gradients w.r.t. every parameter. Returns the fast penalty."""
    result = compare_penalty(ensemble, members, x, mode=mode, target=target, projections=projections,
                             backend=backend)
    assert float(result.expected.detach().abs().min()) > 0, "degenerate case: a zero Jacobian tests nothing"
    name = f"{label} {mode}/{target} penalty".strip()
    assert_close(result.fast, result.expected, rtol=RTOL64, atol=0, name=name)
    assert_grads_close(result.fast_grads, result.expected_grads, rtol=RTOL64, atol_scale=RTOL64, name=name)
    return result.fast
