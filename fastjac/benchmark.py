"""``python -m fastjac bench``: the throughput table, every case timed interleaved with the case it is
compared with, in one run.

Three parts, and nothing else:

- the case registry ``KINDS``: each kind of case is one ``Kind`` entry with its label, the builder of a
  zero-argument closure running one unit of work (a training step, an inference pass, one SGD-UAP
  iteration), its anchor (the case its ratio is taken against) and its FLOP rule;
- the interleaved timer ``measure_interleaved``: a group of closures timed round-robin in a shuffled
  order, so load on a shared machine hits both sides of a ratio alike;
- the table: ``run_table`` (every (arch, M) group) and ``format_markdown``.

What builds on it lives in ``bench/``: the target checks (``python -m bench.targets``), the
estimator-variance study (``python -m bench.variance``), ablations, and the pytest-benchmark suites
(``bench/bench_*.py``, the same closures under pytest-benchmark, and one file per fused op).

Architectures: every entry of ``fastjac.models.ARCHITECTURES`` (the engine fuses them), plus two defined
here whose rows measure the generic path against the reference: ``branchy``, a member whose forward
branches on its data, which no engine can trace, and ``lenet_hardtanh``, a LeNet with an activation the
registry does not fuse.

FLOPs: the GEMM/convolution FLOPs one call executes, counted with ``torch.utils.flop_counter``'s formulas
over the ATen ops it dispatches (mm, addmm, bmm, baddbmm and convolution, backward included). The C++
extension's BLAS calls and Triton kernels are invisible to the dispatcher, so every fastjac case is
counted on the ``torch`` backend, which runs the same products; a compiled case is counted on its eager
twin. Achieved FLOP/s are these FLOPs over the case's median time, also as a fraction of the machine's
practical peak: a square float32 matmul timed interleaved with every group, under the same load.

Memory: on CUDA the growth of ``torch.cuda.max_memory_allocated`` over one call. On the CPU PyTorch
exposes no allocator peak, so the figure is the *saved-activation bytes*: the bytes autograd saves for
the backward pass during one call (``torch.autograd.graph.saved_tensors_hooks``, counted once per
storage). It is not a full peak (no parameters, gradients, optimizer state or temporaries), and it is 0
for passes under ``no_grad``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fastjac import backends, memory, models, reference
from fastjac.ensemble import Ensemble
from fastjac.jacobian import JacobianReg, jacobian_penalty, penalty_and_logits
from fastjac.train import make_optimizer
from fastjac.uap import sgd_uap

BATCH = 128
JR_LAMBDA = 0.1
UAP_EPS = (0.1, 0.05, 0.15, 0.2)  # perturbation k uses UAP_EPS[k]; K <= 4
UAP_BETA, UAP_STEP_DECAY = 12.0, 0.8
MEMBERS = (1, 5)
UAP_KS = (1, 4)
# Every training-step case, stacked, loop and reference alike, uses fastjac.train's optimizer (fused
# Adam), so the ratios measure the engine, not the optimizer.
ADAM_OPTIONS = dict(lr=1e-3)
CLOCKS = ("wall", "cpu")
NOISY_IQR = 0.5
GEMM_SIZE = 1024


# ============================================================================================ timing
@dataclass(frozen=True)
class Timing:
    median_s: float
    iqr_s: float                      # interquartile range of the per-call times
    peak_mem_bytes: int | None        # see the module docstring (CUDA peak growth / CPU saved-activation bytes)
    runs: int
    cpu_median_s: float               # median process CPU time per call (all threads; excludes time preempted)

    def seconds(self, clock: str = "wall") -> float:
        """The median of ``clock``: "wall", or "cpu" (process CPU time)."""
        return self.cpu_median_s if clock == "cpu" else self.median_s


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _quartiles(times: Sequence[float]) -> tuple[float, float]:
    """(median, IQR) of ``times``."""
    if len(times) < 2:
        return times[0], 0.0
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return median, q3 - q1


def memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """CUDA: peak allocated-memory growth over one call. CPU: saved-activation bytes of one call."""
    if str(device).startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return max(torch.cuda.max_memory_allocated() - before, 0)
    seen: set[int] = set()
    total = 0

    def pack(tensor):
        nonlocal total
        try:
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # a torch.func wrapper (inside vmap/jvp) has no storage of its own: its own bytes
            total += tensor.numel() * tensor.element_size()
            return tensor
        if key not in seen and nbytes > 0:
            seen.add(key)
            total += nbytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


def measure_interleaved(fns: dict, *, warmup: int = 3, repeats: int = 20, min_time: float = 0.0,
                        max_time: float = float("inf"), device: str = "cpu", memory: bool = True) -> dict:
    """Time a group of closures round-robin (shuffled order each round) -> {key: Timing}.

    Each closure runs ``warmup`` untimed calls, then rounds of one timed call each until ``repeats``
    rounds are done and ``min_time`` seconds have passed; after ``max_time`` seconds it stops once every
    closure has at least 5 timed calls. Interleaving makes ratios within the group robust to load drift.
    ``memory``: True, False, or a set of the keys whose memory figure to take (one more call each).
    """
    keys = list(fns)
    for key in keys:
        for _ in range(warmup):
            fns[key]()
    _sync(device)
    times = {key: [] for key in keys}
    cpu_times = {key: [] for key in keys}
    order, rng = list(keys), random.Random(0)
    started, rounds = time.perf_counter(), 0
    while True:
        elapsed = time.perf_counter() - started
        if rounds >= repeats and elapsed >= min_time:
            break
        if rounds >= min(5, repeats) and elapsed >= max_time:
            break
        rng.shuffle(order)
        for key in order:
            _sync(device)
            tic, cpu_tic = time.perf_counter(), time.process_time()
            fns[key]()
            _sync(device)
            times[key].append(time.perf_counter() - tic)
            cpu_times[key].append(time.process_time() - cpu_tic)
        rounds += 1
    result = {}
    for key in keys:
        median, iqr = _quartiles(times[key])
        measured = memory is True or (memory is not False and key in memory)
        result[key] = Timing(median, iqr, memory_bytes(fns[key], device) if measured else None, len(times[key]),
                             statistics.median(cpu_times[key]))
    return result


def gemm_closure(n: int = GEMM_SIZE, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(closure running one n x n x n matmul, its FLOPs 2 n^3): the machine's practical peak."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return (lambda: torch.mm(a, b)), 2 * n ** 3


# ============================================================================================= FLOPs
_aten = torch.ops.aten
_IN_PLACE = {_aten.addmm_: _aten.addmm, _aten.baddbmm_: _aten.baddbmm}  # counted like their out-of-place forms


class FlopCount(TorchDispatchMode):
    """GEMM/convolution FLOPs of the ATen ops dispatched inside (``torch.utils.flop_counter``'s formulas).

    ``FlopCounterMode`` itself is not used: its module tracker breaks ``torch.autograd.grad(...,
    create_graph=True)``, the reference step's double backward.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(_IN_PLACE.get(func._overloadpacket, func._overloadpacket))
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


@contextmanager
def _automatic_backend(name: str):
    """Within: the automatic choice is ``name`` (cases that name no backend, as a user's code does, run it)."""
    backends.use(name)
    try:
        yield
    finally:
        backends.use(None)


def count_flops(spec: CaseSpec, device: str = "cpu") -> int:
    """GEMM/convolution FLOPs of one call of ``spec``: its closure (a compiled case: its eager twin's) on
    the torch backend, counted on its second call (the first may set things up, e.g. UAP pass sizes)."""
    kind = KINDS[spec.kind]
    spec = dataclasses.replace(spec, kind=kind.eager_twin or spec.kind, backend="auto" if spec.backend != "-" else "-")
    with _automatic_backend("torch"):
        fn = build(spec, device)
        fn()
        with FlopCount() as counter:
            fn()
    return counter.total


# ===================================================================================== architectures
class Branchy(nn.Module):
    """A LeNet-sized member whose forward branches on its data (a residual block taken when the
    features' mean is positive): torch.fx cannot trace it and vmap cannot batch it, so no engine fuses
    it. With ReLU features the branch is always taken; the point is the data-dependent ``if``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))  # [B, 6, 14, 14]
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 14 * 14, 84), nn.ReLU(), nn.Linear(84, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        if h.mean() > 0:
            h = h + self.block(h)
        return self.head(h)


def lenet_hardtanh() -> nn.Sequential:
    """LeNet with Hardtanh for its ReLUs: a layer the registry does not fuse, in a member vmap can run (the
    generic path's other kind of member, beside ``Branchy``)."""
    return nn.Sequential(*(nn.Hardtanh() if isinstance(layer, nn.ReLU) else layer for layer in models.lenet()))


UNFUSED_ARCHS = {"branchy": Branchy, "lenet_hardtanh": lenet_hardtanh}


def arch_names() -> list[str]:
    """Every architecture the table can run: the engine's (``fastjac.models.ARCHITECTURES``), then the
    benchmark's own unfused ones."""
    return [*models.ARCHITECTURES, *UNFUSED_ARCHS]


def make_members(arch: str, members: int, *, seed: int = 0, device: str = "cpu") -> list[nn.Module]:
    torch.manual_seed(seed)
    builder = UNFUSED_ARCHS.get(arch) or (lambda: models.build(arch))
    return [builder().to(device) for _ in range(members)]


def make_batch(batch: int = BATCH, *, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs x [B, 1, 28, 28] in [0, 1) and labels y [B] in [0, 10)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *models.INPUT_SHAPE, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return x.to(device), y.to(device)


# ============================================================================================= cases
@dataclass(frozen=True)
class CaseSpec:
    """One benchmark case. ``backend``: a backend name, "auto" (the automatic choice) or "-" (the case
    runs plain PyTorch and uses no fastjac backend). ``k``: perturbations (UAP cases only)."""
    kind: str
    arch: str
    members: int
    backend: str = "-"
    k: int = 1
    batch: int = BATCH

    @property
    def key(self) -> tuple:
        return (self.kind, self.arch, self.members, self.backend, self.k)

    @property
    def label(self) -> str:
        return KINDS[self.kind].label + (f", K={self.k}" if KINDS[self.kind].per_k else "")


@dataclass
class Setup:
    """What a case starts from: fresh members (seed 0), a fixed random batch x [B, 1, 28, 28] and labels
    y [B], the backend its calls name (None: the automatic choice) and K (UAP cases)."""
    members: list[nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    backend: str | None
    k: int


# ---------------------------------------------------------------------------------- training steps
# A training kind is a loss builder: Setup -> (zero-argument loss function, the parameters to step);
# ``_step`` adds the optimizer around it, eager or under torch.compile.
def _stacked_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over members of each member's mean CE (as ``fastjac.train`` forms it); logits [M, B, C]."""
    labels = y.unsqueeze(0).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / y.shape[0]


def _member_params(members: Sequence[nn.Module]) -> list[torch.Tensor]:
    return [p for member in members for p in member.parameters()]


def _plain_loss(s: Setup):
    ensemble = Ensemble(s.members).train()
    return (lambda: _stacked_ce(ensemble.member_logits(s.x, backend=s.backend), s.y)), ensemble.parameters()


def _one_pass_loss(mode: str):
    """fastjac's internal one-pass JR step, as ``fastjac.train`` calls it (on an unfused architecture
    this is the generic path)."""
    def loss(s: Setup):
        ensemble = Ensemble(s.members).train()

        def fn():
            logits, penalty = penalty_and_logits(ensemble, s.x, nproj=1, mode=mode, backend=s.backend,
                                                 check_values=False)
            return _stacked_ce(logits, s.y) + JR_LAMBDA / 2 * penalty.sum()
        return fn, ensemble.parameters()
    return loss


def _user_loss(mode: str, target: str = "members"):
    """A JR step in a loop of the user's own: the public one-pass call, the user's CE (issue 10's)."""
    def loss(s: Setup):
        ensemble = Ensemble(s.members).train()
        members = len(s.members)

        def fn():
            penalty, logits = jacobian_penalty(ensemble, s.x, nproj=1, mode=mode, target=target, return_logits=True)
            if target == "ensemble":
                return F.cross_entropy(logits.mean(0), s.y) + JR_LAMBDA / 2 * penalty
            return F.cross_entropy(logits.flatten(0, 1), s.y.repeat(members)) + JR_LAMBDA / 2 * penalty.sum()
        return fn, ensemble.parameters()
    return loss


def _hoffman_loss(s: Setup):
    """Hoffman et al.'s code unchanged on a fastjac Ensemble: JacobianReg on the mean logits."""
    ensemble = Ensemble(s.members).train()
    regularizer = JacobianReg(n=1)

    def fn():
        x = s.x.detach().requires_grad_(True)  # the user's x.requires_grad_(True) on each new batch
        out = ensemble(x)  # mean logits [B, C]
        return F.cross_entropy(out, s.y) + JR_LAMBDA * regularizer(x, out)  # JacobianReg = 1/2 * estimate
    return fn, ensemble.parameters()


def _reference_loss(s: Setup):
    """Hoffman et al.'s structure: one forward per member, CE + double-backprop penalty."""
    def fn():
        loss = 0.0
        for member in s.members:
            inputs = s.x.detach().requires_grad_(True)
            logits = member(inputs)
            v = reference.sphere_projections(1, inputs.shape[0], logits.shape[-1], device=inputs.device)
            loss = loss + F.cross_entropy(logits, s.y) + JR_LAMBDA / 2 * reference.penalty_vjp_outputs(inputs, logits, v)
        return loss
    return fn, _member_params(s.members)


def _peer_jvp_loss(s: Setup):
    """The peer a torch.func user writes: stacked members (stack_module_state), functional_call under
    vmap, the penalty's tangents and the logits from one jvp. BatchNorm runs without running
    statistics (``replace_all_batch_norm_modules_``: torch.func cannot update buffers in place)."""
    params, buffers = torch.func.stack_module_state(s.members)
    template = torch.func.replace_all_batch_norm_modules_(copy.deepcopy(s.members[0]).to("meta"))
    kept = dict(template.named_buffers())
    buffers = {name: tensor for name, tensor in buffers.items() if name in kept}

    def call(member_params, member_buffers, inputs):
        return torch.func.functional_call(template, (member_params, member_buffers), (inputs,))

    def member_logits(inputs):
        return torch.func.vmap(call, in_dims=(0, 0, None))(params, buffers, inputs)  # [M, B, C]

    def fn():
        u = torch.randn_like(s.x)
        logits, tangents = torch.func.jvp(member_logits, (s.x,), (u,))
        return _stacked_ce(logits, s.y) + JR_LAMBDA / 2 * tangents.pow(2).sum() / s.x.shape[0]
    return fn, list(params.values())


def _compiled_peer_jvp_loss(s: Setup):
    """The peer under torch.compile, where it can compile: with torch 2.13, compiling torch.func.jvp
    through BatchNorm fails (a fake-tensor call to _fw_primal), and after that failure later cases of the
    same process were seen to lose their autograd graphs ("element 0 of tensors does not require grad";
    ResNet-8 group, also on the tree of 2026-11-30 08:15; cause not found). So it is not attempted there."""
    if any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in s.members[0].modules()):
        raise RuntimeError("not attempted: torch.compile of torch.func.jvp through BatchNorm fails in torch 2.13 "
                           "(fake-tensor call to _fw_primal), and the failure broke later cases of the process")
    return _peer_jvp_loss(s)


def _loop_loss(s: Setup):
    return (lambda: sum(F.cross_entropy(member(s.x), s.y) for member in s.members)), _member_params(s.members)


def _compile(loss_fn):
    """torch.compile(loss_fn) and a note: the graphs and graph breaks Dynamo made of it (counted over the
    caller's first call, which compiles)."""
    from torch._dynamo.utils import counters

    compiled = torch.compile(loss_fn)

    def note(before):
        graphs = counters["stats"]["unique_graphs"] - before[0]
        breaks = sum(counters["graph_break"].values()) - before[1]
        if graphs == 0:
            raise RuntimeError("torch.compile made no graph (Dynamo's recompile limit? torch._dynamo.reset() "
                               "before building)")
        return f"{graphs} graph{'s' * (graphs != 1)}, {breaks} graph break{'s' * (breaks != 1)}"

    return compiled, note, (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))


def _step(loss_builder, compiled: bool = False):
    """Builder of a training step: loss, backward, Adam step; under torch.compile the loss function
    (forward and its backward) is compiled here, by a first call outside any timed region."""
    def build_step(s: Setup):
        loss_fn, params = loss_builder(s)
        optimizer = make_optimizer(params, **ADAM_OPTIONS)
        if compiled:
            loss_fn, note, before = _compile(loss_fn)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            optimizer.step()
            return loss.detach()

        if compiled:
            step()
            step.note = note(before)
        return step
    return build_step


# -------------------------------------------------------------------------------- inference, SGD-UAP
def _ensemble_loop(members: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    if len(members) == 1:
        return members[0]
    return lambda x: torch.stack([member(x) for member in members]).mean(0)


def _infer_stacked(s: Setup):
    ensemble = Ensemble(s.members).eval()
    return torch.no_grad()(lambda: ensemble.member_logits(s.x, backend=s.backend).mean(0))


def _infer_loop(s: Setup):
    model = _ensemble_loop([member.eval() for member in s.members])
    return torch.no_grad()(lambda: model(s.x))


def _infer_vmap(s: Setup):
    params, buffers = torch.func.stack_module_state([member.eval() for member in s.members])
    template = copy.deepcopy(s.members[0]).to("meta")

    def call(p, b, inputs):
        return torch.func.functional_call(template, (p, b), (inputs,))

    batched = torch.func.vmap(call, in_dims=(0, 0, None))
    return torch.no_grad()(lambda: batched(params, buffers, s.x).mean(0))


def _uap(s: Setup):
    """One fastjac sgd_uap call on one batch = one iteration for all K perturbations (model in eval mode)."""
    model = s.members[0].eval() if len(s.members) == 1 else Ensemble(s.members).eval()
    batches, eps = [(s.x, s.y)], list(UAP_EPS[:s.k])
    return lambda: sgd_uap(model, batches, eps=eps, epochs=1, beta=UAP_BETA, step_decay=UAP_STEP_DECAY,
                           backend=s.backend).delta


def _uap_common(s: Setup):
    """The structure of common SGD-UAP code: for each of the K perturbations in turn, a leaf delta
    [1, *input] repeated over the batch, the model's parameters left requiring grad (so ``backward`` also
    forms every parameter gradient), then the sign step and projection. An ensemble is a loop over its
    member modules (eval mode), output = mean logits."""
    model = _ensemble_loop([member.eval() for member in s.members])
    params = _member_params(s.members)
    x, y = s.x, s.y
    deltas = [torch.zeros(1, *x.shape[1:], device=x.device, requires_grad=True) for _ in range(s.k)]

    def step():
        for delta, eps in zip(deltas, UAP_EPS[:s.k]):
            perturbed = torch.clamp(x + delta.repeat(x.shape[0], *([1] * (x.dim() - 1))), 0.0, 1.0)
            loss = F.cross_entropy(model(perturbed), y, reduction="none").clamp(max=UAP_BETA).mean()
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                delta += eps * UAP_STEP_DECAY * delta.grad.sign()
                delta.clamp_(-eps, eps)
            delta.grad = None
        return torch.cat([delta.detach() for delta in deltas])

    return step


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Kind:
    """One kind of case: the single place its label, builder, anchor and FLOP rule are decided.

    ``build(setup)`` -> the closure. ``rows``: the backends a group runs it on: "auto" (the
    automatic choice), "auto+named" (that, and every benchmarked backend by name), "named", or "-"
    (plain PyTorch). ``anchor``: (kind, backend rule) of the case the ratio is taken against; rule
    "auto", "auto-name" (the backend the automatic choice resolves to, by name), "same" (this row's
    backend) or "-". ``archs``: "fused" (the engine's architectures), "unfused" (``UNFUSED_ARCHS``) or
    "any". ``per_k``: K perturbations per call (UAP), one row per K in ``UAP_KS``. ``eager_twin``: the
    case runs that kind's step under torch.compile; its FLOPs are counted on the twin, and it has no
    memory figure (saved-tensor hooks would make Dynamo recompile).
    """
    label: str
    build: Callable[[Setup], Callable[[], torch.Tensor]]
    short: str
    rows: str
    anchor: tuple[str, str] | None = None
    archs: str = "fused"
    per_k: bool = False
    eager_twin: str | None = None


KINDS: dict[str, Kind] = {
    "plain": Kind("plain step, stacked", _step(_plain_loss), "plain", "auto+named", ("plain", "auto"),
                  archs="any"),
    "jr_vjp": Kind("JR step vjp, stacked", _step(_one_pass_loss("vjp")), "vjp", "named",
                   ("plain", "same")),
    "jr_jvp": Kind("JR step jvp, stacked", _step(_one_pass_loss("jvp")), "jvp", "named",
                   ("plain", "same")),
    # The peers before the user-loop cases: compiled after fastjac's compiled jvp step (user_jvp_compiled)
    # in one process, the peer's compile fails in torch 2.13 ("ZeroTensors are immutable",
    # pytorch/pytorch#177261); compiled first, both compile and run (checked interleaved).
    "peer_jvp": Kind("JR step jvp, torch.func vmap + jvp (peer)", _step(_peer_jvp_loss), "peer jvp", "-",
                     ("jr_jvp", "auto-name")),
    "peer_jvp_compiled": Kind("JR step jvp, torch.func vmap + jvp under torch.compile (peer: the reference's "
                              "double backward does not compile)", _step(_compiled_peer_jvp_loss, compiled=True),
                              "peer jvp compiled", "-", ("jr_jvp", "auto-name"), eager_twin="peer_jvp"),
    "user_vjp": Kind("JR step vjp, user loop (jacobian_penalty return_logits)", _step(_user_loss("vjp")),
                     "user vjp", "auto", ("jr_vjp", "auto-name")),
    "user_jvp": Kind("JR step jvp, user loop (jacobian_penalty return_logits)", _step(_user_loss("jvp")),
                     "user jvp", "auto", ("jr_jvp", "auto-name")),
    "user_vjp_compiled": Kind("JR step vjp, user loop under torch.compile",
                              _step(_user_loss("vjp"), compiled=True), "user vjp compiled", "auto",
                              ("user_vjp", "auto"), eager_twin="user_vjp"),
    "user_jvp_compiled": Kind("JR step jvp, user loop under torch.compile",
                              _step(_user_loss("jvp"), compiled=True), "user jvp compiled", "auto",
                              ("user_jvp", "auto"), eager_twin="user_jvp"),
    "user_ensemble": Kind("JR step vjp target ensemble, user loop", _step(_user_loss("vjp", "ensemble")),
                          "user ensemble", "auto", ("user_vjp", "auto")),
    "hoffman": Kind("JR step, Hoffman-style (JacobianReg on ens(x))", _step(_hoffman_loss), "hoffman",
                    "auto", ("user_ensemble", "auto")),
    "reference_jr": Kind("JR step, reference loop (double backprop)", _step(_reference_loss),
                         "reference", "-", ("jr_vjp", "auto-name"), archs="any"),
    "generic_vjp": Kind("JR step vjp, generic path", _step(_one_pass_loss("vjp")), "generic vjp", "auto",
                        ("reference_jr", "-"), archs="unfused"),
    "generic_jvp": Kind("JR step jvp, generic path", _step(_one_pass_loss("jvp")), "generic jvp", "auto",
                        ("reference_jr", "-"), archs="unfused"),
    "loop": Kind("plain step, loop of members", _step(_loop_loss), "loop", "-", ("plain", "auto"),
                 archs="any"),
    "infer_stacked": Kind("inference, stacked", _infer_stacked, "stacked", "auto+named",
                          ("infer_stacked", "auto")),
    "infer_loop": Kind("inference, loop of members", _infer_loop, "infer_loop", "-",
                       ("infer_stacked", "auto")),
    "infer_vmap": Kind("inference, torch.func vmap", _infer_vmap, "infer_vmap", "-",
                       ("infer_stacked", "auto")),
    "uap": Kind("SGD-UAP iteration, fastjac", _uap, "uap", "auto", ("uap_common", "-"), per_k=True),
    "uap_common": Kind("SGD-UAP iteration, common impl.", _uap_common, "common", "-", per_k=True),
}


def build(spec: CaseSpec, device: str = "cpu") -> Callable[[], torch.Tensor]:
    """A closure running one call of ``spec`` on fresh members (seed 0) and a fixed random batch.

    It returns the call's result, for a sanity check: the loss (training steps, a scalar), the ensemble
    output [B, C] (inference) or the perturbations [K, *input] after the iteration (UAP). A compiled case
    is compiled here; its closure carries ``note`` (Dynamo's graphs and graph breaks).
    """
    if spec.kind not in KINDS:
        raise ValueError(f"unknown case kind {spec.kind!r}; known: {', '.join(KINDS)}")
    kind = KINDS[spec.kind]
    if kind.per_k and not 1 <= spec.k <= len(UAP_EPS):
        raise ValueError(f"k must be in 1..{len(UAP_EPS)}, got {spec.k}")
    x, y = make_batch(spec.batch, device=device)
    setup = Setup(make_members(spec.arch, spec.members, device=device), x, y,
                  None if spec.backend in ("auto", "-") else spec.backend, spec.k)
    return kind.build(setup)


def cases(arch: str, members: int, backend_names: Sequence[str]) -> list[CaseSpec]:
    """Every case of one (arch, M) group, in ``KINDS`` order; ``backend_names``: the backends to run by
    name (none on an unfused architecture: the generic path runs no backend's kernels)."""
    unfused = arch in UNFUSED_ARCHS
    named = [] if unfused else list(backend_names)
    specs = []
    for name, kind in KINDS.items():
        if kind.archs != "any" and (kind.archs == "unfused") != unfused:
            continue
        names = {"auto": ["auto"], "auto+named": ["auto", *named], "named": named, "-": ["-"]}[kind.rows]
        specs += [CaseSpec(name, arch, members, backend, k) for backend in names for k in (UAP_KS if kind.per_k else (1,))]
    return specs


def anchor(spec: CaseSpec, auto: str) -> CaseSpec | None:
    """The case ``spec`` is compared with (ratio = spec's time / the anchor's), or None; ``auto``: the
    backend the automatic choice resolves to."""
    if KINDS[spec.kind].anchor is None:
        return None
    other, rule = KINDS[spec.kind].anchor
    backend = {"auto": "auto", "auto-name": auto, "-": "-"}.get(rule)
    if backend is None:  # "same": this row's backend (the automatic row when it resolves to it)
        backend = "auto" if spec.backend == auto else spec.backend
    target = dataclasses.replace(spec, kind=other, backend=backend, k=spec.k if KINDS[other].per_k else 1)
    return None if target == spec else target


def not_benchmarked(name: str, device: str = "cpu") -> str | None:
    """Why backend ``name`` has no rows on ``device`` (None: it has): unavailable here, Triton on the CPU
    interpreter (a correctness tool, not a benchmark), or a backend of the other device."""
    reason = backends._why_unavailable(name)
    if reason is not None:
        return reason
    device_type = torch.device(device).type
    if device_type not in backends.device_types(name):
        return f"{name!r} runs on {' or '.join(backends.device_types(name))} tensors"
    if backends.get(name).interpreted:
        return f"{name!r} runs in an interpreter here (tests only)"
    return None


def bench_backends(device: str = "cpu") -> list[str]:
    """The backends benchmarked by name on ``device`` (``not_benchmarked`` says why the others are not)."""
    return [name for name in backends.NAMES if not_benchmarked(name, device) is None]


# ============================================================================================= table
def _short(spec: CaseSpec, auto: str) -> str:
    short = KINDS[spec.kind].short
    if spec.backend == "auto":
        return f"{short} (auto={auto})"
    return short if spec.backend == "-" else f"{short} ({spec.backend})"


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def run_table(quick: bool = False, archs: Sequence[str] | None = None, members: Sequence[int] = MEMBERS,
              file=None, *, device: str = "cpu", clock: str = "wall", kinds: Sequence[str] | None = None,
              rounds: int | None = None) -> list[dict]:
    """Run every case of every (arch, M) group, each group timed interleaved -> one dict per case.
    ``kinds``: only the cases of these kinds (``KINDS`` keys; default all), e.g. to leave out the
    torch.compile cases where compiling would cost more than the run is allowed. ``rounds``: exactly
    this many timed rounds per group, with no time limit (default: 20, or fewer once a group has run 20 s
    and 5 rounds; 5 with ``quick``): on a noisy machine more rounds steady the medians.

    Row keys: name, kind, arch, M, K, backend, median_ms (wall clock), iqr_ms, cpu_ms (median process
    CPU time), time_ms (the median of ``clock``: what images/s, GFLOP/s and ratios use), runs, mem_bytes,
    samples_per_s (images per second: K*B / time for the UAP cases, B / time otherwise), flops, gflops,
    peak_gflops (the group's GEMM, timed interleaved with its cases), pct_peak, anchor (the anchor's
    name/backend), ratio (time / anchor's time), clock, noisy (wall clock only: the row's or its
    anchor's IQR exceeds NOISY_IQR times the median, the mark of a run disturbed by other work), note
    (a compiled case: Dynamo's graphs and breaks), error (a case that could not run: why; its timing
    keys are None). ``clock="cpu"`` suits a machine shared with other work when torch runs one thread:
    CPU time then excludes the time the process waits for a core. ``file``: where progress lines go.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown case kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    archs = list(archs or arch_names())
    names, auto = bench_backends(device), backends.current(device)
    timing_options = dict(warmup=1, repeats=5, max_time=4.0) if quick else dict(warmup=3, repeats=20, max_time=20.0)
    if rounds is not None:
        timing_options.update(repeats=rounds, max_time=float("inf"))
    flop_counts: dict[tuple, int] = {}

    rows: list[dict] = []
    for arch in archs:
        for m in members:
            torch._dynamo.reset()  # a fresh compile cache per group: Dynamo's recompile limit never bites
            specs = [spec for spec in cases(arch, m, names) if kinds is None or spec.kind in kinds]
            started = time.perf_counter()
            closures, errors = {}, {}
            for spec in specs:
                try:
                    fn = build(spec, device)
                    fn()  # a case that cannot run is reported, not timed
                    flop_key = (KINDS[spec.kind].eager_twin or spec.kind, arch, m, spec.k, spec.batch)
                    if flop_key not in flop_counts:
                        flop_counts[flop_key] = count_flops(spec, device)
                    closures[spec.key] = fn
                except Exception as error:  # noqa: BLE001 (any failure becomes the row's text)
                    errors[spec.key] = _first_line(error)
            closures["gemm"], gemm_flops = gemm_closure(device=device)
            memory = {spec.key for spec in specs if spec.key in closures and KINDS[spec.kind].eager_twin is None}
            timings = measure_interleaved(closures, device=device, memory=memory, **timing_options)
            peak = gemm_flops / timings["gemm"].seconds(clock) / 1e9
            if file is not None:
                print(f"[bench] {arch} M={m}: {len(specs)} cases in {time.perf_counter() - started:.1f}s, GEMM "
                      f"{peak:.1f} GFLOP/s, load average {_load_average()}", file=file, flush=True)
            for spec in specs:
                rows.append(_row(spec, timings, errors, peak, auto, clock,
                                 flop_counts.get((KINDS[spec.kind].eager_twin or spec.kind, arch, m, spec.k, spec.batch)),
                                 getattr(closures.get(spec.key), "note", None)))
    return rows


def _row(spec: CaseSpec, timings: dict, errors: dict, peak: float, auto: str, clock: str, flops: int | None,
         note: str | None) -> dict:
    row = dict(name=spec.label, kind=spec.kind, arch=spec.arch, M=spec.members, K=spec.k,
               backend=f"auto={auto}" if spec.backend == "auto" else spec.backend, clock=clock, note=note,
               error=errors.get(spec.key), peak_gflops=peak, flops=flops, anchor=None, ratio=None, noisy=False)
    timing = timings.get(spec.key)
    if timing is None:
        return row | dict.fromkeys(("median_ms", "iqr_ms", "cpu_ms", "time_ms", "runs", "mem_bytes",
                                    "samples_per_s", "gflops", "pct_peak"))
    seconds = timing.seconds(clock)
    gflops = flops / seconds / 1e9
    row.update(median_ms=timing.median_s * 1e3, iqr_ms=timing.iqr_s * 1e3, cpu_ms=timing.cpu_median_s * 1e3,
               time_ms=seconds * 1e3, runs=timing.runs, mem_bytes=timing.peak_mem_bytes,
               samples_per_s=spec.batch * (spec.k if KINDS[spec.kind].per_k else 1) / seconds,
               gflops=gflops, pct_peak=100 * gflops / peak)
    reference_spec = anchor(spec, auto)
    reference_timing = None if reference_spec is None else timings.get(reference_spec.key)
    if reference_timing is not None:
        row.update(anchor=_short(reference_spec, auto), ratio=seconds / reference_timing.seconds(clock),
                   noisy=clock == "wall" and any(t.iqr_s > NOISY_IQR * t.median_s for t in (timing, reference_timing)))
    return row


def _load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(rows: Sequence[dict], device: str = "cpu", clock: str = "wall") -> dict:
    """The machine, the software, the backends not benchmarked (and why), and the GEMM peaks the groups
    of ``rows`` measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    skipped = {name: not_benchmarked(name, device) for name in backends.NAMES}
    info = dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__, clock=clock,
                python=platform.python_version(), device=device,
                gemm_peak_gflops=sorted({(row["arch"], row["M"]): row["peak_gflops"] for row in rows}.values()),
                date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                backends=", ".join(backends.available()), auto_backend=backends.current(device),
                not_benchmarked="; ".join(f"{name} ({reason})" for name, reason in skipped.items() if reason))
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    info["load_average"] = _load_average()
    return info


def _peak_range(peaks: Sequence[float]) -> str:
    if not peaks:
        return "n/a"
    return f"{peaks[0]:.1f}" if len(peaks) == 1 else f"{min(peaks):.1f} to {max(peaks):.1f}"


def _memory_cell(value: int | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value / 2 ** 20:.2f}"


def _table_line(row: dict) -> str:
    name = row["name"] + (f" [{row['note']}]" if row.get("note") else "")
    if row.get("error"):
        return f"| {name} | {row['arch']} | {row['M']} | {row['backend']} | failed: {row['error']} |" + " |" * 9
    ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}" + (" (noisy)" if row.get("noisy") else "")
    return (f"| {name} | {row['arch']} | {row['M']} | {row['backend']} | {row['median_ms']:.2f} | "
            f"{row['iqr_ms']:.2f} | {row['cpu_ms']:.2f} | {row['runs']} | {_memory_cell(row['mem_bytes'])} | "
            f"{row['samples_per_s']:.0f} | {row['gflops']:.1f} | {row['pct_peak']:.0f} | {row['anchor'] or ''} | "
            f"{ratio} |")


def format_markdown(rows: Sequence[dict], header_info: dict) -> str:
    """A markdown table of ``rows`` headed by the machine (``header_info`` from ``machine_info``)."""
    info = header_info
    clock = rows[0]["clock"] if rows else "wall"
    device = info.get("gpu", f"CPU {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads")
    memory_header = "peak MiB" if str(info.get("device", "cpu")).startswith("cuda") else "saved-act MiB"
    lines = [
        f"Machine: {device}; torch {info['torch']}, Python {info['python']}; backends available: "
        f"{info['backends']} (automatic: {info['auto_backend']}); not benchmarked: {info['not_benchmarked'] or 'none'}.",
        f"Practical peak: a {GEMM_SIZE}^3 float32 matmul timed in every group ({info['clock']} clock, "
        f"{info['threads']} threads): {_peak_range(info['gemm_peak_gflops'])} GFLOP/s; % peak uses its own group's. "
        f"Date: {info['date']}; load average at the end: {info['load_average']}.",
        "",
        f"| case | arch | M | backend | wall median ms | wall IQR ms | CPU ms | runs | {memory_header} | images/s | "
        f"GFLOP/s | % peak | anchor | {clock} time / anchor |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    lines += [_table_line(row) for row in rows]
    lines += [
        "",
        f"B = {BATCH}, nproj = 1, float32, random data; lambda_JR = {JR_LAMBDA}; every step includes backward and "
        "an Adam step. Each (arch, M) group is timed interleaved (shuffled round-robin), so a ratio compares "
        "closures run under the same load. CPU ms: median process CPU time per call (all threads). "
        f"(noisy): the row's or its anchor's wall IQR exceeds {NOISY_IQR:g} x its median, i.e. other work "
        "disturbed the run; do not read that ratio. "
        f"images/s, GFLOP/s, % peak and ratios use the {clock} clock "
        f"({'median process CPU time' if clock == 'cpu' else 'median wall time'}). "
        "GFLOP/s: the GEMM/convolution FLOPs one call executes (torch.utils.flop_counter formulas over its ATen "
        "ops, counted on the torch backend; a compiled case on its eager twin). torch.compile rows: compiled "
        "before timing; [n graphs, k graph breaks] as Dynamo made them. branchy: a member with data-dependent "
        "control flow that no engine fuses; lenet_hardtanh: LeNet with Hardtanh, not fused (the JR rows of both "
        "are the generic path). "
        + ("peak MiB: growth of torch.cuda.max_memory_allocated over one call."
           if memory_header == "peak MiB" else
           "saved-act MiB: bytes autograd saves for backward in one call (saved_tensors_hooks, once per storage); "
           "not a full peak (no parameters, gradients, optimizer state or temporaries); 0 under no_grad."),
    ]
    return "\n".join(lines)


# =============================================================================================== CLI
def make_parser(prog: str = "python -m fastjac bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Throughput of fastjac against loops of members, torch.func, torch.compile, the reference JR "
                    "step and a common SGD-UAP implementation, all timed in one run (see fastjac/benchmark.py). "
                    "Targets: python -m bench.targets; estimator variance: python -m bench.variance.")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisy)")
    parser.add_argument("--arch", choices=arch_names(), action="append",
                        help="architecture(s) to run (repeatable; default: all)")
    parser.add_argument("--members", type=int, action="append", help=f"ensemble size(s) M (default: {MEMBERS})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); 1 is "
                        "the robust setting on a machine shared with other work")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="clock for ratios, images/s and GFLOP/s: wall time, or process CPU time (with "
                             "--threads 1 it excludes the time spent waiting for a core on a shared machine)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), metavar="KIND",
                        help=f"only these kinds of case (default: all): {', '.join(KINDS)}")
    parser.add_argument("--rounds", type=int, help="exactly this many timed rounds per (arch, M) group, with no "
                        "time limit (default: up to 20 within 20 s, at least 5): more steady the medians on a noisy "
                        "machine")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    return parser


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> tuple[list, str]:
    """Apply ``args`` (threads), run the table -> (rows, the markdown report headed by the command). The
    process keeps freed memory (``fastjac.memory``), as fastjac's command line does: every row shares it."""
    if any(m < 1 for m in args.members or []):
        parser.error("--members must be >= 1")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    memory.keep_freed_memory()
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    rows = run_table(args.quick, args.arch or arch_names(), tuple(args.members or MEMBERS), file=sys.stderr,
                     device=args.device, clock=args.clock, kinds=args.kinds, rounds=args.rounds)
    command = f"{parser.prog} " + " ".join(argv)
    return rows, "\n".join([f"Command: `{command.strip()}`", "", format_markdown(rows, machine_info(rows, args.device,
                                                                                                   args.clock))])


def write_report(text: str, out: str | None) -> None:
    print(text)
    if out:
        with open(out, "w") as handle:
            handle.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m fastjac bench``: run the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser("python -m fastjac.benchmark" if sys.argv[0].endswith("benchmark.py") else
                         "python -m fastjac bench")
    args = parser.parse_args(argv)
    _, text = run_from_args(parser, args, argv)
    write_report(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
