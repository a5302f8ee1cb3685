"""Jacobian-regularized training of single models and ensembles, checkpointed every epoch.

One step for an Ensemble is one batched pass for all members (the stacked engine): loss =
sum_m [CE(f_m) + lambda_m/2 * ||J_m||^2] (target "members") or CE(mean_m f_m) + lambda/2 * ||J_ens||^2
(target "ensemble"). Randomness is drawn from generators seeded by (seed, epoch): the data order on the CPU,
the projections on the data's device; so a run resumed from its checkpoint ends with the same weights as an
uninterrupted one. Every argument is checked before the first step, and the hot loop never waits for the
device: per-step values stay there, and divergence is checked once per epoch.
"""
from __future__ import annotations

import functools
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastjac import _io, backends
from fastjac._checks import (check_choice, check_fits_dtype, check_inputs, check_int, check_labels, check_model_input,
                             check_nproj, check_projection_memory, warn_outside_unit_range)
from fastjac.distributed import MemberBlock, World, all_reduce_, on_rank0, resolve, sum_across_ranks
from fastjac.ensemble import Ensemble
from fastjac.jacobian import MODES, TARGETS, logits_and_rows, penalty_and_logits

MEMBER_DATA = ("shared", "independent")
MAX_SEED = 2**40  # the generators' seeds, seed * 1_000_003 + epoch, must fit a 64-bit integer


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
    """The data-order generator of one epoch. It stays on the CPU whatever the data's device: the same seed
    gives the same batches on every machine, and resuming at any epoch replays exactly the same order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def projection_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The projection generator of one epoch, on the data's device (torch.randn for CUDA tensors needs a
    CUDA generator). Its draws depend on the device's generator kind, as any device-side randomness does."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch + 500_001)


def _model_signature(model: nn.Module) -> str:
    """Tensor names and shapes: what a checkpoint's weights must fit."""
    return ", ".join(f"{name} {list(tensor.shape)}" for name, tensor in model.state_dict().items())


def _config(**settings) -> dict:
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in settings.items()}


def _differences(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint A, this run B' for every setting both record and that differs (a setting an older
    checkpoint does not record is not compared)."""
    return [f"{key}: checkpoint {saved[key]!r}, this run {current[key]!r}"
            for key in current if key in saved and saved[key] != current[key]]


def _load_checkpoint(checkpoint, config: dict, epochs: int) -> dict:
    """The checkpoint's record, checked against this run: its structure, every setting, and the epochs."""
    state = _io.load(checkpoint, "checkpoint")
    if not isinstance(state, dict) or not all(key in state for key in _io.CHECKPOINT_KEYS) \
            or not isinstance(state["epoch"], int) or not isinstance(state["config"], dict) \
            or not isinstance(state["model"], dict) or not isinstance(state["history"], list):
        raise ValueError(f"checkpoint {checkpoint} is not a fastjac training checkpoint (expected a dict with "
                         f"{', '.join(_io.CHECKPOINT_KEYS)}); remove it or choose another output")
    differences = _differences(state["config"], config)
    if differences:
        raise ValueError(f"checkpoint {checkpoint} was written by a run with other settings: "
                         f"{'; '.join(differences)}. Use the same settings to resume, or remove the checkpoint "
                         f"(or choose another output) to start over")
    done, planned = state["epoch"], state.get("epochs")
    if epochs < done:
        raise ValueError(f"checkpoint {checkpoint} has already trained {done} epochs, more than the {epochs} "
                         f"asked for; ask for epochs >= {done}, or remove the checkpoint to start over")
    if planned is not None and planned != epochs and epochs > done:
        warnings.warn(f"resuming {checkpoint} after epoch {done}: it was written by a run of {planned} epochs, "
                      f"this run trains to epoch {epochs}", stacklevel=3)
    _io.check_finite_state(state["model"], checkpoint)
    return state


def _check_arguments(model, x, y, *, epochs, batch_size, lr, jr_target, jr_mode, nproj, seed, member_data,
                     backend) -> int:
    """Every argument of ``train`` checked before any compute; returns the number of classes."""
    check_inputs(x, "data x", values=False)
    check_labels(y, x.shape[0], None, "data y", values=False, device=x.device)
    check_choice(jr_target, TARGETS, "jr_target")
    check_choice(jr_mode, MODES, "jr_mode")
    check_choice(member_data, MEMBER_DATA, "member_data")
    if jr_mode != "exact":
        check_nproj(nproj, jr_mode)
    check_int(epochs, "epochs", 0)
    check_int(batch_size, "batch_size", 1)
    check_int(seed, "seed", 0, MAX_SEED)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not lr > 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if backend is not None:
        backends.resolve(backend, x.device.type)  # a backend named explicitly must run, before any work
    classes = check_model_input(model, x, "data x")  # device, dtype and sample shape first: then scan values
    check_inputs(x, "data x")
    check_labels(y, x.shape[0], classes, "data y")  # labels must index the model's classes
    low, high = torch.aminmax(x)
    warn_outside_unit_range(float(low), float(high), "data x")
    return classes


def train(model: nn.Module, data, *, epochs: int, batch_size: int = 128, lr: float = 1e-3,
          jr_lambda=0.0, jr_target: str = "members", jr_mode: str = "vjp", nproj: int = 1, seed: int = 0,
          checkpoint=None, progress: bool = True, member_data: str = "shared", backend: str | None = None,
          distributed=None) -> TrainResult:
    """Train ``model`` (an nn.Module or an Ensemble) in place with Adam on ``data = (x [N,*input], y [N])``.

    x and y must be on the model's device, x in the model's dtype and in [0, 1] (a warning otherwise).
    jr_lambda: a float, or one float per member (target "members"; 0 leaves a member unregularized).
    jr_target: "members" or "ensemble"; jr_mode: "vjp" or "jvp" (or "exact", slow); nproj projections.
    member_data: "shared" (every member sees the same batches) or "independent" (each member its own
        shuffle, as separately trained models would).
    checkpoint: a file path; written atomically after every epoch, and resumed from when it exists (with the
        same settings; more epochs continue with a warning, fewer are refused).
    distributed: None (default) spreads the members of an Ensemble over the ranks of an initialized
        torch.distributed process group of more than one rank (``torchrun`` + ``fastjac.distributed.init()``),
        "members" asks for that explicitly, False trains in this process alone even then. Every rank passes
        the same arguments and the whole model, and gets the whole trained ensemble back, equal to the
        single-process result; rank 0 alone reads and writes the checkpoint (``fastjac.distributed``).
    A run whose loss or parameters stop being finite raises FloatingPointError at the end of that epoch,
    before any checkpoint of the bad state is written (checked once per epoch: no host sync per step).
    Returns a TrainResult with the per-epoch history.
    """
    x, y = data
    classes = _check_arguments(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, jr_target=jr_target,
                               jr_mode=jr_mode, nproj=nproj, seed=seed, member_data=member_data, backend=backend)
    is_ensemble = isinstance(model, Ensemble)
    members = model.num_members if is_ensemble else 1
    if member_data == "independent" and not is_ensemble:
        raise ValueError("member_data='independent' needs an Ensemble")
    if member_data == "independent" and jr_target == "ensemble":
        raise ValueError("jr_target='ensemble' trains the members jointly on shared batches (member_data='shared')")
    lambdas = _lambdas(jr_lambda, members, jr_target if is_ensemble else "single")
    check_fits_dtype(lambdas.tolist(), x.dtype, "jr_lambda")
    regularized = bool((lambdas > 0).any())
    if regularized and jr_mode != "exact":
        check_projection_memory(model, x, min(batch_size, x.shape[0]), classes if nproj == -1 else nproj)
    config = _config(batch_size=batch_size, lr=lr, jr_lambda=lambdas.tolist(), jr_target=jr_target, jr_mode=jr_mode,
                     nproj=nproj, seed=seed, member_data=member_data, members=members, samples=int(x.shape[0]),
                     model=_model_signature(model))
    spread = resolve(distributed, ("members",), "train")
    world: World | None = None if spread is None else spread[0]
    block = None if world is None else MemberBlock(model, world, "train")
    trained = model if block is None else block.local  # what this process runs and steps

    optimizer = make_optimizer(trained.parameters(), lr)
    result = TrainResult(model)
    start_epoch = 0
    state = on_rank0(world, lambda: _load_checkpoint(checkpoint, config, epochs)
                     if checkpoint is not None and Path(checkpoint).exists() else None)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer_state = state["optimizer"]
            if block is not None:
                block.local.load_state_dict(block.take_state(state["model"]))
                optimizer_state = block.take_optimizer_state(optimizer_state)
            optimizer.load_state_dict(optimizer_state)
        except (RuntimeError, ValueError, KeyError, IndexError) as error:
            raise ValueError(f"checkpoint {checkpoint} does not fit this model: {str(error).splitlines()[0]}") from None
        result.history, start_epoch = list(state["history"]), state["epoch"]

    trained.train()
    lambdas = lambdas.to(device=x.device, dtype=x.dtype)
    if block is not None and jr_target == "members":
        lambdas = block.take(lambdas)
    settings = dict(regularized=regularized, nproj=nproj, mode=jr_mode, target=jr_target, backend=backend)
    make_step = _step  # target "ensemble" over ranks: the members' sums cross the ranks every step
    if block is not None and jr_target == "ensemble":
        make_step = functools.partial(_spread_ensemble_step, members=members)
    parameters = list(trained.parameters())
    show = progress and (world is None or world.is_first)
    # penalty totals sum over the members (target "members"): their mean divides by M
    penalty_count = members if is_ensemble and jr_target == "members" else 1
    for epoch in range(start_epoch, epochs):
        generator = epoch_generator(seed, epoch)
        orders = [torch.randperm(x.shape[0], generator=generator).to(x.device)
                  for _ in range(members if member_data == "independent" else 1)]
        if block is not None and member_data == "independent":
            orders = orders[block.indices.start:block.indices.stop]
        step = make_step(trained, lambdas, generator=projection_generator(seed, epoch, x.device), **settings)
        started, steps = time.perf_counter(), 0
        totals = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss, ce, penalty: summed on the device
        batches = range(0, x.shape[0], batch_size)
        per_member = member_data == "independent"
        for offset in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=None if show else True, leave=False):
            index = torch.stack([order[offset:offset + batch_size] for order in orders])
            batch_x = x[index] if per_member else x[index[0]]
            batch_y = y[index] if per_member else y[index[0]]
            loss, ce, penalty = step(batch_x, batch_y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals += torch.stack([loss.detach(), ce.detach(), penalty.detach()]).to(totals.dtype)
            steps += 1
        # one host sync per epoch (and one all-reduce across ranks): the sums, and whether the loss and every
        # parameter stayed finite
        finite = torch.stack([torch.isfinite(p).all() for p in parameters] + [torch.isfinite(totals).all()]).all()
        sums = torch.cat([totals, (~finite).to(totals.dtype).unsqueeze(0)])
        if world is not None:
            sums = _sum_epoch(sums, world, replicated=jr_target == "ensemble", epoch=epoch)
        loss_sum, ce_sum, penalty_sum, not_finite = sums.tolist()
        if not_finite:
            raise FloatingPointError(
                f"training diverged in epoch {epoch + 1}: the loss or the parameters are no longer finite (NaN or "
                f"inf); lower lr (now {lr:g}) or jr_lambda. Nothing of this epoch was saved")
        steps = max(steps, 1)
        loss_mean, ce_mean, penalty_mean = loss_sum / steps, ce_sum / steps, penalty_sum / (steps * penalty_count)
        result.history.append({"epoch": epoch + 1, "loss": loss_mean, "ce": ce_mean, "penalty": penalty_mean,
                               "seconds": time.perf_counter() - started})
        if show:
            tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {loss_mean:.4f} ce {ce_mean:.4f} "
                       f"penalty {penalty_mean:.4g} ({result.history[-1]['seconds']:.1f}s)", file=sys.stderr)
        if checkpoint is not None:
            model_state, optimizer_state = trained.state_dict(), optimizer.state_dict()
            if block is not None:
                model_state, optimizer_state = block.full_states(model_state, optimizer_state)
            record = {"format": _io.CHECKPOINT_FORMAT, "epoch": epoch + 1, "epochs": epochs, "model": model_state,
                      "optimizer": optimizer_state, "config": config, "history": result.history}
            on_rank0(world, lambda: _io.atomic_save(record, checkpoint))
    if block is not None:
        block.write_back()
    model.eval()
    return result


def _step(model: nn.Module, lambdas: torch.Tensor, *, regularized: bool, nproj: int, mode: str, target: str,
          backend, generator):
    """The training step's loss of ``model`` (this process's whole model or member block) on one batch: a
    function of (batch x [B, *input] or [M, B, *input] per member, y [B] or [M, B]) -> (loss, CE, the penalty
    summed over the members)."""
    is_ensemble = isinstance(model, Ensemble)

    def step(batch_x, batch_y):
        per_member = batch_y.dim() == 2
        if regularized:
            logits, penalty = penalty_and_logits(model, batch_x, nproj=nproj, mode=mode, target=target,
                                                 backend=backend, per_member=per_member, generator=generator,
                                                 check_values=False)  # the whole data set was checked above
        else:
            logits = model.member_logits(batch_x, per_member=per_member, backend=backend) if is_ensemble \
                else model(batch_x).unsqueeze(0)
            penalty = logits.new_zeros(lambdas.shape)
        if target == "ensemble" or not is_ensemble:
            ce = F.cross_entropy(logits.mean(0), batch_y)
        else:  # each member its own CE: the sum over members is M independent objectives
            labels = batch_y if per_member else batch_y.unsqueeze(0).expand(logits.shape[0], -1)
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / batch_y.shape[-1]
        return ce + (lambdas * penalty).sum() / 2, ce, penalty.sum()

    return step


def _spread_ensemble_step(model: Ensemble, lambdas: torch.Tensor, *, members: int, regularized: bool, nproj: int,
                          mode: str, target: str, backend, generator):
    """``_step`` for target "ensemble" with the ``members`` spread over the ranks (``model``: this rank's
    block): CE(mean_m f_m) and ||mean_m r_m||^2 need every member, so each step all-reduces this rank's sums
    of the member logits and of the penalty rows r_m (``logits_and_rows``: v^T J_m or J_m u, drawn with the
    same projections on every rank). Every rank then computes the same loss; its gradient reaches this rank's
    members through the sums (``sum_across_ranks``: nothing to communicate in the backward)."""

    def step(batch_x, batch_y):
        if regularized:
            logits, rows = logits_and_rows(model, batch_x, nproj=nproj, mode=mode, backend=backend,
                                           generator=generator, check_values=False)
            partial = torch.cat([logits.sum(0).flatten(), rows.sum(0)])
        else:
            logits = model.member_logits(batch_x, backend=backend)
            partial = logits.sum(0).flatten()
        sums = sum_across_ranks(partial, "all-reduce of the member sums (target 'ensemble')") / members
        outputs = logits[0].numel()
        ce = F.cross_entropy(sums[:outputs].view_as(logits[0]), batch_y)
        penalty = sums[outputs:].pow(2).sum() if regularized else sums.new_zeros(())
        return ce + (lambdas * penalty).sum() / 2, ce, penalty

    return step


def _sum_epoch(sums: torch.Tensor, world: World, *, replicated: bool, epoch: int) -> torch.Tensor:
    """An epoch's [loss, CE, penalty, not-finite] sums over the ranks. Replicated losses (target "ensemble":
    every rank computed the same ones) count once, from rank 0; the not-finite flags always add up."""
    if replicated and not world.is_first:
        sums = torch.cat([torch.zeros_like(sums[:-1]), sums[-1:]])
    return all_reduce_(sums.contiguous(), f"the end of epoch {epoch + 1}'s all-reduce")
