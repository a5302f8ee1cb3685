"""``python -m fastjac verify``: every available backend against the reference, worst errors printed.

Each backend runs on its own device (``fastjac.backends.device_for``: triton on a GPU, or the CPU under the Triton
interpreter; cuda on a GPU; cpp on the CPU; torch on the requested device), in float64 and float32, and
is compared with ONE reference: the plain PyTorch loop of ``fastjac.reference`` in float64 on the CPU, run
on the same values (the models, inputs and projections are drawn in float32, so their float64 copies are
exact). Compared: member logits, penalties (vjp and jvp, targets members and ensemble, with the same
explicit projections) and the gradients of the penalties w.r.t. every stacked parameter. A float64 row
shows the backend's rounding; a float32 row its float32 error (a small multiple of 1e-7 is expected).

Members are compared in eval mode (BatchNorm uses its running statistics). In train mode the reference
cannot serve: its jvp estimator mutates the running statistics inside torch.func.jvp, and reverse mode
through ATen batch_norm's forward-mode derivative is wrong in torch 2.13 (pytorch/pytorch#196699); the
test suite checks train-mode BatchNorm against a reference written in plain ops (tests/test_batch_norm.py).
"""
from __future__ import annotations

import copy
import sys

import torch

from fastjac import _io, backends, models, reference
from fastjac.ensemble import Ensemble
from fastjac.jacobian import jacobian_penalty, make_projections
from fastjac.testing import member_grads, reference_penalty, relative_error, stacked_grads

CLASSES = 10
CASES = [(mode, target) for mode in ("vjp", "jvp") for target in ("members", "ensemble")]


def _relative_error(actual, expected) -> float:
    """``testing.relative_error`` with ``actual`` on any device and ``expected`` the float64 CPU reference."""
    return relative_error(actual.detach().to("cpu", torch.float64), expected)


def default_backends() -> list[str]:
    """Every available backend, less Triton when it would run on the CPU interpreter (minutes per pass
    at these sizes); name it explicitly to include it."""
    return [name for name in backends.available() if not backends.get(name).interpreted]


def _reference(members_list, x, projections) -> dict:
    """The float64 CPU reference: logits [M,B,C], and per (mode, target) the penalty and its gradients
    {parameter name: [M, *shape]} (the Ensemble's stacked layout)."""
    plain = [copy.deepcopy(m).to(torch.float64) for m in members_list]
    x = x.to(torch.float64)
    expected = {"logits": reference.member_logits(plain, x)}
    for mode, target in CASES:
        penalty = reference_penalty(plain, x, mode, target, projections[mode].to(torch.float64))
        expected[mode, target] = (penalty, member_grads(plain, penalty.sum()))
    return expected


def _errors(name, device, members_list, x, projections, expected, dtype) -> dict:
    """Worst relative errors of backend ``name`` on ``device`` in ``dtype`` against ``expected``."""
    ensemble = Ensemble([copy.deepcopy(m).to(dtype) for m in members_list]).to(device).eval()
    x = x.to(device, dtype)
    errors = {"logits": _relative_error(ensemble.member_logits(x, backend=name), expected["logits"])}
    for mode, target in CASES:
        fast = jacobian_penalty(ensemble, x, mode=mode, target=target, projections=projections[mode].to(device, dtype),
                                backend=name)
        penalty, grads = expected[mode, target]
        errors[f"penalty {mode}/{target}"] = _relative_error(fast, penalty.reshape(fast.shape))
        fast_grads = stacked_grads(ensemble, fast.sum())
        errors[f"grad {mode}/{target}"] = max(_relative_error(fast_grads[key], grads[key]) for key in grads)
    return errors


def verify(arch: str = "mlp", model_path=None, members: int = 3, batch: int = 5, dtypes=(torch.float64, torch.float32),
           names: list[str] | None = None, device: str | torch.device | None = None, out=sys.stderr) -> dict:
    """Compare ``names`` (default: ``default_backends()``) against the reference; ``device`` is the device
    asked for (default: cuda when available), which each backend adapts (``backends.device_for``). Returns
    {"arch", "backends": {name: {"device", dtype name: {quantity: worst relative error}}}}."""
    if model_path is not None:
        model, _ = _io.load_model(model_path)
        members_list = model.members() if isinstance(model, Ensemble) else [model]
    else:
        torch.manual_seed(0)
        members_list = [models.build(arch) for _ in range(members)]
    members_list = [copy.deepcopy(m).cpu().float().eval() for m in members_list]  # the values both sides share
    x = torch.rand(batch, *models.INPUT_SHAPE)
    generator = torch.Generator().manual_seed(1)
    projections = {mode: make_projections(mode, 2, x.shape, CLASSES, generator=generator, dtype=torch.float32)
                   for mode in ("vjp", "jvp")}
    names = names or default_backends()
    for name in names:
        backends.resolve(name, backends.device_for(name, device))  # a backend named explicitly must be able to run
    expected = _reference(members_list, x, projections)
    report = {"arch": arch if model_path is None else str(model_path), "backends": {}}
    for name in names:
        where = backends.device_for(name, device)
        results = {"device": str(where)}
        for dtype in dtypes:
            results[str(dtype).replace("torch.", "")] = _errors(name, where, members_list, x, projections, expected,
                                                                dtype)
        report["backends"][name] = results
    _print(report, out)
    return report


def _print(report: dict, out) -> None:
    for name, results in report["backends"].items():
        for dtype, errors in results.items():
            if dtype == "device":
                continue
            cells = ", ".join(f"{key} {value:.1e}" for key, value in errors.items())
            print(f"[{name} {dtype} on {results['device']}] worst relative error: {cells}", file=out)
