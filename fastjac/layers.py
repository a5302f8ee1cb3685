"""The layer registry of the stacked engine: one class per layer kind.

A layer record is a frozen dataclass built from a member's ``nn.Module`` (``layer_for_module``, looked up
by module type in ``LAYERS``) or from a functional call such as ``F.relu``/``torch.flatten``/``x + y``
(``layer_for_call``: the call is first mapped to the equivalent module by ``FUNCTIONS``). Each kind has

    forward(run, h, layout, streams, batch, keep) -> (out, out_layout, saved)
        the primal rows and the tangent rows of every stream at once;
    transpose(run, saved, g, layout, nproj, batch) -> (g, g_layout)
        the cotangent rows (v^T J), run in reverse with what the forward saved;

``saved`` is a small dataclass of named fields (or None). ``run`` is the ``Engine``: its stacked
parameters and buffers (``run.state[name] -> [M, ...]``), the member count, the backend and the epilogue
launchers. ``keep`` says whether anything beyond the primal rows is needed (tangent streams, or a tape
for the cotangent chain); a plain pass (``keep`` False) runs the cheapest ATen ops.

Rows: R = S*B, stream 0 (rows [0, B)) is the primal batch, streams 1..S-1 are tangent rows (jvp mode).
In the cotangent chain the P*B rows are the P projections' cotangents. Activations travel in one of
three layouts, whichever makes the next product one call:
    "shared"  [R, *features]     the input batch, the same for every member
    "members" [M, R, *features]  after a Linear (one bmm per layer) or a per-member Conv2d
    "rows"    [R, M, *features]  after a Conv2d on the shared input (one convolution, channels M*C)
Cotangents are never "shared": each member's v^T J is its own.

Layer math (DESIGN.md): bias on the primal rows only; ReLU masks, max-pool indices and the derivative
of a smooth activation come from the primal rows and multiply the tangent/cotangent rows; BatchNorm
in eval mode is a per-channel scale on the extra rows; in train mode its statistics come from the
primal rows and the extra rows go through the exact linearization of the normalization, with means over
the B samples (and space) of one stream; the running statistics are updated once per pass, from the
primal rows, exactly as a plain forward updates them.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fastjac.ops import batch_norm as batch_norm_op
from fastjac.ops import conv_transpose
from fastjac.ops import stacked_linear as linear_op
from fastjac.ops import stream_epilogue as epilogue_op


class Unsupported(ValueError):
    """A module or call the registry does not fuse; the generic torch.func path runs the member."""


# ------------------------------------------------------------------------------------------- layouts
def to_members(h: torch.Tensor, layout: str) -> torch.Tensor:
    """[M, R, ...] view of a per-member activation."""
    return h if layout == "members" else h.transpose(0, 1)


def to_rows(h: torch.Tensor, layout: str) -> torch.Tensor:
    """[R, M, ...] view of a per-member activation."""
    return h if layout == "rows" else h.transpose(0, 1)


def convert(g: torch.Tensor, layout: str, target: str) -> torch.Tensor:
    """A per-member activation in ``layout`` as a view in ``target`` ("members" or "rows")."""
    return to_members(g, layout) if target == "members" else to_rows(g, layout)


def channels_view(h: torch.Tensor, layout: str) -> torch.Tensor:
    """A spatial activation as [R, M*C, H, W] (per member) or [R, C, H, W] (shared)."""
    if layout == "shared":
        return h
    rows = to_rows(h, layout)
    return rows.reshape(rows.shape[0], -1, *rows.shape[-2:])


def streams_view(h: torch.Tensor, layout: str, streams: int) -> torch.Tensor:
    """[O, S, I] view for the row-wise ops: O = M for members, 1 otherwise (rows of one stream are
    contiguous in every layout)."""
    if layout == "members":
        return h.reshape(h.shape[0], streams, -1)
    return h.reshape(1, streams, -1)


def unbind_members(t: torch.Tensor) -> list:
    """t.unbind(0); one member's is a view (no UnbindBackward stacking its gradient)."""
    return [t.squeeze(0)] if t.shape[0] == 1 else list(t.unbind(0))


def stack_members(parts: list) -> torch.Tensor:
    """torch.stack of per-member results; one member's is a view (no copy)."""
    return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)


def scale_rows(g: torch.Tensor, layout: str, factor: torch.Tensor, factor_layout: str, nproj: int,
               launchers=epilogue_op.TORCH_LAUNCHERS):
    """g (P*B rows per member) times a per-primal-row factor (a bool ReLU mask or a float derivative)
    recorded by the forward as [M, B*features] ("members"), [1, B*features] (shared by the members:
    pass "members") or [1, B*M*features] ("rows"), broadcast over the P projections. Returns g in
    ``factor_layout``'s order. A mask with a row per member of g is applied by ``launchers`` (the
    backend's stream epilogue: no float copy of the mask)."""
    if factor_layout == "rows":
        g = to_rows(g, layout)
        rows, factor = g.reshape(1, nproj, -1), factor.reshape(1, -1)
    else:
        g = to_members(g, layout)
        rows = g.reshape(g.shape[0], nproj, -1)
    if factor.dtype == torch.bool and factor.shape[0] == rows.shape[0]:
        out = epilogue_op.masked_streams(rows, factor, launchers)
    else:  # a float derivative, or a mask shared by the members (a product with the bool mask: measured
        # ~4x faster than torch.where on the CPU)
        out = rows * factor.unsqueeze(1)
    return out.view(g.shape), "rows" if factor_layout == "rows" else "members"


def _factor_layout(layout: str) -> str:
    """Where a row factor recorded in ``layout`` lives for ``scale_rows``."""
    return "rows" if layout == "rows" else "members"


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


# ------------------------------------------------------------------------------------------ registry
LAYERS: dict[type, type] = {}


def register(*module_types):
    """Class decorator: the layer kind built from these nn.Module types (``from_module``)."""
    def decorate(cls):
        for module_type in module_types:
            LAYERS[module_type] = cls
        return cls
    return decorate


def layer_for_module(name: str, module: nn.Module) -> "Layer":
    """The layer record of member submodule ``name``; Unsupported if no kind fuses it."""
    kind = LAYERS.get(type(module))
    if kind is None:
        raise Unsupported(f"node {name or '(root)'}: {type(module).__name__} is not fused")
    return kind.from_module(name, module)


class Layer:
    """Base of every layer kind (subclasses are frozen dataclasses)."""

    arity = 1            # activations consumed (the residual add: 2)
    shape_only = False   # the identity on values (Flatten, Identity, eval-mode Dropout)

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> "Layer":
        return cls()

    def in_mode(self, training: bool) -> "Layer":
        """This layer in train or eval mode; Unsupported where the mode cannot be fused."""
        return self

    def apply(self, run, inputs, streams: int, batch: int, keep: bool):
        """The engine's entry: ``inputs`` is a list of (activation, layout), one per input."""
        ((h, layout),) = inputs
        return self.forward(run, h, layout, streams, batch, keep)

    def apply_transpose(self, run, saved, g, layout: str, nproj: int, batch: int) -> list:
        """The cotangent of each input, [(g, layout)]."""
        return [self.transpose(run, saved, g, layout, nproj, batch)]



# ------------------------------------------------------------------------------- layers with weights
@dataclass(frozen=True)
class ProductSaved:
    in_layout: str               # layout of the layer's input
    in_shape: tuple              # shape of the layer's input
    mask: torch.Tensor | None    # fused ReLU's primal mask, or None
    out_layout: str = "members"  # layout of the output (and of the mask)


@register(nn.Linear)
@dataclass(frozen=True)
class Linear(Layer):
    name: str                    # parameter-name prefix in the member ("1" -> "1.weight")
    has_bias: bool
    relu: bool = False           # a ReLU follows and is fused into the epilogue

    @classmethod
    def from_module(cls, name, module):
        return cls(name, module.bias is not None)

    def forward(self, run, h, layout, streams, batch, keep):
        weight, bias = run.weight_bias(self)
        source = h if layout == "shared" else to_members(h, layout)
        out, mask = linear_op.stacked_linear(source, weight, bias, streams, self.relu, run.backend, keep)
        return out, "members", ProductSaved(layout, tuple(source.shape), mask)

    def transpose(self, run, saved, g, layout, nproj, batch):
        weight, _ = run.weight_bias(self)
        if saved.mask is not None:
            g, layout = scale_rows(g, layout, saved.mask, "members", nproj, run.epilogue_launchers)
        g = torch.bmm(to_members(g, layout), weight)  # [M, P*B, IN]
        return (g.transpose(0, 1), "rows") if saved.in_layout == "rows" else (g, "members")


@register(nn.Conv2d)
@dataclass(frozen=True)
class Conv2d(Layer):
    """A stacked Conv2d. On the shared input (groups 1) one convolution of M*COUT channels gives the "rows"
    layout; otherwise each member's convolution runs on its own contiguous slice of a "members" layout
    [M, R, C, H, W]. Measured on this project's shared 2-core CPU, one thread, forward + backward of a
    ResNet 3x3 conv (32 channels, 14x14, B = 64, M = 5): 138 ms this way, 161 ms as ATen's grouped kernel
    over [R, M*C, H, W], 192 ms as a loop over that layout's channel chunks (their copies)."""
    name: str
    has_bias: bool
    kernel: tuple
    stride: tuple
    padding: tuple               # (top, bottom, left, right): padding="same" may be asymmetric
    dilation: tuple
    groups: int = 1
    relu: bool = False

    @classmethod
    def from_module(cls, name, module):
        if module.padding_mode != "zeros":
            raise Unsupported(f"node {name}: Conv2d with padding_mode={module.padding_mode!r} is not fused")
        kernel, dilation = _pair(module.kernel_size), _pair(module.dilation)
        if module.padding == "same":  # stride 1 (PyTorch requires it); the odd extra pixel goes last
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            padding = (totals[0] // 2, totals[0] - totals[0] // 2, totals[1] // 2, totals[1] - totals[1] // 2)
        else:
            top, left = (0, 0) if module.padding == "valid" else _pair(module.padding)
            padding = (top, top, left, left)
        return cls(name, module.bias is not None, kernel, _pair(module.stride), padding, dilation, module.groups)

    @property
    def symmetric(self) -> bool:
        return self.padding[0] == self.padding[1] and self.padding[2] == self.padding[3]

    @property
    def subsamples(self) -> bool:
        """A strided 1x1 convolution without padding (ResNet's projection shortcut): run as a subsample of
        the input followed by a 1x1 convolution of stride 1, and transposed as the reverse. ATen's own
        strided 1x1 kernels measured 3-8x slower on the CPU (16 -> 32 channels, 28x28 -> 14x14, B = 128,
        2 threads: forward + backward 17.3 against 4.6 ms; the transpose 10.6 against 1.3 ms)."""
        return self.kernel == (1, 1) and self.stride != (1, 1) and not any(self.padding)

    def _conv(self, x, weight, bias):
        """F.conv2d of x [N, C, H, W] with this layer's settings (asymmetric padding applied first)."""
        if self.subsamples:
            return F.conv2d(x[:, :, ::self.stride[0], ::self.stride[1]].contiguous(), weight, bias, 1, 0, 1,
                            self.groups)
        if self.symmetric:
            return F.conv2d(x, weight, bias, self.stride, (self.padding[0], self.padding[2]), self.dilation,
                            self.groups)
        x = F.pad(x, (self.padding[2], self.padding[3], self.padding[0], self.padding[1]))
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)

    def forward(self, run, h, layout, streams, batch, keep):
        weight, bias = run.weight_bias(self)
        members, cout = weight.shape[:2]
        plain = not keep and not run.backend.own_plain_epilogue  # ATen fuses the bias; relu keeps its output
        if layout == "shared" and self.groups == 1:  # one convolution for every member: [R, M*COUT, h, w]
            flat_bias = bias.reshape(-1) if plain and bias is not None else None
            y = self._conv(h, weight.reshape(members * cout, *weight.shape[2:]), flat_bias)
            out_layout, view = "rows", y.view(y.shape[0], members, cout, *y.shape[-2:])
        else:
            inputs = [h] * members if layout == "shared" else unbind_members(to_members(h, layout))
            biases = unbind_members(bias) if plain and bias is not None else [None] * members
            y = stack_members([self._conv(x, w, b) for x, w, b in zip(inputs, unbind_members(weight), biases)])
            out_layout, view = "members", y
        if plain:
            return (torch.relu(view) if self.relu else view), out_layout, ProductSaved(layout, tuple(h.shape), None)
        o = 1 if out_layout == "rows" else members
        out, mask = epilogue_op.stream_epilogue(
            y.reshape(o, streams, -1), None if bias is None else bias.reshape(o, -1), y.shape[-1] * y.shape[-2],
            self.relu, run.epilogue_launchers)
        return out.view(view.shape), out_layout, ProductSaved(layout, tuple(h.shape), mask, out_layout)

    def transpose(self, run, saved, g, layout, nproj, batch):
        weight, _ = run.weight_bias(self)
        if saved.mask is not None:
            g, layout = scale_rows(g, layout, saved.mask, saved.out_layout, nproj, run.epilogue_launchers)
        height, width = saved.in_shape[-2:]
        if self.subsamples:  # the 1x1 transpose, scattered onto the positions the forward sampled
            g = to_members(g, layout)
            small = stack_members([F.conv_transpose2d(g_m, w_m, None, 1, 0, 0, self.groups)
                                   for g_m, w_m in zip(unbind_members(g), unbind_members(weight))])
            full = small.new_zeros(*small.shape[:-2], height, width)
            full[..., ::self.stride[0], ::self.stride[1]] = small
            return full, "members"
        if self.symmetric:
            padding = (self.padding[0], self.padding[2])
            target = (height, width)
        else:  # transpose onto the padded input, then crop the padding away
            padding = (0, 0)
            target = (height + self.padding[0] + self.padding[1], width + self.padding[2] + self.padding[3])
        g = to_members(g, layout)  # [M, P*B, COUT, h, w]; each member's cotangent w.r.t. the input is its own
        output_padding = tuple(
            target[i] - ((g.shape[-2 + i] - 1) * self.stride[i] - 2 * padding[i]
                         + self.dilation[i] * (self.kernel[i] - 1) + 1)
            for i in range(2))
        stride_one = self.stride == (1, 1) and self.groups == 1 and not any(output_padding)

        def transpose(g_m, w_m):  # stride 1: the fastest of the ways ops/conv_transpose times
            if stride_one:
                return conv_transpose.conv_transpose2d(g_m, w_m, padding, self.dilation)
            return F.conv_transpose2d(g_m, w_m, None, self.stride, padding, output_padding, self.groups, self.dilation)

        g = stack_members([transpose(g_m, w_m) for g_m, w_m in zip(unbind_members(g), unbind_members(weight))])
        if not self.symmetric:
            g = g[..., self.padding[0]:self.padding[0] + height, self.padding[2]:self.padding[2] + width]
        return g, "members"


# ---------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class RowFactorSaved:
    layout: str                  # layout of the activation the factor was recorded in
    factor: torch.Tensor         # [O, B*features]: a bool ReLU mask or a float derivative f'(x)


@register(nn.ReLU)
@dataclass(frozen=True)
class ReLU(Layer):
    """A ReLU not fused into the layer before it (after pooling, a residual add, a BatchNorm, ...)."""

    def forward(self, run, h, layout, streams, batch, keep):
        if not keep:
            return torch.relu(h), layout, None
        out, mask = epilogue_op.stream_epilogue(streams_view(h, layout, streams), None, 1, True,
                                                run.epilogue_launchers)
        return out.view(h.shape), layout, RowFactorSaved(layout, mask)

    def transpose(self, run, saved, g, layout, nproj, batch):
        return scale_rows(g, layout, saved.factor, _factor_layout(saved.layout), nproj, run.epilogue_launchers)


class Pointwise(Layer):
    """A smooth (or piecewise-smooth) pointwise activation y = f(x): tangent and cotangent rows are
    multiplied by f'(x) of the primal rows. Subclasses give ``value(x)`` and ``derivative(x, y)``, both
    in differentiable torch ops (the penalty's gradient runs through f'(x))."""

    def forward(self, run, h, layout, streams, batch, keep):
        if not keep:
            return self.value(h), layout, None
        rows = streams_view(h, layout, streams)  # [O, S, I]
        primal = rows[:, 0]
        y = self.value(primal)
        slope = self.derivative(primal, y)
        out = torch.cat([y.unsqueeze(1), rows[:, 1:] * slope.unsqueeze(1)], 1)
        return out.view(h.shape), layout, RowFactorSaved(layout, slope)

    def transpose(self, run, saved, g, layout, nproj, batch):
        return scale_rows(g, layout, saved.factor, _factor_layout(saved.layout), nproj, run.epilogue_launchers)


@register(nn.Tanh)
@dataclass(frozen=True)
class Tanh(Pointwise):
    def value(self, x):
        return torch.tanh(x)

    def derivative(self, x, y):
        return 1 - y * y


@register(nn.Sigmoid)
@dataclass(frozen=True)
class Sigmoid(Pointwise):
    def value(self, x):
        return torch.sigmoid(x)

    def derivative(self, x, y):
        return y * (1 - y)


@register(nn.GELU)
@dataclass(frozen=True)
class GELU(Pointwise):
    approximate: str = "none"

    @classmethod
    def from_module(cls, name, module):
        return cls(module.approximate)

    def value(self, x):
        return F.gelu(x, approximate=self.approximate)

    def derivative(self, x, y):
        if self.approximate == "tanh":  # 0.5 x (1 + tanh(k (x + a x^3)))
            k, a = math.sqrt(2 / math.pi), 0.044715
            t = torch.tanh(k * (x + a * x ** 3))
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * a * x * x)
        return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


@register(nn.SiLU)
@dataclass(frozen=True)
class SiLU(Pointwise):
    def value(self, x):
        return F.silu(x)

    def derivative(self, x, y):
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))


@register(nn.LeakyReLU)
@dataclass(frozen=True)
class LeakyReLU(Pointwise):
    negative_slope: float = 0.01

    @classmethod
    def from_module(cls, name, module):
        return cls(module.negative_slope)

    def value(self, x):
        return F.leaky_relu(x, self.negative_slope)

    def derivative(self, x, y):
        return (x > 0).to(x.dtype) * (1 - self.negative_slope) + self.negative_slope


@register(nn.ELU)
@dataclass(frozen=True)
class ELU(Pointwise):
    alpha: float = 1.0

    @classmethod
    def from_module(cls, name, module):
        return cls(module.alpha)

    def value(self, x):
        return F.elu(x, self.alpha)

    def derivative(self, x, y):  # x <= 0: alpha e^x = y + alpha
        return torch.where(x > 0, torch.ones_like(y), y + self.alpha)


@register(nn.Softplus)
@dataclass(frozen=True)
class Softplus(Pointwise):
    beta: float = 1.0
    threshold: float = 20.0

    @classmethod
    def from_module(cls, name, module):
        return cls(module.beta, module.threshold)

    def value(self, x):
        return F.softplus(x, self.beta, self.threshold)

    def derivative(self, x, y):  # torch's softplus is the identity where beta x > threshold
        z = x * self.beta
        return torch.where(z > self.threshold, torch.ones_like(z), torch.sigmoid(z))


# ----------------------------------------------------------------------------------------- pooling
@dataclass(frozen=True)
class InputSaved:
    in_layout: str
    in_shape: tuple              # the input's shape (pooling: its [O, S, B, C', H, W] view, see ``_pool_rows``)
    indices: torch.Tensor | None = None  # max pooling: the primal's argmax per window, [O*B, C', h, w]


def _pool_rows(h: torch.Tensor, layout: str, streams: int) -> torch.Tensor:
    """[O, S, B, C', H, W] view of a spatial activation: O = M and C' = C for "members", O = 1 and
    C' = M*C for "rows" (the members' channels side by side), O = 1 and C' = C for "shared"."""
    if layout == "members":
        return h.reshape(h.shape[0], streams, -1, *h.shape[2:])
    channels = channels_view(h, layout)
    return channels.reshape(1, streams, -1, *channels.shape[1:])


def _unpool_rows(v: torch.Tensor, layout: str, members: int) -> torch.Tensor:
    """Inverse of ``_pool_rows`` for the pooled [O, S, B, C', h, w]: back to ``layout``'s shape."""
    o, streams, batch, channels = v.shape[:4]
    if layout == "members":
        return v.reshape(o, streams * batch, channels, *v.shape[-2:])
    if layout == "rows":
        return v.reshape(streams * batch, members, channels // members, *v.shape[-2:])
    return v.reshape(streams * batch, channels, *v.shape[-2:])


def _cotangent_layout(in_layout: str) -> str:
    """Where a pooling layer's input cotangent lives: per member, in the input's own layout ("rows" for a
    shared input: each member's cotangent is its own)."""
    return "members" if in_layout == "members" else "rows"


class _LinearPool(Layer):
    """Pooling that is a linear map of each row (average pooling): all streams in one call. Each gives
    ``_pool(x [N, C, H, W])`` and ``_spread(g [N, C, h, w], shape)``, the transposed map onto ``shape``."""

    def forward(self, run, h, layout, streams, batch, keep):
        v = _pool_rows(h, layout, streams)
        pooled = self._pool(v.flatten(0, 2))
        out = _unpool_rows(pooled.view(*v.shape[:4], *pooled.shape[-2:]), layout, run.members)
        return out, layout, InputSaved(layout, tuple(v.shape))

    def transpose(self, run, saved, g, layout, nproj, batch):
        target = _cotangent_layout(saved.in_layout)
        v = _pool_rows(convert(g, layout, target), target, nproj)  # [O, P, B, C', h, w]
        spread = self._spread(v.flatten(0, 2), (v.shape[0] * nproj * batch, v.shape[3], *saved.in_shape[-2:]))
        return _unpool_rows(spread.view(*v.shape[:4], *spread.shape[-2:]), target, run.members), target


@register(nn.MaxPool2d)
@dataclass(frozen=True)
class MaxPool2d(Layer):
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool

    @classmethod
    def from_module(cls, name, module):
        if module.return_indices:
            raise Unsupported(f"node {name}: MaxPool2d with return_indices=True is not fused")
        return cls(_pair(module.kernel_size), _pair(module.stride or module.kernel_size), _pair(module.padding),
                   _pair(module.dilation), module.ceil_mode)

    def forward(self, run, h, layout, streams, batch, keep):
        v = _pool_rows(h, layout, streams)  # [O, S, B, C', H, W]
        o, _, _, channels = v.shape[:4]
        pooled, indices = self._pool_with_indices(v[:, 0].flatten(0, 1))  # [O*B, C', h, w]
        size = pooled.shape[-2:]
        out = pooled.view(o, 1, batch, channels, -1)
        if streams > 1:  # tangent rows take the primal's argmax: the derivative of max pooling
            index = indices.view(o, 1, batch, channels, -1).expand(o, streams - 1, batch, channels, -1)
            tangent = v[:, 1:].reshape(o, streams - 1, batch, channels, -1).gather(4, index)
            out = torch.cat([out, tangent], 1)
        out = _unpool_rows(out.view(o, streams, batch, channels, *size), layout, run.members)
        return out, layout, InputSaved(layout, tuple(v.shape), indices)

    def _pool_with_indices(self, x):
        """``F.max_pool2d`` with indices, both contiguous [N, C, h, w]. On the CPU the argmax comes from a
        channels-last copy: ATen's CPU kernel is ~3x slower on contiguous NCHW input and gives the same
        values and indices (LeNet's first pool, [128, 30, 28, 28], 2 threads, torch 2.13: 12.4 ms against
        3.7 ms with both copies). Where x needs a gradient, the values are gathered from x itself (the
        backward is a scatter, as max pooling's own) rather than sent back through two layout copies."""
        args = (self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)
        if x.device.type != "cpu":
            return F.max_pool2d(x, *args, return_indices=True)
        with torch.no_grad():
            pooled, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), *args, return_indices=True)
            indices = indices.contiguous()
        if x.requires_grad and torch.is_grad_enabled():
            return x.flatten(2).gather(2, indices.flatten(2)).view(indices.shape), indices
        return pooled.contiguous(), indices

    def transpose(self, run, saved, g, layout, nproj, batch):
        target = _cotangent_layout(saved.in_layout)
        v = _pool_rows(convert(g, layout, target), target, nproj)  # [O, P, B, C', h, w]
        o, _, _, channels = v.shape[:4]
        indices = saved.indices
        if saved.in_layout == "shared":  # one index map for all members: repeat it per member
            indices = indices.repeat(1, run.members, 1, 1)
        index = indices.view(o, 1, batch, channels, -1).expand(o, nproj, batch, channels, -1)
        height, width = saved.in_shape[-2:]
        spread = v.new_zeros(o, nproj, batch, channels, height * width).scatter_add(
            4, index, v.reshape(o, nproj, batch, channels, -1))
        return _unpool_rows(spread.view(o, nproj, batch, channels, height, width), target, run.members), target


@register(nn.AvgPool2d)
@dataclass(frozen=True)
class AvgPool2d(_LinearPool):
    kernel: tuple
    stride: tuple
    padding: tuple
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: int | None

    @classmethod
    def from_module(cls, name, module):
        return cls(_pair(module.kernel_size), _pair(module.stride or module.kernel_size), _pair(module.padding),
                   module.ceil_mode, module.count_include_pad, module.divisor_override)

    def _pool(self, x):
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override)

    def _spread(self, g, shape):
        return torch.ops.aten.avg_pool2d_backward(g, g.new_zeros(()).expand(shape), self.kernel, self.stride,
                                                  self.padding, self.ceil_mode, self.count_include_pad,
                                                  self.divisor_override)


@register(nn.AdaptiveAvgPool2d)
@dataclass(frozen=True)
class AdaptiveAvgPool2d(_LinearPool):
    output_size: tuple

    @classmethod
    def from_module(cls, name, module):
        size = _pair(module.output_size)
        if None in size:
            raise Unsupported(f"node {name}: AdaptiveAvgPool2d with a None output size is not fused")
        return cls(size)

    def _pool(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)

    def _spread(self, g, shape):
        return torch.ops.aten._adaptive_avg_pool2d_backward(g, g.new_zeros(()).expand(shape))


# ------------------------------------------------------------------------------------ shape-only kinds
@register(nn.Flatten)
@dataclass(frozen=True)
class Flatten(Layer):
    shape_only = True

    @classmethod
    def from_module(cls, name, module):
        if module.start_dim != 1 or module.end_dim != -1:
            raise Unsupported(f"node {name}: Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}) is not "
                              "fused (only start_dim=1, end_dim=-1)")
        return cls()

    def forward(self, run, h, layout, streams, batch, keep):
        lead = 1 if layout == "shared" else 2
        return h.reshape(*h.shape[:lead], -1), layout, InputSaved(layout, tuple(h.shape))

    def transpose(self, run, saved, g, layout, nproj, batch):
        features = saved.in_shape[1:] if saved.in_layout == "shared" else saved.in_shape[2:]
        return g.reshape(*g.shape[:2], *features), layout


@register(nn.Identity)
@dataclass(frozen=True)
class Identity(Layer):
    shape_only = True

    def forward(self, run, h, layout, streams, batch, keep):
        return h, layout, None

    def transpose(self, run, saved, g, layout, nproj, batch):
        return g, layout


@register(nn.Dropout)
@dataclass(frozen=True)
class Dropout(Identity):
    """The identity in eval mode (or with p = 0); in training mode with p > 0 not fused."""
    p: float = 0.5

    @classmethod
    def from_module(cls, name, module):
        return cls(module.p)

    def in_mode(self, training):
        if training and self.p > 0:
            raise Unsupported("Dropout with p > 0 in training mode")
        return self


# ------------------------------------------------------------------------------------ the residual add
@dataclass(frozen=True)
class Add(Layer):
    """y = a + b (a residual connection): tangents add; the cotangent goes to both inputs."""
    arity = 2

    def apply(self, run, inputs, streams, batch, keep):
        (a, la), (b, lb) = inputs
        if la == "shared":  # the sum is per member if either input is: keep that one first
            (a, la), (b, lb) = (b, lb), (a, la)
        if lb == "shared" and la != "shared":  # [R, *f] broadcast over the member axis of a
            b = b if la == "members" else b.unsqueeze(1)
        elif lb != la:
            b = convert(b, lb, la)
        return a + b, la, None

    def apply_transpose(self, run, saved, g, layout, nproj, batch):
        return [(g, layout), (g, layout)]


# ---------------------------------------------------------------------------------------- BatchNorm
def channel_streams(h: torch.Tensor, layout: str, streams: int, members: int) -> torch.Tensor:
    """[S, B, M, C, L] view of an activation with C channels and L = prod(spatial) in any layout."""
    if layout == "members":
        m, rows, channels = h.shape[:3]
        return h.reshape(m, streams, rows // streams, channels, -1).permute(1, 2, 0, 3, 4)
    if layout == "rows":
        rows, m, channels = h.shape[:3]
        return h.reshape(streams, rows // streams, m, channels, -1)
    rows, channels = h.shape[:2]
    return h.reshape(streams, rows // streams, 1, channels, -1).expand(-1, -1, members, -1, -1)


def from_channel_streams(y: torch.Tensor, layout: str, features: tuple) -> tuple[torch.Tensor, str]:
    """Inverse of ``channel_streams``: [S, B, M, C, L] -> "members" [M, S*B, C, *spatial] for a members
    input, else "rows" [S*B, M, C, *spatial]. ``features`` = (C, *spatial)."""
    streams, batch, members = y.shape[:3]
    if layout == "members":
        return y.permute(2, 0, 1, 3, 4).reshape(members, streams * batch, *features), "members"
    return y.reshape(streams * batch, members, *features), "rows"


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count: int,
                         momentum: float | None) -> None:
    """One update of the running statistics [M, C] from a batch's mean and biased variance [M, C] over
    ``count`` values per channel, exactly as ``nn.BatchNorm*`` does in a training forward (momentum None:
    the cumulative average over num_batches_tracked)."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            factor = (1.0 / num_batches_tracked.to(mean.dtype)).view(-1, 1)
        else:
            factor = momentum
        running_mean.mul_(1 - factor).add_(mean.detach() * factor)
        running_var.mul_(1 - factor).add_(var.detach() * (count / max(count - 1, 1)) * factor)


@dataclass(frozen=True)
class BatchNormSaved:
    scale: torch.Tensor                # gamma / sigma per member and channel, [M, C, 1]
    x_hat: torch.Tensor | None = None  # batch statistics: the normalized primal rows [B, M, C, L]


@register(nn.BatchNorm1d, nn.BatchNorm2d)
@dataclass(frozen=True)
class BatchNorm(Layer):
    name: str
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool = False

    @classmethod
    def from_module(cls, name, module):
        return cls(name, module.eps, module.momentum, module.affine, module.track_running_stats)

    def in_mode(self, training):
        return replace(self, training=training)

    @property
    def batch_statistics(self) -> bool:
        """Normalizes with the batch's statistics (train mode, or no running statistics kept)."""
        return self.training or not self.track_running_stats

    def _affine(self, run):
        if not self.affine:
            return None, None
        return run.state[f"{self.name}.weight"], run.state[f"{self.name}.bias"]

    def _running(self, run):
        """(running_mean, running_var, num_batches_tracked) [M, C], [M, C], [M] or Nones."""
        if not self.track_running_stats:
            return None, None, None
        return tuple(run.state.get(f"{self.name}.{key}") for key in ("running_mean", "running_var",
                                                                       "num_batches_tracked"))

    def _update(self, run, mean, var, count):
        if self.training and self.track_running_stats:
            update_running_stats(*self._running(run), mean.reshape(run.members, -1), var.reshape(run.members, -1),
                                 count, self.momentum)

    def forward(self, run, h, layout, streams, batch, keep):
        gamma, beta = self._affine(run)
        members = run.members
        x = channel_streams(h, layout, streams, members)  # [S, B, M, C, L]
        features = tuple(h.shape[1 if layout == "shared" else 2:])
        if not keep:  # the primal rows alone, on ATen's batch_norm
            running_mean, running_var, tracked = self._running(run)
            momentum = 0.0
            if self.batch_statistics and running_mean is not None:  # train mode: the running statistics move
                if self.momentum is None:  # the cumulative average: its factor comes from num_batches_tracked
                    with torch.no_grad():
                        mean, var, _ = batch_norm_op.moments(x[0])
                        self._update(run, mean, var, batch * x.shape[-1])
                    running_mean = running_var = None
                else:  # ATen's batch_norm updates them in place (views of the stacked buffers), as nn.BatchNorm*d
                    # does, without a separate pass for the moments
                    momentum = self.momentum
                    if tracked is not None:
                        tracked.add_(1)
            if layout == "members":  # each member's contiguous slice
                parts = zip(unbind_members(h), *(_unbind(t, members) for t in (running_mean, running_var, gamma, beta)))
                out = stack_members([F.batch_norm(h_m, mean_m, var_m, gamma_m, beta_m, self.batch_statistics, momentum,
                                                self.eps) for h_m, mean_m, var_m, gamma_m, beta_m in parts])
                return out, "members", None
            flat = x[0].reshape(batch, -1, x.shape[-1])  # [B, M*C, L]: every member's channels side by side
            out = F.batch_norm(flat, *(None if t is None else t.view(-1) for t in (running_mean, running_var)),
                               *(None if t is None else t.reshape(-1) for t in (gamma, beta)),
                               self.batch_statistics, momentum, self.eps)
            return from_channel_streams(out.view(1, *x.shape[1:]), layout, features) + (None,)
        gamma3 = None if gamma is None else gamma.view(members, -1, 1)
        beta3 = None if beta is None else beta.view(members, -1, 1)
        launchers = run.backend.batch_norm
        if self.batch_statistics and streams > 1:  # jvp mode: every stream in one Function, nothing saved
            y, mean, var = batch_norm_op.normalized_streams(x, gamma3, beta3, self.eps, launchers)
            self._update(run, mean, var, batch * x.shape[-1])
            return from_channel_streams(y, layout, features) + (None,)
        if self.batch_statistics:  # one stream, the cotangent chain's tape: the transpose needs x_hat
            out, x_hat, inv_std, mean, var = batch_norm_op.batch_statistics(x.squeeze(0), gamma3, beta3, self.eps,
                                                                            launchers)
            self._update(run, mean, var, batch * x.shape[-1])
            scale = inv_std if gamma3 is None else inv_std * gamma3
            out = out.unsqueeze(0)
            saved = BatchNormSaved(scale, x_hat)
        else:  # a per-channel affine map: the extra rows are only scaled (the shift is stream 0's)
            running_mean, running_var, _ = self._running(run)
            scale = torch.rsqrt(running_var.view(members, -1, 1) + self.eps)
            scale = scale if gamma3 is None else scale * gamma3
            shift = -running_mean.view(members, -1, 1) * scale
            shift = shift if beta3 is None else shift + beta3
            shifts = torch.cat([shift.unsqueeze(0), shift.new_zeros(streams - 1, *shift.shape)]).unsqueeze(1)
            out = torch.addcmul(shifts, x, scale)
            saved = BatchNormSaved(scale)
        return from_channel_streams(out, layout, features) + (saved,)

    def transpose(self, run, saved, g, layout, nproj, batch):
        features = tuple(g.shape[2:])
        g5 = channel_streams(g, layout, nproj, run.members)  # [P, B, M, C, L]
        if saved.x_hat is None:
            out = g5 * saved.scale
        else:
            out = batch_norm_op.normalized_linearization(g5, saved.x_hat, saved.scale, run.backend.batch_norm)
        return from_channel_streams(out, layout, features)


def _unbind(t: torch.Tensor | None, members: int) -> list:
    """Per-member slices of a stacked [M, ...] tensor, or M Nones."""
    return [None] * members if t is None else unbind_members(t)


# ----------------------------------------------------------------------------------- functional calls
def _unary(build):
    """A builder for a call whose first argument is the tensor: ``build(*other args, **kwargs) -> Module``."""
    return lambda _input, *args, **kwargs: build(*args, **kwargs)


def _add(_input, _other, alpha=1):
    if alpha != 1:
        raise Unsupported(f"add with alpha={alpha!r} is not fused")
    return Add()


# fx call targets (functions, or method names for ``x.relu()``-style calls) -> the equivalent module, or
# directly the layer; each builder takes the call's arguments (tensors included) with torch's signature
FUNCTIONS = {
    F.relu: _unary(lambda inplace=False: nn.ReLU()),
    torch.relu: _unary(nn.ReLU),
    "relu": _unary(nn.ReLU),
    torch.flatten: _unary(lambda start_dim=0, end_dim=-1: nn.Flatten(start_dim, end_dim)),
    "flatten": _unary(lambda start_dim=0, end_dim=-1: nn.Flatten(start_dim, end_dim)),
    torch.tanh: _unary(nn.Tanh),
    F.tanh: _unary(nn.Tanh),
    "tanh": _unary(nn.Tanh),
    torch.sigmoid: _unary(nn.Sigmoid),
    F.sigmoid: _unary(nn.Sigmoid),
    "sigmoid": _unary(nn.Sigmoid),
    F.gelu: _unary(lambda approximate="none": nn.GELU(approximate)),
    F.silu: _unary(lambda inplace=False: nn.SiLU()),
    F.leaky_relu: _unary(lambda negative_slope=0.01, inplace=False: nn.LeakyReLU(negative_slope)),
    F.elu: _unary(lambda alpha=1.0, inplace=False: nn.ELU(alpha)),
    F.softplus: _unary(lambda beta=1.0, threshold=20.0: nn.Softplus(beta, threshold)),
    F.adaptive_avg_pool2d: _unary(nn.AdaptiveAvgPool2d),
    F.max_pool2d: _unary(lambda kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False:
                         nn.MaxPool2d(kernel_size, stride, padding, dilation, return_indices, ceil_mode)),
    F.avg_pool2d: _unary(nn.AvgPool2d),
    operator.add: _add,
    torch.add: _add,
    "add": _add,
}


def layer_for_call(label: str, target, args: tuple, kwargs: dict) -> Layer:
    """The layer record of a functional call (``F.relu(x)``, ``x.flatten(1)``, ``a + b``...); Unsupported
    if no kind fuses it. ``args``/``kwargs`` are the call's, tensors included."""
    build = FUNCTIONS.get(target)
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    if build is None:
        raise Unsupported(f"node {label}: {name}() is not fused")
    try:
        made = build(*args, **kwargs)
    except TypeError as error:
        raise Unsupported(f"node {label}: {name}() with these arguments is not fused ({error})") from error
    except Unsupported as error:
        raise Unsupported(f"node {label}: {error}") from error
    return made if isinstance(made, Layer) else layer_for_module(label, made)
