"""``python -m fastjac verify``: every available backend against the reference, worst errors printed.

Compares, in float64 (where the reference is exact up to rounding) and float32: member logits,
penalties (vjp and jvp, targets members and ensemble, with the same explicit projections) and the
gradients of the penalties w.r.t. every stacked parameter.
"""
from __future__ import annotations

import copy
import sys

import torch

from fastjac import _io, backends, models, reference
from fastjac.ensemble import Ensemble
from fastjac.jacobian import jacobian_penalty, make_projections


def _gradients(loss, tensors):
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


def _relative_error(actual, expected) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def default_backends() -> list[str]:
    """Every available backend, less Triton when it would run on the CPU interpreter (minutes per pass
    at these sizes); name it explicitly to include it."""
    return [name for name in backends.available() if not (name == "triton" and backends.triton_interpreted())]


def verify(arch: str = "mlp", model_path=None, members: int = 3, batch: int = 5, dtypes=(torch.float64, torch.float32),
           names: list[str] | None = None, out=sys.stderr, device="cpu") -> dict:
    """Every backend in ``names`` (default: ``default_backends()``) against the reference, on ``device``
    (the ensemble, its reference members, the inputs and the projections all live there)."""
    device = torch.device(device)
    if model_path is not None:
        model, _ = _io.load_model(model_path)
        members_list = model.members() if isinstance(model, Ensemble) else [model]
    else:
        torch.manual_seed(0)
        members_list = [models.build(arch) for _ in range(members)]
    x_full = torch.rand(batch, *models.INPUT_SHAPE)
    report = {"arch": arch if model_path is None else model_path, "backends": {}}
    for name in names or default_backends():
        backends.resolve(name)  # a backend named explicitly must be able to run
        worst = {}
        for dtype in dtypes:
            plain = [copy.deepcopy(m).to(device=device, dtype=dtype) for m in members_list]
            ensemble = Ensemble(plain).to(device=device, dtype=dtype)
            x = x_full.to(device=device, dtype=dtype)
            errors = {"logits": _relative_error(ensemble.member_logits(x, backend=name), reference.member_logits(plain, x))}
            for mode in ("vjp", "jvp"):
                projections = make_projections(mode, 2, x.shape, 10, generator=torch.Generator().manual_seed(1),
                                               dtype=dtype).to(device)  # drawn on the CPU: the same on every device
                for target in ("members", "ensemble"):
                    fast = jacobian_penalty(ensemble, x, mode=mode, target=target, projections=projections, backend=name)
                    functions = plain if target == "members" else [reference.ensemble_model(plain)]
                    estimator = reference.penalty_vjp if mode == "vjp" else reference.penalty_jvp
                    slow = torch.stack([estimator(f, x, projections) for f in functions]).reshape(fast.shape)
                    params = list(ensemble.params().values())
                    fast_grads = _gradients(fast.sum(), params)
                    member_params = [dict(m.named_parameters()) for m in plain]
                    flat = [member_params[i][n] for n in ensemble.names for i in range(len(plain))]
                    slow_flat = _gradients(slow.sum(), flat)
                    slow_grads = [torch.stack(slow_flat[k * len(plain):(k + 1) * len(plain)]) for k in range(len(params))]
                    errors[f"penalty {mode}/{target}"] = _relative_error(fast, slow)
                    errors[f"grad {mode}/{target}"] = max(_relative_error(a, b) for a, b in zip(fast_grads, slow_grads))
            worst[str(dtype).replace("torch.", "")] = errors
        report["backends"][name] = worst
    _print(report, out)
    return report


def _print(report: dict, out) -> None:
    for name, by_dtype in report["backends"].items():
        for dtype, errors in by_dtype.items():
            cells = ", ".join(f"{key} {value:.1e}" for key, value in errors.items())
            print(f"[{name} {dtype}] worst relative error: {cells}", file=out)
