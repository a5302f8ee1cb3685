"""Jacobian regularization: ``jacobian_penalty`` (every mode and target) and Hoffman's ``JacobianReg``.

The penalty is the mean over the batch of an estimate of ||J(x_b)||_F^2 (DESIGN.md). Ensembles of
fused architectures and fused single modules run on the stacked engine (one pass, no double
backward); a chain of Linear(+ReLU) layers on a backend whose products are ATen GEMMs runs as one
Function with a hand-written backward (``fastjac.ops.linear_chain``, ~11% faster on the vjp step);
anything else runs on the generic torch.func path (``fastjac.generic``: all members at once, one primal
pass), and mode="exact" on ``fastjac.reference``.
"""
from __future__ import annotations

import torch
from torch import nn

from dataclasses import dataclass, replace

from fastjac import backends, engine, generic, reference
from fastjac._checks import all_finite, check_choice, check_inputs, check_matches_model, check_model_input, check_nproj
from fastjac.ensemble import Ensemble, fused_view
from fastjac.ops import compiled_cpu, linear_chain

MODES = ("vjp", "jvp", "exact")
TARGETS = ("members", "ensemble")


def make_projections(mode: str, nproj: int, x_shape, classes: int, *, generator=None, dtype=torch.float32,
                     device="cpu") -> torch.Tensor | None:
    """Random projections for ``mode``: v [nproj, B, C] unit rows (vjp) or u [nproj, B, *input] (jvp).

    ``x_shape`` is the shared input's shape [B, *input]. None for vjp with nproj = -1 (exact basis).
    """
    if mode == "vjp":
        if nproj == -1:
            return None
        return reference.sphere_projections(nproj, x_shape[0], classes, generator=generator, dtype=dtype, device=device)
    if generator is None and compiled_cpu.applies(device):  # inductor's own randn is slow on a CPU
        return compiled_cpu.randn(nproj, *x_shape, dtype=dtype, device=device)
    return reference.gaussian_projections(nproj, x_shape, generator=generator, dtype=dtype, device=device)


def _check_projections(projections: torch.Tensor, mode: str, x_shape, classes: int | None, values: bool = True) -> None:
    """Shapes always; with ``values``, also unit rows (vjp) and finite entries (a scan of the tensor)."""
    expected = "[nproj, B, C]" if mode == "vjp" else "[nproj, B, *input]"
    if projections.dim() < 3 or projections.shape[1] != x_shape[0]:
        raise ValueError(f"projections for mode={mode!r} must be {expected} with B={x_shape[0]}, "
                         f"got {tuple(projections.shape)}")
    if mode == "jvp" and tuple(projections.shape[1:]) != tuple(x_shape):
        raise ValueError(f"projections for mode='jvp' must be [nproj, {', '.join(map(str, x_shape))}], "
                         f"got {tuple(projections.shape)}")
    if mode == "vjp" and classes is not None and projections.shape[2] != classes:
        raise ValueError(f"projections for mode='vjp' must be [nproj, B, C={classes}], got {tuple(projections.shape)}")
    if not values:
        return
    if mode == "vjp":
        norms = projections.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            raise ValueError("projections for mode='vjp' must have unit rows (Hoffman's estimator scales by C)")
    if not all_finite(projections):
        raise ValueError("projections contain NaN or inf values")


def penalty_and_logits(model: nn.Module, x: torch.Tensor, *, nproj: int = 1, mode: str = "vjp",
                       target: str = "members", projections: torch.Tensor | None = None,
                       backend: str | None = None, per_member: bool = False, generator=None,
                       check_values: bool = True):
    """(member logits [M, B, C], penalty [M] or scalar) in one pass: what a JR training step needs.

    A single module counts as M = 1 and gets a scalar penalty; so does target="ensemble".
    ``check_values=False`` skips the scan of x (and of the caller's projections) for NaN/inf: for a
    caller such as ``train`` that has checked the whole data set once already.
    """
    check_choice(mode, MODES, "mode")
    check_choice(target, TARGETS, "target")
    # a scan of the values is a data-dependent branch, which would break a torch.compile graph: a
    # compiled step checks shapes only
    check_values = check_values and not torch.compiler.is_compiling()
    if check_values:
        check_inputs(x, "x")
    check_matches_model(model, x)
    if mode != "exact":
        check_nproj(nproj, mode)
    is_ensemble = isinstance(model, Ensemble)
    if per_member and not is_ensemble:
        raise ValueError("per_member inputs need an Ensemble")
    if per_member and target == "ensemble":
        raise ValueError("target='ensemble' needs one batch shared by all members (per_member=False)")
    shared_shape = tuple(x.shape[1:]) if per_member else tuple(x.shape)
    if projections is not None:
        _check_projections(projections, mode if mode != "exact" else "vjp", shared_shape, None, check_values)

    try:
        if mode == "exact":
            logits, penalty = _exact_penalty(model, x, target, per_member)
        elif (fused := fused_view(model)) is not None:
            graph, state = fused
            run = engine.Engine(graph, state, backends.resolve(backend, x.device.type))
            logits, penalty = _fused_penalty(run, x, mode, nproj, target, projections, per_member, shared_shape,
                                             generator)
        else:
            logits, penalty = _generic_penalty(model, x, mode, nproj, target, projections, per_member, shared_shape,
                                               generator)
    except (RuntimeError, ValueError):  # torch's shape errors, or a fused op's validator
        # x's sample shape is the usual cause: a dry run of one row says so clearly (no cost on success)
        check_model_input(model, x[0] if per_member else x, "x")
        raise
    if not is_ensemble or target == "ensemble":
        penalty = penalty.reshape(())
    return logits, penalty


def _fused_penalty(run: engine.Engine, x, mode, nproj, target, projections, per_member, shared_shape, generator):
    """The stacked engine: tangent rows beside the primal rows (jvp), or the recorded pass's transposed
    graph (vjp); a Linear(+ReLU) chain as one Function on the backends where that pays off."""
    batch = shared_shape[0]
    chain = run.linear_chain() if run.backend.chain_products is not None and not x.requires_grad else None
    if chain is not None:
        return _chain_penalty(chain, run.backend, x, mode, nproj, target, projections, per_member, shared_shape,
                              generator)
    if mode == "jvp":
        u = _jvp_directions(projections, nproj, shared_shape, generator, x)
        logits, tangents, _ = run.forward(x, u, per_member=per_member)
        return logits, _tangent_penalty(tangents, target)
    logits, _, tape = run.forward(x, per_member=per_member, record=True)
    v, scale = _vjp_projections(projections, nproj, shared_shape, logits.shape[-1], generator, x)
    return logits, _tape_penalty(run, tape, v, scale, target, batch)


def _generic_penalty(model, x, mode, nproj, target, projections, per_member, shared_shape, generator):
    """The generic torch.func path (``fastjac.generic``): all members at once, one primal pass."""
    if mode == "jvp":
        u = _jvp_directions(projections, nproj, shared_shape, generator, x)
        logits, tangents = generic.jvp(model, x, u, per_member)
        return logits, _tangent_penalty(tangents, target)
    logits, inputs = generic.logits_with_input(model, x, per_member)
    v, scale = _vjp_projections(projections, nproj, shared_shape, logits.shape[-1], generator, x)
    return logits, _cotangent_penalty(generic.cotangents(logits, inputs, v), scale, target)


def _tangent_penalty(tangents: torch.Tensor, target: str) -> torch.Tensor:
    """The input-space estimate from J_m u [M, P, B, C]: ||J u||^2 averaged over the P*B rows, per member
    [M], or of J_ens u = mean_m J_m u ([1], target "ensemble"); target "rows": the rows, scaled (``_scaled_rows``)."""
    if target == "rows":
        return _scaled_rows(tangents, 1.0 / (tangents.shape[1] * tangents.shape[2]))
    if target == "ensemble":
        tangents = tangents.mean(0, keepdim=True)
    return tangents.pow(2).sum(dim=(1, 2, 3)) / (tangents.shape[1] * tangents.shape[2])


def _tape_penalty(run: engine.Engine, tape, v, scale: float, target: str, batch: int) -> torch.Tensor:
    """Hoffman's estimate from a recorded engine pass: scale * ||v^T J||^2 per member [M], or of J_ens =
    mean_m J_m ([1], target "ensemble"); v [P, B, C]."""
    return _cotangent_penalty(run.cotangent(tape, v, batch), scale, target)


def _cotangent_penalty(g: torch.Tensor, scale: float, target: str) -> torch.Tensor:
    """scale * ||v^T J_m||^2 from the cotangents g [M, P, B, *input], per member [M], or of
    v^T J_ens = mean_m v^T J_m ([1], target "ensemble"); target "rows": the rows, scaled (``_scaled_rows``)."""
    if target == "rows":
        return _scaled_rows(g, scale)
    if target == "ensemble":
        g = g.mean(0, keepdim=True)
    return scale * g.pow(2).flatten(1).sum(dim=1)


def _scaled_rows(rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Projected rows [M, P, B, ...] (J_m u or v^T J_m) times sqrt(scale) as [M, N]: the internal target
    "rows" of ``logits_and_rows``, whose squared norms are the penalties."""
    return rows.flatten(1) * scale ** 0.5


def logits_and_rows(model: nn.Module, x: torch.Tensor, *, nproj: int = 1, mode: str = "vjp",
                    projections: torch.Tensor | None = None, backend: str | None = None, generator=None,
                    check_values: bool = True):
    """(member logits [M, B, C], rows [M, N]) of one pass: what the penalty is made of, before the norm.

    rows_m are member m's projected Jacobian rows times sqrt(scale) (the estimator's factor), so that
    ||rows_m||^2 is its penalty (target "members") and ||mean_m rows_m||^2 the ensemble's (target
    "ensemble"), with the projections ``penalty_and_logits`` would draw from the same generator. vjp: v^T J_m
    (N = P*B*D, D the input size); jvp: J_m u (N = P*B*C); mode "exact": the vjp rows of the C basis vectors
    (nproj = -1: the exact value). For a caller that combines the members itself: ``fastjac.train`` sums
    them over members held by several ranks (target "ensemble" under torch.distributed).
    x: [B, *input], shared by the members. Differentiable w.r.t. the parameters.
    """
    check_choice(mode, MODES, "mode")
    if mode == "exact":
        mode, nproj, projections = "vjp", -1, None
    check_nproj(nproj, mode)
    check_values = check_values and not torch.compiler.is_compiling()
    if check_values:
        check_inputs(x, "x")
    if projections is not None:
        _check_projections(projections, mode, tuple(x.shape), None, check_values)
    shared_shape = tuple(x.shape)
    if (fused := fused_view(model)) is not None:
        graph, state = fused
        run = engine.Engine(graph, state, backends.resolve(backend, x.device.type))
        return _fused_penalty(run, x, mode, nproj, "rows", projections, False, shared_shape, generator)
    return _generic_penalty(model, x, mode, nproj, "rows", projections, False, shared_shape, generator)


def _jvp_directions(projections, nproj, shared_shape, generator, x) -> torch.Tensor:
    """u [P, B, *input]: the caller's directions or fresh Gaussian ones."""
    if projections is not None:
        return projections
    return make_projections("jvp", nproj, shared_shape, 0, generator=generator, dtype=x.dtype, device=x.device)


def _vjp_projections(projections, nproj, shared_shape, classes: int, generator, x):
    """(v [P, B, C], scale) of Hoffman's estimator: the caller's or fresh unit rows with scale C / (P*B),
    or for nproj = -1 the C basis vectors with scale 1/B (the exact value)."""
    batch = shared_shape[0]
    if projections is None and nproj == -1:
        return reference.basis_projections(batch, classes, dtype=x.dtype, device=x.device), 1.0 / batch
    if projections is None:
        projections = make_projections("vjp", nproj, shared_shape, classes, generator=generator, dtype=x.dtype,
                                       device=x.device)
    _check_projections(projections, "vjp", shared_shape, classes, values=False)  # C is known only now
    return projections, classes / (projections.shape[0] * batch)


def _chain_penalty(chain, backend, x, mode, nproj, target, projections, per_member, shared_shape, generator):
    weights, biases, relus = chain
    if mode == "vjp":
        projections, scale = _vjp_projections(projections, nproj, shared_shape, weights[-1].shape[1], generator, x)
    else:
        projections = _jvp_directions(projections, nproj, shared_shape, generator, x)
        scale = 1.0 / (projections.shape[0] * shared_shape[0])
    spec = linear_chain.ChainSpec(mode, target, relus, tuple(bias is not None for bias in biases), scale, backend)
    inputs = x.flatten(2) if per_member else x.flatten(1)
    return linear_chain.chain_penalty(spec, inputs, projections.flatten(2), weights, biases)


def _exact_penalty(model, x, target, per_member):
    """mode='exact': the reference's per-sample jacrev norms on the members as functions, one at a time."""
    if isinstance(model, Ensemble):
        functions = [model.member_function(index) for index in range(model.num_members)]
    else:
        functions = [model]
    inputs = [x[index] for index in range(len(functions))] if per_member else [x] * len(functions)
    if target == "ensemble":
        functions, inputs = [reference.ensemble_model(functions)], [x]
    penalties = torch.stack([reference.penalty_exact(f, member_x) for f, member_x in zip(functions, inputs)])
    if isinstance(model, Ensemble):
        logits = model.member_logits(x, per_member=per_member)
    else:
        logits = model(x).unsqueeze(0)
    return logits, penalties


def jacobian_penalty(model: nn.Module, x: torch.Tensor, *, nproj: int = 1, mode: str = "vjp",
                     target: str = "members", projections: torch.Tensor | None = None,
                     backend: str | None = None, per_member: bool = False, generator=None,
                     return_logits: bool = False):
    """Estimate of the batch mean of ||J(x_b)||_F^2, differentiable w.r.t. the parameters.

    Args:
        model: an ``Ensemble`` or a single ``nn.Module`` mapping [B, *input] -> logits [B, C].
        x: inputs [B, *input] (or [M, B, *input] with ``per_member``, members target only).
        nproj: projections per sample (>= 1); -1 = exact from the C basis vectors (mode="vjp").
        mode: "vjp" (Hoffman's output-space estimator), "jvp" (input-space), or "exact" (jacrev).
        target: "members" -> one estimate per member [M]; "ensemble" -> scalar, J_ens = mean_m J_m.
        projections: v [nproj, B, C] with unit rows (vjp) or u [nproj, B, *input] (jvp) to use instead of
            random draws (the same for every member).
        backend: a name from ``fastjac.backends.available()``; None = the automatic choice.
        generator: a torch.Generator for the random projections.
        return_logits: also return the logits of the same pass (one forward for both): what a
            training loop of the user's own needs next to the penalty.
    Returns: the penalty, a scalar (single module, or target="ensemble") or [M] (Ensemble, target="members");
    with ``return_logits``, (penalty, logits): logits [M, B, C] for an Ensemble, [B, C] for a single module.
    """
    logits, penalty = penalty_and_logits(model, x, nproj=nproj, mode=mode, target=target, projections=projections,
                                         backend=backend, per_member=per_member, generator=generator)
    if not return_logits:
        return penalty
    return penalty, (logits if isinstance(model, Ensemble) else logits.squeeze(0))


@dataclass(frozen=True)
class ForwardRecord:
    """What an Ensemble's forward keeps, when its input requires grad, so that ``JacobianReg`` can form
    Hoffman's penalty from that same pass (no second forward, no double backward).

    ``x`` is the input the pass ran on ([B, *input], or [M, B, *input] per member); ``target`` is
    "members" for ``member_logits`` (one penalty per member) and "ensemble" for the mean output.
    Exactly one of ``chain`` (a Linear(+ReLU) chain's saved activations) and ``run``/``tape`` (the
    layer-by-layer engine's tape) is set.
    """
    x: torch.Tensor
    per_member: bool
    target: str
    chain: linear_chain.ChainRecord | None = None
    run: engine.Engine | None = None
    tape: engine.Tape | None = None

    def penalty(self, nproj: int, classes: int, of: torch.Tensor | None = None) -> torch.Tensor:
        """Hoffman's estimate with ``nproj`` fresh unit projections (-1: the exact basis), drawn from the
        global generator exactly as the double-backprop path draws them: [M], or a scalar ("ensemble").
        ``of``: the output the penalty is taken of (JacobianReg's y), which lets a chain's penalty hand its
        weight gradients to the forward's backward (``linear_chain.RecordedPenalty``)."""
        shared_shape = tuple(self.x.shape[1:]) if self.per_member else tuple(self.x.shape)
        v, scale = _vjp_projections(None, nproj, shared_shape, classes, None, self.x)
        if self.chain is not None:
            penalty = linear_chain.recorded_penalty(self.chain, v, scale, self.target, after=of)
        else:
            penalty = _tape_penalty(self.run, self.tape, v, scale, self.target, shared_shape[0])
        return penalty.reshape(()) if self.target == "ensemble" else penalty


def recorded_logits(run: engine.Engine, x: torch.Tensor, per_member: bool) -> torch.Tensor:
    """Member logits [M, B, C] of one engine pass that also records what Hoffman's penalty needs (the
    ReLU masks, pool indices: the chain's activations or the engine's tape), attached to the result for
    ``JacobianReg``. ``Ensemble.member_logits`` calls this when x requires grad (Hoffman-style code)."""
    chain = run.linear_chain() if run.backend.chain_products is not None else None
    if chain is not None:
        weights, biases, relus = chain
        saved = linear_chain.ChainRecord(run.backend, relus, weights)
        logits = linear_chain.chain_logits(run.backend, x.flatten(2 if per_member else 1), weights, biases, relus,
                                           saved)
        record = ForwardRecord(x, per_member, "members", chain=saved)
    else:
        logits, _, tape = run.forward(x, per_member=per_member, record=True)
        record = ForwardRecord(x, per_member, "members", run=run, tape=tape)
    logits._fastjac_record = record
    return logits


def record_mean(logits: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Carries a recorded pass from member logits [M, B, C] to their mean [B, C] (the ensemble output,
    target "ensemble"); returns ``mean``."""
    record = getattr(logits, "_fastjac_record", None)
    if record is not None:
        mean._fastjac_record = replace(record, target="ensemble")
    return mean


class JacobianReg(nn.Module):
    """Drop-in criterion with Hoffman et al.'s semantics: ``forward(x, y) = (1/2) * estimate``.

    ``y`` is the model output computed from ``x`` (which must require grad); ``n`` projections per sample,
    n = -1 for the exact value. Two ways to run, same value for the same projections (drawn from the
    global generator):

    - ``y = ens(x)`` ([B, C], the ensemble's mean logits: target "ensemble", a scalar) or
      ``y = ens.member_logits(x)`` ([M, B, C]: one penalty per member, [M]) of a fastjac ``Ensemble``
      that the engine fuses: the penalty comes from what that forward recorded (the cotangent chain
      only; no second forward, no double backward). Its gradient reaches the parameters; it adds nothing
      to x's gradient, which for piecewise-linear members (ReLU, pooling) is exactly zero anyway.
    - any other ``y`` [B, C] (or [M, B, C]): double backprop through the graph from x to y, like the
      original.
    """

    def __init__(self, n: int = 1):
        super().__init__()
        check_nproj(n, "vjp")
        self.n = n

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("JacobianReg: x and y must be tensors")
        if not x.requires_grad:
            raise ValueError("JacobianReg: x must require grad and y must be computed from it")
        # y [B, C], or member logits [M, B, C] of a shared x [B, ...] or of per-member inputs [M, B, ...]
        batch_ok = y.dim() == 2 and y.shape[0] == x.shape[0] or y.dim() == 3 and (
            y.shape[1] == x.shape[0] or x.dim() > 2 and tuple(y.shape[:2]) == tuple(x.shape[:2]))
        if not batch_ok:
            raise ValueError(f"JacobianReg: y must be logits [B={x.shape[0]}, C] (or member logits [M, B, C]), "
                             f"got {tuple(y.shape)}")
        record = getattr(y, "_fastjac_record", None)
        if record is not None:
            if record.x is not x:
                raise ValueError("JacobianReg: y was computed by a fastjac Ensemble from another tensor than x")
            return 0.5 * record.penalty(self.n, y.shape[-1], of=y)
        return 0.5 * self._double_backprop(x, y)

    def _double_backprop(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Hoffman's estimator by double backprop: a scalar for y [B, C], [M] for member logits [M, B, C]."""
        batch, classes = y.shape[-2:]
        v = None if self.n == -1 else reference.sphere_projections(self.n, batch, classes, dtype=y.dtype,
                                                                   device=y.device)
        if not y.requires_grad or y.grad_fn is None:
            raise ValueError("JacobianReg: y was not computed from x (it does not depend on any tensor that "
                             "requires grad)")
        try:
            if y.dim() == 2:
                return reference.penalty_vjp_outputs(x, y, v)
            return torch.stack([reference.penalty_vjp_outputs(x, member, v) for member in y])
        except RuntimeError as error:
            if "appears to not have been used in the graph" in str(error):
                raise ValueError("JacobianReg: y was not computed from x") from error
            raise

    def extra_repr(self) -> str:
        return f"n={self.n}"
