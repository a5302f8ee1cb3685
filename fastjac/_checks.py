"""Input checks shared by every public entry point: one place, messages that name the argument."""
from __future__ import annotations

import math

import torch


def check_inputs(x: torch.Tensor, name: str = "x", *, min_dim: int = 2) -> None:
    """A floating-point batch ``[B, *features]`` with B >= 1 and only finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch with at least {min_dim} dims, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")


def check_labels(y: torch.Tensor, batch: int, num_classes: int | None = None, name: str = "y") -> None:
    """Integer class labels ``[batch]`` in [0, num_classes)."""
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor of class labels, got {getattr(y, 'dtype', type(y))}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] to match the inputs, got {tuple(y.shape)}")
    if batch and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        raise ValueError(f"{name} has labels outside [0, {num_classes})")


def check_eps(eps) -> list[float]:
    """eps as a non-empty list of floats, each in (0, 1] (inputs live in [0, 1])."""
    values = list(eps) if isinstance(eps, (list, tuple)) else [eps]
    if not values:
        raise ValueError("eps must be a float or a non-empty list of floats")
    for value in values:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not 0 < value <= 1:
            raise ValueError(f"eps must be in (0, 1] (inputs are images in [0, 1]), got {value!r}")
    return [float(v) for v in values]


def check_nproj(nproj: int, mode: str) -> None:
    if not isinstance(nproj, int) or isinstance(nproj, bool):
        raise TypeError(f"nproj must be an int, got {type(nproj).__name__}")
    if nproj == -1 and mode != "vjp":
        raise ValueError("nproj = -1 (exact from the C basis vectors) exists only for mode='vjp'")
    if nproj == 0 or nproj < -1:
        raise ValueError(f"nproj must be >= 1, or -1 for the exact value (mode='vjp'); got {nproj}")


def check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
