"""Clean and UAP metrics, batched over the K perturbations and streamed over the test set in chunks."""
from __future__ import annotations

import torch
from torch import nn

from fastjac._checks import check_inputs, check_labels
from fastjac.uap import frozen_logits


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor | None = None, *,
             chunk_size: int = 1000, backend: str | None = None) -> dict:
    """Metrics of ``model`` on (x [N,*input], y [N]) and perturbations ``delta`` ([K,*input] or [*input]).

    Returns {"clean_accuracy": float, "uap_accuracy": [K], "evasion_rate": [K] (1 - uap accuracy),
    "fooling_rate": [K] (fraction of predictions that change)}; the lists are empty without delta.
    Memory is bounded by chunk_size * (K + 1) inputs at a time.
    """
    check_inputs(x, "x")
    check_labels(y, x.shape[0], None, "y")
    if delta is not None:
        if delta.dim() == x.dim() - 1:
            delta = delta.unsqueeze(0)
        if tuple(delta.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"delta must be [K, {', '.join(map(str, x.shape[1:]))}], got {tuple(delta.shape)}")
        check_inputs(delta, "delta")
    was_training = model.training
    model.eval()
    f = frozen_logits(model, backend)
    k = 0 if delta is None else delta.shape[0]
    clean_correct, uap_correct, fooled = 0, torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
    try:
        for start in range(0, x.shape[0], chunk_size):
            xs, ys = x[start:start + chunk_size], y[start:start + chunk_size]
            rows = xs if delta is None else torch.cat([xs, torch.clamp(xs.unsqueeze(0) + delta.unsqueeze(1), 0, 1).flatten(0, 1)])
            prediction = f(rows).argmax(dim=1).view(k + 1, -1)  # row 0: clean, rows 1..K: perturbed
            clean_correct += int((prediction[0] == ys).sum())
            uap_correct += (prediction[1:] == ys).sum(dim=1).cpu()
            fooled += (prediction[1:] != prediction[0]).sum(dim=1).cpu()
    finally:
        model.train(was_training)
    n = x.shape[0]
    uap_accuracy = (uap_correct.double() / n).tolist()
    return {"clean_accuracy": clean_correct / n, "uap_accuracy": uap_accuracy,
            "evasion_rate": [1.0 - a for a in uap_accuracy], "fooling_rate": (fooled.double() / n).tolist()}
