"""The one place a backend is chosen, and the one place that knows what each backend is.

A backend is a ``Backend`` object: the launchers of every fused op in ``fastjac/ops`` and what the
backend can do (its capabilities). Code elsewhere asks those fields and never compares names:

- ``torch``: batched ATen ops; runs on every device.
- ``cpp``: the C++ extension (CPU, OpenMP; ``torch.ops.fastjac``): the stream epilogue, the stacked Linear,
  and member-parallel products for the Linear-chain Functions.
- ``triton``: Triton kernels on a CUDA device (or the CPU under ``TRITON_INTERPRET=1``, for tests only),
  including the SGD-UAP perturbation fused into the first Linear.
- ``cuda``: a GPU with ATen's CUDA ops and cuBLAS for every op, plus the CUDA extension's one kernel, the
  fused float32 SGD-UAP update.

Choice, in order: ``use(name)`` if called, else the environment variable ``FASTJAC_BACKEND``, else the
automatic default for the tensors' device: the first available backend of ``AUTO_ORDER[device]``, an
order set from what ``bench/`` measured fastest there (see bench/RESULTS.md). An automatic choice falls
back quietly (logged at debug level); a backend asked for by name fails loudly if it cannot run, or
cannot run on the tensors' device.
"""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("fastjac.backends")

NAMES = ("torch", "cpp", "triton", "cuda")

# Measured fastest first (bench/RESULTS.md, bench/RESULTS-gpu.md). On the GPU (an H200, B = 128) the
# steps are host-bound: 'cuda' ties 'torch' and 'triton' is 1.5x slower, so 'torch' alone; triton on the
# CPU is an interpreter and never automatic.
AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("torch",)}

_chosen: str | None = None


class BackendUnavailable(RuntimeError):
    """Raised when a backend asked for by name cannot run here."""


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1): tests only, never automatic."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_reasons: dict[str, str | None] = {}  # _why_unavailable's answers (a dict: torch.compile warns on lru_cache)


@torch.compiler.assume_constant_result  # a constant to torch.compile (it would not trace the import)
def _why_unavailable(name: str) -> str | None:
    """None if ``name`` can run in this process, else the reason it cannot (found once per name)."""
    if name not in _reasons:
        _reasons[name] = _find_why_unavailable(name)
    return _reasons[name]


def _find_why_unavailable(name: str) -> str | None:
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


@dataclass(frozen=True, eq=False)
class Backend:
    """One backend: its launchers (the signatures of the ``*_forward``/``*_backward`` functions of
    ``fastjac/ops/<op>.py``) and its capabilities."""
    name: str
    device_types: tuple            # device types its launchers run on
    stream_epilogue: tuple         # (forward, backward)
    stacked_linear: tuple          # (forward, backward)
    perturb: tuple                 # (forward, backward)
    sign_step: Callable            # the SGD-UAP update of K perturbations
    batch_norm: tuple              # ops.batch_norm.Launchers: BatchNorm with batch statistics
    perturbed_linear: tuple | None = None   # the perturbation fused into the first Linear, or None
    chain_products: Callable | None = None  # () -> the Linear-chain Functions' products; None: no chain
    plain_chain: bool = False      # plain training passes of a chain run as one Function too
    own_plain_epilogue: bool = False  # plain passes keep its epilogue kernels (else ATen fuses bias, ReLU)
    interpreted: bool = False      # its kernels run in an interpreter: correctness only, never timed

    def __str__(self) -> str:
        return self.name

    def check_device(self, device) -> None:
        """A backend named for tensors on ``device`` must run there (e.g. cpp on CUDA tensors cannot)."""
        if torch.device(device).type not in self.device_types:
            raise BackendUnavailable(f"backend {self.name!r} runs on {' or '.join(self.device_types)} tensors, "
                                     f"got tensors on {device}")


def device_types(name: str) -> tuple:
    """The device types backend ``name`` runs its tensors on (known without loading it): triton on a GPU
    when one is visible, else on the CPU through the interpreter (tests only)."""
    if name == "triton":
        return ("cuda",) if torch.cuda.is_available() else ("cpu",)
    return {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "cuda": ("cuda",)}[name]


def device_for(name: str, requested=None) -> torch.device:
    """Where backend ``name`` puts its tensors when ``requested`` (default: cuda when available, else cpu)
    is asked for: the requested device if the backend runs there (``cuda:1`` stays ``cuda:1``), else the
    device type it runs on."""
    requested = torch.device(requested if requested is not None else "cuda" if torch.cuda.is_available() else "cpu")
    types = device_types(name)
    return requested if requested.type in types else torch.device(types[0])


def _build(name: str) -> Backend:
    """The Backend object of an available backend (imports its launchers)."""
    from fastjac.ops import batch_norm, linear_chain
    from fastjac.ops import stacked_linear as linear
    from fastjac.ops import stream_epilogue as epilogue
    from fastjac.ops import uap_step

    aten = dict(stream_epilogue=(epilogue.stream_epilogue_forward, epilogue.stream_epilogue_backward),
                stacked_linear=(linear.stacked_linear_forward, linear.stacked_linear_backward),
                perturb=(uap_step.perturb_forward, uap_step.perturb_backward), sign_step=uap_step.uap_step,
                batch_norm=batch_norm.ATEN, chain_products=lambda: linear_chain.ATenProducts)
    if name == "torch":
        return Backend(name, device_types(name), **aten)
    if name == "cpp":
        from fastjac.ops import native

        ops = native.OPS
        return Backend(name, device_types(name), **{
            **aten, "stream_epilogue": (ops.stream_epilogue_forward, ops.stream_epilogue_backward),
            "stacked_linear": (ops.stacked_linear_forward, ops.stacked_linear_backward),
            "batch_norm": batch_norm.native_launchers(ops),
            "chain_products": lambda: linear_chain.MemberParallelProducts(ops), "plain_chain": True})
    if name == "cuda":
        return Backend(name, device_types(name), **{**aten, "sign_step": uap_step.cuda_sign_step})
    if name == "triton":
        from fastjac.kernels import stacked_linear as k_linear
        from fastjac.kernels import stream_epilogue as k_epilogue
        from fastjac.kernels import uap_step as k_uap

        return Backend(name, device_types(name),
                       stream_epilogue=(k_epilogue.stream_epilogue_forward, k_epilogue.stream_epilogue_backward),
                       stacked_linear=(k_linear.stacked_linear_forward, k_linear.stacked_linear_backward),
                       perturb=(k_uap.perturb_forward, k_uap.perturb_backward), sign_step=k_uap.uap_step,
                       perturbed_linear=(k_uap.perturbed_linear_forward, k_uap.perturbed_linear_backward),
                       batch_norm=batch_norm.ATEN, own_plain_epilogue=True, interpreted=device_types(name) == ("cpu",))
    raise AssertionError(name)  # _why_unavailable names every other name as unknown


def available() -> list[str]:
    """Names of the backends that can run in this process."""
    return [name for name in NAMES if _why_unavailable(name) is None]


def _require(name: str) -> str:
    reason = _why_unavailable(name)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run: {reason}")
    return name


_built: dict[str, Backend] = {}  # one object per backend, built on first use


def get(name: str) -> Backend:
    """The Backend object ``name`` (it must be able to run here)."""
    name = _require(name)
    if name not in _built:
        _built[name] = _build(name)
    return _built[name]


def use(name: str | None) -> None:
    """Force backend ``name`` for every later call (None returns to the automatic choice)."""
    global _chosen
    _chosen = None if name is None else _require(name)


def current(device: str = "cpu") -> str:
    """The name of the backend used for tensors on ``device`` ('cpu' or 'cuda') when none is named in a call."""
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


def resolve(name: "str | Backend | None", device="cpu") -> Backend:
    """The backend to run on tensors of ``device``: ``name`` (a name or a Backend) if given, which must be
    available and run on that device; else the automatic choice, ``current(device)``."""
    backend = name if isinstance(name, Backend) else get(current(device) if name is None else name)
    backend.check_device(device)
    return backend
