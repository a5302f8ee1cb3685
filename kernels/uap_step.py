"""Triton kernels of the SGD-UAP step (semantics and shapes: fastjac/ops/uap_step.py).

Elementwise ops over x viewed as [B, D] and delta as [K, D]:
``_perturb_fwd_kernel``   out[k, b] = clamp(x[b] + delta[k], 0, 1), a program per (row k*B + b, D block).
``_perturb_bwd_kernel``   grad_delta[k] = sum_b grad[k, b] * (0 <= x[b] + delta[k] <= 1), a program per
    (D block, k, chunk of the batch) walking its chunk (float32 accumulation, float64 for float64); with
    few programs (D = 784, K = 1: one or two blocks) the batch is split into chunks whose partial sums
    [splits, K, D] the launcher adds (deterministic, no atomics).
``_uap_step_kernel``      clamp(delta + step_k * sign(grad), -eps_k, eps_k) with torch's exact operations:
    sign is (g > 0) - (g < 0) (0 for NaN, as torch.sign on the CPU), step_k * sign is exact, so one
    rounding of the add (fused or not) gives bit-identical float32 results; the clamp propagates NaN.

The first-layer prologue of an attack, ``perturbed_linear_forward/backward``, reuses the stacked Linear
GEMM kernels of kernels/stacked_linear.py in their PERTURB mode: the forward forms clamp(x + delta_k, 0, 1)
while loading x tiles and the backward reduces the input gradient over the batch through the clamp's
inclusive mask, so the [K*B, IN] perturbed batch and its gradient never exist in memory.

Launchers take tensors already validated by fastjac/ops/uap_step.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import ELEMENTWISE_CONFIGS, acc_dtype, bucket, configs, launch_device, reduction_splits
from .stacked_linear import linear_forward, linear_grad_input, premask_float64


@triton.jit
def _clamp01(v):
    return tl.minimum(tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.autotune(configs=configs(**ELEMENTWISE_CONFIGS), key=["D"])
@triton.jit
def _perturb_fwd_kernel(x_ptr, delta_ptr, out_ptr, B, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # k * B + b
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < D
    v = tl.load(x_ptr + (row % B) * D + i, mask=ok, other=0.0) + tl.load(delta_ptr + (row // B) * D + i, mask=ok, other=0.0)
    tl.store(out_ptr + row * D + i, _clamp01(v), mask=ok)


@triton.autotune(configs=configs(**ELEMENTWISE_CONFIGS), key=["CHUNK_KEY", "D"])
@triton.jit(do_not_specialize=["CHUNK_KEY"])
def _perturb_bwd_kernel(grad_ptr, x_ptr, delta_ptr, gd_ptr, B, D, K, CHUNK, CHUNK_KEY, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    ok = i < D
    d = tl.load(delta_ptr + k * D + i, mask=ok, other=0.0)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for b in range(split * CHUNK, tl.minimum((split + 1) * CHUNK, B)):
        row = tl.cast(b, tl.int64)
        shifted = tl.load(x_ptr + row * D + i, mask=ok, other=0.0) + d
        g = tl.load(grad_ptr + (k * B + row) * D + i, mask=ok, other=0.0)
        acc += (g * ((shifted >= 0) & (shifted <= 1)).to(g.dtype)).to(ACC)
    tl.store(gd_ptr + (split.to(tl.int64) * K + k) * D + i, acc.to(gd_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=configs(**ELEMENTWISE_CONFIGS), key=["D"])
@triton.jit
def _uap_step_kernel(delta_ptr, grad_ptr, step_ptr, eps_ptr, out_ptr, D, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k = tl.program_id(1).to(tl.int64)
    ok = i < D
    d = tl.load(delta_ptr + k * D + i, mask=ok, other=0.0)
    g = tl.load(grad_ptr + k * D + i, mask=ok, other=0.0)
    step = tl.load(step_ptr + k)
    eps = tl.load(eps_ptr + k)
    sign = (g > 0).to(d.dtype) - (g < 0).to(d.dtype)
    v = d + step * sign
    v = tl.minimum(tl.maximum(v, -eps, propagate_nan=tl.PropagateNan.ALL), eps, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + k * D + i, v, mask=ok)


def _flat(x, delta):
    """x [B, *in], delta [K, *in] -> (x, delta contiguous, B, K, D = prod(in))."""
    return x.contiguous(), delta.contiguous(), x.shape[0], delta.shape[0], math.prod(delta.shape[1:])


# Fewest samples a chunk of a split perturbation backward walks: fewer would make the partial sums
# ([splits, K, D], each as large as the result) a traffic of their own.
MIN_CHUNK_SAMPLES = 16


def perturb_forward(x, delta):
    """clamp(x + delta_k, 0, 1): [K, B, *in] (as fastjac.ops.uap_step.perturb_forward)."""
    x, delta, batch, k, d = _flat(x, delta)
    out = torch.empty((k, batch, *x.shape[1:]), device=x.device, dtype=x.dtype)
    if out.numel() > 0:
        with launch_device(x, delta):
            _perturb_fwd_kernel[lambda meta: (k * batch, triton.cdiv(d, meta["BLOCK"]))](x, delta, out, batch, d)
    return out


def perturb_backward(grad, x, delta):
    """grad_delta [K, *in] through the clamp (bounds inclusive, as fastjac.ops.uap_step.perturb_backward).
    The batch is split into chunks when the (D block, k) programs (counted at BLOCK = 512, the smallest
    GPU config's) cannot fill the device."""
    x, delta, batch, k, d = _flat(x, delta)
    grad = grad.contiguous()
    if delta.numel() == 0:
        return torch.empty_like(delta)
    splits = reduction_splits(delta.device, k * triton.cdiv(d, 512), batch, MIN_CHUNK_SAMPLES)
    chunk = max(triton.cdiv(batch, splits), 1)
    splits = max(triton.cdiv(batch, chunk), 1)  # no empty chunk
    partial = torch.empty((splits, *delta.shape), device=delta.device, dtype=delta.dtype)
    with launch_device(grad, x, delta):
        _perturb_bwd_kernel[lambda meta: (triton.cdiv(d, meta["BLOCK"]), k, splits)](
            grad, x, delta, partial, batch, d, k, chunk, bucket(chunk), ACC=acc_dtype(grad.dtype))
    return partial[0] if splits == 1 else partial.sum(0)


def uap_step(delta, grad, step, eps):
    """clamp(delta + step_k * sign(grad), -eps_k, eps_k) (as fastjac.ops.uap_step.uap_step)."""
    k = delta.shape[0]
    step = torch.as_tensor(step, device=delta.device).to(delta.dtype).reshape(-1).expand(k).contiguous()
    eps = torch.as_tensor(eps, device=delta.device).to(delta.dtype).reshape(-1).expand(k).contiguous()
    delta, grad = delta.contiguous(), grad.contiguous()
    out = torch.empty_like(delta)
    d = math.prod(delta.shape[1:])
    if out.numel() > 0:
        with launch_device(delta, grad, step, eps):
            _uap_step_kernel[lambda meta: (triton.cdiv(d, meta["BLOCK"]), k)](delta, grad, step, eps, out, d)
    return out


def perturbed_linear_forward(x, delta, weight, bias, relu: bool):
    """(out [M, K*B, OUT], mask [M, K*B*OUT] | None) of relu?(clamp(x + delta_k, 0, 1) @ W_m^T + b_m)."""
    batch = x.shape[0]
    x, delta = x.reshape(batch, -1).contiguous(), delta.reshape(delta.shape[0], -1).contiguous()
    return linear_forward(x, weight.contiguous(), None if bias is None else bias.contiguous(), 1, relu,
                          delta=delta, batch=batch)


def perturbed_linear_backward(grad_out, x, delta, weight, mask):
    """grad_delta (delta's shape): the batch-sum of (grad_out*mask) @ W_m summed over m, through the clamp."""
    batch, shape = x.shape[0], delta.shape
    x, delta = x.reshape(batch, -1).contiguous(), delta.reshape(shape[0], -1).contiguous()
    mask = None if mask is None else mask.contiguous()
    grad_out, mask = premask_float64(grad_out.contiguous(), mask, grad_out.shape[1])
    grad = linear_grad_input(grad_out, weight.contiguous(), mask, grad_out.shape[1], True, x=x, delta=delta)
    return grad.view(shape)
