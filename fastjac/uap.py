"""SGD-UAP over K universal perturbations at once, with the model's parameters frozen.

Per data batch, the K x B perturbed inputs clamp(x + delta_k, 0, 1) go through the (stacked) model in
one pass (on the CPU, in as few passes as keep the activations in cache: ``perturbations_per_pass``);
the only gradient formed is w.r.t. delta; each perturbation takes its own step
(eps_k * step_decay) and projection onto ||delta_k||_inf <= eps_k. Perturbation k equals what
``fastjac.reference.sgd_uap`` produces alone for eps_k / target_k on the same batches.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastjac import backends, engine
from fastjac._checks import (check_eps, check_inputs, check_int, check_labels, check_model_input,
                             warn_outside_unit_range)
from fastjac.distributed import MemberBlock, all_reduce_, resolve, sum_across_ranks
from fastjac.ensemble import Ensemble, fused_view, rows_per_cpu_pass
from fastjac.ops import uap_step


@dataclass
class UAPResult:
    delta: torch.Tensor                 # [K, *input], ||delta_k||_inf <= eps_k
    eps: list
    targets: list                       # None (untargeted) or a class, per perturbation
    losses: list = field(default_factory=list)  # per batch: [K] attack losses (negated CE when targeted)
    seconds: float = 0.0


def _frozen_engine(model: nn.Module, backend: str | None):
    """The stacked engine over detached parameters (so a backward pass forms input gradients only), or
    None for an architecture it does not fuse."""
    view = fused_view(model)
    if view is None:
        return None
    layers, params = view
    params = {name: p.detach() for name, p in params.items()}
    return engine.Engine(layers, params, backends.resolve(backend, next(iter(params.values())).device.type))


def frozen_member_logits(model: nn.Module, backend: str | None = None):
    """f(x [N, *input]) -> member logits [M, N, C] (a single module: M = 1) with the parameters frozen."""
    run = _frozen_engine(model, backend)
    if run is not None:
        return lambda x: run.forward(x)[0]
    # generic path: autograd.grad w.r.t. the input alone skips ATen's weight gradients
    if isinstance(model, Ensemble):
        return model.member_logits
    return lambda x: model(x).unsqueeze(0)


def frozen_logits(model: nn.Module, backend: str | None = None):
    """f(x [N, *input]) -> output [N, C] (an Ensemble: mean logits) with the parameters frozen."""
    f = frozen_member_logits(model, backend)
    return lambda x: f(x).mean(0)


def perturbed_member_logits(model: nn.Module, backend: str | None = None):
    """f(x [B, *input], delta [K, *input]) -> member logits [M, K*B, C] on clamp(x + delta_k, 0, 1) (row
    k*B + b), parameters frozen. The Triton backend forms the perturbation inside the first layer's load."""
    run = _frozen_engine(model, backend)
    if run is not None and run.backend.perturbed_linear is not None:
        return run.forward_perturbed
    chosen = run.backend if run is not None else backends.resolve(backend, next(model.parameters()).device.type)
    f = frozen_member_logits(model, backend)
    return lambda x, delta: f(uap_step.perturb(x, delta, chosen.perturb).flatten(0, 1))


def perturbed_logits(model: nn.Module, backend: str | None = None):
    """f(x [B, *input], delta [K, *input]) -> output [K*B, C] (an Ensemble: mean logits) on
    clamp(x + delta_k, 0, 1) (row k*B + b), parameters frozen."""
    f = perturbed_member_logits(model, backend)
    return lambda x, delta: f(x, delta).mean(0)


def perturbations_per_pass(model: nn.Module, x: torch.Tensor, count: int) -> int:
    """How many of the ``count`` perturbations of batch ``x`` go through the model in one pass: all of them
    on a GPU; on the CPU as many as keep the largest layer output within ``ensemble.CPU_PASS_BYTES``, at
    least one."""
    if x.device.type != "cpu" or count == 1:
        return count
    rows = rows_per_cpu_pass(model, tuple(x.shape[1:]), x.element_size())
    return count if rows == 0 else max(1, min(count, rows // x.shape[0]))


def _broadcast(eps: list, target) -> tuple[list, list]:
    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    if len(eps) == 1 and len(targets) > 1:
        eps = eps * len(targets)
    if len(targets) == 1 and len(eps) > 1:
        targets = targets * len(eps)
    if len(eps) != len(targets):
        raise ValueError(f"eps ({len(eps)} values) and target ({len(targets)} values) must have one length, or one of them a single value")
    for value in targets:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"target must be None or a class index >= 0, got {value!r}")
    return eps, targets


def _check_batches(model: nn.Module, batches, targets: list) -> tuple[int, int]:
    """One pass over ``batches`` before the attack: (number of batches, classes). Shapes, dtypes and devices
    are checked per batch on the host; the values (finite, in [0, 1], labels in range) are reduced on the
    device and read back with ONE sync, so the attack's loop needs no check and no sync at all."""
    if isinstance(batches, Iterator):
        raise TypeError(f"batches must be re-iterable (a list of (x, y) pairs or a DataLoader): a one-shot "
                        f"{type(batches).__name__} would be used up by the first epoch and the later epochs would "
                        f"silently see no data; pass list(batches)")
    count, classes, first_shape, reductions = 0, None, None, []
    for x, y in batches:
        check_inputs(x, f"batch {count} x", values=False)
        check_labels(y, x.shape[0], None, f"batch {count} y", values=False, device=x.device)
        if first_shape is None:
            first_shape = tuple(x.shape[1:])
            classes = check_model_input(model, x, f"batch {count} x")
        elif tuple(x.shape[1:]) != first_shape:
            raise ValueError(f"batch {count} x has sample shape {list(x.shape[1:])}, batch 0 had {list(first_shape)}")
        low, high = torch.aminmax(x)
        reductions.append(torch.stack([torch.isfinite(x).all().to(x.dtype), low, high,
                                       y.min().to(x.dtype), y.max().to(x.dtype)]))
        count += 1
    if count == 0:
        raise ValueError("batches yielded no data")
    finite, low, high, label_low, label_high = torch.stack(reductions).T.tolist()  # the one sync
    for index, (ok, lo, hi) in enumerate(zip(finite, label_low, label_high)):
        if not ok:
            raise ValueError(f"batch {index} x contains NaN or inf values")
        if lo < 0 or hi >= classes:
            raise ValueError(f"batch {index} y has labels from {lo:g} to {hi:g}; labels must be in [0, {classes}) "
                             f"(the model's classes)")
    warn_outside_unit_range(min(low), max(high), "batches x")
    for value in targets:
        if value is not None and value >= classes:
            raise ValueError(f"target must be a class index < {classes} (the model's classes), got {value}")
    return count, classes


def sgd_uap(model: nn.Module, batches, *, eps, epochs: int = 10, beta: float = 12.0, step_decay: float = 0.8,
            target=None, backend: str | None = None, progress: bool = False, distributed=None) -> UAPResult:
    """Fit K = len(eps) (or len(target)) universal perturbations at once.

    Args:
        model: an nn.Module or an Ensemble (attacked through its mean logits); never modified.
        batches: a re-iterable of (x [B,*input] in [0,1], y [B]) pairs, e.g. a DataLoader or a list, on the
            model's device and in its dtype; all of it is checked in one pass before the attack.
        eps: a float or a list of floats in (0, 1]: the L-inf radius of each perturbation.
        target: None (untargeted), a class index, or a list (None entries allowed) broadcast with eps.
        beta: CE clamp; step_decay: step = eps * step_decay.
        distributed: under an initialized torch.distributed process group of more than one rank, every rank
            passes the same model and batches and gets the same perturbations, equal to the single-process
            ones. "data" (the default there) splits each batch's rows over the ranks; "members" splits an
            Ensemble's members (the member-logit sums are all-reduced forward, the gradients backward);
            False attacks in this process alone.
    Returns a UAPResult: ``delta`` [K, *input] and the per-batch losses.
    """
    eps, targets = _broadcast(check_eps(eps), target)
    check_int(epochs, "epochs", 1)
    if not beta > 0 or not 0 < step_decay:
        raise ValueError(f"beta and step_decay must be > 0, got beta={beta!r}, step_decay={step_decay!r}")
    chosen = backends.resolve(backend, next(model.parameters()).device.type)
    spread = resolve(distributed, ("data", "members"), "sgd_uap")
    count, _ = _check_batches(model, batches, targets)
    was_training = model.training
    model.eval()
    attacked, f = model, perturbed_logits(model, backend)
    if spread is not None and spread[1] == "members":
        block = MemberBlock(model, spread[0], "sgd_uap")
        attacked, member_logits = block.local, perturbed_member_logits(block.local, backend)
        f = lambda x, delta: sum_across_ranks(member_logits(x, delta).sum(0)) / block.members  # noqa: E731
    delta, result, started = None, None, time.perf_counter()
    try:
        for epoch in range(epochs):
            seen = 0
            for x, y in tqdm(batches, desc=f"SGD-UAP epoch {epoch + 1}/{epochs}", disable=None if progress else True, leave=False):
                if delta is None:
                    delta = x.new_zeros(len(eps), *x.shape[1:])
                    eps_t = torch.tensor(eps, dtype=x.dtype, device=x.device)
                    step_t = eps_t * step_decay
                    result = UAPResult(delta, eps, targets)
                    # a targeted attack descends the CE toward its class: the loss is negated
                    signs = torch.tensor([1.0 if t is None else -1.0 for t in targets], dtype=x.dtype, device=x.device)
                    gradients = _gradient_function(f, spread, targets=targets, signs=signs, beta=beta,
                                                   per_pass=perturbations_per_pass(attacked, x, len(eps)))
                grads, losses = gradients(x, y, delta)
                delta = uap_step.sign_step(delta, grads, step_t, eps_t, chosen.sign_step)
                result.losses.append(losses)  # kept on the device: no sync per batch
                seen += 1
            if seen != count:
                raise ValueError(f"batches yielded {count} batches when checked but {seen} in epoch {epoch + 1}: "
                                 f"it must yield the same batches every time it is iterated")
    finally:
        model.train(was_training)
    result.delta, result.seconds = delta, time.perf_counter() - started
    result.losses = torch.stack(result.losses).tolist()
    return result


def _gradient_function(f, spread, *, targets: list, signs: torch.Tensor, beta: float, per_pass: int):
    """(x [B, *input], y [B], delta [K, *input]) -> (d loss / d delta [K, *input], losses [K]) of one batch,
    loss_k = sign_k * mean over the B rows of min(CE(f(clamp(x + delta_k, 0, 1)), label_k), beta). Under
    torch.distributed (``spread``: (world, mode)) every rank returns the same whole-batch values: "data"
    computes this rank's share of the rows and all-reduces the sums; "members" has ``f`` all-reduce the
    member-logit sums and all-reduces the gradient contributions of this rank's members."""

    def batch_sums(x, y, delta, rows: int):
        """Of ``rows`` rows of a batch, the part from these rows x, y: in passes of ``per_pass`` perturbations."""
        labels = torch.stack([y if t is None else torch.full_like(y, t) for t in targets])  # [K, b]
        grads, losses = [], []
        for part in (slice(start, start + per_pass) for start in range(0, len(targets), per_pass)):
            trial = delta[part].detach().requires_grad_(True)
            logits = f(x, trial)  # [k*b, C]
            ce = F.cross_entropy(logits, labels[part].flatten(), reduction="none").view(trial.shape[0], -1)
            part_losses = signs[part] * ce.clamp(max=beta).sum(dim=1) / rows  # each delta_k sees its own term
            grads.append(torch.autograd.grad(part_losses.sum(), trial)[0])
            losses.append(part_losses.detach())
        return torch.cat(grads), torch.cat(losses)

    if spread is None:
        return lambda x, y, delta: batch_sums(x, y, delta, x.shape[0])
    world, mode = spread
    if mode == "members":
        def members(x, y, delta):
            grads, losses = batch_sums(x, y, delta, x.shape[0])
            return all_reduce_(grads, "all-reduce of the perturbation gradients"), losses  # losses: replicated

        return members

    def data(x, y, delta):
        share = world.block(x.shape[0])  # empty on the last ranks when the batch has fewer rows than ranks
        if len(share):
            grads, losses = batch_sums(x[share.start:share.stop], y[share.start:share.stop], delta, x.shape[0])
        else:
            grads, losses = torch.zeros_like(delta), delta.new_zeros(len(targets))
        both = all_reduce_(torch.cat([grads.flatten(), losses]), "all-reduce of the perturbation gradients")
        return both[:delta.numel()].view_as(delta), both[delta.numel():]

    return data
