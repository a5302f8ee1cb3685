"""Input checks shared by every public entry point: one place, messages that name the argument."""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import warnings

import torch
from torch import nn


def check_inputs(x: torch.Tensor, name: str = "x", *, min_dim: int = 2, values: bool = True) -> None:
    """A floating-point batch ``[B, *features]`` with B >= 1 and (``values``: a scan, one host sync) only
    finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch with at least {min_dim} dims, got shape {tuple(x.shape)}")
    if values and not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf values")


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of x is finite (one host sync). A sum is finite only if every term is (NaN and
    inf propagate), so one reduction answers (~15 us for a [128, 784] batch here, against ~160 us for
    isfinite's passes); the full scan runs only when the sum is not finite, which overflow alone can cause."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_labels(y: torch.Tensor, batch: int, num_classes: int | None = None, name: str = "y", *,
                 values: bool = True, device: torch.device | None = None) -> None:
    """Integer class labels ``[batch]`` in [0, num_classes) (the range only with ``values``: one host sync),
    on ``device`` when given (the inputs')."""
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor of class labels, got {getattr(y, 'dtype', type(y))}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] to match the inputs, got {tuple(y.shape)}")
    if device is not None and y.device != device:
        raise ValueError(f"{name} is on {y.device} but the inputs are on {device}; put them on one device")
    if values and batch:
        low, high = torch.aminmax(y)
        low, high = int(low), int(high)
        if low < 0 or (num_classes is not None and high >= num_classes):
            allowed = ">= 0" if num_classes is None else f"in [0, {num_classes}) (the model's classes)"
            raise ValueError(f"{name} has labels from {low} to {high}; labels must be {allowed}")


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


def check_int(value, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """An int (not a bool) in [minimum, maximum]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A UserWarning shown once per process (per message), from the caller of the public function."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def warn_outside_unit_range(low: float, high: float, name: str) -> None:
    """Images are expected in [0, 1] (UAP clamps and eps assume it): values outside warn once."""
    if low < 0 or high > 1:
        warn_once(f"{name} has values in [{low:.4g}, {high:.4g}], outside [0, 1]: fastjac expects images scaled "
                  f"to [0, 1] (UAPs clamp to it, eps is measured in it); divide 8-bit pixels by 255")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()  # a dry run must not touch BatchNorm's running statistics
    try:
        yield
    finally:
        model.train(was_training)


def check_matches_model(model: nn.Module, x: torch.Tensor, name: str = "x") -> None:
    """``x`` is on the device and of the dtype of ``model``'s parameters (no compute)."""
    reference = next(itertools.chain(model.parameters(), model.buffers()), None)
    if reference is not None and reference.is_floating_point():
        if x.device != reference.device:
            raise ValueError(f"{name} is on {x.device} but the model's parameters are on {reference.device}; "
                             f"move them to one device (x.to(device), model.to(device))")
        if x.dtype != reference.dtype:
            raise TypeError(f"{name} is {str(x.dtype).replace('torch.', '')} but the model's parameters are "
                            f"{str(reference.dtype).replace('torch.', '')}; convert one of them "
                            f"(x.to({reference.dtype}) or model.to({x.dtype}))")


def check_model_input(model: nn.Module, x: torch.Tensor, name: str = "x") -> int:
    """``x [B, *input]`` fits ``model``: the device and dtype of its parameters, and a sample shape it takes
    (one row through the model, in eval mode, without gradients). Returns the number of classes C."""
    check_matches_model(model, x, name)
    try:
        with torch.no_grad(), _eval_mode(model):
            output = model(x[:1])
    except (RuntimeError, ValueError) as error:  # torch's shape errors, or a fused op's validator
        from fastjac.models import INPUT_SHAPE

        hint = "" if tuple(x.shape[1:]) == INPUT_SHAPE else f" (fastjac.models take [B, {', '.join(map(str, INPUT_SHAPE))}])"
        raise ValueError(f"{name} has sample shape {list(x.shape[1:])}, which the model cannot take{hint}: "
                         f"{str(error).splitlines()[0]}") from None
    if output.dim() != 2 or output.shape[0] != 1:
        raise ValueError(f"the model must map {name} [B, *input] to logits [B, C], got {list(output.shape)} for B = 1")
    return output.shape[-1]


def check_fits_dtype(values, dtype: torch.dtype, name: str) -> None:
    """Python floats the computation will hold in ``dtype`` must not overflow it to inf."""
    largest = torch.finfo(dtype).max
    for value in values:
        if abs(value) > largest:
            raise ValueError(f"{name} = {value!r} overflows {str(dtype).replace('torch.', '')} (largest {largest:.3g})")


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or the host's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_projection_memory(model: nn.Module, x: torch.Tensor, batch: int, rows: int, name: str = "nproj") -> None:
    """Refuse ``rows`` projection rows per sample whose streams could never fit on x's device: a lower bound
    of the memory is rows x batch x (the largest layer output over the members) x the element size."""
    from fastjac.ensemble import largest_activation

    try:
        per_row = largest_activation(model, tuple(x.shape[1:]))
    except (RuntimeError, NotImplementedError, TypeError):  # a layer without a meta kernel: the input size
        per_row = 0
    per_row = max(per_row, math.prod(x.shape[1:]))
    need, total = rows * batch * per_row * x.element_size(), device_memory_bytes(x.device)
    if need > total:
        raise ValueError(f"{name} = {rows} needs at least {need / 2**30:.3g} GiB for the projection streams of one "
                         f"batch ({rows} x {batch} rows x {per_row} values of the largest layer output x "
                         f"{x.element_size()} bytes), more than the {total / 2**30:.3g} GiB of {x.device}; "
                         f"lower {name} or the batch size")
