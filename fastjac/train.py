"""Jacobian-regularized training of single models and ensembles, checkpointed every epoch.

One step for an Ensemble is one batched pass for all members (the stacked engine): loss =
sum_m [CE(f_m) + lambda_m/2 * ||J_m||^2] (target "members") or CE(mean_m f_m) + lambda/2 * ||J_ens||^2
(target "ensemble"). Randomness (data order, projections) is drawn from a generator seeded by
(seed, epoch), so a run resumed from its checkpoint ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastjac import _io
from fastjac._checks import check_choice, check_inputs, check_labels, check_nproj
from fastjac.ensemble import Ensemble
from fastjac.jacobian import MODES, TARGETS, penalty_and_logits

MEMBER_DATA = ("shared", "independent")


@dataclass
class TrainResult:
    model: nn.Module
    history: list = field(default_factory=list)  # one dict per epoch: loss, ce, penalty, seconds

    @property
    def seconds(self) -> float:
        return sum(epoch["seconds"] for epoch in self.history)


def _lambdas(jr_lambda, members: int, target: str) -> torch.Tensor:
    values = list(jr_lambda) if isinstance(jr_lambda, (list, tuple)) else [jr_lambda] * (members if target == "members" else 1)
    if target == "single" and len(values) != 1:
        raise ValueError("a single model takes one jr_lambda, not a list")
    if target == "ensemble" and len(values) != 1:
        raise ValueError("jr_target='ensemble' takes one jr_lambda for the whole ensemble, not a list")
    if target == "members" and len(values) != members:
        raise ValueError(f"jr_lambda has {len(values)} values for {members} members")
    for value in values:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"jr_lambda values must be finite and >= 0, got {value!r}")
    return torch.tensor(values, dtype=torch.float64)


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where torch has a fused kernel for these tensors: one pass over all parameters
    instead of a chain of foreach ops (0.3 ms vs 4.5 ms per step for a 5-member 784-256-256-10 stack)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch: resuming at any epoch replays exactly the same randomness."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _config(**settings) -> dict:
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in settings.items()}


def train(model: nn.Module, data, *, epochs: int, batch_size: int = 128, lr: float = 1e-3,
          jr_lambda=0.0, jr_target: str = "members", jr_mode: str = "vjp", nproj: int = 1, seed: int = 0,
          checkpoint=None, progress: bool = True, member_data: str = "shared", backend: str | None = None) -> TrainResult:
    """Train ``model`` (an nn.Module or an Ensemble) in place with Adam on ``data = (x [N,*input], y [N])``.

    jr_lambda: a float, or one float per member (target "members"; 0 leaves a member unregularized).
    jr_target: "members" or "ensemble"; jr_mode: "vjp" or "jvp" (or "exact", slow); nproj projections.
    member_data: "shared" (every member sees the same batches) or "independent" (each member its own
        shuffle, as separately trained models would).
    checkpoint: a file path; written atomically after every epoch, and resumed from when it exists.
    Returns a TrainResult with the per-epoch history.
    """
    x, y = data
    check_inputs(x, "data x")
    check_labels(y, x.shape[0], None, "data y")
    check_choice(jr_target, TARGETS, "jr_target")
    check_choice(jr_mode, MODES, "jr_mode")
    check_choice(member_data, MEMBER_DATA, "member_data")
    if jr_mode != "exact":
        check_nproj(nproj, jr_mode)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    is_ensemble = isinstance(model, Ensemble)
    members = model.num_members if is_ensemble else 1
    if member_data == "independent" and not is_ensemble:
        raise ValueError("member_data='independent' needs an Ensemble")
    if member_data == "independent" and jr_target == "ensemble":
        raise ValueError("jr_target='ensemble' trains the members jointly on shared batches (member_data='shared')")
    lambdas = _lambdas(jr_lambda, members, jr_target if is_ensemble else "single")
    with torch.no_grad():  # labels must index the model's classes: a clear error now, not deep in CE
        check_labels(y, x.shape[0], model(x[:1]).shape[-1], "data y")
    regularized = bool((lambdas > 0).any())
    config = _config(batch_size=batch_size, lr=lr, jr_lambda=lambdas.tolist(), jr_target=jr_target, jr_mode=jr_mode,
                     nproj=nproj, seed=seed, member_data=member_data, members=members, samples=int(x.shape[0]))

    optimizer = make_optimizer(model.parameters(), lr)
    result = TrainResult(model)
    start_epoch = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = _io.load(checkpoint)
        if state.get("config") != config:
            raise ValueError(f"checkpoint {checkpoint} was written by a run with other settings:\n"
                             f"  checkpoint: {state.get('config')}\n  this run:   {config}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        result.history, start_epoch = list(state["history"]), int(state["epoch"])

    model.train()
    lambdas = lambdas.to(x.dtype)
    for epoch in range(start_epoch, epochs):
        generator = epoch_generator(seed, epoch)
        orders = [torch.randperm(x.shape[0], generator=generator)
                  for _ in range(members if member_data == "independent" else 1)]
        started, totals, steps = time.perf_counter(), torch.zeros(3, dtype=torch.float64), 0
        batches = range(0, x.shape[0], batch_size)
        for offset in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=None if progress else True, leave=False):
            index = torch.stack([order[offset:offset + batch_size] for order in orders])
            per_member = member_data == "independent"
            batch_x = x[index] if per_member else x[index[0]]
            batch_y = y[index] if per_member else y[index[0]]
            if regularized:
                logits, penalty = penalty_and_logits(model, batch_x, nproj=nproj, mode=jr_mode, target=jr_target,
                                                     backend=backend, per_member=per_member, generator=generator,
                                                     check_values=False)  # the whole data set was checked above
            else:
                logits = model.member_logits(batch_x, per_member=per_member, backend=backend) if is_ensemble \
                    else model(batch_x).unsqueeze(0)
                penalty = logits.new_zeros(lambdas.shape)
            if jr_target == "ensemble" or not is_ensemble:
                ce = F.cross_entropy(logits.mean(0), batch_y)
            else:  # each member its own CE: the sum over members is M independent objectives
                labels = batch_y if per_member else batch_y.unsqueeze(0).expand(members, -1)
                ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / batch_y.shape[-1]
            loss = ce + (lambdas * penalty).sum() / 2
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged at epoch {epoch + 1}: loss is {loss.item()}; lower lr or jr_lambda")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals += torch.tensor([loss.item(), ce.item(), penalty.detach().mean().item()], dtype=torch.float64)
            steps += 1
        loss_mean, ce_mean, penalty_mean = (totals / max(steps, 1)).tolist()
        result.history.append({"epoch": epoch + 1, "loss": loss_mean, "ce": ce_mean, "penalty": penalty_mean,
                               "seconds": time.perf_counter() - started})
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {loss_mean:.4f} ce {ce_mean:.4f} "
                       f"penalty {penalty_mean:.4g} ({result.history[-1]['seconds']:.1f}s)", file=sys.stderr)
        if checkpoint is not None:
            _io.atomic_save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "config": config, "history": result.history}, checkpoint)
    model.eval()
    return result
