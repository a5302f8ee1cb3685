"""Triton kernels of the standalone stream epilogue (semantics and shapes: fastjac/ops/stream_epilogue.py).

Used after ops without a fused epilogue (Conv2d). ``y`` is viewed as [O, S, I]:

``_epilogue_fwd_kernel``  a program per (block of BLOCK elements i, o): loads the primal element y[o, 0, i]
    once, adds bias[o, (i // rep) % NB], forms the mask, then walks the S-1 tangent streams multiplying
    by it. Results are bit-identical to the torch launcher (same elementwise operations).
``_epilogue_grad_kernel`` grad_y = grad_out * mask[o, i] for every stream (only launched with a mask:
    without one grad_y is grad_out itself, as in the torch launcher).
``_bias_grad_kernel``     grad_bias[o, nb] = sum of the stream-0 grad_y over the I/NB elements i with
    (i // rep) % NB == nb: a program per (block of BLOCK_NB bias entries, o, chunk of those elements),
    deterministic (no atomics: the chunks' partial sums [splits, O, NB] are added by the launcher),
    accumulated in float32 (float64 for float64). A convolution has few bias entries (O = 1, NB = M*C:
    one or two blocks) and many elements each (B*H*W), so its reduction is split to fill the GPU.

Launchers take tensors already validated by fastjac/ops/stream_epilogue.py. Sizes that change with the
batch enter the autotune keys as powers of two (``_common.bucket``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import ELEMENTWISE_CONFIGS, acc_dtype, bucket, configs, launch_device, reduction_splits


@triton.autotune(configs=configs(**ELEMENTWISE_CONFIGS), key=["S", "I_KEY", "HAS_BIAS", "RELU"])
@triton.jit(do_not_specialize=["I_KEY"])
def _epilogue_fwd_kernel(
    y_ptr, bias_ptr, out_ptr, mask_ptr, S, I, NB, REP, I_KEY,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    o = tl.program_id(1).to(tl.int64)
    ok = i < I
    base = o * S * I
    primal = tl.load(y_ptr + base + i, mask=ok, other=0.0)
    if HAS_BIAS:
        primal = primal + tl.load(bias_ptr + o * NB + (i // REP) % NB, mask=ok, other=0.0)
    if RELU:
        keep = primal > 0
        primal = primal * keep.to(primal.dtype)
        tl.store(mask_ptr + o * I + i, keep.to(tl.int8), mask=ok)
    tl.store(out_ptr + base + i, primal, mask=ok)
    for s in range(1, S):
        offset = base + tl.cast(s, tl.int64) * I + i
        tangent = tl.load(y_ptr + offset, mask=ok, other=0.0)
        if RELU:
            tangent = tangent * keep.to(tangent.dtype)
        tl.store(out_ptr + offset, tangent, mask=ok)


@triton.autotune(configs=configs(**ELEMENTWISE_CONFIGS), key=["S", "I_KEY"])
@triton.jit(do_not_specialize=["I_KEY"])
def _epilogue_grad_kernel(gout_ptr, mask_ptr, gy_ptr, S, I, I_KEY, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    o = tl.program_id(1).to(tl.int64)
    ok = i < I
    keep = tl.load(mask_ptr + o * I + i, mask=ok, other=0) != 0
    for s in range(0, S):
        offset = o * S * I + tl.cast(s, tl.int64) * I + i
        g = tl.load(gout_ptr + offset, mask=ok, other=0.0)
        tl.store(gy_ptr + offset, g * keep.to(g.dtype), mask=ok)


BIAS_GRAD_CONFIGS = [({"BLOCK_NB": 32, "BLOCK_T": 64}, 4, 1), ({"BLOCK_NB": 64, "BLOCK_T": 128}, 8, 1),
                     ({"BLOCK_NB": 16, "BLOCK_T": 256}, 4, 1)]


@triton.autotune(
    configs=configs(gpu=BIAS_GRAD_CONFIGS, interpreted={"BLOCK_NB": 16, "BLOCK_T": 16}),
    key=["CHUNK_KEY", "NB", "REP", "HAS_MASK"],
)
@triton.jit(do_not_specialize=["CHUNK_KEY"])
def _bias_grad_kernel(
    gout_ptr, mask_ptr, gb_ptr, O, S, I, NB, REP, CHUNK, CHUNK_KEY,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_T: tl.constexpr,
):
    nb = tl.program_id(0) * BLOCK_NB + tl.arange(0, BLOCK_NB)
    o = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    nb_ok = nb < NB
    per_entry = I // NB  # elements per bias entry: (I / (NB*REP)) repeats times REP
    t_hi = tl.minimum((split + 1) * CHUNK, per_entry)
    acc = tl.zeros((BLOCK_NB,), dtype=ACC)
    for t0 in range(split * CHUNK, t_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        # element t of entry nb: repeat j = t // REP, position r = t % REP -> i = (j*NB + nb)*REP + r
        i = ((t // REP).to(tl.int64)[None, :] * NB + nb[:, None]) * REP + (t % REP)[None, :]
        ok = nb_ok[:, None] & (t < t_hi)[None, :]
        g = tl.load(gout_ptr + o * S * I + i, mask=ok, other=0.0)
        if HAS_MASK:
            g = g * (tl.load(mask_ptr + o * I + i, mask=ok, other=0) != 0).to(g.dtype)
        acc += tl.sum(g.to(ACC), axis=1)
    tl.store(gb_ptr + (split.to(tl.int64) * O + o) * NB + nb, acc.to(gb_ptr.dtype.element_ty), mask=nb_ok)


# Fewest elements a chunk of a split bias reduction keeps: a few of the largest BLOCK_T tiles, so the
# partial sums ([splits, O, NB]) stay small beside the gradient they reduce.
MIN_CHUNK = 1024


def stream_epilogue_forward(y, bias, rep: int, relu: bool):
    """Same signature and results as fastjac.ops.stream_epilogue.stream_epilogue_forward (arguments checked
    there)."""
    y = y.contiguous()
    bias = None if bias is None else bias.contiguous()
    o, s, length = y.shape
    out = torch.empty_like(y)
    mask = torch.empty((o, length), device=y.device, dtype=torch.int8) if relu else None
    if y.numel() > 0:
        grid = lambda meta: (triton.cdiv(length, meta["BLOCK"]), o)
        with launch_device(y, bias):
            _epilogue_fwd_kernel[grid](
                y, y if bias is None else bias, out, out if mask is None else mask,
                s, length, 1 if bias is None else bias.shape[1], rep, bucket(length),
                HAS_BIAS=bias is not None, RELU=relu,
            )
    return out, None if mask is None else mask.view(torch.bool)


def stream_epilogue_backward(grad_out, mask, nb: int, rep: int, has_bias: bool):
    """Same signature and results as fastjac.ops.stream_epilogue.stream_epilogue_backward."""
    grad_out = grad_out.contiguous()
    o, s, length = grad_out.shape
    mask_bytes = None if mask is None else mask.contiguous().view(torch.int8)
    if mask_bytes is None:
        grad_y = grad_out
    else:
        grad_y = torch.empty_like(grad_out)
        if grad_out.numel() > 0:
            grid = lambda meta: (triton.cdiv(length, meta["BLOCK"]), o)
            with launch_device(grad_out, mask_bytes):
                _epilogue_grad_kernel[grid](grad_out, mask_bytes, grad_y, s, length, bucket(length))
    grad_bias = None
    if has_bias:
        grad_bias = _bias_grad(grad_out, mask_bytes, nb, rep)
    return grad_y, grad_bias


def _bias_grad(grad_out, mask_bytes, nb: int, rep: int):
    """grad_bias [O, nb]: the stream-0 sums, split into chunks of each entry's elements when the
    (block of entries, o) programs alone (counted at BLOCK_NB = 32) cannot fill the device."""
    o, s, length = grad_out.shape
    if o * nb == 0:
        return torch.empty((o, nb), device=grad_out.device, dtype=grad_out.dtype)
    per_entry = length // nb
    splits = reduction_splits(grad_out.device, o * triton.cdiv(nb, 32), per_entry, MIN_CHUNK)
    chunk = max(triton.cdiv(per_entry, splits), 1)
    splits = max(triton.cdiv(per_entry, chunk), 1)  # no empty chunk
    partial = torch.empty((splits, o, nb), device=grad_out.device, dtype=grad_out.dtype)
    grid = lambda meta: (triton.cdiv(nb, meta["BLOCK_NB"]), o, splits)
    with launch_device(grad_out, mask_bytes):
        _bias_grad_kernel[grid](
            grad_out, grad_out if mask_bytes is None else mask_bytes, partial, o, s, length, nb, rep, chunk,
            bucket(chunk), HAS_MASK=mask_bytes is not None, ACC=acc_dtype(grad_out.dtype),
        )
    return partial[0] if splits == 1 else partial.sum(0)
