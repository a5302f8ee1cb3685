"""The C++ extension's launchers as dispatcher ops, ``torch.ops.fastjac.*``, and their fake kernels.

``csrc/ext.cpp`` registers the schemas (TORCH_LIBRARY) and the CPU kernels; the fake (meta) kernels below
give the output shapes without computing, so ``torch.compile`` traces through the ops (no graph break),
and meta tensors and ``torch.export`` see them. The two forward ops have registered autograd (their
backward is the matching backward op), so each is a differentiable op on its own; the engine reaches
them through the autograd Functions of ``fastjac/ops``, which serve every backend alike. No op is
differentiable twice: a double backward through them fails loudly instead of silently missing terms.

Shapes (see the ops' modules for the semantics):
    stream_epilogue_forward(y [O,S,I], bias [O,NB]?, rep, relu) -> (out [O,S,I], mask [O,I] bool?)
    stream_epilogue_backward(grad_out [O,S,I], mask?, nb, rep, has_bias) -> (grad_y [O,S,I], grad_bias [O,NB]?)
    stacked_linear_forward(x [R,IN] | [M,R,IN], weight [M,OUT,IN], bias?, streams, relu)
        -> (out [M,R,OUT], mask [M,B*OUT] bool?)   with B = R / streams
    stacked_linear_backward(grad_out [M,R,OUT], x, weight, mask?, streams, has_bias, needs_x_grad)
        -> (grad_x like x?, grad_weight like weight, grad_bias [M,OUT]?)
    stacked_addmm_(out [M,P,Q] (written), a [M,P,K], b [M,K,Q], bias [M,Q]?, accumulate) -> ()
    batch_norm_statistics_backward(grad_y?, grad_x_hat?, grad_inv_std?, x_hat, inv_std, gamma?)
        -> (grad_x, grad_gamma?, grad_beta? [M,C,1])
    batch_norm_linearization_forward(t [S,B,M,C,L], x_hat, scale [M,C,1]) -> (out, mean_t, mean_tx [S,1,M,C,1])
    batch_norm_linearization_backward(grad_out, t, x_hat, scale, mean_t, mean_tx) -> (grad_t, grad_x_hat, grad_scale)
    batch_norm_streams_forward(x [S,B,M,C,L], gamma?, beta? [M,C,1], eps)
        -> (y like x, mean, var, inv_std [M,C,1], mean_t, mean_tx [S-1,1,M,C,1])
    batch_norm_streams_backward(grad_y, x, mean, inv_std, gamma?, mean_t, mean_tx) -> (grad_x, grad_gamma, grad_beta)
    uap_step(delta [K,*in], grad like delta, step [K], eps [K]) -> like delta   (CUDA builds, float32)
"""
from __future__ import annotations

import torch


def _register_fakes() -> None:
    @torch.library.register_fake("fastjac::stream_epilogue_forward")
    def _(y, bias, rep, relu):
        return torch.empty_like(y), (y.new_empty(y.shape[0], y.shape[2], dtype=torch.bool) if relu else None)

    @torch.library.register_fake("fastjac::stream_epilogue_backward")
    def _(grad_out, mask, nb, rep, has_bias):
        return torch.empty_like(grad_out), (grad_out.new_empty(grad_out.shape[0], nb) if has_bias else None)

    @torch.library.register_fake("fastjac::stacked_linear_forward")
    def _(x, weight, bias, streams, relu):
        members, out_features = weight.shape[:2]
        rows = x.shape[-2]
        mask = x.new_empty(members, rows // streams * out_features, dtype=torch.bool) if relu else None
        return x.new_empty(members, rows, out_features), mask

    @torch.library.register_fake("fastjac::stacked_linear_backward")
    def _(grad_out, x, weight, mask, streams, has_bias, needs_x_grad):
        grad_bias = weight.new_empty(weight.shape[:2]) if has_bias else None
        return (torch.empty_like(x) if needs_x_grad else None), torch.empty_like(weight), grad_bias

    @torch.library.register_fake("fastjac::stacked_addmm_")
    def _(out, a, b, bias, accumulate):
        return None

    @torch.library.register_fake("fastjac::batch_norm_statistics_backward")
    def _(grad_y, grad_x_hat, grad_inv_std, x_hat, inv_std, gamma):
        affine = grad_y is not None and gamma is not None
        return (torch.empty_like(x_hat), *(inv_std.new_empty(inv_std.shape) if affine else None for _ in range(2)))

    @torch.library.register_fake("fastjac::batch_norm_linearization_forward")
    def _(t, x_hat, scale):
        means = t.new_empty(t.shape[0], 1, t.shape[2], t.shape[3], 1)
        return torch.empty_like(t), means, torch.empty_like(means)

    @torch.library.register_fake("fastjac::batch_norm_linearization_backward")
    def _(grad_out, t, x_hat, scale, mean_t, mean_tx):
        return torch.empty_like(t), torch.empty_like(x_hat), scale.new_empty(scale.shape)

    @torch.library.register_fake("fastjac::batch_norm_streams_forward")
    def _(x, gamma, beta, eps):
        channels = x.new_empty(x.shape[2], x.shape[3], 1)
        means = x.new_empty(x.shape[0] - 1, 1, x.shape[2], x.shape[3], 1)
        return (torch.empty_like(x), channels, torch.empty_like(channels), torch.empty_like(channels), means,
                torch.empty_like(means))

    @torch.library.register_fake("fastjac::batch_norm_streams_backward")
    def _(grad_y, x, mean, inv_std, gamma, mean_t, mean_tx):
        return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake("fastjac::uap_step")
    def _(delta, grad, step, eps):
        return torch.empty_like(delta)


def _register_autograd() -> None:
    ops = torch.ops.fastjac

    def epilogue_context(ctx, inputs, output):
        _, bias, ctx.rep, _ = inputs
        ctx.has_bias, ctx.nb = bias is not None, 0 if bias is None else bias.shape[1]
        ctx.save_for_backward(output[1])

    def epilogue_backward(ctx, grad_out, _grad_mask):
        (mask,) = ctx.saved_tensors
        grad_y, grad_bias = ops.stream_epilogue_backward(grad_out.contiguous(), mask, ctx.nb, ctx.rep, ctx.has_bias)
        return grad_y, grad_bias, None, None

    def linear_context(ctx, inputs, output):
        x, weight, bias, ctx.streams, _ = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, output[1])

    def linear_backward(ctx, grad_out, _grad_mask):
        x, weight, mask = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = ops.stacked_linear_backward(
            grad_out.contiguous(), x, weight, mask, ctx.streams, ctx.has_bias, ctx.needs_input_grad[0])
        return grad_x, grad_weight, grad_bias, None, None

    torch.library.register_autograd("fastjac::stream_epilogue_forward", epilogue_backward,
                                    setup_context=epilogue_context)
    torch.library.register_autograd("fastjac::stacked_linear_forward", linear_backward, setup_context=linear_context)


try:
    from fastjac import _C  # noqa: F401  (loading it registers the torch.ops.fastjac library)
except ImportError:
    OPS = None  # the extension is optional: the cpp backend reports itself unavailable (fastjac.backends)
else:
    _register_fakes()
    _register_autograd()
    OPS = torch.ops.fastjac
