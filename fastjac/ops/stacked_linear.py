"""Stacked Linear over M members with the stream epilogue fused: one batched product for all members
and all streams (primal + tangent rows), bias on the primal rows, ReLU mask from the primal rows.

Shapes (R = S*B rows: stream s occupies rows [s*B, (s+1)*B); stream 0 is the primal batch):
    x      [M, R, IN]  per-member rows, or [R, IN] rows shared by every member (e.g. the input batch)
    weight [M, OUT, IN]
    bias   [M, OUT] or None
    out    [M, R, OUT]
    mask   [M, B*OUT] bool (primal pre-activation > 0), or None when relu is False

Launchers (every backend implements exactly these signatures):
    stacked_linear_forward(x, weight, bias, streams, relu) -> (out, mask)
    stacked_linear_backward(grad_out, x, weight, mask, streams, has_bias, needs_x_grad)
        -> (grad_x like x or None, grad_weight [M,OUT,IN], grad_bias [M,OUT] or None)
"""
from __future__ import annotations

import torch

from fastjac.ops import stream_epilogue as epi


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, streams: int) -> None:
    if weight.dim() != 3:
        raise ValueError(f"stacked_linear: weight must be [M, OUT, IN], got {tuple(weight.shape)}")
    m, _, fan_in = weight.shape
    if x.dim() not in (2, 3) or x.shape[-1] != fan_in or (x.dim() == 3 and x.shape[0] != m):
        raise ValueError(f"stacked_linear: x must be [R, {fan_in}] or [{m}, R, {fan_in}], got {tuple(x.shape)}")
    if x.shape[-2] % streams != 0:
        raise ValueError(f"stacked_linear: {x.shape[-2]} rows do not split into {streams} streams")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError("stacked_linear: x, weight and bias must share one dtype")


def stacked_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, R, IN] or shared [R, IN] times weight_m^T (+ bias_m) -> contiguous [M, R, OUT], in ATen ops
    (differentiable): addmm/baddbmm fuse the bias into the product."""
    m, out_features, fan_in = weight.shape
    if x.dim() == 2:  # one GEMM for every member: [R, IN] x [IN, M*OUT]
        flat = weight.reshape(m * out_features, fan_in).t()
        y = torch.mm(x, flat) if bias is None else torch.addmm(bias.reshape(-1), x, flat)
        return y.view(x.shape[0], m, out_features).transpose(0, 1).contiguous()
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def stacked_linear_forward(x, weight, bias, streams: int, relu: bool):
    _check(x, weight, bias, streams)
    y = stacked_product(x, weight)
    m, rows, out_features = y.shape
    out, mask = epi.stream_epilogue_forward(y.view(m, streams, -1), bias, 1, relu)
    return out.view(m, rows, out_features), mask


def stacked_linear_backward(grad_out, x, weight, mask, streams: int, has_bias: bool, needs_x_grad: bool):
    m, rows, out_features = grad_out.shape
    grad_y, grad_bias = epi.stream_epilogue_backward(grad_out.view(m, streams, -1), mask, out_features, 1, has_bias)
    grad_y = grad_y.view(m, rows, out_features)
    if x.dim() == 2:
        grad_weight = torch.matmul(grad_y.transpose(1, 2), x)  # [M, OUT, R] @ [R, IN]
        grad_x = torch.einsum("mro,moi->ri", grad_y, weight) if needs_x_grad else None
    else:
        grad_weight = torch.bmm(grad_y.transpose(1, 2), x)
        grad_x = torch.bmm(grad_y, weight) if needs_x_grad else None
    return grad_x, grad_weight, grad_bias


class StackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, streams, relu, launchers):
        forward_launcher, ctx.backward_launcher = launchers
        x, weight = x.contiguous(), weight.contiguous()
        out, mask = forward_launcher(x, weight, None if bias is None else bias.contiguous(), streams, relu)
        ctx.save_for_backward(x, weight, mask if mask is not None else torch.empty(0, dtype=torch.bool))
        ctx.has_mask, ctx.has_bias, ctx.streams = mask is not None, bias is not None, streams
        if mask is not None:
            ctx.mark_non_differentiable(mask)
        return out, mask

    @staticmethod
    def backward(ctx, grad_out, _grad_mask):
        x, weight, mask = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = ctx.backward_launcher(
            grad_out.contiguous(), x, weight, mask if ctx.has_mask else None,
            ctx.streams, ctx.has_bias, ctx.needs_input_grad[0],
        )
        return grad_x, grad_weight, grad_bias, None, None, None


def stacked_linear_plain(x, weight, bias, relu: bool) -> torch.Tensor:
    """The primal rows alone, no mask kept: ATen's addmm/baddbmm fuse the bias into the product and
    relu's autograd keeps its own output, exactly like a loop of nn.Linear, batched. [M, R, OUT]."""
    y = stacked_product(x, weight, bias)
    return torch.relu(y) if relu else y


def stacked_linear(x, weight, bias, streams: int, relu: bool, backend, need_mask: bool = True):
    """Differentiable stacked Linear + stream epilogue with ``backend``'s launchers (a
    ``fastjac.backends.Backend``). Returns (out [M,R,OUT], mask).

    Without tangent streams and without a caller for the mask (``need_mask=False``: inference, a plain
    training step, an attack) a backend without epilogue kernels of its own for plain passes runs
    ``stacked_linear_plain``: nothing is left to fuse that ATen does not already fuse. With frozen
    parameters (weight without grad) the product runs as a plain ATen matmul, whose autograd computes the
    input gradient only: the fused backward would also form the weight gradient nobody asked for.
    """
    _check(x, weight, bias, streams)
    if streams == 1 and not need_mask and not backend.own_plain_epilogue:
        return stacked_linear_plain(x, weight, bias, relu), None
    if not weight.requires_grad and (bias is None or not bias.requires_grad):
        y = stacked_product(x, weight)
        m, rows, out_features = y.shape
        out, mask = epi.stream_epilogue(y.view(m, streams, -1), bias, 1, relu, backend.stream_epilogue)
        return out.view(m, rows, out_features), mask
    return StackedLinear.apply(x, weight, bias, streams, relu, backend.stacked_linear)
