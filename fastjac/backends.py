"""The one place a backend is chosen.

A backend is a set of launchers for the fused ops in ``fastjac/ops``: ``torch`` (batched ATen ops, runs
everywhere), ``cpp`` (the C++ extension, CPU), ``triton`` (Triton kernels: a CUDA device, or the CPU
under ``TRITON_INTERPRET=1`` for tests only) and ``cuda`` (a GPU: ATen's CUDA ops and cuBLAS for every
op, plus the CUDA extension's one kernel, the fused float32 SGD-UAP update).

Choice, in order: ``use(name)`` if called, else the environment variable ``FASTJAC_BACKEND``, else the
automatic default for the tensors' device: the first available backend of ``AUTO_ORDER[device]``, an
order set from what ``bench/`` measured fastest there (see bench/RESULTS.md). An automatic choice falls
back quietly (logged at debug level); a backend asked for by name fails loudly if it cannot run.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("fastjac.backends")

NAMES = ("torch", "cpp", "triton", "cuda")

# Measured fastest first (bench/RESULTS.md). The GPU order stays 'torch' first until a GPU
# benchmark shows a kernel backend ahead there; triton on the CPU is an interpreter and never automatic.
AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("torch",)}

_chosen: str | None = None


class BackendUnavailable(RuntimeError):
    """Raised when a backend asked for by name cannot run here."""


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1): tests only, never automatic."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
@torch.compiler.assume_constant_result  # a constant to torch.compile (it would not trace the import)
def _why_unavailable(name: str) -> str | None:
    """None if ``name`` can run in this process, else the reason it cannot."""
    if name == "torch":
        return None
    if name in ("cpp", "cuda"):
        try:
            ext = importlib.import_module("fastjac._C")
        except ImportError as error:
            return f"the C++ extension fastjac._C is not built ({error}); run scripts/setup.sh"
        if name == "cuda":
            if not getattr(ext, "WITH_CUDA", False):
                return "fastjac._C was built without CUDA (torch without CUDA, or no nvcc at build time)"
            if not torch.cuda.is_available():
                return "no CUDA device is visible"
        return None
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as error:
            return f"triton is not installed ({error})"
        if not torch.cuda.is_available() and not triton_interpreted():
            return "no CUDA device, and TRITON_INTERPRET=1 is not set"
        return None
    return f"unknown backend {name!r}; known: {', '.join(NAMES)}"


def available() -> list[str]:
    """Names of the backends that can run in this process."""
    return [name for name in NAMES if _why_unavailable(name) is None]


def _require(name: str) -> str:
    reason = _why_unavailable(name)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run: {reason}")
    return name


def use(name: str | None) -> None:
    """Force backend ``name`` for every later call (None returns to the automatic choice)."""
    global _chosen
    _chosen = None if name is None else _require(name)


def current(device: str = "cpu") -> str:
    """The backend used for tensors on ``device`` ('cpu' or 'cuda') when none is named in a call."""
    if _chosen is not None:
        return _chosen
    forced = os.environ.get("FASTJAC_BACKEND")
    if forced:
        return _require(forced)
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    for name in AUTO_ORDER[device_type]:
        reason = _why_unavailable(name)
        if reason is None:
            return name
        log.debug("backend %s skipped on %s: %s", name, device_type, reason)
    return "torch"


def resolve(name: str | None, device: str = "cpu") -> str:
    """The backend to run: ``name`` if given (it must be available), else ``current(device)``."""
    return current(device) if name is None else _require(name)
