"""The stacked engine: all members, the primal batch and the projection streams in one pass per layer.

Architectures are parsed once into a list of ``Layer`` records (Linear, Conv2d, ReLU, MaxPool2d,
AvgPool2d, Flatten, Identity/eval-mode Dropout); parameters come stacked along a leading member axis
(Linear W [M,OUT,IN], Conv2d W [M,COUT,CIN,k,k]).

Rows: R = S*B, stream 0 (rows [0, B)) is the primal batch, streams 1..S-1 are tangent rows (jvp mode).
Activations travel in one of three layouts, whichever makes the next product one call:
    "shared"  [R, *features]     the input batch, the same for every member
    "members" [M, R, *features]  after a Linear (one bmm per layer)
    "rows"    [R, M, *features]  after a Conv2d (one grouped convolution, channels M*C)
ReLU masks and max-pool indices come from the primal rows only and are applied to the tangent rows;
bias touches primal rows only (tangents are linear in the input direction).

For the vjp mode the primal pass records a tape (masks, pool indices, shapes) and ``cotangent`` runs
the transposed chain v -> v^T J in reverse with ordinary differentiable ops, so the penalty's parameter
gradient is one plain backward: no double-backward graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastjac.ops import linear_chain
from fastjac.ops import stacked_linear as linear_op
from fastjac.ops import stream_epilogue as epilogue_op


class UnsupportedArchitecture(ValueError):
    """The module is not a flat stack of layers the engine fuses; the generic torch.func path runs it."""


@dataclass(frozen=True)
class Layer:
    kind: str                  # linear | conv | relu | maxpool | avgpool | flatten | identity | dropout
    name: str = ""             # parameter-name prefix in the member module (e.g. "1" -> "1.weight")
    relu: bool = False         # linear/conv: a ReLU follows and is fused into the epilogue
    has_bias: bool = False
    options: dict = field(default_factory=dict, compare=False)


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def parse(module: nn.Module) -> list[Layer]:
    """Layer records of a flat (possibly nested) nn.Sequential, fusing each ReLU into the layer before."""
    if not isinstance(module, nn.Sequential):
        raise UnsupportedArchitecture(f"only nn.Sequential members are fused, got {type(module).__name__}")
    if any(True for _ in module.buffers()):
        raise UnsupportedArchitecture("members with buffers (e.g. BatchNorm) are not fused")
    layers: list[Layer] = []

    def visit(seq: nn.Sequential, prefix: str):
        for child_name, child in seq.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, nn.Sequential):
                visit(child, name + ".")
            elif isinstance(child, nn.Linear):
                layers.append(Layer("linear", name, has_bias=child.bias is not None))
            elif isinstance(child, nn.Conv2d):
                if child.groups != 1 or child.padding_mode != "zeros" or isinstance(child.padding, str):
                    raise UnsupportedArchitecture(f"Conv2d {name}: only groups=1, zero padding given as ints is fused")
                layers.append(Layer("conv", name, has_bias=child.bias is not None, options=dict(
                    stride=_pair(child.stride), padding=_pair(child.padding), dilation=_pair(child.dilation),
                    kernel=_pair(child.kernel_size))))
            elif isinstance(child, nn.ReLU):
                if layers and layers[-1].kind in ("linear", "conv") and not layers[-1].relu:
                    previous = layers.pop()
                    layers.append(Layer(previous.kind, previous.name, True, previous.has_bias, previous.options))
                else:
                    layers.append(Layer("relu", name))
            elif isinstance(child, nn.MaxPool2d):
                if child.return_indices:
                    raise UnsupportedArchitecture(f"MaxPool2d {name}: return_indices=True is not fused")
                layers.append(Layer("maxpool", name, options=dict(
                    kernel=_pair(child.kernel_size), stride=_pair(child.stride or child.kernel_size),
                    padding=_pair(child.padding), dilation=_pair(child.dilation), ceil_mode=child.ceil_mode)))
            elif isinstance(child, nn.AvgPool2d):
                layers.append(Layer("avgpool", name, options=dict(
                    kernel=_pair(child.kernel_size), stride=_pair(child.stride or child.kernel_size),
                    padding=_pair(child.padding), ceil_mode=child.ceil_mode,
                    count_include_pad=child.count_include_pad, divisor_override=child.divisor_override)))
            elif isinstance(child, nn.Flatten):
                if child.start_dim != 1 or child.end_dim != -1:
                    raise UnsupportedArchitecture(f"Flatten {name}: only start_dim=1, end_dim=-1 is fused")
                layers.append(Layer("flatten", name))
            elif isinstance(child, nn.Identity):
                layers.append(Layer("identity", name))
            elif isinstance(child, nn.Dropout):
                layers.append(Layer("dropout", name, options=dict(p=child.p)))
            else:
                raise UnsupportedArchitecture(f"layer {name} ({type(child).__name__}) is not fused")

    visit(module, "")
    if not any(layer.kind in ("linear", "conv") for layer in layers):
        raise UnsupportedArchitecture("the member has no Linear or Conv2d layer")
    return layers


def fusable_in_mode(layers: list[Layer], training: bool) -> bool:
    """Dropout is the identity only in eval mode (or with p = 0)."""
    return not training or all(layer.options.get("p", 0) == 0 for layer in layers if layer.kind == "dropout")


# ------------------------------------------------------------------------------------------- layouts
def _to_members(h: torch.Tensor, layout: str) -> torch.Tensor:
    return h if layout == "members" else h.transpose(0, 1)


def _to_rows(h: torch.Tensor, layout: str) -> torch.Tensor:
    return h if layout == "rows" else h.transpose(0, 1)


def _channels_view(h: torch.Tensor, layout: str) -> torch.Tensor:
    """A spatial activation as [R, M*C, H, W] (rows) or [R, C, H, W] (shared)."""
    if layout == "shared":
        return h
    rows = _to_rows(h, layout)
    return rows.reshape(rows.shape[0], -1, *rows.shape[-2:])


def _streams_view(h: torch.Tensor, layout: str, streams: int) -> torch.Tensor:
    """[O, S, I] view for the epilogue: O = M for members, 1 otherwise."""
    if layout == "members":
        return h.reshape(h.shape[0], streams, -1)
    return h.reshape(1, streams, -1)


def _grouped(conv, x, weight, bias, *args, groups: int, **kwargs):
    """``conv(x, weight, bias, *args, groups=groups, **kwargs)`` for a grouped (one group per member) convolution.

    On the CPU, where the weight has several channels per group, the member groups run as separate
    convolutions joined along channels: ATen's grouped CPU kernels measured ~2x slower forward +
    backward than a loop over the groups (LeNet, M = 5, B = 128: second-layer conv 20 vs 11 ms, its
    transpose 38 vs 15 ms). With one channel per group (the first layer's transpose: 32 vs 52 ms), and
    on a GPU, the grouped kernel is left to the library.
    """
    if groups == 1 or x.is_cuda or weight.shape[1] == 1:
        return conv(x, weight, bias, *args, groups=groups, **kwargs)
    biases = [None] * groups if bias is None else bias.chunk(groups)
    return torch.cat([conv(xg, wg, bg, *args, **kwargs)
                      for xg, wg, bg in zip(x.chunk(groups, 1), weight.chunk(groups), biases)], 1)


@dataclass
class Tape:
    """What the cotangent chain needs from the primal pass, one entry per layer, in forward order."""
    entries: list = field(default_factory=list)


class Engine:
    """Runs parsed layers over stacked parameters ``params[name] -> [M, ...]`` on one backend."""

    def __init__(self, layers: list[Layer], params: dict, backend: str):
        self.layers, self.params, self.backend = layers, params, backend
        self.members = next(iter(params.values())).shape[0]
        self.epilogue_launchers = epilogue_op.launchers(backend)

    def _weight_bias(self, layer: Layer):
        return self.params[f"{layer.name}.weight"], self.params.get(f"{layer.name}.bias") if layer.has_bias else None

    # ------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, tangents: torch.Tensor | None = None, *, per_member: bool = False,
                record: bool = False):
        """Primal logits [M, B, C] and, with ``tangents`` u [P, B, *input], J_m u as [M, P, B, C].

        ``x`` is [B, *input] shared by all members, or [M, B, *input] with ``per_member``. With ``record``
        the pass also returns a Tape for ``cotangent`` (then ``tangents`` must be None).
        """
        batch = x.shape[1] if per_member else x.shape[0]
        chain = self._plain_chain(x) if tangents is None and not record else None
        if chain is not None:
            weights, biases, relus = chain
            return linear_chain.chain_logits(self.backend, x.flatten(2 if per_member else 1), weights, biases,
                                             relus), None, None
        streams = 1 if tangents is None else 1 + tangents.shape[0]
        if tangents is None:
            h = x
        elif per_member:
            u = tangents.reshape(1, -1, *tangents.shape[2:]).expand(self.members, -1, *tangents.shape[2:])
            h = torch.cat([x, u], dim=1)
        else:
            h = torch.cat([x, tangents.reshape(-1, *tangents.shape[2:])])
        return self._run(h, "members" if per_member else "shared", streams, batch, 0, Tape() if record else None)

    def _run(self, h, layout: str, streams: int, batch: int, start: int, tape: Tape | None):
        """Layers ``start..`` on activations ``h`` in ``layout``; returns (logits, tangents, tape)."""
        # Masks serve the tangent streams and the cotangent tape; a plain pass keeps none.
        need_mask = streams > 1 or tape is not None
        for layer in self.layers[start:]:
            h, layout, saved = self._forward_layer(layer, h, layout, streams, batch, need_mask)
            if tape is not None:
                tape.entries.append(saved)
        out = _to_members(h, layout) if layout != "shared" else h.unsqueeze(0).expand(self.members, *h.shape)
        logits = out[:, :batch]
        tangent_out = None if streams == 1 else out[:, batch:].reshape(self.members, streams - 1, batch, -1)
        return logits, tangent_out, tape

    def first_linear(self) -> int | None:
        """Index of the first layer if it is a Linear reached through shape-only layers, else None."""
        for index, layer in enumerate(self.layers):
            if layer.kind == "linear":
                return index
            if layer.kind not in ("flatten", "identity", "dropout"):
                return None
        return None

    def _plain_chain(self, x: torch.Tensor):
        """The chain (see ``linear_chain``) when a plain training pass runs as one Function: a Linear(+ReLU)
        chain, a backend that gains from it (``linear_chain.PLAIN_BACKENDS``), parameters that need a
        gradient and an input that does not. Else None."""
        if (self.backend in linear_chain.PLAIN_BACKENDS and torch.is_grad_enabled() and not x.requires_grad
                and any(p.requires_grad for p in self.params.values())):
            return self.linear_chain()
        return None

    def linear_chain(self):
        """(weights, biases, relus) when the network is a chain of Linear(+ReLU) layers, with only
        shape-free layers (Flatten, Identity, eval-mode Dropout) around them; else None. Such a chain's
        JR quantities run as one autograd Function (``fastjac.ops.linear_chain``)."""
        # parse() guarantees a Linear or Conv2d, so a stack of only these kinds has at least one Linear
        if any(layer.kind not in ("linear", "flatten", "identity", "dropout") for layer in self.layers):
            return None
        chain = [layer for layer in self.layers if layer.kind == "linear"]
        weights, biases = zip(*(self._weight_bias(layer) for layer in chain))
        return list(weights), list(biases), tuple(layer.relu for layer in chain)

    def forward_perturbed(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Member logits [M, K*B, C] on clamp(x + delta_k, 0, 1) (row k*B + b), differentiable w.r.t.
        delta only. Where the network starts with a Linear, the perturbation is formed inside the first
        layer's load (``perturbed_linear``) and the [K*B, *input] batch is never materialized."""
        from fastjac.ops import uap_step

        first = self.first_linear()
        if first is None:
            return self.forward(uap_step.perturb(x, delta, self.backend).flatten(0, 1))[0]
        layer = self.layers[first]
        weight, bias = self._weight_bias(layer)
        out, _ = uap_step.perturbed_linear(x.flatten(1), delta.flatten(1), weight, bias, layer.relu, self.backend)
        return self._run(out, "members", 1, out.shape[1], first + 1, None)[0]

    def _forward_layer(self, layer: Layer, h, layout: str, streams: int, batch: int, need_mask: bool):
        kind, opts = layer.kind, layer.options
        if kind == "linear":
            weight, bias = self._weight_bias(layer)
            source = h if layout == "shared" else _to_members(h, layout)
            out, mask = linear_op.stacked_linear(source, weight, bias, streams, layer.relu, self.backend, need_mask)
            return out, "members", (layout, source.shape, mask)
        if kind == "conv":
            weight, bias = self._weight_bias(layer)
            source = _channels_view(h, layout)
            members, cout = weight.shape[:2]
            plain = not need_mask and self.backend != "triton"  # ATen fuses the bias; relu keeps its output
            y = _grouped(F.conv2d, source, weight.reshape(members * cout, *weight.shape[2:]),
                         bias.reshape(-1) if plain and bias is not None else None, opts["stride"],
                         opts["padding"], opts["dilation"], groups=1 if layout == "shared" else members)
            if plain:
                out, mask = (torch.relu(y) if layer.relu else y), None
            else:
                out, mask = epilogue_op.stream_epilogue(
                    y.reshape(1, streams, -1), None if bias is None else bias.reshape(1, -1),
                    y.shape[-1] * y.shape[-2], layer.relu, self.epilogue_launchers)
            out = out.view(y.shape[0], members, cout, *y.shape[-2:])
            return out, "rows", (layout, source.shape, mask)
        if kind == "relu":
            out, mask = epilogue_op.stream_epilogue(_streams_view(h, layout, streams), None, 1, True,
                                                    self.epilogue_launchers)
            return out.view(h.shape), layout, (layout, mask)
        if kind == "maxpool":
            source = _channels_view(h, layout)
            pooled, indices = F.max_pool2d(source[:batch], opts["kernel"], opts["stride"], opts["padding"],
                                           opts["dilation"], opts["ceil_mode"], return_indices=True)
            if streams > 1:  # tangent rows take the primal's argmax: the derivative of max pooling
                flat_index = indices.flatten(2).unsqueeze(0).expand(streams - 1, -1, -1, -1)
                tangent = source[batch:].reshape(streams - 1, batch, source.shape[1], -1).gather(3, flat_index)
                pooled = torch.cat([pooled, tangent.reshape(-1, *pooled.shape[1:])])
            return self._unchannel(pooled, layout), layout if layout == "shared" else "rows", (layout, source.shape, indices)
        if kind == "avgpool":
            source = _channels_view(h, layout)
            pooled = F.avg_pool2d(source, opts["kernel"], opts["stride"], opts["padding"], opts["ceil_mode"],
                                  opts["count_include_pad"], opts["divisor_override"])
            return self._unchannel(pooled, layout), layout if layout == "shared" else "rows", (layout, source.shape, None)
        if kind == "flatten":
            lead = 1 if layout == "shared" else 2
            return h.reshape(*h.shape[:lead], -1), layout, (layout, h.shape, None)
        return h, layout, None  # identity, eval-mode dropout

    def _unchannel(self, pooled: torch.Tensor, layout: str) -> torch.Tensor:
        """[R, M*C, H, W] -> rows [R, M, C, H, W]; shared stays [R, C, H, W]."""
        if layout == "shared":
            return pooled
        return pooled.view(pooled.shape[0], self.members, -1, *pooled.shape[-2:])

    # ------------------------------------------------------------------------------------ cotangent
    def cotangent(self, tape: Tape, v: torch.Tensor, batch: int) -> torch.Tensor:
        """v^T J_m for every member: v [P, B, C] (the same rows for every member) -> [M, P, B, *input].

        Runs the transposed layers in reverse with the primal pass's masks and indices; differentiable
        w.r.t. the parameters with ordinary (first-order) autograd.
        """
        nproj = v.shape[0]
        g = v.reshape(1, nproj * batch, -1).expand(self.members, -1, -1)
        layout = "members"
        for layer, saved in zip(reversed(self.layers), reversed(tape.entries)):
            g, layout = self._transpose_layer(layer, saved, g, layout, nproj, batch)
        g = _to_members(g, layout) if layout != "shared" else g.unsqueeze(0).expand(self.members, *g.shape)
        return g.reshape(self.members, nproj, batch, *g.shape[2:])

    @staticmethod
    def _apply_mask(g: torch.Tensor, layout: str, mask: torch.Tensor, mask_layout: str, nproj: int):
        """g (P*B rows per member) times a primal mask recorded in ``mask_layout`` ([M, B*features] for
        members, [1, B*features] for shared, [1, B*M*features] for rows), broadcast over the P rows.
        Returns g in ``mask_layout``'s order ("members" when the mask was shared by all members)."""
        # a product with the bool mask: measured ~4x faster than torch.where on the CPU
        if mask_layout == "rows":
            g = _to_rows(g, layout)
            return (g.reshape(nproj, -1) * mask.reshape(1, -1)).view(g.shape), "rows"
        g = _to_members(g, layout)
        return (g.reshape(g.shape[0], nproj, -1) * mask.unsqueeze(1)).view(g.shape), "members"

    def _transpose_layer(self, layer: Layer, saved, g, layout: str, nproj: int, batch: int):
        kind, opts = layer.kind, layer.options
        if kind == "linear":
            in_layout, in_shape, mask = saved
            weight, _ = self._weight_bias(layer)
            if mask is not None:
                g, layout = self._apply_mask(g, layout, mask, "members", nproj)
            g = torch.bmm(_to_members(g, layout), weight)  # [M, P*B, IN]
            return (g, "members") if in_layout in ("shared", "members") else (g.transpose(0, 1), "rows")
        if kind == "conv":
            in_layout, in_shape, mask = saved
            weight, _ = self._weight_bias(layer)
            members, cout = weight.shape[:2]
            if mask is not None:
                g, layout = self._apply_mask(g, layout, mask, "rows", nproj)
            g = _channels_view(g, layout)
            stride, padding, dilation, kernel = opts["stride"], opts["padding"], opts["dilation"], opts["kernel"]
            output_padding = tuple(
                in_shape[-2 + i] - ((g.shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
                for i in range(2))
            # groups=M even for a shared input: each member's cotangent w.r.t. the input is its own.
            g = _grouped(F.conv_transpose2d, g, weight.reshape(members * cout, *weight.shape[2:]), None, stride,
                         padding, output_padding, groups=members, dilation=dilation)
            return g.view(g.shape[0], members, -1, *g.shape[-2:]), "rows"
        if kind == "relu":
            mask_layout, mask = saved
            return self._apply_mask(g, layout, mask, "members" if mask_layout == "shared" else mask_layout, nproj)
        if kind in ("maxpool", "avgpool"):
            in_layout, in_shape, indices = saved
            g = _channels_view(g, layout)  # [P*B, M*C, h, w]
            rows, channels = g.shape[:2]
            height, width = in_shape[-2:]
            if kind == "maxpool":
                if in_layout == "shared":  # one index map for all members: repeat it per member
                    indices = indices.repeat(1, self.members, 1, 1)
                index = indices.flatten(2).unsqueeze(0).expand(nproj, -1, -1, -1)
                g = g.new_zeros(nproj, batch, channels, height * width).scatter_add(
                    3, index, g.reshape(nproj, batch, channels, -1))
            else:
                g = torch.ops.aten.avg_pool2d_backward(
                    g, g.new_zeros(()).expand(rows, channels, height, width), opts["kernel"], opts["stride"],
                    opts["padding"], opts["ceil_mode"], opts["count_include_pad"], opts["divisor_override"])
            return g.reshape(rows, self.members, -1, height, width), "rows"
        if kind == "flatten":
            in_layout, in_shape, _ = saved
            features = in_shape[1:] if in_layout == "shared" else in_shape[2:]
            return g.reshape(*g.shape[:2], *features), layout
        return g, layout
