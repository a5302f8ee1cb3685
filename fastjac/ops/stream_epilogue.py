"""The stream epilogue: bias on the primal rows, ReLU mask from the primal rows applied to every stream.

After a stacked Linear or Conv2d, the pre-activation ``y`` holds S streams: stream 0 is the primal batch,
streams 1..S-1 are tangent rows (input-space JVP directions). Tangents are linear in the input, so they
get no bias, and ReLU acts on them through the primal's mask (its derivative). Every layout the engine
uses is viewed as ``y [O, S, I]``:

- member-major Linear output ``[M, S*B, F]``   -> O = M, I = B*F,       bias [M, F],   rep = 1
- row-major Conv2d output ``[S*B, M*C, H, W]`` -> O = 1, I = B*M*C*H*W, bias [1, M*C], rep = H*W
- row-major activations ``[S*B, M, *feature]`` -> O = 1, I = B*M*prod(feature), no bias (a standalone ReLU)

so the bias index of element i is ``(i // rep) % NB`` with ``NB = bias.shape[1]``.

Launchers (all backends share these signatures):
    stream_epilogue_forward(y [O,S,I], bias [O,NB] | None, rep, relu) -> (out [O,S,I], mask [O,I] bool | None)
    stream_epilogue_backward(grad_out [O,S,I], mask [O,I] | None, nb, rep, has_bias)
        -> (grad_y [O,S,I], grad_bias [O,NB] | None)
The mask is None when ``relu`` is False (bias only).
"""
from __future__ import annotations

import torch


def _check(y: torch.Tensor, bias: torch.Tensor | None, rep: int) -> None:
    if y.dim() != 3:
        raise ValueError(f"stream_epilogue: y must be [O, S, I], got shape {tuple(y.shape)}")
    if bias is not None:
        if bias.dim() != 2 or bias.shape[0] != y.shape[0]:
            raise ValueError(f"stream_epilogue: bias must be [O={y.shape[0]}, NB], got {tuple(bias.shape)}")
        if y.shape[2] % (bias.shape[1] * rep) != 0:
            raise ValueError(f"stream_epilogue: I={y.shape[2]} is not a multiple of NB*rep={bias.shape[1] * rep}")
        if bias.dtype != y.dtype:
            raise TypeError(f"stream_epilogue: bias dtype {bias.dtype} differs from y dtype {y.dtype}")


def stream_epilogue_forward(y, bias, rep: int, relu: bool):
    _check(y, bias, rep)
    o, _, length = y.shape
    primal = y[:, 0]
    if bias is not None:  # broadcast [O, NB] over the (I / (NB*rep), rep) positions, no expanded copy
        nb = bias.shape[1]
        primal = (primal.reshape(o, length // (nb * rep), nb, rep) + bias.view(o, 1, nb, 1)).view(o, length)
    if not relu:
        out = y.clone()
        out[:, 0] = primal
        return out, None
    mask = primal > 0
    out = y * mask.unsqueeze(1)
    out[:, 0] = primal * mask
    return out, mask


def stream_epilogue_backward(grad_out, mask, nb: int, rep: int, has_bias: bool):
    grad_y = grad_out if mask is None else grad_out * mask.unsqueeze(1)
    grad_bias = None
    if has_bias:
        o, _, length = grad_y.shape
        grad_bias = grad_y[:, 0].reshape(o, length // (nb * rep), nb, rep).sum(dim=(1, 3))
    return grad_y, grad_bias


class StreamEpilogue(torch.autograd.Function):
    """autograd wrapper; ``launchers`` is a (forward, backward) pair from one backend."""

    @staticmethod
    def forward(ctx, y, bias, rep, relu, launchers):
        forward_launcher, backward_launcher = launchers
        out, mask = forward_launcher(y.contiguous(), None if bias is None else bias.contiguous(), rep, relu)
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        ctx.nb = 0 if bias is None else bias.shape[1]
        ctx.rep, ctx.has_bias, ctx.backward_launcher = rep, bias is not None, backward_launcher
        if mask is not None:
            ctx.mark_non_differentiable(mask)
        return out, mask

    @staticmethod
    def backward(ctx, grad_out, _grad_mask):
        (mask,) = ctx.saved_tensors
        grad_y, grad_bias = ctx.backward_launcher(
            grad_out.contiguous(), mask if ctx.has_mask else None, ctx.nb, ctx.rep, ctx.has_bias
        )
        return grad_y, grad_bias, None, None, None


TORCH_LAUNCHERS = (stream_epilogue_forward, stream_epilogue_backward)


def stream_epilogue(y, bias, rep: int = 1, relu: bool = True, launchers=TORCH_LAUNCHERS):
    """Differentiable stream epilogue; see the module docstring for shapes. Returns (out, mask).
    ``launchers``: a backend's (forward, backward) pair (``Backend.stream_epilogue``). Arguments are
    checked here, once, for every backend's launchers."""
    _check(y, bias, rep)
    if bias is None and not relu:  # the identity: the launchers would copy y forward and clone its gradient
        return y, None
    return StreamEpilogue.apply(y, bias, rep, relu, launchers)


class MaskedStreams(torch.autograd.Function):
    """g [O, S, I] times a ReLU mask [O, I] (bool) on every stream: the ReLU's derivative applied to the
    tangent or cotangent rows, as the epilogue's backward launcher computes it (one pass; a float product
    with the bool mask first copies the mask to float: measured 2.4-3x slower on the CPU). Self-adjoint:
    its backward is the same product."""

    @staticmethod
    def forward(ctx, g, mask, launchers):
        ctx.save_for_backward(mask)
        ctx.launchers = launchers
        return launchers[1](g.contiguous(), mask, 0, 1, False)[0]

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return masked_streams(grad, mask, ctx.launchers), None, None


def masked_streams(g: torch.Tensor, mask: torch.Tensor, launchers=TORCH_LAUNCHERS) -> torch.Tensor:
    """Differentiable g [O, S, I] * mask [O, I] (bool, broadcast over the S streams) on a backend's
    (forward, backward) epilogue launchers."""
    if g.dim() != 3 or mask.dtype != torch.bool or mask.shape != (g.shape[0], g.shape[2]):
        raise ValueError(f"masked_streams: g must be [O, S, I] and mask a bool [O, I], got {tuple(g.shape)} and "
                         f"{mask.dtype} {tuple(mask.shape)}")
    return MaskedStreams.apply(g, mask.contiguous(), launchers)
