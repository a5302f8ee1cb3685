"""ATen calls that torch.compile must not generate code for on a CPU, as opaque custom ops.

Inductor replaces an ATen op by C++ of its own; for two ops of a JR step that code measured far slower
than ATen's kernel on this project's CPU (torch 2.13, a 2-core AVX-512 Xeon; ``scratch`` timings of the
op alone, compiled vs eager):

- ``threshold_backward`` (the ReLU masks of the linear chain) becomes ``where(activation <= 0, 0, grad)``
  and the partitioner saves the bool mask for the backward; a bool output costs inductor 10-20x ATen's
  time (``x <= 0`` on [5, 128, 256]: 2.4 ms vs 0.11 ms). The compiled MLP vjp step was 1.2x eager.
- ``randn`` (the jvp mode's Gaussian directions u) becomes inductor's own counter-based generator: 3.4 ms
  for u [1, 128, 784] against ATen's 0.4 ms. The compiled MLP jvp step was 1.2x eager.

A custom op is one opaque call in the compiled graph, running ATen's kernel: the compiled steps then
match or beat eager. On a GPU inductor's Triton code for both is fast, so ``applies`` is False there.
"""
from __future__ import annotations

import torch


def applies(device: torch.device | str) -> bool:
    """Whether a call on ``device`` should go through these ops: inside torch.compile, on a CPU."""
    return torch.compiler.is_compiling() and torch.device(device).type == "cpu"


# Defined through torch.library.Library rather than torch.library.custom_op: its Python wrapper measured
# ~10 us more per call (29 vs 19 us, ATen's own op 17-19 us), paid six times in a compiled MLP vjp step.
_library = torch.library.Library("fastjac", "FRAGMENT")  # csrc/ext.cpp's TORCH_LIBRARY(fastjac) has the rest
_library.define("relu_backward(Tensor grad, Tensor activation) -> Tensor")
# in place, like ATen's normal_: a functional draw (no tensor in, one out) could be merged with another of
# the same shape by the compiled graph's common-subexpression pass, which spares only ATen's random ops
_library.define("normal_(Tensor(a!) out) -> ()")


def _relu_backward(grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward.default(grad, activation, 0)


def _normal_(out: torch.Tensor) -> None:
    out.normal_()


_library.impl("relu_backward", _relu_backward, "CompositeExplicitAutograd")
_library.impl("normal_", _normal_, "CompositeExplicitAutograd")


@torch.library.register_fake("fastjac::relu_backward", lib=_library)
def _(grad, activation):
    return grad.new_empty(torch.broadcast_shapes(grad.shape, activation.shape))


@torch.library.register_fake("fastjac::normal_", lib=_library)
def _(out):
    return None


def relu_backward(grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """ATen's threshold_backward(grad, activation, 0): grad where activation > 0, else 0 (broadcast);
    through the opaque op where ``applies``."""
    if applies(grad.device):
        return torch.ops.fastjac.relu_backward.default(grad, activation)
    return _relu_backward(grad, activation)


def randn(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Standard Gaussian draws from the global generator, like torch.randn."""
    out = torch.empty(shape, dtype=dtype, device=device)
    torch.ops.fastjac.normal_.default(out)
    return out
