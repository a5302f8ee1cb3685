"""Triton kernels of the stacked Linear with the stream epilogue fused (semantics: fastjac/ops/stacked_linear.py).

Three member-grouped GEMM kernels, each specialised by ``tl.constexpr`` switches instead of copies:

``_linear_fwd_kernel``   out[m] = x[m] @ weight[m]^T with the stream epilogue in its epilogue. A program
    owns (member, block of BLOCK_B primal rows b, stream group, block of BLOCK_N outputs). Its row tile
    has SLOTS slots of BLOCK_B rows: slot 0 holds the primal rows b of stream 0, slots 1.. hold the rows
    b of streams 1 + g*(SLOTS-1) + (slot-1). Every weight tile is loaded once and feeds the primal and the
    tangent rows together, and the ReLU mask of row r (the primal row r % B) is in the same tile, so a
    tile never needs another program's result. With SLOTS = next_pow2(S) there is one group and the
    primal is computed once; when SLOTS is capped (``MAX_SLOTS``) groups g > 0 recompute the primal tile
    (1/(SLOTS-1) extra work on it) and only group 0 stores it and the mask.
    PERTURB (used by kernels/uap_step.py): the rows are clamp(x[r % XB] + delta[r // XB], 0, 1), formed
    in registers while loading the x tile (the perturbed batch is never written to memory).
``_linear_grad_input_kernel``  grad_x = (grad_out * mask) @ weight, summed over members when x is shared;
    the mask multiply is fused into the grad_out loads. PERTURB: instead of storing grad_x, the rows of
    perturbation k are masked by torch.clamp's inclusive-bounds derivative and summed over the batch into
    grad_delta[k] (again never materialising the [K*B, IN] gradient): a program per (k, chunk of the
    batch), the chunks' partial sums added by the launcher.
``_linear_grad_weight_kernel`` grad_W = (grad_out * mask)^T @ x and, fused, grad_bias = the sum of the
    stream-0 rows of grad_out * mask.

Accumulation is float32 (float64 for float64 inputs); ``tl.dot`` takes the inputs' dtype, in the precision
of ``_common.dot_precision`` (IEEE float32 unless torch's CUDA matmuls allow TF32; the policy is there).
The mask is stored as one byte per element and handed out as a ``torch.bool`` view ``[M, B*OUT]``.
Block sizes are autotuned on a GPU, keyed by the layer's widths, the constexpr flags, the dtypes and the
row count rounded up to a power of two (``_common.bucket``); configs are pruned to the shared-memory
budget of sm_80 and to ``_common.MAX_TILE_REGISTERS`` (accumulator and operand tiles per thread), so
float64 gets smaller tiles (and at most ``MAX_SLOTS_FLOAT64`` streams per tile). The grad-weight config
of 64 x 128 x 128 tiles was removed: 320 KB of shared memory in float64 (over sm_90's 227 KB) and
an estimated 128 registers per thread in float32. Under ``TRITON_INTERPRET=1`` one small config is used.
Launchers take tensors already validated by fastjac/ops/stacked_linear.py and fastjac/ops/uap_step.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, bucket, budget_pruner, configs, dot_precision, launch_device,
                      reduction_splits)

# Largest slot count (primal + tangent streams in one row tile). Beyond it, stream groups recompute
# the primal tile. Module-level so tests can lower it to exercise several groups. float64 tiles hold
# half as many rows in the same registers.
MAX_SLOTS = 8
MAX_SLOTS_FLOAT64 = 4


# ----------------------------------------------------------------------------------------------- forward

# Autotune pruning (``_common.budget_pruner``): the forward's accumulator is its [SLOTS * BLOCK_B, BLOCK_N]
# row tile, its dot operands the x and weight tiles.
prune_forward_configs = budget_pruner(
    tile_elements=lambda p: p["SLOTS"] * p["BLOCK_B"] * p["BLOCK_K"] + p["BLOCK_K"] * p["BLOCK_N"],
    acc_elements=lambda p: p["SLOTS"] * p["BLOCK_B"] * p["BLOCK_N"])


# GPU autotune configs: (block sizes, num_warps, num_stages).
FORWARD_CONFIGS = [
    ({"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
    ({"BLOCK_B": 32, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
    ({"BLOCK_B": 16, "BLOCK_N": 128, "BLOCK_K": 32}, 4, 3),
    ({"BLOCK_B": 32, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 3),
    ({"BLOCK_B": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 8, 2),
]


@triton.autotune(
    configs=configs(gpu=FORWARD_CONFIGS, interpreted={"BLOCK_B": 16, "BLOCK_N": 16, "BLOCK_K": 16}),
    key=["B_KEY", "OUT", "IN", "M", "SLOTS", "HAS_BIAS", "RELU", "PERTURB", "PRECISION"],
    prune_configs_by={"early_config_prune": prune_forward_configs},
)
@triton.jit(do_not_specialize=["B_KEY"])
def _linear_fwd_kernel(
    x_ptr, delta_ptr, w_ptr, bias_ptr, out_ptr, mask_ptr,
    B, S, M, OUT, IN, XB, stride_xm, B_KEY,
    SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, PERTURB: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    num_b_blocks = tl.cdiv(B, BLOCK_B)
    pid_b = tl.program_id(0) % num_b_blocks
    group = tl.program_id(0) // num_b_blocks
    pid_n = tl.program_id(1)
    member = tl.program_id(2).to(tl.int64)

    # Row tile: SLOTS slots of BLOCK_B rows; slot 0 = primal rows, slot j > 0 = a tangent stream.
    t = tl.arange(0, SLOTS * BLOCK_B)
    slot = t // BLOCK_B
    b = pid_b * BLOCK_B + t % BLOCK_B
    if SLOTS > 1:
        stream = tl.where(slot == 0, 0, 1 + group * (SLOTS - 1) + slot - 1)
    else:
        stream = slot
    row = (stream * B + b).to(tl.int64)
    row_ok = (b < B) & (stream < S)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < OUT
    kr = tl.arange(0, BLOCK_K)

    if PERTURB:  # row r = k*XB + b' reads x[b'] and delta[k]
        a_ptrs = x_ptr + (row % XB)[:, None] * IN
        d_ptrs = delta_ptr + (row // XB)[:, None] * IN
    else:
        a_ptrs = x_ptr + member * stride_xm + row[:, None] * IN
    w_ptrs = w_ptr + member * OUT * IN + n[None, :].to(tl.int64) * IN

    acc = tl.zeros((SLOTS * BLOCK_B, BLOCK_N), dtype=ACC)
    for k0 in range(0, IN, BLOCK_K):
        k = k0 + kr
        k_ok = k < IN
        a_ok = row_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptrs + k[None, :], mask=a_ok, other=0.0)
        if PERTURB:
            d = tl.load(d_ptrs + k[None, :], mask=a_ok, other=0.0)
            a = tl.minimum(tl.maximum(a + d, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                           propagate_nan=tl.PropagateNan.ALL)
        w = tl.load(w_ptrs + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC)

    # Epilogue: bias + mask from the primal slot, applied to every slot of the tile. Only group 0
    # stores the primal rows and the mask (primal_rows is B there, 0 in the other groups).
    primal_rows = tl.where(group == 0, B, 0)
    if SLOTS > 1:
        acc3 = tl.reshape(acc, (SLOTS, BLOCK_B, BLOCK_N))
        is_primal = (tl.arange(0, SLOTS) == 0)[:, None, None]
        pre = tl.sum(tl.where(is_primal, acc3, 0.0), axis=0)  # exact: adds zeros only
    else:
        pre = acc
    if HAS_BIAS:
        bias = tl.load(bias_ptr + member * OUT + n, mask=n_ok, other=0.0).to(ACC)
        pre = pre + bias[None, :]
    if RELU:
        keep = pre > 0
        pre = pre * keep.to(ACC)
        bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        m_ptrs = mask_ptr + member * B * OUT + bb[:, None].to(tl.int64) * OUT + n[None, :]
        tl.store(m_ptrs, keep.to(tl.int8), mask=(bb < primal_rows)[:, None] & n_ok[None, :])
    if SLOTS > 1:
        if RELU:
            tangent = acc3 * keep.to(ACC)[None, :, :]
        else:
            tangent = acc3
        res = tl.reshape(tl.where(is_primal, pre[None, :, :], tangent), (SLOTS * BLOCK_B, BLOCK_N))
    else:
        res = pre
    store_ok = row_ok & ((slot > 0) | (b < primal_rows))
    o_ptrs = out_ptr + member * S * B * OUT + row[:, None] * OUT + n[None, :]
    tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=store_ok[:, None] & n_ok[None, :])


def _slots(streams: int, dtype: torch.dtype) -> tuple[int, int]:
    """(SLOTS, groups) for ``streams`` streams of ``dtype``."""
    if streams == 1:
        return 1, 1
    cap = min(MAX_SLOTS, MAX_SLOTS_FLOAT64) if dtype == torch.float64 else MAX_SLOTS
    slots = min(triton.next_power_of_2(streams), max(2, cap))
    return slots, triton.cdiv(streams - 1, slots - 1)


def linear_forward(x, weight, bias, streams: int, relu: bool, delta=None, batch: int = 1):
    """Launch the forward kernel. ``delta`` given: PERTURB mode, x [batch, IN], rows = K*batch, streams 1."""
    m, out_features, fan_in = weight.shape
    if delta is not None:
        rows, stride_xm = delta.shape[0] * batch, 0
    else:
        rows, stride_xm = x.shape[-2], (0 if x.dim() == 2 else x.shape[-2] * fan_in)
    primal = rows // streams
    out = torch.empty((m, rows, out_features), device=weight.device, dtype=weight.dtype)
    mask = torch.empty((m, primal * out_features), device=weight.device, dtype=torch.int8) if relu else None
    if rows == 0 or out_features == 0 or m == 0:
        return out, None if mask is None else mask.view(torch.bool)
    slots, groups = _slots(streams, weight.dtype)
    grid = lambda meta: (triton.cdiv(primal, meta["BLOCK_B"]) * groups, triton.cdiv(out_features, meta["BLOCK_N"]), m)
    with launch_device(x, delta, weight, bias):
        _linear_fwd_kernel[grid](
            x, x if delta is None else delta, weight, weight if bias is None else bias, out,
            out if mask is None else mask,
            primal, streams, m, out_features, fan_in, batch, stride_xm, bucket(primal),
            SLOTS=slots, HAS_BIAS=bias is not None, RELU=relu, PERTURB=delta is not None,
            ACC=acc_dtype(weight.dtype), PRECISION=dot_precision(weight.dtype),
        )
    return out, None if mask is None else mask.view(torch.bool)


# ---------------------------------------------------------------------------------------------- backward

# grad-input: a [BLOCK_R, BLOCK_K] accumulator from grad_out [BLOCK_R, BLOCK_N] and weight [BLOCK_N, BLOCK_K]
prune_grad_input_configs = budget_pruner(
    tile_elements=lambda p: p["BLOCK_R"] * p["BLOCK_N"] + p["BLOCK_N"] * p["BLOCK_K"],
    acc_elements=lambda p: p["BLOCK_R"] * p["BLOCK_K"])


GRAD_INPUT_CONFIGS = [
    ({"BLOCK_R": 32, "BLOCK_N": 32, "BLOCK_K": 64}, 4, 3),
    ({"BLOCK_R": 64, "BLOCK_N": 32, "BLOCK_K": 64}, 4, 3),
    ({"BLOCK_R": 64, "BLOCK_N": 64, "BLOCK_K": 128}, 8, 3),
    ({"BLOCK_R": 128, "BLOCK_N": 32, "BLOCK_K": 64}, 8, 3),
]


@triton.autotune(
    configs=configs(gpu=GRAD_INPUT_CONFIGS, interpreted={"BLOCK_R": 16, "BLOCK_N": 16, "BLOCK_K": 16}),
    key=["R_KEY", "OUT", "IN", "M", "HAS_MASK", "SHARED_X", "PERTURB", "PRECISION"],
    prune_configs_by={"early_config_prune": prune_grad_input_configs},
)
@triton.jit(do_not_specialize=["R_KEY"])
def _linear_grad_input_kernel(
    gout_ptr, mask_ptr, w_ptr, gx_ptr, x_ptr, delta_ptr,
    R, B, M, OUT, IN, XB, SPLITS, CHUNK, R_KEY,
    HAS_MASK: tl.constexpr, SHARED_X: tl.constexpr, PERTURB: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < IN
    pid_m = tl.program_id(2)
    if SHARED_X:  # x was read by every member: its gradient sums over them
        m_lo = 0
        m_hi = M
    else:
        m_lo = pid_m
        m_hi = pid_m + 1
    if PERTURB:  # program (perturbation p, chunk c): rows [c*CHUNK, (c+1)*CHUNK) of p's XB rows, reduced
        p = pid_r // SPLITS
        p_lo = p * XB
        r_lo = p_lo + (pid_r % SPLITS) * CHUNK
        r_hi = tl.minimum(r_lo + CHUNK, p_lo + XB)
    else:
        r_lo = pid_r * BLOCK_R
        r_hi = tl.minimum(r_lo + BLOCK_R, R)
    rr = tl.arange(0, BLOCK_R)
    nr = tl.arange(0, BLOCK_N)
    reduced = tl.zeros((BLOCK_K,), dtype=ACC)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows = (r0 + rr).to(tl.int64)
        r_ok = rows < r_hi
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC)
        for mi in range(m_lo, m_hi):
            member = tl.cast(mi, tl.int64)
            for n0 in range(0, OUT, BLOCK_N):
                n = n0 + nr
                g_ok = r_ok[:, None] & (n < OUT)[None, :]
                g = tl.load(gout_ptr + member * R * OUT + rows[:, None] * OUT + n[None, :], mask=g_ok, other=0.0)
                if HAS_MASK:  # row r uses the mask of its primal row r % B
                    keep = tl.load(mask_ptr + member * B * OUT + (rows % B)[:, None] * OUT + n[None, :],
                                   mask=g_ok, other=0)
                    g = g * (keep != 0).to(g.dtype)
                w = tl.load(w_ptr + member * OUT * IN + n[:, None].to(tl.int64) * IN + k[None, :],
                            mask=(n < OUT)[:, None] & k_ok[None, :], other=0.0)
                acc = tl.dot(g, w, acc, input_precision=PRECISION, out_dtype=ACC)
        if PERTURB:  # d clamp(x + delta)/d delta, bounds inclusive like torch.clamp's gradient
            v_ok = r_ok[:, None] & k_ok[None, :]
            xv = tl.load(x_ptr + (rows - p_lo)[:, None] * IN + k[None, :], mask=v_ok, other=0.0)
            dv = tl.load(delta_ptr + p.to(tl.int64) * IN + k, mask=k_ok, other=0.0)
            shifted = xv + dv[None, :]
            inside = (shifted >= 0) & (shifted <= 1) & v_ok
            reduced += tl.sum(acc * inside.to(ACC), axis=0)
        else:
            if SHARED_X:
                gx_base = gx_ptr
            else:
                gx_base = gx_ptr + pid_m.to(tl.int64) * R * IN
            tl.store(gx_base + rows[:, None] * IN + k[None, :], acc.to(gx_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & k_ok[None, :])
    if PERTURB:  # the chunk's partial sum: row pid_r of [K * SPLITS, IN]
        tl.store(gx_ptr + pid_r.to(tl.int64) * IN + k, reduced.to(gx_ptr.dtype.element_ty), mask=k_ok)


# Fewest batch rows a chunk of a split batch reduction keeps (PERTURB grad-input): below it the partial
# sums' extra traffic outweighs the parallelism gained.
MIN_CHUNK_ROWS = 32


def premask_float64(grad_out, mask, primal_rows: int):
    """(grad_out, mask) for the gradient kernels, once per backward launcher. float64 gradients get their
    ReLU mask applied here (mask None): triton 3.6, the version of torch 2.11's CUDA builds, cannot compile
    a float64 ``tl.dot`` whose operand was computed in registers (its MMAv2 lowering asserts "fp64 don't
    support largeK MMA"). float64 serves tests and gradchecks, where the extra pass costs nothing that
    matters."""
    if mask is None or grad_out.dtype != torch.float64:
        return grad_out, mask
    m, rows, out_features = grad_out.shape
    primal_mask = mask.view(m, -1, out_features)  # stored flat, [M, B * OUT]
    row_mask = primal_mask[:, torch.arange(rows, device=grad_out.device) % max(primal_rows, 1)]  # row r: r % B
    return grad_out * row_mask, None


def linear_grad_input(grad_out, weight, mask, primal_rows: int, shared_x: bool, x=None, delta=None):
    """grad_x [M or -, R, IN] (or grad_delta [K, IN] when ``delta`` is given: PERTURB mode, x [XB, IN]).

    PERTURB mode reduces each perturbation's XB rows; with few perturbations (K = 1: IN / BLOCK_K
    programs, 13 for IN = 784) the batch is split into chunks (``_common.reduction_splits``, programs
    counted at BLOCK_K = 64, the smallest GPU config's) whose partial sums [K, splits, IN] are added here.
    """
    m, rows, out_features = grad_out.shape
    fan_in = weight.shape[2]
    splits, chunk = 1, 1
    if delta is not None:
        count, batch = delta.shape[0], x.shape[0]
        if count * fan_in > 0:
            splits = reduction_splits(grad_out.device, count * triton.cdiv(fan_in, 64), batch, MIN_CHUNK_ROWS)
        chunk = triton.cdiv(batch, splits)
        splits = triton.cdiv(batch, chunk) if batch else 1  # no empty chunk
        grad = torch.empty((count * splits, fan_in), device=grad_out.device, dtype=grad_out.dtype)
    else:
        grad = torch.empty((rows, fan_in) if shared_x else (m, rows, fan_in), device=grad_out.device,
                           dtype=grad_out.dtype)
        batch = 1
    if grad.numel() == 0:
        return grad
    if rows == 0 or out_features == 0 or m == 0:
        grad.zero_()
    else:
        def grid(meta):
            row_programs = grad.shape[0] if delta is not None else triton.cdiv(rows, meta["BLOCK_R"])
            return row_programs, triton.cdiv(fan_in, meta["BLOCK_K"]), 1 if (shared_x or delta is not None) else m

        with launch_device(grad_out, weight, mask, x, delta):
            _linear_grad_input_kernel[grid](
                grad_out, grad_out if mask is None else mask.view(torch.int8), weight, grad,
                grad_out if x is None else x, grad_out if delta is None else delta,
                rows, primal_rows, m, out_features, fan_in, batch, splits, chunk, bucket(rows),
                HAS_MASK=mask is not None, SHARED_X=shared_x or delta is not None, PERTURB=delta is not None,
                ACC=acc_dtype(grad_out.dtype), PRECISION=dot_precision(grad_out.dtype),
            )
    return grad if splits == 1 else grad.view(count, splits, fan_in).sum(1)


# grad-weight: a [BLOCK_N, BLOCK_K] accumulator from grad_out [BLOCK_R, BLOCK_N] and x [BLOCK_R, BLOCK_K]
prune_grad_weight_configs = budget_pruner(
    tile_elements=lambda p: p["BLOCK_R"] * p["BLOCK_N"] + p["BLOCK_R"] * p["BLOCK_K"],
    acc_elements=lambda p: p["BLOCK_N"] * p["BLOCK_K"])


GRAD_WEIGHT_CONFIGS = [
    ({"BLOCK_R": 32, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
    ({"BLOCK_R": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
    ({"BLOCK_R": 32, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
]


@triton.autotune(
    configs=configs(gpu=GRAD_WEIGHT_CONFIGS, interpreted={"BLOCK_R": 16, "BLOCK_N": 16, "BLOCK_K": 16}),
    key=["R_KEY", "OUT", "IN", "M", "HAS_MASK", "HAS_BIAS", "PRECISION"],
    prune_configs_by={"early_config_prune": prune_grad_weight_configs},
)
@triton.jit(do_not_specialize=["R_KEY"])
def _linear_grad_weight_kernel(
    gout_ptr, mask_ptr, x_ptr, gw_ptr, gb_ptr,
    R, B, M, OUT, IN, stride_xm, R_KEY,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_k = tl.program_id(1)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    member = tl.program_id(2).to(tl.int64)
    n_ok = n < OUT
    k_ok = k < IN
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    grad_bias = tl.zeros((BLOCK_N,), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        rows = (r0 + rr).to(tl.int64)
        r_ok = rows < R
        g_ok = r_ok[:, None] & n_ok[None, :]
        g = tl.load(gout_ptr + member * R * OUT + rows[:, None] * OUT + n[None, :], mask=g_ok, other=0.0)
        if HAS_MASK:
            keep = tl.load(mask_ptr + member * B * OUT + (rows % B)[:, None] * OUT + n[None, :], mask=g_ok, other=0)
            g = g * (keep != 0).to(g.dtype)
        xt = tl.load(x_ptr + member * stride_xm + rows[:, None] * IN + k[None, :],
                     mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), xt, acc, input_precision=PRECISION, out_dtype=ACC)
        if HAS_BIAS:  # the bias only touched the primal rows (stream 0: rows < B)
            grad_bias += tl.sum(tl.where((rows < B)[:, None], g.to(ACC), 0.0), axis=0)
    tl.store(gw_ptr + member * OUT * IN + n[:, None].to(tl.int64) * IN + k[None, :],
             acc.to(gw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        tl.store(gb_ptr + member * OUT + n, grad_bias.to(gb_ptr.dtype.element_ty), mask=n < tl.where(pid_k == 0, OUT, 0))


def linear_grad_weight(grad_out, x, mask, primal_rows: int, has_bias: bool):
    """(grad_weight [M, OUT, IN], grad_bias [M, OUT] or None)."""
    m, rows, out_features = grad_out.shape
    fan_in = x.shape[-1]
    grad_weight = torch.empty((m, out_features, fan_in), device=grad_out.device, dtype=grad_out.dtype)
    grad_bias = torch.empty((m, out_features), device=grad_out.device, dtype=grad_out.dtype) if has_bias else None
    if grad_weight.numel() == 0 and grad_bias is None:
        return grad_weight, grad_bias
    stride_xm = 0 if x.dim() == 2 else rows * fan_in
    grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), max(1, triton.cdiv(fan_in, meta["BLOCK_K"])), m)
    with launch_device(grad_out, x, mask):
        _linear_grad_weight_kernel[grid](
            grad_out, grad_out if mask is None else mask.view(torch.int8), x, grad_weight,
            grad_weight if grad_bias is None else grad_bias,
            rows, max(primal_rows, 1), m, out_features, fan_in, stride_xm, bucket(rows),
            HAS_MASK=mask is not None, HAS_BIAS=has_bias,
            ACC=acc_dtype(grad_out.dtype), PRECISION=dot_precision(grad_out.dtype),
        )
    return grad_weight, grad_bias


# --------------------------------------------------------------------------------------------- launchers

def stacked_linear_forward(x, weight, bias, streams: int, relu: bool):
    """Same signature and results as fastjac.ops.stacked_linear.stacked_linear_forward (arguments checked
    there)."""
    x, weight = x.contiguous(), weight.contiguous()
    return linear_forward(x, weight, None if bias is None else bias.contiguous(), streams, relu)


def stacked_linear_backward(grad_out, x, weight, mask, streams: int, has_bias: bool, needs_x_grad: bool):
    """Same signature and results as fastjac.ops.stacked_linear.stacked_linear_backward."""
    grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
    mask = None if mask is None else mask.contiguous()
    primal_rows = grad_out.shape[1] // streams
    grad_out, mask = premask_float64(grad_out, mask, primal_rows)  # once for both kernels
    grad_weight, grad_bias = linear_grad_weight(grad_out, x, mask, primal_rows, has_bias)
    grad_x = linear_grad_input(grad_out, weight, mask, primal_rows, x.dim() == 2) if needs_x_grad else None
    return grad_x, grad_weight, grad_bias
