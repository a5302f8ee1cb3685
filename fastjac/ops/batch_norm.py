"""BatchNorm with batch statistics on the stacked engine's rows: the normalization of the primal rows and
its exact linearization on the tangent / cotangent rows, each one autograd Function with a hand-written
backward (as composites of ATen ops their autograd graphs were ~half of a ResNet JR step's elementwise
passes: one node, and one saved tensor, per multiply, subtract and reduction).

Shapes (per member m and channel c; N = B*L values per channel and stream; L = prod(spatial)):
    x      [B, M, C, L]     the primal rows entering the layer
    x_hat  [B, M, C, L]     (x - mean) * inv_std, mean and biased variance over the B samples and space
    inv_std [M, C, 1]       (var + eps)^-1/2
    t      [S, B, M, C, L]  S streams of tangent rows (jvp) or cotangent rows (vjp)
    scale  [M, C, 1]        gamma * inv_std (inv_std without an affine map)

Launchers (``ATEN``: torch ops, every backend but cpp; ``native_launchers``: for the cpp backend, the C++
ops of csrc/batch_norm.cpp, one pass per reduction and per output, for all but statistics_forward):
    moments(x) -> (mean [1,M,C,1], var [1,M,C,1], x - mean)
    statistics_forward(x, eps) -> (x_hat, inv_std, mean [M,C,1], var [M,C,1])
    statistics_backward(grad_y, grad_x_hat, grad_inv_std, x_hat, inv_std, gamma)
        -> (grad_x, grad_gamma, grad_beta [M,C,1]; both None without grad_y or gamma)
    linearization_forward(t, x_hat, scale) -> (scale * (t - mean(t) - x_hat * mean(t * x_hat)),
                                               (mean(t), mean(t * x_hat)) [S, 1, M, C, 1])
    linearization_backward(grad_out, t, x_hat, scale, mean_t, mean_tx) -> (grad_t, grad_x_hat, grad_scale)
    streams_forward(x, gamma, beta, eps) -> (y like x, mean, var, inv_std [M,C,1], mean_t, mean_tx [S-1,1,M,C,1])
    streams_backward(grad_y, x, mean, inv_std, gamma, mean_t, mean_tx) -> (grad_x like x, grad_gamma, grad_beta)
The means of the linearization run over the B samples and the space of ONE stream: each stream is a
direction for the whole batch. The map is self-adjoint, so it serves the tangent and the cotangent rows.

The streams launchers are the jvp mode's whole layer in one Function: x [S, B, M, C, L] holds the primal
rows (stream 0) and S-1 tangent streams; y = gamma * x_hat + beta on stream 0 and gamma * (the
linearization of each tangent stream) on the others, written in x's memory order (so the engine neither
splits its input nor joins its output), and the backward is one Function too, recomputing x_hat from x
rather than saving it. With a = mean(t), b = mean(t * x_hat) per tangent stream t and, for the gradient
g0 of stream 0 and g of stream t, c = mean(g * x_hat), e = mean(g * t) - a * mean(g) - b * c:
    grad_t = gamma * inv_std * (g - mean(g) - x_hat * c)
    grad_x = inv_std * (G - mean(G) - x_hat * mean(G * x_hat)) - gamma * inv_std^2 * sum(e) * x_hat,
        G = gamma * g0 - gamma * inv_std * sum over streams of (b * g + c * t)   (dL/dx_hat)
    grad_gamma = sum(g0 * x_hat) + inv_std * N * sum(e),  grad_beta = sum(g0)
(the last term of grad_x: the tangent rows' explicit inv_std, d inv_std / dx = -inv_std^2 * x_hat / N).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def _per_channel_sum(y: torch.Tensor) -> torch.Tensor:
    """Sum over the sample and space axes of [..., B, M, C, L] -> [..., 1, M, C, 1], innermost axis first
    (a reduction over two strided axes at once measured several times slower on the CPU)."""
    return y.sum(-1, keepdim=True).sum(-4, keepdim=True)


def moments(x: torch.Tensor):
    """(mean [1, M, C, 1], biased variance [1, M, C, 1], x - mean) of x [B, M, C, L] per member and channel.
    torch.var_mean over the axes (0, 3) measured ~25x slower on the CPU (65 vs 2.5 ms, [64, 5, 16, 784])."""
    count = x.shape[0] * x.shape[3]
    mean = _per_channel_sum(x) / count
    centered = x - mean
    var = torch.linalg.vector_norm(centered, dim=3, keepdim=True).square().sum(0, keepdim=True) / count
    return mean, var, centered


def statistics_forward(x: torch.Tensor, eps: float):
    mean, var, centered = moments(x)
    inv_std = torch.rsqrt(var + eps)
    return centered.mul_(inv_std), inv_std[0], mean[0], var[0]


def statistics_backward(grad_y, grad_x_hat, grad_inv_std, x_hat, inv_std, gamma):
    """The backward of y = gamma * x_hat + beta whose x_hat and inv_std are outputs too (any gradient may
    be None; gamma None: no affine map, y = x_hat). x_hat's whole gradient is G = grad_x_hat + gamma *
    grad_y; x's is inv_std * (G - mean(G) - x_hat * mean(G * x_hat)) (the normalization's own derivative),
    minus G_r * inv_std^2 * x_hat / N for inv_std's G_r (d inv_std / dx = -inv_std^3 (x - mean) / N);
    grad_gamma = sum(grad_y * x_hat), grad_beta = sum(grad_y)."""
    count = x_hat.shape[0] * x_hat.shape[3]
    grad_gamma = grad_beta = None
    whole = grad_x_hat
    if grad_y is not None:
        if gamma is not None:
            grad_gamma, grad_beta = _per_channel_sum(grad_y * x_hat)[0], _per_channel_sum(grad_y)[0]
        from_y = grad_y if gamma is None else grad_y * gamma
        whole = from_y if whole is None else whole + from_y
    grad_x = torch.zeros_like(x_hat) if whole is None else _self_adjoint(whole, x_hat, inv_std, count)
    if grad_inv_std is not None:
        grad_x.addcmul_(x_hat, grad_inv_std * inv_std.square() / count, value=-1)
    return grad_x, grad_gamma, grad_beta


def _self_adjoint(t, x_hat, scale, count, means=None):
    """scale * (t - mean(t) - x_hat * mean(t * x_hat)), means per stream over [B, L] (t [..., B, M, C, L]);
    ``means`` = (mean(t), mean(t * x_hat)) when already known."""
    mean_t, mean_tx = _means(t, x_hat, count) if means is None else means
    out = torch.addcmul(-(mean_t * scale), t, scale)
    return out.addcmul_(x_hat, mean_tx * scale, value=-1)


def _means(t, x_hat, count):
    """(mean(t), mean(t * x_hat)) per stream, member and channel: [..., 1, M, C, 1] each."""
    return _per_channel_sum(t) / count, _per_channel_sum(t * x_hat) / count


def linearization_forward(t, x_hat, scale):
    """(the linearization of t, the means it used: mean(t), mean(t * x_hat) per stream)."""
    means = _means(t, x_hat, t.shape[1] * t.shape[4])
    return _self_adjoint(t, x_hat, scale, t.shape[1] * t.shape[4], means), means


def linearization_backward(grad_out, t, x_hat, scale, mean_t, mean_tx):
    """With c = t - a - x_hat * b (a = mean(t), b = mean(t * x_hat)) and out = scale * c:
    grad_t = the same map applied to grad_out; grad_scale = sum(grad_out * c);
    grad_x_hat = -sum over streams of (H * b + t * mean(H * x_hat)), H = grad_out * scale."""
    count = t.shape[1] * t.shape[4]
    sum_g = _per_channel_sum(grad_out)               # [S, 1, M, C, 1]
    sum_gx = _per_channel_sum(grad_out * x_hat)
    sum_gt = _per_channel_sum(grad_out * t)
    grad_t = torch.addcmul(-(sum_g * scale / count), grad_out, scale).addcmul_(x_hat, sum_gx * scale / count,
                                                                              value=-1)
    grad_scale = (sum_gt - mean_t * sum_g - mean_tx * sum_gx).sum(0)[0]
    grad_x_hat = torch.mul(grad_out, -(mean_tx * scale)).addcmul_(t, -(sum_gx * scale / count)).sum(0)
    return grad_t, grad_x_hat, grad_scale


def streams_forward(x, gamma, beta, eps):
    count = x.shape[1] * x.shape[4]
    x0, t = x[0], x[1:]
    mean, var, centered = moments(x0)
    inv_std = torch.rsqrt(var + eps)
    x_hat = centered * inv_std
    mean_t, mean_tx = _means(t, x_hat, count)
    scale = inv_std if gamma is None else inv_std * gamma
    y = torch.empty_like(x)
    y[0] = x_hat if gamma is None else torch.addcmul(beta, x_hat, gamma)
    y[1:] = _self_adjoint(t, x_hat, scale, count, (mean_t, mean_tx))
    return y, mean[0], var[0], inv_std[0], mean_t, mean_tx


def streams_backward(grad_y, x, mean, inv_std, gamma, mean_t, mean_tx):
    count = x.shape[1] * x.shape[4]
    x0, t = x[0], x[1:]
    g0, g = grad_y[0], grad_y[1:]
    x_hat = (x0 - mean) * inv_std
    gain = torch.ones_like(inv_std) if gamma is None else gamma
    sum_g0, sum_g0x = _per_channel_sum(g0), _per_channel_sum(g0 * x_hat)       # [1, M, C, 1]
    sum_g, sum_gx = _per_channel_sum(g), _per_channel_sum(g * x_hat)           # [S-1, 1, M, C, 1]
    mean_gx = sum_gx / count
    e = ((_per_channel_sum(g * t) - mean_t * sum_g - mean_tx * sum_gx) / count).sum(0)
    grad_t = _self_adjoint(g, x_hat, gain * inv_std, count, (sum_g / count, mean_gx))
    big_g = gain * g0 - gain * inv_std * (mean_tx * g + mean_gx * t).sum(0)
    mean_big_g = gain * sum_g0 / count - gain * inv_std * (mean_tx * sum_g / count + mean_gx * mean_t).sum(0)
    mean_big_gx = gain * sum_g0x / count - 2 * gain * inv_std * (mean_tx * mean_gx).sum(0)
    grad_x0 = inv_std * (big_g - mean_big_g - x_hat * mean_big_gx) - gain * inv_std.square() * e * x_hat
    grad_x = torch.empty_like(x)
    grad_x[0], grad_x[1:] = grad_x0, grad_t
    return grad_x, (sum_g0x + inv_std * count * e)[0], sum_g0[0]


class Launchers(NamedTuple):
    statistics_forward: object
    statistics_backward: object
    linearization_forward: object
    linearization_backward: object
    streams_forward: object
    streams_backward: object


ATEN = Launchers(statistics_forward, statistics_backward, linearization_forward, linearization_backward,
                 streams_forward, streams_backward)


def native_launchers(ops) -> Launchers:
    """The C++ launchers (``torch.ops.fastjac``), with the ATen launchers' signatures; the statistics'
    forward stays ATen's (its vectorized reductions measured faster, csrc/batch_norm.cpp)."""
    def native_linearization_forward(t, x_hat, scale):
        out, mean_t, mean_tx = ops.batch_norm_linearization_forward(t, x_hat, scale.contiguous())
        return out, (mean_t, mean_tx)

    def native_statistics_backward(grad_y, grad_x_hat, grad_inv_std, x_hat, inv_std, gamma):
        return ops.batch_norm_statistics_backward(grad_y, grad_x_hat, grad_inv_std, x_hat, inv_std.contiguous(),
                                                  None if gamma is None else gamma.contiguous())

    def native_streams_backward(grad_y, x, mean, inv_std, gamma, mean_t, mean_tx):
        if grad_y.stride(-1) != 1:  # the kernel reads rows with L contiguous
            grad_y = grad_y.contiguous()
        return ops.batch_norm_streams_backward(grad_y, x, mean, inv_std, gamma, mean_t, mean_tx)

    return Launchers(statistics_forward, native_statistics_backward, native_linearization_forward,
                     ops.batch_norm_linearization_backward, ops.batch_norm_streams_forward, native_streams_backward)


class BatchStatistics(torch.autograd.Function):
    """x [B, M, C, L], gamma and beta [M, C, 1] (or None) -> (y = gamma * x_hat + beta, x_hat, inv_std
    [M, C, 1], mean, var); mean and var (for the running statistics) are not differentiable. One node for
    the affine map too: its backward's products and sums were ~7 elementwise passes of the vjp mode's
    step per layer, now part of the statistics' backward pass."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps, launchers):
        x_hat, inv_std, mean, var = launchers.statistics_forward(x, eps)
        # without an affine map y is x_hat's value, as its own tensor: a Function's outputs are distinct
        y = x_hat.clone() if gamma is None else torch.addcmul(beta, x_hat, gamma)
        ctx.launchers = launchers
        ctx.save_for_backward(x_hat, inv_std, gamma)
        ctx.mark_non_differentiable(mean, var)
        return y, x_hat, inv_std, mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_x_hat, grad_inv_std, _grad_mean, _grad_var):
        x_hat, inv_std, gamma = ctx.saved_tensors
        grad_x, grad_gamma, grad_beta = ctx.launchers.statistics_backward(grad_y, grad_x_hat, grad_inv_std, x_hat,
                                                                          inv_std, gamma)
        return grad_x, grad_gamma, grad_beta, None, None


class NormalizedLinearization(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, x_hat, scale, launchers):
        out, means = launchers.linearization_forward(t, x_hat, scale)
        ctx.launchers = launchers
        ctx.save_for_backward(t, x_hat, scale, *means)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return *ctx.launchers.linearization_backward(grad_out.contiguous(), *ctx.saved_tensors), None


def batch_statistics(x: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float,
                     launchers: Launchers = ATEN):
    """Train-mode BatchNorm of primal rows x [B, M, C, L] that keeps what its linearization needs:
    differentiable (y like x, x_hat like x, inv_std [M, C, 1]), and the batch's mean and biased variance
    [M, C, 1] (detached). gamma and beta [M, C, 1], or both None."""
    return BatchStatistics.apply(x, gamma, beta, eps, launchers)


def normalized_linearization(t: torch.Tensor, x_hat: torch.Tensor, scale: torch.Tensor,
                             launchers: Launchers = ATEN) -> torch.Tensor:
    """Differentiable scale * (t - mean(t) - x_hat * mean(t * x_hat)) for t [S, B, M, C, L]."""
    return NormalizedLinearization.apply(t, x_hat, scale, launchers)


class NormalizedStreams(torch.autograd.Function):
    """x [S, B, M, C, L] -> (y like x, mean, var [M, C, 1]): see the module's docstring; mean and var (for
    the running statistics) are not differentiable. Once differentiable: the jvp-mode penalty needs one
    backward."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps, launchers):
        y, mean, var, inv_std, mean_t, mean_tx = launchers.streams_forward(x, gamma, beta, eps)
        ctx.launchers = launchers
        ctx.save_for_backward(x, mean, inv_std, gamma, mean_t, mean_tx)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        grad_x, grad_gamma, grad_beta = ctx.launchers.streams_backward(grad_y, *ctx.saved_tensors)
        _, wants_gamma, wants_beta, _, _ = ctx.needs_input_grad
        return grad_x, grad_gamma if wants_gamma else None, grad_beta if wants_beta else None, None, None


def normalized_streams(x: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float,
                       launchers: Launchers = ATEN):
    """Train-mode BatchNorm of the primal rows x[0] and its exact linearization on the tangent streams
    x[1:], in one Function: (y like x, the batch's mean and biased variance [M, C, 1], detached). gamma and
    beta [M, C, 1], or both None."""
    return NormalizedStreams.apply(x, gamma, beta, eps, launchers)
