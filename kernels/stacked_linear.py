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
    perturbation k (a program per k) are masked by torch.clamp's inclusive-bounds derivative and summed
    over the batch into grad_delta[k] (again never materialising the [K*B, IN] gradient).
``_linear_grad_weight_kernel`` grad_W = (grad_out * mask)^T @ x and, fused, grad_bias = the sum of the
    stream-0 rows of grad_out * mask.

Accumulation is float32 (float64 for float64 inputs); ``tl.dot`` takes the inputs' dtype. float32 dots run
in IEEE precision unless ``torch.backends.cuda.matmul.allow_tf32`` is set, so results match torch's.
The mask is stored as one byte per element and handed out as a ``torch.bool`` view ``[M, B*OUT]``.
Block sizes are autotuned on a GPU; under ``TRITON_INTERPRET=1`` one small config is used (autotuning an
interpreter only burns minutes).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Largest slot count (primal + tangent streams in one row tile). Beyond it, stream groups recompute
# the primal tile. Module-level so tests can lower it to exercise several groups.
MAX_SLOTS = 8


def configs(gpu, interpreted):
    """Autotune configs: ``gpu`` ([(meta dict, num_warps, num_stages)]) on a GPU, only ``interpreted`` otherwise."""
    if INTERPRET:
        return [triton.Config(interpreted, num_warps=1, num_stages=1)]
    return [triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in gpu]


def acc_dtype(dtype: torch.dtype):
    """Accumulator dtype for inputs of ``dtype``: float64 stays float64, everything else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 products, as torch computes them unless TF32 matmuls were allowed."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; it only affects float32 operands


def check_device(*tensors) -> None:
    for tensor in tensors:
        if tensor is not None and tensor.device.type != "cuda" and not INTERPRET:
            raise RuntimeError("fastjac.kernels: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")


# ----------------------------------------------------------------------------------------------- forward

MAX_TILE_ROWS = 256  # SLOTS * BLOCK_B: the [rows, BLOCK_N] accumulator lives in registers


def prune_forward_configs(configs, named_args, **kwargs):
    """Autotune pruning: drop configs whose row tile (SLOTS * BLOCK_B) exceeds MAX_TILE_ROWS."""
    slots = kwargs.get("SLOTS", named_args.get("SLOTS", 1))
    kept = [config for config in configs if slots * config.kwargs["BLOCK_B"] <= MAX_TILE_ROWS]
    return kept or [min(configs, key=lambda config: config.kwargs["BLOCK_B"])]


@triton.autotune(
    configs=configs(
        gpu=[
            ({"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
            ({"BLOCK_B": 32, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
            ({"BLOCK_B": 16, "BLOCK_N": 128, "BLOCK_K": 32}, 4, 3),
            ({"BLOCK_B": 32, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 3),
            ({"BLOCK_B": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 8, 2),
        ],
        interpreted={"BLOCK_B": 16, "BLOCK_N": 16, "BLOCK_K": 16},
    ),
    key=["B", "OUT", "IN", "SLOTS", "PERTURB"],
    prune_configs_by={"early_config_prune": prune_forward_configs},
)
@triton.jit
def _linear_fwd_kernel(
    x_ptr, delta_ptr, w_ptr, bias_ptr, out_ptr, mask_ptr,
    B, S, OUT, IN, XB, stride_xm,
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
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

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


def _slots(streams: int) -> tuple[int, int]:
    """(SLOTS, groups) for ``streams`` streams."""
    if streams == 1:
        return 1, 1
    slots = min(triton.next_power_of_2(streams), max(2, MAX_SLOTS))
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
    slots, groups = _slots(streams)
    grid = lambda meta: (triton.cdiv(primal, meta["BLOCK_B"]) * groups, triton.cdiv(out_features, meta["BLOCK_N"]), m)
    _linear_fwd_kernel[grid](
        x, x if delta is None else delta, weight, weight if bias is None else bias, out,
        out if mask is None else mask,
        primal, streams, out_features, fan_in, batch, stride_xm,
        SLOTS=slots, HAS_BIAS=bias is not None, RELU=relu, PERTURB=delta is not None,
        ACC=acc_dtype(weight.dtype), PRECISION=dot_precision(weight.dtype),
    )
    return out, None if mask is None else mask.view(torch.bool)


# ---------------------------------------------------------------------------------------------- backward

@triton.autotune(
    configs=configs(
        gpu=[
            ({"BLOCK_R": 32, "BLOCK_N": 32, "BLOCK_K": 64}, 4, 3),
            ({"BLOCK_R": 64, "BLOCK_N": 32, "BLOCK_K": 64}, 4, 3),
            ({"BLOCK_R": 64, "BLOCK_N": 64, "BLOCK_K": 128}, 8, 3),
            ({"BLOCK_R": 128, "BLOCK_N": 32, "BLOCK_K": 64}, 8, 3),
        ],
        interpreted={"BLOCK_R": 16, "BLOCK_N": 16, "BLOCK_K": 16},
    ),
    key=["R", "OUT", "IN", "M", "SHARED_X", "PERTURB"],
)
@triton.jit
def _linear_grad_input_kernel(
    gout_ptr, mask_ptr, w_ptr, gx_ptr, x_ptr, delta_ptr,
    R, B, M, OUT, IN, XB,
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
    if PERTURB:  # program per perturbation: its XB rows, reduced into grad_delta[pid_r]
        r_lo = pid_r * XB
        r_hi = r_lo + XB
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
                acc = tl.dot(g, w, acc, input_precision=PRECISION)
        if PERTURB:  # d clamp(x + delta)/d delta, bounds inclusive like torch.clamp's gradient
            v_ok = r_ok[:, None] & k_ok[None, :]
            xv = tl.load(x_ptr + (rows - r_lo)[:, None] * IN + k[None, :], mask=v_ok, other=0.0)
            dv = tl.load(delta_ptr + pid_r.to(tl.int64) * IN + k, mask=k_ok, other=0.0)
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
    if PERTURB:
        tl.store(gx_ptr + pid_r.to(tl.int64) * IN + k, reduced.to(gx_ptr.dtype.element_ty), mask=k_ok)


def linear_grad_input(grad_out, weight, mask, primal_rows: int, shared_x: bool, x=None, delta=None):
    """grad_x [M or -, R, IN] (or grad_delta [K, IN] when ``delta`` is given: PERTURB mode, x [XB, IN])."""
    m, rows, out_features = grad_out.shape
    fan_in = weight.shape[2]
    if delta is not None:
        grad = torch.empty((delta.shape[0], fan_in), device=grad_out.device, dtype=grad_out.dtype)
        batch = x.shape[0]
    else:
        grad = torch.empty((rows, fan_in) if shared_x else (m, rows, fan_in), device=grad_out.device,
                           dtype=grad_out.dtype)
        batch = 1
    if grad.numel() == 0:
        return grad
    if rows == 0 or out_features == 0 or m == 0:
        return grad.zero_()

    def grid(meta):
        row_programs = delta.shape[0] if delta is not None else triton.cdiv(rows, meta["BLOCK_R"])
        return row_programs, triton.cdiv(fan_in, meta["BLOCK_K"]), 1 if (shared_x or delta is not None) else m

    _linear_grad_input_kernel[grid](
        grad_out, grad_out if mask is None else mask.view(torch.int8), weight, grad,
        grad_out if x is None else x, grad_out if delta is None else delta,
        rows, primal_rows, m, out_features, fan_in, batch,
        HAS_MASK=mask is not None, SHARED_X=shared_x or delta is not None, PERTURB=delta is not None,
        ACC=acc_dtype(grad_out.dtype), PRECISION=dot_precision(grad_out.dtype),
    )
    return grad


@triton.autotune(
    configs=configs(
        gpu=[
            ({"BLOCK_R": 32, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
            ({"BLOCK_R": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
            ({"BLOCK_R": 32, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
            ({"BLOCK_R": 64, "BLOCK_N": 128, "BLOCK_K": 128}, 8, 3),
        ],
        interpreted={"BLOCK_R": 16, "BLOCK_N": 16, "BLOCK_K": 16},
    ),
    key=["R", "OUT", "IN"],
)
@triton.jit
def _linear_grad_weight_kernel(
    gout_ptr, mask_ptr, x_ptr, gw_ptr, gb_ptr,
    R, B, OUT, IN, stride_xm,
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
        acc = tl.dot(tl.trans(g), xt, acc, input_precision=PRECISION)
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
    _linear_grad_weight_kernel[grid](
        grad_out, grad_out if mask is None else mask.view(torch.int8), x, grad_weight,
        grad_weight if grad_bias is None else grad_bias,
        rows, max(primal_rows, 1), out_features, fan_in, stride_xm,
        HAS_MASK=mask is not None, HAS_BIAS=has_bias,
        ACC=acc_dtype(grad_out.dtype), PRECISION=dot_precision(grad_out.dtype),
    )
    return grad_weight, grad_bias


# --------------------------------------------------------------------------------------------- launchers

def stacked_linear_forward(x, weight, bias, streams: int, relu: bool):
    """Same signature and results as fastjac.ops.stacked_linear.stacked_linear_forward."""
    from fastjac.ops.stacked_linear import _check

    _check(x, weight, bias, streams)
    check_device(x, weight, bias)
    x, weight = x.contiguous(), weight.contiguous()
    return linear_forward(x, weight, None if bias is None else bias.contiguous(), streams, relu)


def stacked_linear_backward(grad_out, x, weight, mask, streams: int, has_bias: bool, needs_x_grad: bool):
    """Same signature and results as fastjac.ops.stacked_linear.stacked_linear_backward."""
    check_device(grad_out, x, weight)
    grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
    mask = None if mask is None else mask.contiguous()
    primal_rows = grad_out.shape[1] // streams
    grad_weight, grad_bias = linear_grad_weight(grad_out, x, mask, primal_rows, has_bias)
    grad_x = linear_grad_input(grad_out, weight, mask, primal_rows, x.dim() == 2) if needs_x_grad else None
    return grad_x, grad_weight, grad_bias
