"""The plain-PyTorch reference path: written for clarity, not speed.

Every fast path in fastjac is tested against these functions, and the benchmarks measure against them.
A "model" here is any callable ``f(x [B,*in]) -> logits [B,C]``; an ensemble is a list of such members.
The squared Frobenius norm estimators follow DESIGN.md:

- output space ("vjp", Hoffman et al. 2019): ``||J||_F^2 ~= C * ||v^T J||^2``, v uniform on the unit
  sphere of R^C; nproj = -1 uses the C basis vectors and is exact. Differentiated by double backprop.
- input space ("jvp"): ``||J||_F^2 ~= ||J u||^2`` with u ~ N(0, I_D), by forward-mode AD.
- exact: ``torch.func.jacrev`` per sample.

Each returns the mean over the batch (and over the projections) of the per-sample estimate.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------- ensembles
def member_logits(members: Sequence[Model], x: torch.Tensor) -> torch.Tensor:
    """Logits of every member, ``[M, B, C]``, by a loop."""
    return torch.stack([member(x) for member in members])


def ensemble_logits(members: Sequence[Model], x: torch.Tensor) -> torch.Tensor:
    """The ensemble's output: the mean of member logits, ``[B, C]``."""
    return member_logits(members, x).mean(dim=0)


def ensemble_model(members: Sequence[Model]) -> Model:
    return lambda x: ensemble_logits(members, x)


# -------------------------------------------------------------------------------------- projections
def sphere_projections(nproj: int, batch: int, classes: int, *, generator=None, dtype=torch.float32, device="cpu"):
    """v ``[nproj, B, C]``: rows drawn uniformly from the unit sphere of R^C."""
    v = torch.randn(nproj, batch, classes, generator=generator, dtype=dtype, device=device)
    return v / v.norm(dim=-1, keepdim=True)


def basis_projections(batch: int, classes: int, *, dtype=torch.float32, device="cpu"):
    """The C standard basis vectors for every sample, ``[C, B, C]``: sum_c ||e_c^T J||^2 = ||J||_F^2."""
    return torch.eye(classes, dtype=dtype, device=device).unsqueeze(1).expand(classes, batch, classes)


def gaussian_projections(nproj: int, input_shape: Sequence[int], *, generator=None, dtype=torch.float32, device="cpu"):
    """u ``[nproj, B, *input]``: standard Gaussian directions in input space (``input_shape`` includes B)."""
    return torch.randn(nproj, *input_shape, generator=generator, dtype=dtype, device=device)


# ------------------------------------------------------------------------------ Frobenius estimators
def penalty_vjp(f: Model, x: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """Hoffman's estimator with the given unit rows ``v [nproj, B, C]``; ``v=None`` means exact (basis).

    Returns a scalar, differentiable w.r.t. the parameters of ``f`` (create_graph=True: double backprop).
    """
    x = x.detach().requires_grad_(True)
    return penalty_vjp_outputs(x, f(x), v)


def penalty_vjp_outputs(x: torch.Tensor, logits: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """``penalty_vjp`` for logits [B, C] already computed from ``x`` (which requires grad)."""
    batch, classes = logits.shape
    if v is None:  # the C basis vectors: sum_c ||e_c^T J||^2 = ||J||_F^2 exactly, no factor C
        v, scale = basis_projections(batch, classes, dtype=logits.dtype, device=logits.device), 1.0 / batch
    else:  # unbiased: E[C * ||v^T J||^2] = ||J||_F^2 for v uniform on the sphere; mean over nproj draws
        scale = classes / (v.shape[0] * batch)
    total = logits.new_zeros(())
    for direction in v:
        (vjp,) = torch.autograd.grad(logits, x, direction, create_graph=True)
        total = total + vjp.pow(2).sum()
    return scale * total


def penalty_jvp(f: Model, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Input-space estimator with the given directions ``u [nproj, B, *input]``; scalar, differentiable."""
    total = x.new_zeros(())
    for direction in u:
        _, tangent = torch.func.jvp(f, (x,), (direction,))
        total = total + tangent.pow(2).sum()
    return total / (u.shape[0] * x.shape[0])


def penalty_exact(f: Model, x: torch.Tensor) -> torch.Tensor:
    """Exact mean over the batch of ||J(x_b)||_F^2 from the full per-sample Jacobian (jacrev)."""
    def single(sample):
        return f(sample.unsqueeze(0)).squeeze(0)

    jacobians = torch.func.vmap(torch.func.jacrev(single))(x)  # [B, C, *input]
    return jacobians.pow(2).sum() / x.shape[0]


# ------------------------------------------------------------------------------------------- SGD-UAP
def uap_loss(logits: torch.Tensor, y: torch.Tensor, beta: float, target: int | None) -> torch.Tensor:
    """mean(min(CE, beta)); for a targeted attack the labels become ``target`` and the loss is negated."""
    labels = y if target is None else torch.full_like(y, target)
    loss = F.cross_entropy(logits, labels, reduction="none").clamp(max=beta).mean()
    return loss if target is None else -loss


def sgd_uap(f: Model, batches: Iterable, eps: float, *, epochs: int = 10, beta: float = 12.0,
            step_decay: float = 0.8, target: int | None = None):
    """SGD-UAP (Shafahi et al. 2020, as used by Co et al.): one delta ``[*input]`` with ||delta||_inf <= eps.

    Per batch: loss = uap_loss(f(clamp(x + delta, 0, 1)), y); delta <- clamp(delta + step*sign(dloss/ddelta),
    -eps, eps) with step = eps * step_decay. Returns (delta, losses per batch).
    """
    step = eps * step_decay
    delta, losses = None, []
    for _ in range(epochs):
        for x, y in batches:
            if delta is None:
                delta = torch.zeros_like(x[0])
            trial = delta.clone().requires_grad_(True)
            loss = uap_loss(f(torch.clamp(x + trial, 0.0, 1.0)), y, beta, target)
            (grad,) = torch.autograd.grad(loss, trial)
            delta = torch.clamp(delta + step * torch.sign(grad), -eps, eps)
            losses.append(float(loss.detach()))
    return delta, losses


# ---------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def evaluate(f: Model, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor | None = None) -> dict:
    """clean_accuracy, and per perturbation k of ``delta [K, *input]``: uap_accuracy, evasion_rate
    (1 - uap_accuracy) and fooling_rate (fraction of predictions that change)."""
    clean_prediction = f(x).argmax(dim=1)
    result = {"clean_accuracy": (clean_prediction == y).double().mean().item(),
              "uap_accuracy": [], "evasion_rate": [], "fooling_rate": []}
    for d in ([] if delta is None else delta):
        prediction = f(torch.clamp(x + d, 0.0, 1.0)).argmax(dim=1)
        accuracy = (prediction == y).double().mean().item()
        result["uap_accuracy"].append(accuracy)
        result["evasion_rate"].append(1.0 - accuracy)
        result["fooling_rate"].append((prediction != clean_prediction).double().mean().item())
    return result
