"""``Ensemble``: M members of one architecture with their parameters stacked along a member axis."""
from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from fastjac import backends, engine, generic
from fastjac.graph import Graph, parse
from fastjac.layers import Unsupported

_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastjac: running on the generic torch.func path ({reason})", stacklevel=3)


def _key(name: str) -> str:
    """Parameter names as ParameterDict keys ('1.weight' -> '1__weight': dots are not allowed)."""
    return name.replace(".", "__")


def check_same_architecture(members: Sequence[nn.Module]) -> None:
    """Raise ValueError naming the first difference between member 0 and any other member."""
    first = members[0]
    first_layers = [type(module).__name__ for module in first.modules()]
    first_params = {name: (tuple(p.shape), p.dtype) for name, p in first.named_parameters()}
    first_buffers = {name: tuple(b.shape) for name, b in first.named_buffers()}
    for index, member in enumerate(members[1:], start=1):
        if not isinstance(member, nn.Module):
            raise TypeError(f"ensemble member {index} is a {type(member).__name__}, not an nn.Module")
        layers = [type(module).__name__ for module in member.modules()]
        if layers != first_layers:
            raise ValueError(f"ensemble members differ in architecture: member {index} has layers {layers[1:]}, "
                             f"member 0 has {first_layers[1:]}")
        params = {name: (tuple(p.shape), p.dtype) for name, p in member.named_parameters()}
        if params != first_params:
            diff = sorted(set(params.items()) ^ set(first_params.items()), key=str)
            raise ValueError(f"ensemble members differ in parameters: member {index} vs member 0 at {diff[:2]}")
        if {name: tuple(b.shape) for name, b in member.named_buffers()} != first_buffers:
            raise ValueError(f"ensemble members differ in buffers: member {index} vs member 0")
        if str(member) != str(first):
            raise ValueError(f"ensemble members differ in layer settings: member {index} is\n{member}\n"
                             f"member 0 is\n{first}")


class Ensemble(nn.Module):
    """An ensemble of M members sharing one architecture; ``forward(x)`` is the mean of member logits.

    Parameters live stacked: each member parameter of shape S becomes one ``nn.Parameter`` [M, *S], so
    an optimizer step on the ensemble is M independent member steps; buffers (BatchNorm's running
    statistics) are stacked the same way ([M, C]) and saved in ``state_dict``. Architectures the layer
    registry fuses (``fastjac.graph.parse``) run all members in one batched pass per layer; any other
    runs on the generic torch.func path (``fastjac.generic``) with a one-time warning naming the node.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("an Ensemble needs at least one member")
        if not isinstance(members[0], nn.Module):
            raise TypeError(f"ensemble member 0 is a {type(members[0]).__name__}, not an nn.Module")
        check_same_architecture(members)
        # The template keeps the architecture (never its values) on the meta device, outside the module tree.
        self._template = [copy.deepcopy(members[0]).to("meta")]
        self.names = [name for name, _ in members[0].named_parameters()]
        self.stacked = nn.ParameterDict({
            _key(name): nn.Parameter(torch.stack([dict(m.named_parameters())[name].detach() for m in members]))
            for name in self.names})
        for name, _ in members[0].named_buffers():
            self.register_buffer("buffer__" + _key(name), torch.stack([dict(m.named_buffers())[name] for m in members]))
        self.buffer_names = [name for name, _ in members[0].named_buffers()]
        try:
            self.graph, self.unsupported = parse(members[0]), None
        except Unsupported as reason:
            self.graph, self.unsupported = None, str(reason)

    # -------------------------------------------------------------------------------------- views
    @property
    def num_members(self) -> int:
        return next(iter(self.stacked.values())).shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.stacked.values())).dtype

    def params(self) -> dict[str, torch.Tensor]:
        """Stacked parameters by member-module name ('1.weight' -> [M, *shape])."""
        return {name: self.stacked[_key(name)] for name in self.names}

    def buffers_by_name(self) -> dict[str, torch.Tensor]:
        """Stacked buffers by member-module name ('1.running_mean' -> [M, *shape])."""
        return {name: getattr(self, "buffer__" + _key(name)) for name in self.buffer_names}

    def state(self) -> dict[str, torch.Tensor]:
        """Stacked parameters and buffers by member-module name: what the engine and torch.func run on."""
        return {**self.params(), **self.buffers_by_name()}

    def fused_graph(self) -> Graph | None:
        """The layer graph in this mode when this call runs on the stacked engine, else None (with the
        one-time warning saying why)."""
        return _graph_in_mode(self.graph, self.unsupported, self.training)

    def fused(self) -> bool:
        """True when this call runs on the stacked engine (architecture supported in this mode)."""
        return self.fused_graph() is not None

    def engine(self, backend: str | None = None) -> engine.Engine:
        """The stacked engine over this ensemble's state (the architecture must be fused in this mode)."""
        device = next(iter(self.stacked.values())).device
        return engine.Engine(self.fused_graph(), self.state(), backends.resolve(backend, device.type))

    def members(self) -> list[nn.Module]:
        """Unstacked copies of the members as ordinary nn.Modules (detached from this ensemble)."""
        result = []
        device = next(iter(self.stacked.values())).device
        for index in range(self.num_members):
            # the template keeps the dtype the members had; the stacked parameters may have been converted since
            member = copy.deepcopy(self._template[0]).to_empty(device=device).to(self.dtype)
            state = {name: tensor[index].detach().clone() for name, tensor in self.params().items()}
            state.update({name: tensor[index].clone() for name, tensor in self.buffers_by_name().items()})
            member.load_state_dict(state)
            member.train(self.training)
            result.append(member)
        return result

    def member_function(self, index: int):
        """Member ``index`` as a function of x that reads the live stacked parameters (differentiable)."""
        params = {name: tensor[index] for name, tensor in self.params().items()}
        params.update({name: tensor[index] for name, tensor in self.buffers_by_name().items()})
        template = self._template[0]
        template.train(self.training)
        return lambda x: torch.func.functional_call(template, params, (x,))

    # ------------------------------------------------------------------------------------ forward
    def member_logits(self, x: torch.Tensor, *, per_member: bool = False, backend: str | None = None) -> torch.Tensor:
        """Logits of every member, [M, B, C]. ``x``: [B, *input] shared, or [M, B, *input] with per_member."""
        if per_member and x.shape[0] != self.num_members:
            raise ValueError(f"per-member inputs must be [M={self.num_members}, B, ...], got {tuple(x.shape)}")
        if self.fused():
            run = self.engine(backend)
            if x.requires_grad and torch.is_grad_enabled():  # Hoffman-style code: keep what JacobianReg needs
                from fastjac.jacobian import recorded_logits  # (jacobian imports this module)

                return recorded_logits(run, x, per_member)
            if not torch.is_grad_enabled() and x.device.type == "cpu" and self._rows_independent():
                return self._logits_in_passes(run, x, per_member)
            return run.forward(x, per_member=per_member)[0]
        return generic.member_logits(self, x, per_member)

    def _rows_independent(self) -> bool:
        """Each row's logits depend on that row alone: no BatchNorm normalizes with its batch's statistics
        (eval mode, running statistics kept)."""
        return not self.training and all(module.track_running_stats for module in self._template[0].modules()
                                          if isinstance(module, nn.modules.batchnorm._BatchNorm))

    def _logits_in_passes(self, run: engine.Engine, x: torch.Tensor, per_member: bool) -> torch.Tensor:
        """Inference on the CPU in as few equal passes over the batch as keep the largest layer output
        within ``CPU_PASS_BYTES`` (rows are independent here, so the result is the one-pass result)."""
        batch_dim = 1 if per_member else 0
        batch = x.shape[batch_dim]
        rows = rows_per_cpu_pass(self, tuple(x.shape[batch_dim + 1:]), x.element_size())
        passes = 1 if rows == 0 else -(-batch // rows)
        if passes == 1:
            return run.forward(x, per_member=per_member)[0]
        parts = x.split(-(-batch // passes), batch_dim)
        return torch.cat([run.forward(part, per_member=per_member)[0] for part in parts], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble output: mean of member logits, [B, C]."""
        from fastjac.jacobian import record_mean  # a recorded pass (x requires grad) carries over

        logits = self.member_logits(x)
        return record_mean(logits, logits.mean(dim=0))

    def extra_repr(self) -> str:
        path = "stacked engine" if self.graph is not None else f"generic path: {self.unsupported}"
        return f"members={self.num_members}, {path}"


def _graph_in_mode(graph: Graph | None, unsupported: str | None, training: bool) -> Graph | None:
    """``graph`` in train or eval mode, or None with the one-time warning (``unsupported``: why there is no
    graph at all)."""
    if graph is None:
        _warn_once(unsupported)
        return None
    try:
        return graph.in_mode(training)
    except Unsupported as reason:
        _warn_once(str(reason))
        return None


# single modules' parsed graphs (or the reason they have none), once per module object
_parsed: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def fused_view(model: nn.Module):
    """(graph, stacked state [M, ...]) when the engine can run ``model`` in its current mode, else None.

    An Ensemble gives its stacked parameters and buffers; a plain module counts as one member (its
    parameters and buffers unsqueezed: differentiable views of its own parameters, and views of its
    buffers, so running statistics update in place).
    """
    if isinstance(model, Ensemble):
        graph = model.fused_graph()
        return None if graph is None else (graph, model.state())
    if model not in _parsed:
        try:
            _parsed[model] = (parse(model), None)
        except Unsupported as reason:
            _parsed[model] = (None, str(reason))
    graph = _graph_in_mode(*_parsed[model], model.training)
    if graph is None:
        return None
    state = {name: p.unsqueeze(0) for name, p in model.named_parameters()}
    state.update({name: b.unsqueeze(0) for name, b in model.named_buffers()})
    return graph, state


# Per pass on the CPU, the largest layer output (all members, all rows of the pass) should stay near the
# cores' caches; a heuristic, from measurements on this project's 2-core VMs. Intel Xeon (2 MiB L2 per
# core), eval-mode inference of M = 5 members, B = 128, same-run medians against the loop of members:
# ResNet-8 (245 KiB per row) 1.9-2.1x the loop's time in one pass, 1.4-1.5x in passes of 32-48 rows; LeNet
# (92 KiB per row) best in passes of 48-64 rows. AMD EPYC (32 MiB L3), SGD-UAP on LeNet: K = 4
# perturbations in one pass (35 MiB) 5.0x the time of K = 1, in four passes 3.4x.
CPU_PASS_BYTES = 8 * 2**20


def rows_per_cpu_pass(model: nn.Module, sample_shape: tuple, element_size: int) -> int:
    """How many input rows of shape ``sample_shape`` one pass of ``model`` takes on the CPU: as many as keep
    its largest layer output within ``CPU_PASS_BYTES``, at least one; 0 where that size is unknown (a layer
    without a meta-device kernel: one pass). The dry run costs ~2 ms, once per model and sample shape."""
    sizes = _largest_activations.setdefault(model, {})
    if sample_shape not in sizes:
        try:
            sizes[sample_shape] = largest_activation(model, sample_shape)
        except (RuntimeError, NotImplementedError):
            sizes[sample_shape] = 0
    per_row = sizes[sample_shape] * element_size
    if isinstance(model, Ensemble) and model.graph is not None and engine.runs_by_member(model.graph, model.num_members,
                                                                                          "cpu"):
        per_row //= model.num_members  # a pass holds one member's activations at a time
    return 0 if per_row == 0 else max(1, CPU_PASS_BYTES // per_row)


_largest_activations: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def largest_activation(model: nn.Module, sample_shape) -> int:
    """Elements in the largest output of a layer with weights, for ONE input row of shape ``sample_shape``,
    summed over the members of an Ensemble: a dry run on the meta device (no data, no compute)."""
    if isinstance(model, Ensemble):
        template, members = model._template[0], model.num_members
    else:
        template, members = copy.deepcopy(model).to("meta"), 1
    largest = 0

    def record(module, inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    # layers with weights: their outputs (and the activations after them) are per member; the input rows
    # before the first weight are shared by the members
    hooks = [module.register_forward_hook(record) for module in template.modules()
             if list(module.parameters(recurse=False))]
    try:
        with torch.no_grad():
            template(torch.empty(1, *sample_shape, device="meta", dtype=_parameter_dtype(template)))
    finally:
        for hook in hooks:
            hook.remove()
    return largest * members


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.get_default_dtype())

