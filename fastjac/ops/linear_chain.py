"""The JR training quantities of a stacked Linear(+ReLU) chain (an MLP) as one autograd Function.

For a chain of L stacked Linear layers (weight [M, OUT, IN], optional bias [M, OUT], optional ReLU after
each), ``chain_penalty`` returns what a JR training step needs, in one forward:

    logits  [M, B, C]   the primal rows
    penalty [M] (target "members") or [1] (target "ensemble": J_ens = mean_m J_m)
        vjp: scale * ||v^T J_m||^2 summed over rows, v [P, B, C] (the cotangent chain, run transposed)
        jvp: scale * ||J_m u||^2 summed over rows,   u [P, B, IN] (tangent rows next to the primal rows)
    or, target "rows", the rows themselves times sqrt(scale), [M, P*B*IN] (vjp) or [M, P*B*C] (jvp): for a
    caller that combines the members itself (``fastjac.distributed``: J_ens over members on several ranks)

and every parameter gradient by hand in backward, with the fewest products and no autograd graph:

- ReLU masks are never materialized: the primal post-activations are kept (they are the next layer's
  input anyway) and every masked product is ``threshold_backward(g, activation, 0)``, ATen's fused ReLU
  backward (a product with a bool mask first casts the mask to float: one more pass per use).
- vjp: each weight is used twice (forward and cotangent chain); its gradient is one product plus one
  accumulating product (``weight_grad`` into the first), never a sum of two separately allocated
  gradients.
- jvp: primal and tangent rows share every product, forward and backward (the tangents get no bias and
  the primal's mask), so the step is a plain backward over (1 + P) * B rows.

Versus the layer-by-layer engine under autograd (fastjac.engine) this removes the per-layer autograd
nodes, the mask casts and the gradient accumulation passes. The products are ATen GEMMs (MKL on the
CPU, cuBLAS on a GPU) on the torch and cuda backends, and the C++ extension's member-parallel BLAS
calls on cpp (``MemberParallelProducts``): each backend says which (``Backend.chain_products``; None
where the chain does not run, e.g. Triton, which has kernels of its own for the layer-by-layer engine).
The JR Function pays off on every backend with chain products (it removes autograd overhead: ~11% of a
vjp step); the plain one only where the products are the member-parallel ones (``Backend.plain_chain``:
cpp, 7-10% of a plain step at 2 threads). Neither the projections nor x get a gradient from the penalty
(the masks are constant almost everywhere); ``ChainLogits`` forms x's gradient when x requires grad.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from fastjac.ops import compiled_cpu, engine_queries
from fastjac.ops.stacked_linear import stacked_product

_relu_backward_out = torch.ops.aten.threshold_backward.grad_input


# g * (activation > 0), ATen's fused ReLU backward in one pass (opaque under torch.compile on a CPU:
# inductor's code for it is slow there, see compiled_cpu)
_relu_backward = compiled_cpu.relu_backward


@dataclass(frozen=True)
class ChainSpec:
    mode: str                 # "vjp" | "jvp"
    target: str               # "members" | "ensemble" | "rows"
    relus: tuple              # per layer: a ReLU follows
    biases: tuple             # per layer: the layer has a bias
    scale: float              # the estimator's factor (vjp: C / (P*B), or 1/B for the exact basis; jvp: 1/(P*B))
    backend: object           # a fastjac.backends.Backend: whose products (``Backend.chain_products``)


class ATenProducts:
    """The chain's three kinds of product as ATen calls (bmm/baddbmm; one GEMM over [R, IN] x [IN, M*OUT]
    for an input shared by the members)."""

    # h [R, IN] (shared by the members) or [M, R, IN] -> h W_m^T (+ b_m): contiguous [M, R, OUT]
    linear = staticmethod(stacked_product)

    @staticmethod
    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)

    @staticmethod
    def weight_grad(grad_weight: torch.Tensor | None, grad_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """grad_weight (+)= grad_out^T h over rows; grad_out [M, R, OUT], h [R, IN] shared or [M, R, IN]."""
        m, rows, out_features = grad_out.shape
        if h.dim() == 2:  # shared input: one GEMM [M*OUT, R] x [R, IN]
            lhs = grad_out.transpose(1, 2).reshape(m * out_features, rows)
            if grad_weight is None:
                return torch.mm(lhs, h).view(m, out_features, -1)
            grad_weight.view(m * out_features, -1).addmm_(lhs, h)
            return grad_weight
        if grad_weight is None:
            return torch.bmm(grad_out.transpose(1, 2), h)
        return grad_weight.baddbmm_(grad_out.transpose(1, 2), h)


@torch.compiler.assume_constant_result  # a constant to torch.compile: a thread query would break the graph
def _one_thread() -> bool:
    return torch.get_num_threads() == 1


class MemberParallelProducts:
    """The same products through the C++ extension's ``stacked_addmm_`` (``torch.ops.fastjac``):
    (member, row block) tasks over the intra-op threads, each product single-threaded, operands passed
    as strided views (a shared input as a stride-0 member dim, so no transposing copies)."""

    def __init__(self, native_ops):
        self.addmm_ = native_ops.stacked_addmm_
        # one thread: ATen's single [R, IN] x [IN, M*OUT] GEMM for a shared input measured ~6% faster
        # than M products
        self.shared_input_on_aten = _one_thread()

    def linear(self, h, weight, bias):
        if h.dim() == 2 and self.shared_input_on_aten:
            return ATenProducts.linear(h, weight, bias)
        m, out_features, _ = weight.shape
        h = h.expand(m, *h.shape) if h.dim() == 2 else h
        out = h.new_empty(m, h.shape[1], out_features)
        self.addmm_(out, h, weight.transpose(1, 2), bias, False)
        return out

    def matmul(self, a, b):
        out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
        self.addmm_(out, a, b, None, False)
        return out

    def weight_grad(self, grad_weight, grad_out, h):
        h = h.expand(grad_out.shape[0], *h.shape) if h.dim() == 2 else h
        if grad_weight is None:
            return self.matmul(grad_out.transpose(1, 2), h)
        self.addmm_(grad_weight, grad_out.transpose(1, 2), h, None, True)
        return grad_weight


def _masked(g: torch.Tensor, activation: torch.Tensor, streams: int) -> torch.Tensor:
    """g [M, S*B, F] masked by the primal post-ReLU activation [M, B, F] (broadcast over the S streams)."""
    m, rows, features = g.shape
    if streams == 1:
        return _relu_backward(g, activation)
    return _relu_backward(g.view(m, streams, -1, features), activation.unsqueeze(1)).view(m, rows, features)


def _squared_norms(rows: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty sum of squares per member [M] or of the member mean [1], the tensor that was squared)."""
    if target == "ensemble":
        rows = rows.mean(0, keepdim=True)
    return rows.pow(2).flatten(1).sum(1), rows


def _penalty_output(rows: torch.Tensor, spec: ChainSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ChainPenalty's second output from the projected rows [M, ...] (v^T J_m or J_m u), and what its
    backward keeps: scale * the squared norms (per member, or of the member mean) and the tensor squared;
    or, target "rows", the rows times sqrt(scale) as [M, N] and nothing."""
    if spec.target == "rows":
        return rows.flatten(1) * spec.scale ** 0.5, None
    penalty, squared = _squared_norms(rows, spec.target)
    return spec.scale * penalty, squared


def _rows_gradient(spec: ChainSpec, grad_output: torch.Tensor, squared: torch.Tensor | None, shape) -> torch.Tensor:
    """d loss / d rows, shaped ``shape`` ([M, ...]), from the gradient of ``_penalty_output``'s output."""
    if spec.target == "rows":
        return (grad_output * spec.scale ** 0.5).view(shape)
    # d penalty / d squared rows; the ensemble target's mean spreads it evenly over the members
    factor = 2.0 * spec.scale / (shape[0] if spec.target == "ensemble" else 1)
    return ((factor * grad_output.view(-1, *([1] * (squared.dim() - 1)))) * squared).expand(shape)


def _forward_layers(ops, h, weights, biases, relus, batch: int, streams: int):
    """Runs the layers on rows [primal; tangents] -> (each layer's input, the output [M, S*B, C]).
    Bias and ReLU act on the primal rows; the tangent rows take the primal's mask."""
    inputs = []  # each layer's input: [R, IN] shared or [M, R, IN]; later ones double as ReLU masks
    for weight, bias, relu in zip(weights, biases, relus):
        inputs.append(h)
        if streams == 1:
            z = ops.linear(h, weight, bias)
            if relu:
                z.relu_()
        else:
            z = ops.linear(h, weight, None)
            primal = z[:, :batch]
            if bias is not None:
                primal.add_(bias.unsqueeze(1))
            if relu:
                primal.relu_()
                tangent = z[:, batch:].view(z.shape[0], streams - 1, batch, -1)
                _relu_backward_out(tangent, primal.unsqueeze(1), 0, grad_input=tangent)
        h = z
    return inputs, h


def _backward_layers(ops, grad_z, inputs, output, weights, relus, has_bias, batch: int, streams: int,
                     grad_weights: list, input_grad: bool = False):
    """Backpropagates grad_z [M, S*B, C] (at the output, before its ReLU) through the layers; weight
    gradients accumulate into ``grad_weights`` (None entries are allocated). Returns (the bias gradients,
    with ``input_grad`` the gradient of the chain's input x (like x: [R, IN] shared, summed over the
    members, or [M, R, IN]), else None)."""
    activations = list(inputs[1:]) + [output]  # post-activation of each layer (primal rows first)
    grad_biases = [None] * len(weights)
    if relus[-1]:
        grad_z = _masked(grad_z, activations[-1][:, :batch], streams)
    for index in reversed(range(len(weights))):
        grad_weights[index] = ops.weight_grad(grad_weights[index], grad_z, inputs[index])
        if has_bias[index]:
            grad_biases[index] = grad_z[:, :batch].sum(1)
        if index > 0:
            grad_z = ops.matmul(grad_z, weights[index])
            if relus[index - 1]:
                grad_z = _masked(grad_z, activations[index - 1][:, :batch], streams)
    if not input_grad:
        return grad_biases, None
    if inputs[0].dim() == 2:  # a shared input: one GEMM [R, M*OUT] x [M*OUT, IN] sums over the members
        members, rows, out_features = grad_z.shape
        flat = grad_z.transpose(0, 1).reshape(rows, members * out_features)
        return grad_biases, flat @ weights[0].reshape(members * out_features, -1)
    return grad_biases, ops.matmul(grad_z, weights[0])


def _cotangent_chain(ops, c, inputs, output, weights, relus, nproj: int):
    """The transposed chain c -> c^T J_m: c [M, P*B, C] at the output -> ([M, P*B, IN] at the input, each
    layer's cotangent at its pre-activation). ReLU masks come from the primal post-activations
    (``inputs[l + 1]`` after layer l, ``output`` after the last), broadcast over the P projections."""
    masked = [None] * len(weights)
    for index in reversed(range(len(weights))):
        if relus[index]:
            c = _masked(c, inputs[index + 1] if index + 1 < len(weights) else output, nproj)
        masked[index] = c
        c = ops.matmul(c, weights[index])  # [M, P*B, IN]
    return c, masked


def _cotangent_chain_backward(ops, grad_c, masked, inputs, weights, relus, nproj: int, grad_weights: list):
    """Gradients of the cotangent chain's weights from grad_c [M, P*B, IN] (d loss / d (c^T J_m)), input
    side first; they accumulate into ``grad_weights`` (None entries are allocated). The masks are constant
    almost everywhere, so the weights are the chain's only parameters."""
    for index in range(len(weights)):
        product = ops.matmul(masked[index].transpose(1, 2), grad_c)
        grad_weights[index] = product if grad_weights[index] is None else grad_weights[index].add_(product)
        if index + 1 < len(weights):
            grad_c = ops.matmul(grad_c, weights[index].transpose(1, 2))
            if relus[index]:
                grad_c = _masked(grad_c, inputs[index + 1], nproj)


class ChainLogits(torch.autograd.Function):
    """Member logits [M, B, C] of the chain, the plain training step's forward, with the same products
    and hand-written backward as ChainPenalty (no projections, no penalty). With a ``record`` (a
    ``ChainRecord``), the forward also hands out what it saved, so a penalty can be formed from this
    pass later (``RecordedPenalty``: ``fastjac.JacobianReg`` on an Ensemble's output), and the backward
    adds the weight gradients that penalty's backward handed over (``ChainRecord.handoffs``)."""

    @staticmethod
    def forward(ctx, backend, relus: tuple, has_bias: tuple, record, x, *params):
        weights, biases = _split(params, has_bias)
        inputs, output = _forward_layers(backend.chain_products(), x, weights, biases, relus, x.shape[-2], 1)
        ctx.save_for_backward(*inputs, output, *weights)
        ctx.backend, ctx.relus, ctx.has_bias = backend, relus, has_bias
        ctx.record = None if record is None else weakref.ref(record)  # the record holds this node: no cycle
        if record is not None:
            record.inputs, record.output = inputs, output
        return output

    @staticmethod
    def backward(ctx, grad_logits):
        layers = len(ctx.relus)
        saved = ctx.saved_tensors
        inputs, output, weights = saved[:layers], saved[layers], saved[layers + 1:]
        record = None if ctx.record is None else ctx.record()
        handed = None
        if record is not None and record.handoffs:  # a penalty of this forward left its weight gradients
            handed = record.handoffs.pop(torch._C._current_graph_task_id(), None)
        grad_weights = [None] * layers if handed is None else list(handed)  # accumulated into in place
        grad_biases, grad_x = _backward_layers(ctx.backend.chain_products(), grad_logits.contiguous(), inputs, output,
                                               weights, ctx.relus, ctx.has_bias, grad_logits.shape[1], 1,
                                               grad_weights, input_grad=ctx.needs_input_grad[4])
        return (None, None, None, None, grad_x, *_join(grad_weights, grad_biases, ctx.has_bias))


class ChainRecord:
    """What a recorded chain forward keeps for a later penalty: the backend, the ReLU flags, the live
    weights [M, OUT, IN] (the autograd leaves the penalty's gradient flows to), and, once the forward ran,
    each layer's input (``inputs[0]`` is x) and the output [M, B, C] (primal post-activations, no graph),
    and its autograd node (``node``).

    ``handoffs`` maps an autograd graph task (one backward call) to weight gradients that a penalty's
    backward formed and left for the forward's backward to accumulate into, rather than returning them:
    autograd would otherwise add the two nodes' gradients of every weight (a fresh tensor and a pass
    each). A penalty hands off only when the forward's node runs in that same backward call."""

    def __init__(self, backend, relus: tuple, weights):
        self.backend, self.relus, self.weights = backend, tuple(relus), list(weights)
        self.inputs, self.output, self.node = None, None, None
        self.handoffs: dict[int, list] = {}


def chain_logits(backend, x: torch.Tensor, weights, biases, relus, record: ChainRecord | None = None):
    """Member logits [M, B, C] of the stacked chain; x [B, IN] shared or [M, B, IN]. Differentiable w.r.t.
    the weights, the biases and x; ``record`` (optional) receives the forward's saved activations."""
    has_bias = tuple(bias is not None for bias in biases)
    logits = ChainLogits.apply(backend, tuple(relus), has_bias, record, x.contiguous(),
                               *_join(weights, biases, has_bias))
    if record is not None:
        record.node = logits.grad_fn
    return logits


class RecordedPenalty(torch.autograd.Function):
    """The vjp penalty scale * ||c^T J_m||^2 (c [P*B, C] shared by the members) from a recorded chain
    forward: only the cotangent chain runs (no second forward). Differentiable w.r.t. the weights.

    ``after``: a tensor computed from the recorded forward's logits (what JacobianReg was given), or
    None. Taken as an input (its gradient is None), it makes the forward's backward run after this
    one's, so that this one can hand its weight gradients over (``ChainRecord.handoffs``)."""

    @staticmethod
    def forward(ctx, record, target: str, scale: float, nproj: int, after, c, *weights):
        ops = record.backend.chain_products()
        cotangent, masked = _cotangent_chain(ops, c.expand(weights[0].shape[0], *c.shape), record.inputs,
                                             record.output, weights, record.relus, nproj)
        penalty, squared = _squared_norms(cotangent, target)
        ctx.save_for_backward(squared, *masked, *record.inputs, *weights)
        ctx.record, ctx.target, ctx.scale, ctx.nproj = record, target, scale, nproj
        ctx.hand_off = after is not None and record.node is not None and engine_queries.AVAILABLE  # else none
        return scale * penalty

    @staticmethod
    def backward(ctx, grad_penalty):
        record = ctx.record
        layers = len(record.relus)
        saved = ctx.saved_tensors
        squared, masked, inputs, weights = saved[0], saved[1:1 + layers], saved[1 + layers:1 + 2 * layers], saved[-layers:]
        members = weights[0].shape[0]
        factor = 2.0 * ctx.scale / (members if ctx.target == "ensemble" else 1)
        grad_c = ((factor * grad_penalty.view(-1, 1, 1)) * squared).expand(members, *squared.shape[1:])
        grad_weights = [None] * layers
        _cotangent_chain_backward(record.backend.chain_products(), grad_c, masked, inputs, weights, record.relus,
                                  ctx.nproj, grad_weights)
        if ctx.hand_off and not torch.compiler.is_compiling() and torch._C._will_engine_execute_node(record.node):
            task = torch._C._current_graph_task_id()
            earlier = record.handoffs.get(task)  # another penalty of the same forward, same backward call
            record.handoffs[task] = grad_weights if earlier is None else [a.add_(b) for a, b in zip(earlier, grad_weights)]
            return (None,) * (6 + layers)
        return (None,) * 6 + tuple(grad_weights)


def recorded_penalty(record: ChainRecord, v: torch.Tensor, scale: float, target: str,
                     after: torch.Tensor | None = None) -> torch.Tensor:
    """Penalty [M] (target "members") or [1] ("ensemble") of Hoffman's estimator from a recorded forward:
    v [P, B, C] the projections, ``scale`` the estimator's factor. Differentiable w.r.t. the weights.
    ``after``: the tensor the penalty is taken of (computed from the recorded logits), or None; see
    RecordedPenalty."""
    rows = v.reshape(-1, v.shape[-1]).contiguous()
    return RecordedPenalty.apply(record, target, scale, v.shape[0], after, rows, *record.weights)


class ChainPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: ChainSpec, x, projections, *params):
        weights, biases = _split(params, spec.biases)
        ops = spec.backend.chain_products()
        streams = 1 if spec.mode == "vjp" else 1 + projections.shape[0]
        batch = x.shape[-2]
        members = weights[0].shape[0]
        if spec.mode == "vjp":
            h = x
        elif x.dim() == 2:
            h = torch.cat([x, projections.reshape(-1, x.shape[-1])])
        else:
            tangents = projections.reshape(1, -1, x.shape[-1]).expand(members, -1, -1)
            h = torch.cat([x, tangents], dim=1)
        inputs, h = _forward_layers(ops, h, weights, biases, spec.relus, batch, streams)
        out = h.view(members, streams, batch, -1)
        logits = out[:, 0]
        ctx.spec, ctx.layers, ctx.nproj = spec, len(weights), projections.shape[0]
        if spec.mode == "jvp":
            penalty, squared = _penalty_output(out[:, 1:], spec)
            ctx.save_for_backward(*inputs, h, squared, *weights)
            return logits, penalty
        # vjp: the cotangent chain v -> v^T J_m, masks from the primal post-activations
        rows = projections.shape[0] * batch
        c = projections.reshape(1, rows, -1).expand(members, -1, -1)
        c, masked = _cotangent_chain(ops, c, inputs, h, weights, spec.relus, projections.shape[0])
        penalty, squared = _penalty_output(c, spec)
        ctx.save_for_backward(*inputs, h, squared, *masked, *weights)
        return logits, penalty

    @staticmethod
    def backward(ctx, grad_logits, grad_penalty):
        spec, layers = ctx.spec, ctx.layers
        ops = spec.backend.chain_products()
        saved = ctx.saved_tensors
        inputs, output, squared = saved[:layers], saved[layers], saved[layers + 1]
        weights = saved[-layers:]
        members, batch = grad_logits.shape[:2]
        grad_weights = [None] * layers
        if spec.mode == "vjp":
            masked = saved[layers + 2:layers + 2 + layers]
            # d loss / d (v^T J_m) [M, P*B, IN]
            grad_c = _rows_gradient(spec, grad_penalty, squared, (members, ctx.nproj * batch, inputs[0].shape[-1]))
            _cotangent_chain_backward(ops, grad_c, masked, inputs, weights, spec.relus, ctx.nproj, grad_weights)
            grad_z, streams = grad_logits.contiguous(), 1  # a sum's gradient is an expanded (stride-0) view
        else:
            streams = ctx.nproj + 1
            grad_rows = _rows_gradient(spec, grad_penalty, squared, (members, ctx.nproj, batch, output.shape[-1]))
            grad_z = torch.cat([grad_logits.unsqueeze(1), grad_rows], 1).view(members, streams * batch, -1)
        grad_biases, _ = _backward_layers(ops, grad_z, inputs, output, weights, spec.relus, spec.biases, batch,
                                          streams, grad_weights)
        return (None, None, None, *_join(grad_weights, grad_biases, spec.biases))


def _split(params, has_bias):
    weights, biases, position = [], [], 0
    for bias in has_bias:
        weights.append(params[position])
        biases.append(params[position + 1] if bias else None)
        position += 2 if bias else 1
    return weights, biases


def _join(weights, biases, has_bias):
    joined = []
    for weight, bias, flag in zip(weights, biases, has_bias):
        joined.append(weight)
        if flag:
            joined.append(bias)
    return joined


def chain_penalty(spec: ChainSpec, x: torch.Tensor, projections: torch.Tensor, weights, biases):
    """(logits [M, B, C], penalty [M] or [1], or the scaled rows [M, N] for target "rows") of the stacked
    chain; see the module docstring.

    x: [B, IN] shared by the members or [M, B, IN]; projections: v [P, B, C] (vjp) or u [P, B, IN] (jvp).
    Differentiable w.r.t. the weights and biases only.
    """
    params = _join(weights, biases, spec.biases)
    return ChainPenalty.apply(spec, x.contiguous(), projections.contiguous(), *params)
