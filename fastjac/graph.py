"""Members as graphs of layer records: ``torch.fx`` symbolic tracing, then the layer registry.

``parse(module)`` traces a member once (nested modules are traced through; torch.nn layers are leaves),
maps every node to a layer record (``fastjac.layers``: modules by type, functional calls such as
``F.relu``, ``torch.flatten``, ``x.flatten(1)``, ``a + b`` by target) and fuses each ReLU into the
Linear/Conv2d before it where that layer feeds nothing else. Anything it cannot trace or map raises
``Unsupported`` naming the node; the caller then runs the generic torch.func path.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import fx, nn

from fastjac.layers import BatchNorm, Conv2d, Layer, Linear, ReLU, Unsupported, layer_for_call, layer_for_module

INPUT = -1  # the graph's input, as a node index


@dataclass(frozen=True)
class Node:
    layer: Layer
    inputs: tuple          # indices of the nodes (or INPUT) whose outputs this layer consumes, in order
    label: str             # the traced node's name, for messages


@dataclass(frozen=True)
class Graph:
    """Layer records in topological order; ``output`` is the node whose value is the member's logits.
    ``frees``: per node, the values (node indices or INPUT) no later node reads, dropped once it has run
    (derived; a plain field rather than a cached property, which torch.compile cannot trace). ``modes``:
    ``in_mode``'s graphs by training flag (a plain dict: torch.compile traces it, and warns on lru_cache)."""
    nodes: tuple
    output: int
    frees: tuple = field(init=False, compare=False, repr=False)
    modes: dict = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        last = {}
        for index, node in enumerate(self.nodes):
            for source in node.inputs:
                last[source] = index
        last.pop(self.output, None)
        frees = [[] for _ in self.nodes]
        for source, index in last.items():
            frees[index].append(source)
        object.__setattr__(self, "frees", tuple(tuple(f) for f in frees))
        object.__setattr__(self, "modes", {})

    def in_mode(self, training: bool) -> "Graph":
        """This graph with every layer in train or eval mode; Unsupported where a layer cannot be fused
        in that mode (Dropout with p > 0 in training)."""
        graph = self.modes.get(training)
        if graph is None:
            graph = Graph(tuple(replace(node, layer=node.layer.in_mode(training)) for node in self.nodes), self.output)
            self.modes[training] = graph
        return graph

    @property
    def has_batch_norm(self) -> bool:
        return any(isinstance(node.layer, BatchNorm) for node in self.nodes)

    def chain(self) -> bool:
        """True when every node consumes the one before it (a plain sequence)."""
        return all(node.inputs == (index - 1 if index else INPUT,) for index, node in enumerate(self.nodes)) \
            and self.output == len(self.nodes) - 1


def _trace(module: nn.Module) -> fx.GraphModule:
    try:
        traced = fx.symbolic_trace(module)
    except Exception as error:  # tracing runs the member's own forward: any error means "not traceable"
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Unsupported(f"torch.fx cannot trace {type(module).__name__}: {message}") from error
    traced.graph.eliminate_dead_code()
    return traced


def parse(module: nn.Module) -> Graph:
    """The layer graph of ``module`` (a member taking one batch [B, *input] to logits [B, C])."""
    traced = _trace(module)
    modules = dict(traced.named_modules())
    index_of: dict = {}
    nodes: list[Node] = []
    output = None
    for fx_node in traced.graph.nodes:
        if fx_node.op == "placeholder":
            if index_of:
                raise Unsupported(f"node {fx_node.name}: members with more than one input are not fused")
            index_of[fx_node] = INPUT
            continue
        if fx_node.op == "output":
            result = fx_node.args[0]
            if not isinstance(result, fx.Node) or index_of.get(result, INPUT) == INPUT:
                raise Unsupported("the member's output is not a single tensor computed by a fused layer")
            output = index_of[result]
            continue
        if fx_node.op == "call_module":
            layer = layer_for_module(fx_node.target, modules[fx_node.target])
        elif fx_node.op in ("call_function", "call_method"):
            layer = layer_for_call(fx_node.name, fx_node.target, fx_node.args, fx_node.kwargs)
        else:
            raise Unsupported(f"node {fx_node.name}: reads the attribute {fx_node.target} directly")
        index_of[fx_node] = len(nodes)
        nodes.append(Node(layer, _tensor_inputs(fx_node, layer.arity, index_of), fx_node.name))
    if not any(isinstance(node.layer, (Linear, Conv2d)) for node in nodes):
        raise Unsupported("the member has no Linear or Conv2d layer")
    return _fuse_relus(nodes, output)


def _tensor_inputs(fx_node: fx.Node, arity: int, index_of: dict) -> tuple:
    """The node indices of the call's tensor arguments: the first ``arity`` positional arguments must be
    traced values, and no other argument may be one (a shape read from a tensor, for example)."""
    tensors = fx_node.args[:arity]
    if len(tensors) != arity or not all(isinstance(a, fx.Node) for a in tensors) \
            or _has_node((fx_node.args[arity:], fx_node.kwargs)):
        raise Unsupported(f"node {fx_node.name}: its arguments are not {arity} tensor(s) and constants")
    return tuple(index_of[a] for a in tensors)


def _has_node(values) -> bool:
    """True when a (nested) argument structure holds a traced value."""
    found = []
    fx.node.map_arg(values, found.append)
    return bool(found)


def _fuse_relus(nodes: list[Node], output: int) -> Graph:
    """Each ReLU whose input is a Linear/Conv2d read by nothing else becomes that layer's fused epilogue."""
    readers = [0] * len(nodes)
    for node in nodes:
        for source in node.inputs:
            if source != INPUT:
                readers[source] += 1
    alias = {}  # index of a fused ReLU -> index of the layer it was fused into
    for index, node in enumerate(nodes):
        (source,) = node.inputs if len(node.inputs) == 1 else (None,)
        if isinstance(node.layer, ReLU) and source not in (None, INPUT) and readers[source] == 1 \
                and isinstance(nodes[source].layer, (Linear, Conv2d)) and not nodes[source].layer.relu:
            nodes[source] = replace(nodes[source], layer=replace(nodes[source].layer, relu=True))
            alias[index] = source
    kept = [index for index in range(len(nodes)) if index not in alias]
    position = {old: new for new, old in enumerate(kept)}
    position[INPUT] = INPUT

    def resolve(index):
        return position[alias.get(index, index)]

    fused = tuple(replace(nodes[old], inputs=tuple(resolve(i) for i in nodes[old].inputs)) for old in kept)
    return Graph(fused, resolve(output))
