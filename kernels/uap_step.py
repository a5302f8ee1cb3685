"""Triton kernels of the SGD-UAP step (semantics and shapes: fastjac/ops/uap_step.py).

Elementwise ops over x viewed as [B, D] and delta as [K, D]:
``_perturb_fwd_kernel``   out[k, b] = clamp(x[b] + delta[k], 0, 1), a program per (row k*B + b, D block).
``_perturb_bwd_kernel``   grad_delta[k] = sum_b grad[k, b] * (0 <= x[b] + delta[k] <= 1), a program per
    (D block, k) walking the batch (float32 accumulation, float64 for float64).
``_uap_step_kernel``      clamp(delta + step_k * sign(grad), -eps_k, eps_k) with torch's exact operations:
    sign is (g > 0) - (g < 0) (0 for NaN, as torch.sign on the CPU), step_k * sign is exact, so one
    rounding of the add (fused or not) gives bit-identical float32 results; the clamp propagates NaN.

The first-layer prologue of an attack, ``perturbed_linear_forward/backward``, reuses the stacked Linear
GEMM kernels of kernels/stacked_linear.py in their PERTURB mode: the forward forms clamp(x + delta_k, 0, 1)
while loading x tiles and the backward reduces the input gradient over the batch through the clamp's
inclusive mask, so the [K*B, IN] perturbed batch and its gradient never exist in memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastjac.kernels.stacked_linear import acc_dtype, check_device, configs, linear_forward, linear_grad_input

_ELEMENTWISE = dict(gpu=[({"BLOCK": 512}, 4, 1), ({"BLOCK": 1024}, 4, 1), ({"BLOCK": 2048}, 8, 1)],
                    interpreted={"BLOCK": 64})


@triton.jit
def _clamp01(v):
    return tl.minimum(tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.autotune(configs=configs(**_ELEMENTWISE), key=["D"])
@triton.jit
def _perturb_fwd_kernel(x_ptr, delta_ptr, out_ptr, B, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # k * B + b
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < D
    v = tl.load(x_ptr + (row % B) * D + i, mask=ok, other=0.0) + tl.load(delta_ptr + (row // B) * D + i, mask=ok, other=0.0)
    tl.store(out_ptr + row * D + i, _clamp01(v), mask=ok)


@triton.autotune(configs=configs(**_ELEMENTWISE), key=["B", "D"])
@triton.jit
def _perturb_bwd_kernel(grad_ptr, x_ptr, delta_ptr, gd_ptr, B, D, ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k = tl.program_id(1).to(tl.int64)
    ok = i < D
    d = tl.load(delta_ptr + k * D + i, mask=ok, other=0.0)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for b in range(0, B):
        row = tl.cast(b, tl.int64)
        shifted = tl.load(x_ptr + row * D + i, mask=ok, other=0.0) + d
        g = tl.load(grad_ptr + (k * B + row) * D + i, mask=ok, other=0.0)
        acc += (g * ((shifted >= 0) & (shifted <= 1)).to(g.dtype)).to(ACC)
    tl.store(gd_ptr + k * D + i, acc.to(gd_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=configs(**_ELEMENTWISE), key=["D"])
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
    if x.shape[1:] != delta.shape[1:]:
        raise ValueError(f"uap_step: x {tuple(x.shape)} and delta {tuple(delta.shape)} differ in the input shape")
    if x.dtype != delta.dtype:
        raise TypeError(f"uap_step: x dtype {x.dtype} differs from delta dtype {delta.dtype}")
    check_device(x, delta)
    return x.contiguous(), delta.contiguous(), x.shape[0], delta.shape[0], x[0].numel() if x.shape[0] else delta[0].numel()


def perturb_forward(x, delta):
    """clamp(x + delta_k, 0, 1): [K, B, *in] (as fastjac.ops.uap_step.perturb_forward)."""
    x, delta, batch, k, d = _flat(x, delta)
    out = torch.empty((k, batch, *x.shape[1:]), device=x.device, dtype=x.dtype)
    if out.numel() > 0:
        _perturb_fwd_kernel[lambda meta: (k * batch, triton.cdiv(d, meta["BLOCK"]))](x, delta, out, batch, d)
    return out


def perturb_backward(grad, x, delta):
    """grad_delta [K, *in] through the clamp (bounds inclusive, as fastjac.ops.uap_step.perturb_backward)."""
    x, delta, batch, k, d = _flat(x, delta)
    check_device(grad)
    grad = grad.contiguous()
    grad_delta = torch.empty_like(delta)
    if grad_delta.numel() > 0:
        _perturb_bwd_kernel[lambda meta: (triton.cdiv(d, meta["BLOCK"]), k)](
            grad, x, delta, grad_delta, batch, d, ACC=acc_dtype(grad.dtype))
    return grad_delta


def uap_step(delta, grad, step, eps):
    """clamp(delta + step_k * sign(grad), -eps_k, eps_k) (as fastjac.ops.uap_step.uap_step)."""
    check_device(delta, grad)
    if grad.shape != delta.shape:
        raise ValueError(f"uap_step: grad {tuple(grad.shape)} differs from delta {tuple(delta.shape)}")
    k = delta.shape[0]
    if grad.dtype != delta.dtype:
        raise TypeError(f"uap_step: grad dtype {grad.dtype} differs from delta dtype {delta.dtype}")
    step = torch.as_tensor(step, device=delta.device).to(delta.dtype).reshape(-1).expand(k).contiguous()
    eps = torch.as_tensor(eps, device=delta.device).to(delta.dtype).reshape(-1).expand(k).contiguous()
    delta, grad = delta.contiguous(), grad.contiguous()
    out = torch.empty_like(delta)
    d = delta[0].numel() if k else 0
    if out.numel() > 0:
        _uap_step_kernel[lambda meta: (triton.cdiv(d, meta["BLOCK"]), k)](delta, grad, step, eps, out, d)
    return out


def perturbed_linear_forward(x, delta, weight, bias, relu: bool):
    """(out [M, K*B, OUT], mask [M, K*B*OUT] | None) of relu?(clamp(x + delta_k, 0, 1) @ W_m^T + b_m)."""
    from fastjac.ops.uap_step import _check_perturbed_linear

    _check_perturbed_linear(x, delta, weight, bias)
    check_device(x, delta, weight, bias)
    batch = x.shape[0]
    x, delta = x.reshape(batch, -1).contiguous(), delta.reshape(delta.shape[0], -1).contiguous()
    return linear_forward(x, weight.contiguous(), None if bias is None else bias.contiguous(), 1, relu,
                          delta=delta, batch=batch)


def perturbed_linear_backward(grad_out, x, delta, weight, mask):
    """grad_delta (delta's shape): the batch-sum of (grad_out*mask) @ W_m summed over m, through the clamp."""
    check_device(grad_out, x, delta, weight)
    batch, shape = x.shape[0], delta.shape
    x, delta = x.reshape(batch, -1).contiguous(), delta.reshape(shape[0], -1).contiguous()
    mask = None if mask is None else mask.contiguous()
    grad = linear_grad_input(grad_out.contiguous(), weight.contiguous(), mask, grad_out.shape[1], True,
                             x=x, delta=delta)
    return grad.view(shape)
