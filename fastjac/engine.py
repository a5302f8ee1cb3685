"""The stacked engine: all members, the primal batch and the projection streams in one pass per layer.

Members are parsed once into a ``Graph`` of layer records (``fastjac.graph``: torch.fx tracing;
``fastjac.layers``: the registry, one class per layer kind); parameters and buffers come stacked along
a leading member axis (Linear W [M,OUT,IN], Conv2d W [M,COUT,CIN/groups,k,k], BatchNorm running_mean
[M, C]).

Rows: R = S*B, stream 0 (rows [0, B)) is the primal batch, streams 1..S-1 are tangent rows (jvp mode);
the layouts an activation travels in ("shared", "members", "rows") are described in ``fastjac.layers``.

On the CPU, graphs with BatchNorm run one member at a time (``runs_by_member``), each member a
one-member engine over its slices of the stacked parameters.

For the vjp mode the primal pass records a tape (each layer's saved state) and ``cotangent`` runs the
transposed graph v -> v^T J in reverse with ordinary differentiable ops (a residual add passes its
cotangent to both branches, which are summed where they fork), so the penalty's parameter gradient is
one plain backward: no double-backward graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastjac.graph import INPUT, Graph
from fastjac.layers import Linear, convert, to_members
from fastjac.ops import linear_chain


def runs_by_member(graph: Graph, members: int, device: torch.device) -> bool:
    """Whether an engine's passes run one member at a time (each a one-member engine over its parameter
    slices): on the CPU, for graphs with BatchNorm. There every convolution and normalization runs per
    member anyway, so stacking the members only adds copies around them (stacks, layout changes and their
    backwards) over activations M times a member's. Measured on ResNet-8, M = 5, B = 128, one thread, two
    same-process runs against the stacked passes (medians): plain step 0.92x and 0.90x, JR vjp step 0.89x
    and 0.99x, jvp step 0.77x and 0.74x the time; eval-mode inference at the loop's time. Stacked passes
    stay where products fuse across members (Linear layers, a convolution of the shared input) and on
    GPUs (not measured there)."""
    return members > 1 and torch.device(device).type == "cpu" and graph.has_batch_norm


@dataclass
class Tape:
    """What the cotangent chain needs from the primal pass: each node's saved state, in graph order; for a
    pass run member by member, each member's (engine, tape) instead."""
    entries: list = field(default_factory=list)
    members: list | None = None


class Engine:
    """Runs a layer graph over stacked parameters and buffers ``state[name] -> [M, ...]`` on one backend.

    ``state`` holds the member's parameter and buffer names ('1.weight', 'bn.running_mean'); BatchNorm
    layers in train mode update the running statistics in it in place, once per forward.
    """

    def __init__(self, graph: Graph, state: dict, backend):
        self.graph, self.state, self.backend = graph, state, backend
        self.members = next(iter(state.values())).shape[0]
        self.epilogue_launchers = backend.stream_epilogue

    def weight_bias(self, layer):
        """(weight [M, ...], bias [M, OUT] or None) of a Linear or Conv2d layer."""
        return self.state[f"{layer.name}.weight"], self.state[f"{layer.name}.bias"] if layer.has_bias else None

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
        if self.by_member(x.device):
            return self._by_member(x, tangents, per_member, record)
        streams = 1 if tangents is None else 1 + tangents.shape[0]
        if tangents is None:
            h = x
        elif per_member:
            u = tangents.reshape(1, -1, *tangents.shape[2:]).expand(self.members, -1, *tangents.shape[2:])
            h = torch.cat([x, u], dim=1)
        else:
            h = torch.cat([x, tangents.reshape(-1, *tangents.shape[2:])])
        values = {INPUT: (h, "members" if per_member else "shared")}
        return self._run(values, 0, streams, batch, Tape() if record else None)

    def by_member(self, device: torch.device) -> bool:
        """Whether this engine's passes on ``device`` run one member at a time (``runs_by_member``)."""
        return runs_by_member(self.graph, self.members, device)

    def _by_member(self, x: torch.Tensor, tangents, per_member: bool, record: bool):
        """forward() one member at a time: (logits [M, B, C], tangents [M, P, B, C] or None, tape or None)."""
        slices = {name: tensor.split(1) for name, tensor in self.state.items()}  # one backward node each
        outputs = []
        for m in range(self.members):
            member = Engine(self.graph, {name: parts[m] for name, parts in slices.items()}, self.backend)
            outputs.append((member, member.forward(x[m:m + 1] if per_member else x, tangents,
                                                   per_member=per_member, record=record)))
        logits = torch.cat([out[0] for _, out in outputs])
        tangent_out = None if tangents is None else torch.cat([out[1] for _, out in outputs])
        tape = Tape(members=[(member, out[2]) for member, out in outputs]) if record else None
        return logits, tangent_out, tape

    def _run(self, values: dict, start: int, streams: int, batch: int, tape: Tape | None):
        """Nodes ``start..`` given the values they read (node index or INPUT -> (activation, layout));
        returns (logits, tangents, tape)."""
        # saved state serves the tangent streams and the cotangent tape; a plain pass keeps none
        keep = streams > 1 or tape is not None
        nodes, frees = self.graph.nodes, self.graph.frees
        for index in range(start, len(nodes)):
            node = nodes[index]
            h, layout, saved = node.layer.apply(self, [values[i] for i in node.inputs], streams, batch, keep)
            values[index] = (h, layout)
            for source in frees[index]:
                del values[source]
            if tape is not None:
                tape.entries.append(saved)
        h, layout = values[self.graph.output]
        out = to_members(h, layout) if layout != "shared" else h.unsqueeze(0).expand(self.members, *h.shape)
        logits = out[:, :batch]
        tangent_out = None if streams == 1 else out[:, batch:].reshape(self.members, streams - 1, batch, -1)
        return logits, tangent_out, tape

    def _chain_nodes(self):
        """The layers when the graph is a plain sequence, else None."""
        return [node.layer for node in self.graph.nodes] if self.graph.chain() else None

    def first_linear(self) -> int | None:
        """Index of the first node if it is a Linear reached through shape-only layers, else None."""
        layers = self._chain_nodes() or []
        for index, layer in enumerate(layers):
            if isinstance(layer, Linear):
                return index
            if not layer.shape_only:
                return None
        return None

    def _plain_chain(self, x: torch.Tensor):
        """The chain (see ``linear_chain``) when a plain training pass runs as one Function: a Linear(+ReLU)
        chain, a backend that gains from it (``Backend.plain_chain``), parameters that need a
        gradient and an input that does not. Else None."""
        if (self.backend.plain_chain and torch.is_grad_enabled() and not x.requires_grad
                and any(p.requires_grad for p in self.state.values())):
            return self.linear_chain()
        return None

    def linear_chain(self):
        """(weights, biases, relus) when the network is a chain of Linear(+ReLU) layers, with only
        shape-free layers (Flatten, Identity, eval-mode Dropout) around them; else None. Such a chain's
        JR quantities run as one autograd Function (``fastjac.ops.linear_chain``)."""
        layers = self._chain_nodes()
        if layers is None or not all(isinstance(layer, Linear) or layer.shape_only for layer in layers):
            return None
        chain = [layer for layer in layers if isinstance(layer, Linear)]
        if not chain:
            return None
        weights, biases = zip(*(self.weight_bias(layer) for layer in chain))
        return list(weights), list(biases), tuple(layer.relu for layer in chain)

    def forward_perturbed(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Member logits [M, K*B, C] on clamp(x + delta_k, 0, 1) (row k*B + b), differentiable w.r.t.
        delta only. Where the network starts with a Linear, the perturbation is formed inside the first
        layer's load (``perturbed_linear``) and the [K*B, *input] batch is never materialized."""
        from fastjac.ops import uap_step

        first = self.first_linear()
        if first is None:
            return self.forward(uap_step.perturb(x, delta, self.backend.perturb).flatten(0, 1))[0]
        layer = self.graph.nodes[first].layer
        weight, bias = self.weight_bias(layer)
        out, _ = uap_step.perturbed_linear(x.flatten(1), delta.flatten(1), weight, bias, layer.relu, self.backend)
        return self._run({first: (out, "members")}, first + 1, 1, out.shape[1], None)[0]

    # ------------------------------------------------------------------------------------ cotangent
    def cotangent(self, tape: Tape, v: torch.Tensor, batch: int) -> torch.Tensor:
        """v^T J_m for every member: v [P, B, C] (the same rows for every member) -> [M, P, B, *input].

        Runs the transposed layers in reverse with the primal pass's saved state; a value read by several
        layers (a residual fork) sums their cotangents. Differentiable w.r.t. the parameters with
        ordinary (first-order) autograd.
        """
        if tape.members is not None:
            return torch.cat([member.cotangent(member_tape, v, batch) for member, member_tape in tape.members])
        nproj = v.shape[0]
        pending = {self.graph.output: (v.reshape(1, nproj * batch, -1).expand(self.members, -1, -1), "members")}
        for index in reversed(range(len(self.graph.nodes))):
            if index not in pending:
                continue
            g, layout = pending.pop(index)
            node = self.graph.nodes[index]
            for source, part in zip(node.inputs, node.layer.apply_transpose(self, tape.entries[index], g, layout,
                                                                           nproj, batch)):
                pending[source] = part if source not in pending else _accumulate(pending[source], part)
        g, layout = pending[INPUT]
        g = to_members(g, layout)
        return g.reshape(self.members, nproj, batch, *g.shape[2:])


def _accumulate(total, part):
    """The sum of two cotangents of one value, in the first one's layout."""
    (g, layout), (h, h_layout) = total, part
    return g + convert(h, h_layout, layout), layout
