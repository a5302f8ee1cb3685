"""The generic path: members the layer registry does not fuse, on torch.func.

``torch.func.functional_call`` runs the member architecture over one member's slice of the stacked
parameters and buffers; ``vmap`` runs all M members at once off the CPU (on the CPU they run one at a
time, see ``members_at_once``, as they do wherever vmap cannot go: data-dependent control flow); ``jvp``
carries the P tangent directions beside one primal pass (vmapped over the directions), and the vjp mode
is one reverse pass over all members and projections (``autograd.grad`` with batched cotangents,
``create_graph`` so the penalty is differentiable).

Members that run one at a time (all of them, on the CPU) avoid two of PyTorch's costs that the
transforms cannot (measured on the benchmark's branchy member, this project's CPU; bench/RESULTS.md):

- jvp mode, one direction: ``torch.autograd.forward_ad`` dual tensors, with ``TangentRules`` giving
  Conv2d, Linear and MaxPool2d the tangent of the map itself. PyTorch's forward-mode formulas also
  convolve the primal with the weight's tangent, which is zero here but materialized (a third convolution
  per Conv2d; two extra products per Linear) and run MaxPool2d twice.
- vjp mode: stride-1 Conv2d layers run as ``StrideOneConv2d``, whose input gradient (the transposed
  convolution the penalty differentiates again) is the fastest of the ways ``fastjac.ops.conv_transpose``
  times; ATen's own was up to 5x slower for a LeNet-like first layer on this CPU.

Buffers: inside the transforms nothing is mutated. A BatchNorm that normalizes with its batch's
statistics (train mode) runs as ``BatchStatisticsNorm`` (plain ops under jvp: see there why), its batch mean and
variance are returned beside the logits, and the running statistics are updated once afterwards exactly
as a plain forward updates them (``layers.update_running_stats``).
"""
from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from fastjac import layers
from fastjac.layers import update_running_stats
from fastjac.ops import batch_norm as batch_norm_op
from fastjac.ops import conv_transpose

log = logging.getLogger("fastjac.generic")

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Members:
    """A model as the generic path sees it: an architecture and its state stacked over M members."""
    template: nn.Module    # the member architecture (its own values are never read), in the model's mode
    state: dict            # parameter and buffer name -> [M, ...] (differentiable views where parameters)
    count: int


def members_of(model: nn.Module) -> Members:
    """An Ensemble's template and stacked state, or a single module as one member."""
    from fastjac.ensemble import Ensemble  # (ensemble imports this module)

    if isinstance(model, Ensemble):
        template = model._template[0]
        template.train(model.training)
        return Members(template, model.state(), model.num_members)
    state = {name: tensor.unsqueeze(0) for name, tensor in model.named_parameters()}
    state.update({name: tensor.unsqueeze(0) for name, tensor in model.named_buffers()})
    return Members(model, state, 1)


# members that vmap cannot run (data-dependent control flow): they run one at a time
_LOOPED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def members_at_once(device: torch.device) -> bool:
    """Whether the members run at once under vmap (off the CPU, where batching them fills the device) or
    one at a time (on the CPU). Measured on this project's 2-core CPU, M = 5, B = 128, reference step /
    generic step (bench/RESULTS.md): a LeNet with Hardtanh (vmappable, not fused) 0.86x (vjp) and 1.10x
    (jvp) with vmap, 1.43x and 1.72x one at a time (vmap's batched convolutions, and the loop's fast paths
    above); an MLP with Hardtanh 0.99x / 1.06x against 0.96x / 1.12x (the same products either way)."""
    return device.type != "cpu"


class BatchStatisticsNorm(nn.Module):
    """A BatchNorm normalizing with its batch's statistics and keeping no running ones: what the generic
    path runs in place of ``nn.BatchNorm*d`` in train mode (or without running statistics).

    With ``by_ops`` (set for forward-mode AD) it computes in plain differentiable ops: ATen's batch_norm
    gives a wrong reverse-mode derivative of its forward-mode JVP in training mode (pytorch/pytorch#196699,
    an incorrect second-order JVP; measured here against finite differences), so torch.func.jvp through
    it would give wrong parameter gradients of the jvp-mode penalty. Otherwise ATen's batch_norm runs
    (its double backward, which the vjp mode uses, is right). Same parameter names (weight, bias) as the
    module it replaces; no buffers: when ``sink`` is a list, each call appends (self, batch mean [C],
    biased variance [C], values per channel) for the running statistics' update outside the transforms.
    """

    def __init__(self, source: _BatchNorm, name: str):
        super().__init__()
        self.name, self.eps, self.momentum = name, source.eps, source.momentum
        self.updates_running = source.training and source.track_running_stats
        self.weight = nn.Parameter(torch.empty_like(source.weight)) if source.affine else None
        self.bias = nn.Parameter(torch.empty_like(source.bias)) if source.affine else None
        self.sink: list | None = None
        self.by_ops = False

    def forward(self, x):
        rows = x.reshape(x.shape[0], 1, x.shape[1], -1)  # [N, 1, C, L]: one "member"
        if self.by_ops:
            mean, var, centered = batch_norm_op.moments(rows)
            y = (centered * torch.rsqrt(var + self.eps)).view_as(x)
            if self.weight is not None:
                shape = [1, -1] + [1] * (x.dim() - 2)
                y = y * self.weight.view(shape) + self.bias.view(shape)
        else:
            y = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            if self.updates_running and self.sink is not None:
                with torch.no_grad():
                    mean, var, _ = batch_norm_op.moments(rows.detach())
        if self.updates_running and self.sink is not None:
            self.sink.append((self, mean.detach().flatten(), var.detach().flatten(), x.numel() // x.shape[1]))
        return y


def _stride_one_padding(module: nn.Module):
    """A plain stride-1 Conv2d's symmetric padding (pair), or None where ``StrideOneConv2d`` does not apply
    (the engine's layer record reads the padding: "valid", "same", ints)."""
    if type(module) is not nn.Conv2d or module.stride != (1, 1) or module.groups != 1 or module.padding_mode != "zeros":
        return None
    layer = layers.Conv2d.from_module("", module)
    return (layer.padding[0], layer.padding[2]) if layer.symmetric else None


class StrideOneConv2d(nn.Module):
    """A stride-1, groups-1 ``nn.Conv2d`` whose input gradient is ``conv_transpose.conv_transpose2d`` (the
    fastest of the ways it times) where x requires grad outside the torch.func transforms and forward mode
    (the members run one at a time); ATen's F.conv2d otherwise. Same parameter names."""

    def __init__(self, source: nn.Conv2d, padding: tuple):
        super().__init__()
        self.padding, self.dilation = padding, tuple(source.dilation)
        self.weight = nn.Parameter(torch.empty_like(source.weight))
        self.bias = nn.Parameter(torch.empty_like(source.bias)) if source.bias is not None else None

    def forward(self, x):
        if (x.requires_grad and torch.is_grad_enabled() and torch._C._functorch.peek_interpreter_stack() is None
                and fwAD.unpack_dual(x).tangent is None):
            return conv_transpose.conv2d(x, self.weight, self.bias, self.padding, self.dilation)
        return F.conv2d(x, self.weight, self.bias, 1, self.padding, self.dilation)


def _conv2d_tangent(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    primal, tangent = fwAD.unpack_dual(x)
    return fwAD.make_dual(F.conv2d(primal, weight, bias, stride, padding, dilation, groups),
                          F.conv2d(tangent, weight, None, stride, padding, dilation, groups))


def _linear_tangent(x, weight, bias=None):
    primal, tangent = fwAD.unpack_dual(x)
    return fwAD.make_dual(F.linear(primal, weight, bias), F.linear(tangent, weight))


def _max_pool2d_tangent(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    primal, tangent = fwAD.unpack_dual(x)
    y, indices = F.max_pool2d(primal, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    y = fwAD.make_dual(y, tangent.flatten(-2).gather(-1, indices.flatten(-2)).view_as(y))
    return (y, indices) if return_indices else y


class TangentRules(TorchFunctionMode):
    """Inside a ``forward_ad.dual_level``: F.conv2d, F.linear and F.max_pool2d of a dual input with
    tangent-free weights compute the tangent as the map itself (conv/linear without bias; the pooled
    positions), instead of PyTorch's formulas, which add a materialized zero term for the weights'
    tangents (see the module docstring). Anything else runs unchanged."""

    # (F.conv2d is torch.conv2d, the function the mode is handed)
    RULES = {F.conv2d: _conv2d_tangent, F.linear: _linear_tangent, F.max_pool2d: _max_pool2d_tangent}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = self.RULES.get(func)
        if (rule is not None and args and isinstance(args[0], torch.Tensor)
                and fwAD.unpack_dual(args[0]).tangent is not None
                and all(fwAD.unpack_dual(a).tangent is None for a in (*args[1:], *kwargs.values())
                        if isinstance(a, torch.Tensor))):
            return rule(*args, **kwargs)
        return func(*args, **kwargs)


# architecture -> (the modes it was prepared in, its functional copy), rebuilt when a mode changes
_FUNCTIONAL: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _functional_template(template: nn.Module) -> nn.Module:
    """A copy of the member architecture with every BatchNorm that uses batch statistics (train mode, or no
    running statistics) replaced by ``BatchStatisticsNorm`` and every plain stride-1 Conv2d by
    ``StrideOneConv2d``; cached per architecture and modes."""
    modes = tuple(module.training for module in template.modules())
    cached = _FUNCTIONAL.get(template)
    if cached is not None and cached[0] == modes:
        return cached[1]
    functional = copy.deepcopy(template).to("meta")  # its values are never read: the state is passed in
    for name, module in list(functional.named_modules()):
        if isinstance(module, _BatchNorm) and (module.training or not module.track_running_stats):
            parent, _, child = name.rpartition(".")
            setattr(functional.get_submodule(parent), child, BatchStatisticsNorm(module, name))
        elif (padding := _stride_one_padding(module)) is not None:
            parent, _, child = name.rpartition(".")
            setattr(functional.get_submodule(parent), child, StrideOneConv2d(module, padding))
    _FUNCTIONAL[template] = (modes, functional)
    return functional


class _MemberCall:
    """f(state_m, x_m) -> (logits, batch statistics) for one member's state: functional_call on the
    functional template (``_functional_template``), returning the batch mean and biased variance of each
    BatchNorm that updates running statistics, in call order, beside the logits."""

    def __init__(self, members: Members, forward_mode: bool = False):
        self.members, self.forward_mode = members, forward_mode
        self.template = _functional_template(members.template)
        names = {name for name, _ in self.template.named_parameters()} | {n for n, _ in self.template.named_buffers()}
        self.state = {name: tensor for name, tensor in members.state.items() if name in names}
        self.norms = [m for m in self.template.modules() if isinstance(m, BatchStatisticsNorm)]
        self.calls: list = []  # (module, values per channel) of each recorded call of the last member call

    def __call__(self, state: dict, x: torch.Tensor):
        sink = []
        for norm in self.norms:
            norm.sink, norm.by_ops = sink, self.forward_mode
        try:
            out = torch.func.functional_call(self.template, state, (x,))
        finally:
            for norm in self.norms:
                norm.sink, norm.by_ops = None, False
        self.calls = [(norm, count) for norm, _, _, count in sink]
        return out, tuple((mean, var) for _, mean, var, _ in sink)

    def update(self, stats) -> None:
        """The running statistics' one update per pass, from the batch statistics ([M, C] each)."""
        for (norm, count), (mean, var) in zip(self.calls, stats):
            running = [self.members.state.get(f"{norm.name}.{key}") for key in _RUNNING]
            update_running_stats(*running, mean, var, count, norm.momentum)


def _over_members(call, members: Members, state: dict, inputs: tuple, in_dims: tuple, looped_call=None):
    """``call(state_m, *inputs_m)`` for every member, stacked: vmap over the members (``members_at_once``),
    or a loop, also for members vmap cannot run (calling ``looped_call`` there, where given). ``in_dims``
    gives each input's member axis (None: shared)."""
    template = members.template
    if template not in _LOOPED and members_at_once(inputs[0].device):
        try:
            return torch.func.vmap(call, in_dims=(0, *in_dims), randomness="different")(state, *inputs)
        except RuntimeError as error:
            if "vmap" not in str(error):
                raise
            log.debug("generic path: members of %s run one at a time (%s)", type(template).__name__, error)
            _LOOPED.add(template)
    # One unbind per stacked tensor, not an index per member: the backward of unbind is one stack, where
    # each member's select would write its gradient into a zero-filled [M, ...] tensor (M^2 traffic; ~5%
    # of a vjp step of the benchmark's branchy ensemble, M = 5)
    state_parts = {name: tensor.unbind(0) for name, tensor in state.items()}
    input_parts = [None if dim is None else x.unbind(dim) for x, dim in zip(inputs, in_dims)]
    results, call = [], looped_call or call
    for index in range(members.count):
        member_state = {name: parts[index] for name, parts in state_parts.items()}
        member_inputs = (x if parts is None else parts[index] for x, parts in zip(inputs, input_parts))
        results.append(call(member_state, *member_inputs))
    return torch.utils._pytree.tree_map(lambda *parts: torch.stack(parts), *results)


def member_logits(model: nn.Module, x: torch.Tensor, per_member: bool = False) -> torch.Tensor:
    """Logits of every member [M, B, C]; x [B, *input] shared, or [M, B, *input] with ``per_member``."""
    members = members_of(model)
    call = _MemberCall(members)
    logits, stats = _over_members(call, members, call.state, (x,), (0 if per_member else None,))
    call.update(stats)
    return logits


def jvp(model: nn.Module, x: torch.Tensor, u: torch.Tensor, per_member: bool = False):
    """(logits [M, B, C], J_m u [M, P, B, C]) from one primal pass per member with the P directions
    u [P, B, *input] vmapped beside it (forward mode)."""
    members = members_of(model)
    call = _MemberCall(members, forward_mode=True)

    def member(state, x_m):
        def directions(u_p):
            return torch.func.jvp(lambda inputs: call(state, inputs), (x_m,), (u_p,), has_aux=True)

        if u.shape[0] == 1:  # one direction: no vmap (over a batch of one, the step measured ~6% slower)
            logits, tangents, stats = directions(u[0])
            return logits, tangents.unsqueeze(0), stats
        # the primal's inputs are not batched over the directions, so it runs once, but vmap hands the
        # primal outputs back expanded over them: keep one copy
        logits, tangents, stats = torch.func.vmap(directions, randomness="same")(u)
        return logits[0], tangents, torch.utils._pytree.tree_map(lambda s: s[0], stats)

    def member_by_dual_numbers(state, x_m):  # one member at a time, one direction (see the module docstring)
        with fwAD.dual_level(), TangentRules():
            out, stats = call(state, fwAD.make_dual(x_m, u[0]))
            logits, tangents = fwAD.unpack_dual(out)
        return logits, tangents.unsqueeze(0), stats

    logits, tangents, stats = _over_members(member, members, call.state, (x,), (0 if per_member else None,),
                                            member_by_dual_numbers if u.shape[0] == 1 else None)
    call.update(stats)
    return logits, tangents


def logits_with_input(model: nn.Module, x: torch.Tensor, per_member: bool = False):
    """(logits [M, B, C], the member inputs [M, B, *input] they were computed from, which require grad):
    the forward half of the vjp mode; ``cotangents`` is the reverse half."""
    members = members_of(model)
    inputs = (x if per_member else x.expand(members.count, *x.shape)).detach().requires_grad_(True)
    call = _MemberCall(members)
    logits, stats = _over_members(call, members, call.state, (inputs,), (0,))
    call.update(stats)
    return logits, inputs


def cotangents(logits: torch.Tensor, inputs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v^T J_m for every member [M, P, B, *input], from ``logits_with_input``'s pair and v [P, B, C] (the
    same rows for every member): one reverse pass batched over the P projections, differentiable w.r.t.
    the parameters (its graph is kept)."""
    if v.shape[0] == 1:  # one projection: a plain reverse pass (vmapped over a batch of one, the backward of
        # each convolution's input gradient ran an extra convolution_backward: 6 instead of 4 per member on
        # the benchmark's branchy member, ~10% of the step's CPU time)
        (g,) = torch.autograd.grad(logits, inputs, v[0].expand_as(logits), create_graph=True)
        return g.unsqueeze(1)
    batched = v.unsqueeze(1).expand(v.shape[0], *logits.shape)  # [P, M, B, C]
    (g,) = torch.autograd.grad(logits, inputs, batched, create_graph=True, is_grads_batched=True)
    return g.transpose(0, 1)
