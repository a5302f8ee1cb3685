"""Clean and UAP metrics, batched over the K perturbations and streamed over the test set in chunks."""
from __future__ import annotations

import torch
from torch import nn

from fastjac._checks import check_inputs, check_int, check_labels, check_model_input, warn_outside_unit_range
from fastjac.distributed import MemberBlock, all_reduce_, resolve, sum_across_ranks
from fastjac.uap import frozen_logits, frozen_member_logits


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor | None = None, *,
             chunk_size: int = 1000, backend: str | None = None, distributed=None) -> dict:
    """Metrics of ``model`` on (x [N,*input], y [N]) and perturbations ``delta`` ([K,*input] or [*input]).

    x, y and delta must be on the model's device and x and delta in its dtype; y must hold labels of the
    model's classes. Returns {"clean_accuracy": float, "uap_accuracy": [K], "evasion_rate": [K]
    (1 - uap accuracy), "fooling_rate": [K] (fraction of predictions that change)}; the lists are empty
    without delta. Memory is bounded by chunk_size * (K + 1) inputs at a time.
    distributed: under an initialized torch.distributed process group of more than one rank, every rank
    passes the same arguments and gets the same metrics: "data" (the default there) splits the N samples
    over the ranks, "members" an Ensemble's members (member-logit sums all-reduced per chunk); False
    evaluates in this process alone.
    """
    check_inputs(x, "x", values=False)
    check_labels(y, x.shape[0], None, "y", values=False, device=x.device)
    check_int(chunk_size, "chunk_size", 1)
    if delta is not None:
        if not isinstance(delta, torch.Tensor):
            raise TypeError(f"delta must be a torch.Tensor [K, *input] or None, got {type(delta).__name__}")
        if delta.dim() == x.dim() - 1:
            delta = delta.unsqueeze(0)
        if tuple(delta.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"delta must be [K, {', '.join(map(str, x.shape[1:]))}], got {tuple(delta.shape)}")
        if delta.device != x.device or delta.dtype != x.dtype:
            raise ValueError(f"delta must have x's device and dtype ({x.device}, {x.dtype}), "
                             f"got {delta.device}, {delta.dtype}")
    classes = check_model_input(model, x, "x")  # device, dtype and sample shape first: then scan values
    check_inputs(x, "x")
    if delta is not None:
        check_inputs(delta, "delta")
    check_labels(y, x.shape[0], classes, "y")  # a label >= C would silently count as a wrong prediction
    low, high = torch.aminmax(x)
    warn_outside_unit_range(float(low), float(high), "x")
    spread = resolve(distributed, ("data", "members"), "evaluate")
    was_training = model.training
    model.eval()
    n, f = x.shape[0], frozen_logits(model, backend)
    if spread is not None and spread[1] == "data":
        share = spread[0].block(n)
        x, y = x[share.start:share.stop], y[share.start:share.stop]
    elif spread is not None:
        block = MemberBlock(model, spread[0], "evaluate")
        member_logits = frozen_member_logits(block.local, backend)
        f = lambda rows: sum_across_ranks(member_logits(rows).sum(0)) / block.members  # noqa: E731
    k = 0 if delta is None else delta.shape[0]
    # counts stay on the device until the end: one host sync for the whole evaluation
    clean_correct = torch.zeros((), dtype=torch.long, device=x.device)
    uap_correct, fooled = (torch.zeros(k, dtype=torch.long, device=x.device) for _ in range(2))
    try:
        for start in range(0, x.shape[0], chunk_size):
            xs, ys = x[start:start + chunk_size], y[start:start + chunk_size]
            rows = xs if delta is None else torch.cat([xs, torch.clamp(xs.unsqueeze(0) + delta.unsqueeze(1), 0, 1).flatten(0, 1)])
            prediction = f(rows).argmax(dim=1).view(k + 1, -1)  # row 0: clean, rows 1..K: perturbed
            clean_correct += (prediction[0] == ys).sum()
            uap_correct += (prediction[1:] == ys).sum(dim=1)
            fooled += (prediction[1:] != prediction[0]).sum(dim=1)
    finally:
        model.train(was_training)
    counts = torch.cat([clean_correct.unsqueeze(0), uap_correct, fooled])
    if spread is not None and spread[1] == "data":
        all_reduce_(counts, "all-reduce of the evaluation counts")
    clean, *counts = counts.tolist()
    uap_accuracy = [count / n for count in counts[:k]]
    return {"clean_accuracy": clean / n, "uap_accuracy": uap_accuracy,
            "evasion_rate": [1.0 - a for a in uap_accuracy], "fooling_rate": [count / n for count in counts[k:]]}
