"""The two per-step ops of SGD-UAP over K perturbations at once.

    perturb_forward(x [B,*in], delta [K,*in]) -> [K, B, *in] = clamp(x + delta_k, 0, 1)
    perturb_backward(grad [K,B,*in], x, delta) -> grad_delta [K,*in]
        = sum_b grad * (0 <= x + delta_k <= 1)    (torch.clamp's gradient: bounds inclusive)
    uap_step(delta [K,*in], grad [K,*in], step [K], eps [K]) -> clamp(delta + step_k*sign(grad), -eps_k, eps_k)

The first layer of an attacked MLP with the perturbation fused into it, on the Triton backend only
(``PERTURBED_LINEAR_BACKENDS``; kernels/uap_step.py): every row is a primal row (no streams, the ReLU
mask applies to the rows themselves; row k*B + b is sample b under delta_k):

    perturbed_linear_forward(x [B,*in], delta [K,*in], weight [M,OUT,IN], bias [M,OUT] | None, relu)
        -> (out [M, K*B, OUT] = relu?(clamp(x + delta_k, 0, 1) @ weight_m^T + bias_m),
            mask [M, K*B*OUT] bool (pre-activation > 0) | None when relu is False)      (IN = prod(in))
    perturbed_linear_backward(grad_out [M,K*B,OUT], x, delta, weight, mask) -> grad_delta like delta
        = perturb_backward(sum_m (grad_out*mask)[m] @ weight_m, x, delta)

The kernels form the perturbed batch [K*B, IN] tile by tile in registers and never write it. The other
backends have nothing to fuse there: an attack perturbs the batch (``perturb``) and runs the plain first
layer, ATen's GEMM. The sign update and projection is one elementwise pass in every backend. Parameters
are frozen during an attack, so no op here ever produces a parameter gradient.
"""
from __future__ import annotations

import torch


def _per_k(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _check_perturb(x, delta) -> None:
    if x.dim() < 1 or delta.dim() != x.dim() or x.shape[1:] != delta.shape[1:]:
        raise ValueError(f"uap_step: x [B, *in] and delta [K, *in] must share *in, got {tuple(x.shape)} and "
                         f"{tuple(delta.shape)}")
    if x.dtype != delta.dtype:
        raise TypeError(f"uap_step: x dtype {x.dtype} differs from delta dtype {delta.dtype}")


def _check_step(delta, grad) -> None:
    if grad.shape != delta.shape:
        raise ValueError(f"uap_step: grad {tuple(grad.shape)} differs from delta {tuple(delta.shape)}")
    if grad.dtype != delta.dtype:
        raise TypeError(f"uap_step: grad dtype {grad.dtype} differs from delta dtype {delta.dtype}")


def perturb_forward(x, delta):
    return torch.clamp(x.unsqueeze(0) + delta.unsqueeze(1), 0.0, 1.0)


def perturb_backward(grad, x, delta):
    shifted = x.unsqueeze(0) + delta.unsqueeze(1)
    inside = (shifted >= 0) & (shifted <= 1)
    return (grad * inside).sum(dim=1)


def uap_step(delta, grad, step, eps):
    return torch.clamp(delta + _per_k(step, delta) * torch.sign(grad), -_per_k(eps, delta), _per_k(eps, delta))


def launchers(backend: str):
    """(perturb_forward, perturb_backward, uap_step) of ``backend``."""
    if backend in ("torch", "cpp"):
        return perturb_forward, perturb_backward, uap_step
    if backend == "triton":
        from fastjac.kernels import uap_step as kernel

        return kernel.perturb_forward, kernel.perturb_backward, kernel.uap_step
    if backend == "cuda":
        from fastjac import _C

        def cuda_uap_step(delta, grad, step, eps):
            # the CUDA kernel is float32-only; other dtypes take the (equivalent) ATen path
            if delta.dtype != torch.float32:
                return uap_step(delta, grad, step, eps)
            return _C.uap_step(delta, grad, step.to(delta.dtype), eps.to(delta.dtype))

        return perturb_forward, perturb_backward, cuda_uap_step
    raise ValueError(f"uap_step: unknown backend {backend!r}")


def _check_perturbed_linear(x, delta, weight, bias) -> None:
    if weight.dim() != 3:
        raise ValueError(f"perturbed_linear: weight must be [M, OUT, IN], got {tuple(weight.shape)}")
    m, out_features, fan_in = weight.shape
    if x.dim() < 2 or delta.dim() != x.dim() or x.shape[1:] != delta.shape[1:]:
        raise ValueError(f"perturbed_linear: x [B, *in] and delta [K, *in] must share *in, "
                         f"got {tuple(x.shape)} and {tuple(delta.shape)}")
    if x.shape[1:].numel() != fan_in:
        raise ValueError(f"perturbed_linear: the input has {tuple(x.shape[1:])} features, weight expects {fan_in}")
    if bias is not None and tuple(bias.shape) != (m, out_features):
        raise ValueError(f"perturbed_linear: bias must be [{m}, {out_features}], got {tuple(bias.shape)}")
    if not (x.dtype == delta.dtype == weight.dtype) or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError("perturbed_linear: x, delta, weight and bias must share one dtype")


# Backends with a fused perturbed first layer (the others perturb the batch and run the plain layer).
PERTURBED_LINEAR_BACKENDS = ("triton",)


class Perturb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, backend):
        forward_launcher, ctx.backward_launcher, _ = launchers(backend)
        x, delta = x.contiguous(), delta.contiguous()
        ctx.save_for_backward(x, delta)
        return forward_launcher(x, delta)

    @staticmethod
    def backward(ctx, grad):
        x, delta = ctx.saved_tensors
        return None, ctx.backward_launcher(grad.contiguous(), x, delta), None


def perturb(x, delta, backend: str = "torch"):
    """clamp(x + delta_k, 0, 1) for every k: [K, B, *in], differentiable w.r.t. delta only."""
    _check_perturb(x, delta)
    return Perturb.apply(x, delta, backend)


def sign_step(delta, grad, step, eps, backend: str = "torch"):
    """One SGD-UAP update of K perturbations (no autograd)."""
    _check_step(delta, grad)
    return launchers(backend)[2](delta.contiguous(), grad.contiguous(), step, eps)


class PerturbedLinear(torch.autograd.Function):
    """The first Linear of every member on the K perturbed batches; differentiable w.r.t. delta only."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, relu):
        from fastjac.kernels import uap_step as kernel

        ctx.backward_launcher = kernel.perturbed_linear_backward
        x, delta, weight = x.contiguous(), delta.contiguous(), weight.contiguous()
        out, mask = kernel.perturbed_linear_forward(x, delta, weight, None if bias is None else bias.contiguous(), relu)
        ctx.save_for_backward(x, delta, weight, mask if mask is not None else torch.empty(0, dtype=torch.bool))
        ctx.has_mask = mask is not None
        if mask is not None:
            ctx.mark_non_differentiable(mask)
        return out, mask

    @staticmethod
    def backward(ctx, grad_out, _grad_mask):
        x, delta, weight, mask = ctx.saved_tensors
        grad_delta = None
        if ctx.needs_input_grad[1]:
            grad_delta = ctx.backward_launcher(grad_out.contiguous(), x, delta, weight, mask if ctx.has_mask else None)
        return None, grad_delta, None, None, None


def perturbed_linear(x, delta, weight, bias=None, relu: bool = False, backend: str = "triton"):
    """relu?(clamp(x + delta_k, 0, 1) @ weight_m^T + bias_m) for every k and member m, on ``backend`` (one
    of ``PERTURBED_LINEAR_BACKENDS``).

    Returns (out [M, K*B, OUT], mask [M, K*B*OUT] | None); differentiable w.r.t. delta only (x and the
    parameters are treated as constants, as in an attack on a frozen model).
    """
    if backend not in PERTURBED_LINEAR_BACKENDS:
        raise ValueError(f"perturbed_linear: backend must be one of {PERTURBED_LINEAR_BACKENDS}, got {backend!r} "
                         "(other backends perturb the batch with perturb() and run the plain first layer)")
    _check_perturbed_linear(x, delta, weight, bias)
    return PerturbedLinear.apply(x, delta, weight, bias, relu)
