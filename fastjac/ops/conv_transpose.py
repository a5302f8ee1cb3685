"""A stride-1 convolution whose input gradient, the transposed convolution, runs the fastest of three ways.

The vjp-mode penalty differentiates the input gradient of every convolution (x's gradient, a transposed
convolution) once more. On the CPU, ATen's transposed convolution of a stride-1 layer (oneDNN's backward-
data kernel) was measured up to 5x slower than the same map run as a forward convolution with the
kernel's channels swapped and its taps flipped, and for other shapes 2.6x faster (this project's 2-core
Xeon VM, torch 2.13, 2 threads, B = 128: a LeNet first layer's [128, 6, 28, 28] -> [128, 1, 28, 28], 5x5:
10.9 against 2.3 ms; 16 -> 3 channels at 32x32, 3x3: 4.4 against 11.3 ms; see bench/RESULTS.md); for
ResNet's stem (16 -> 1 channel, 3x3) both took ~8 ms and one product whose columns ``F.fold`` sums 2.5.
No rule of channel counts picked the right one, so each configuration's first call times the three and
keeps the fastest (``transpose_method``; another must beat ATen's by ``MARGIN``, as its backward is two
calls), as cuDNN's benchmark mode does; off the CPU ATen's kernel always runs, and under torch.compile
both functions are ATen's ops.

    conv2d(x, weight, bias, padding, dilation) -> y [N, COUT, H', W']     stride 1, groups 1, zero padding
    conv_transpose2d(g, weight, padding, dilation) -> [N, CIN, H, W]      the adjoint of conv2d in x: x's
                                                                          gradient for y's gradient g

x [N, CIN, H, W], weight [COUT, CIN, KH, KW], bias [COUT] or None, padding and dilation pairs, with
padding <= dilation * (K - 1) (the flipped form's padding must not be negative; larger paddings take
ATen's kernel). Each is differentiable to every order through the other: conv2d's input gradient is
conv_transpose2d and conv_transpose2d's is conv2d; weight and bias gradients are ATen's
(``convolution_backward`` with the weight mask), always in the layer's own orientation.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from fastjac.ops import engine_queries

log = logging.getLogger("fastjac.ops.conv_transpose")

METHODS = ("aten", "flipped", "fold")
MARGIN = 1.1
# (g's shape, weight's shape, padding, dilation, dtype, threads) -> the faster method, timed once
_CHOSEN: dict[tuple, str] = {}


def flipped_padding(weight: torch.Tensor, padding, dilation) -> tuple[int, int]:
    """The forward convolution's padding that makes it the stride-1 transpose: d * (k - 1) - p per side."""
    return tuple(d * (k - 1) - p for k, p, d in zip(weight.shape[-2:], padding, dilation))


def transpose_forward(g: torch.Tensor, weight: torch.Tensor, padding, dilation, method: str) -> torch.Tensor:
    """conv_transpose2d's value by ``method``: "aten" (ATen's transposed convolution), "flipped" (a forward
    convolution with weight [COUT, CIN, KH, KW] as [CIN, COUT, KH, KW], taps reversed) or "fold" (one
    product weight^T [CIN*KH*KW, COUT] x g [N, COUT, H'*W'], whose columns ``F.fold`` sums onto the input
    positions: for few input channels, e.g. ResNet's stem, 16 -> 1 at 28x28: 2.5 ms against ATen's 7.7)."""
    if method == "flipped":
        kernel = weight.transpose(0, 1).flip(-2, -1)
        return F.conv2d(g, kernel, None, 1, flipped_padding(weight, padding, dilation), dilation)
    if method == "fold":
        kernel = weight.shape[-2:]
        size = tuple(n - 2 * p + d * (k - 1) for n, p, d, k in zip(g.shape[-2:], padding, dilation, kernel))
        columns = weight.flatten(1).t() @ g.flatten(2)  # [N, CIN*KH*KW, H'*W']
        return F.fold(columns, size, kernel, dilation=dilation, padding=padding)
    return F.conv_transpose2d(g, weight, None, 1, padding, 0, 1, dilation)


def _time(fn, repeats: int = 3) -> float:
    fn()  # warm-up: oneDNN builds its kernel for a new shape on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def transpose_method(g: torch.Tensor, weight: torch.Tensor, padding, dilation) -> str:
    """The method conv_transpose2d runs for this configuration: ATen's off the CPU or where the flipped form
    does not apply; on the CPU the fastest of ``METHODS``, timed on the first call (under no_grad) and kept."""
    if g.device.type != "cpu" or min(flipped_padding(weight, padding, dilation)) < 0:
        return "aten"
    key = (tuple(g.shape), tuple(weight.shape), tuple(padding), tuple(dilation), g.dtype, torch.get_num_threads())
    method = _CHOSEN.get(key)
    if method is None:  # timed on stand-ins of the same shapes: g may be batched (autograd's is_grads_batched,
        # a vmap, which allows no random op either)
        g, weight = (torch.ones(t.shape, dtype=t.dtype) for t in (g, weight))
        with torch.no_grad():
            seconds = {m: _time(lambda m=m: transpose_forward(g, weight, padding, dilation, m)) for m in METHODS}
        fastest = min(seconds, key=seconds.get)
        # another method must beat ATen's by MARGIN: its backward is two ATen calls (conv2d and the weight
        # gradient) where ATen's own double backward makes one
        method = _CHOSEN[key] = fastest if seconds[fastest] * MARGIN < seconds["aten"] else "aten"
        log.debug("conv_transpose2d %s: %s (%s)", key, method,
                  ", ".join(f"{m} {s * 1e3:.2f} ms" for m, s in seconds.items()))
    return method


def weight_gradient(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding, dilation) -> torch.Tensor:
    """d<grad_y, conv2d(x, weight)>/d weight [COUT, CIN, KH, KW], ATen's kernel (differentiable in grad_y
    and x through ATen's own double backward)."""
    return torch.ops.aten.convolution_backward(grad_y, x, weight, None, (1, 1), padding, dilation, False, (0, 0), 1,
                                               (False, True, False))[1]


def _asked_for(ctx, index: int) -> bool:
    """Whether the running backward uses the gradient of input ``index``: ``needs_input_grad`` says only
    that it requires grad; where it is not a leaf, the engine says whether its node runs (in the vjp mode's
    first backward, autograd.grad(logits, x), the weights' gradients are not asked for, and ATen's own
    convolution node skips them likewise). A leaf's is always formed (the engine cannot be asked about a
    leaf inside autograd.grad)."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    if node is None or not engine_queries.AVAILABLE or type(node).__name__ == "AccumulateGrad":
        return node is not None
    return torch._C._will_engine_execute_node(node)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation = padding, dilation
        return F.conv2d(x, weight, bias, 1, padding, dilation)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = conv_transpose2d(grad_y, weight, ctx.padding, ctx.dilation) if _asked_for(ctx, 0) else None
        grad_w = weight_gradient(grad_y, x, weight, ctx.padding, ctx.dilation) if _asked_for(ctx, 1) else None
        grad_b = grad_y.sum((0, 2, 3)) if _asked_for(ctx, 2) else None
        return grad_x, grad_w, grad_b, None, None


class _Transpose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, weight, padding, dilation, method):
        ctx.save_for_backward(g, weight)
        ctx.padding, ctx.dilation = padding, dilation
        return transpose_forward(g, weight, padding, dilation, method)

    @staticmethod
    def backward(ctx, grad_out):
        g, weight = ctx.saved_tensors
        # <grad_out, conv_transpose2d(g, w)> = <conv2d(grad_out, w), g>: both gradients in conv2d's terms
        grad_g = conv2d(grad_out, weight, None, ctx.padding, ctx.dilation) if _asked_for(ctx, 0) else None
        grad_w = weight_gradient(g, grad_out, weight, ctx.padding, ctx.dilation) if _asked_for(ctx, 1) else None
        return grad_g, grad_w, None, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, dilation) -> torch.Tensor:
    """F.conv2d(x, weight, bias, 1, padding, dilation), x's gradient by ``conv_transpose2d``."""
    if torch.compiler.is_compiling():  # ATen's ops, which inductor knows (see conv_transpose2d)
        return F.conv2d(x, weight, bias, 1, padding, dilation)
    return _Conv2d.apply(x, weight, bias, _pair(padding), _pair(dilation))


def conv_transpose2d(g: torch.Tensor, weight: torch.Tensor, padding, dilation) -> torch.Tensor:
    """x's gradient of conv2d(x, weight) for y's gradient g (F.conv_transpose2d with stride 1)."""
    padding, dilation = _pair(padding), _pair(dilation)
    if torch.compiler.is_compiling() or torch._C._functorch.is_legacy_batchedtensor(g):
        # ATen's op (differentiable by ATen's own rules): under torch.compile (the timed choice and the
        # engine queries of the Functions do not trace; inductor failed on ResNet-8's compiled vjp step), and
        # inside autograd.grad(..., is_grads_batched=True), where a Function applied loses its graph
        return transpose_forward(g, weight, padding, dilation, "aten")
    method = transpose_method(g, weight, padding, dilation)
    if method == "aten":  # ATen's op and its own double backward
        return transpose_forward(g, weight, padding, dilation, "aten")
    return _Transpose.apply(g, weight, padding, dilation, method)
