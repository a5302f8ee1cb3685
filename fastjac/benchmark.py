"""The one benchmark harness: every timing in ``bench/`` and ``python -m fastjac bench`` goes through here.

Each case is a ``CaseSpec`` that ``build`` turns into a zero-argument closure running exactly one unit of
work (a training step, an inference pass, one SGD-UAP iteration); ``bench/bench_*.py`` time the same
closures under pytest-benchmark. ``measure`` (one closure) and ``measure_interleaved`` (a group of
closures, round-robin) give a warm-up, the median and IQR of many runs, and a memory figure. Ratios are
always taken between closures timed interleaved in the same run, so load on a shared machine hits both
sides alike. Achieved FLOP/s are the case's GEMM/convolution FLOPs (counted from the layer shapes, see
``step_flops``) over its median time, also as a fraction of the machine's practical peak: a square
float32 matmul (``gemm_closure``) timed interleaved with every group, so the peak is taken under the
same load as the cases it scales.

Memory: on CUDA the growth of ``torch.cuda.max_memory_allocated`` over one call. On the CPU PyTorch
exposes no allocator peak, so the figure is the *saved-activation bytes*: the bytes autograd saves for
the backward pass during one call (``torch.autograd.graph.saved_tensors_hooks``, counted once per
storage). It is not a full peak (no parameters, gradients, optimizer state or temporaries), and it is 0
for passes under ``no_grad``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastjac import backends, models, reference
from fastjac.ensemble import Ensemble
from fastjac.jacobian import penalty_and_logits
from fastjac.train import make_optimizer
from fastjac.uap import sgd_uap

BATCH = 128
JR_LAMBDA = 0.1
UAP_EPS = (0.1, 0.05, 0.15, 0.2)  # perturbation k uses UAP_EPS[k]; K <= 4
UAP_BETA, UAP_STEP_DECAY = 12.0, 0.8
ARCHS = ("mlp", "lenet")
MEMBERS = (1, 5)
UAP_KS = (1, 4)
# Every training-step case, stacked, loop and reference alike, uses fastjac.train's optimizer (fused
# Adam), so the ratios measure the engine, not the optimizer.
ADAM_OPTIONS = dict(lr=1e-3)


# ============================================================================================ timing
@dataclass(frozen=True)
class Timing:
    median_s: float
    iqr_s: float                      # interquartile range of the per-call times
    peak_mem_bytes: int | None        # see the module docstring (CUDA peak growth / CPU saved-activation bytes)
    runs: int = 0
    cpu_median_s: float = math.nan    # median process CPU time per call (all threads; excludes time preempted)

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
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and storage.nbytes() > 0:
            seen.add(key)
            total += storage.nbytes()
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
        result[key] = Timing(median, iqr, memory_bytes(fns[key], device) if memory else None, len(times[key]),
                             statistics.median(cpu_times[key]))
    return result


def measure(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20, min_time: float = 0.05,
            max_time: float = float("inf"), device: str = "cpu", memory: bool = True) -> Timing:
    """Median and IQR of ``fn()`` over at least ``repeats`` timed calls and ``min_time`` seconds, after
    ``warmup`` untimed calls; ``peak_mem_bytes`` as described in the module docstring."""
    return measure_interleaved({0: fn}, warmup=warmup, repeats=repeats, min_time=min_time, max_time=max_time,
                               device=device, memory=memory)[0]


GEMM_SIZE = 1024


def gemm_closure(n: int = GEMM_SIZE, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(closure running one n x n x n matmul, its FLOPs 2 n^3): the machine's practical peak."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return (lambda: torch.mm(a, b)), 2 * n ** 3


def gemm_peak_gflops(dtype: torch.dtype = torch.float32, *, n: int = GEMM_SIZE, repeats: int = 10,
                     device: str = "cpu", clock: str = "wall") -> float:
    """GFLOP/s of an n x n x n matmul with torch's current thread count, median of ``repeats``
    (``clock``: "wall", or "cpu" for process CPU time)."""
    fn, work = gemm_closure(n, dtype, device)
    timing = measure(fn, warmup=2, repeats=repeats, min_time=0.0, device=device, memory=False)
    return work / timing.seconds(clock) / 1e9


# ============================================================================================= FLOPs
def mlp_forward_flops(widths: Sequence[int], batch: int) -> int:
    """Forward GEMM FLOPs of one MLP member with layer widths D -> H1 -> ... -> C: 2*B*sum(in*out)."""
    return 2 * batch * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def layer_macs(member: nn.Module, input_shape: Sequence[int] = models.INPUT_SHAPE) -> list[int]:
    """Multiply-adds per sample of every Linear / Conv2d of ``member``, in forward order.

    Linear: in*out. Conv2d: Cout*Hout*Wout*(Cin/groups)*kh*kw (output shapes from one dummy forward).
    Pooling, ReLU, bias and the loss are not counted (they are not products).
    """
    macs: list[int] = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Linear):
            macs.append(module.in_features * module.out_features)
        else:
            kh, kw = module.kernel_size
            macs.append(output[0].numel() * module.in_channels // module.groups * kh * kw)

    handles = [m.register_forward_hook(hook) for m in member.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            member(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return macs


def step_flops(kind: str, macs: Sequence[int], batch: int, members: int = 1, k: int = 1) -> int:
    """GEMM/convolution FLOPs of one call of case ``kind`` (nproj = 1), from per-layer ``macs``.

    With F = 2*B*sum(macs) the forward FLOPs of one member, F_1 its first layer's and F_L its last's
    (every backward product of a layer costs that layer's forward FLOPs):
      infer_*                      F                 (forward only)
      plain, loop                  3F - F_1          (forward, weight grads, input grads of layers 2..L)
      jr_jvp                       6F - 2F_1 = 2 x plain  (primal + tangent rows through forward and
                                   backward; nothing flows into the first layer's input)
      jr_vjp, reference_jr         6F - F_1 - F_L    (forward F; cotangent chain v -> v^T J across all L
                                   layers F; its backward: weight grads F and cotangent grads F - F_L (v is
                                   constant); the CE's backward 2F - F_1) = 2.33 x plain for 784-256-256-10
      uap                          2F per perturbation (forward + input grads of every layer)
      uap_common                   3F per perturbation (also every parameter gradient)
    All times ``members`` (and ``k`` for the UAP cases).
    """
    forward = 2 * batch * sum(macs)
    first, last = 2 * batch * macs[0], 2 * batch * macs[-1]
    per_member = {
        "plain": 3 * forward - first, "loop": 3 * forward - first,
        "jr_jvp": 6 * forward - 2 * first,
        "jr_vjp": 6 * forward - first - last, "reference_jr": 6 * forward - first - last,
        "infer_stacked": forward, "infer_loop": forward, "infer_vmap": forward,
        "uap": 2 * forward * k, "uap_common": 3 * forward * k,
    }[kind]
    return members * per_member


# ============================================================================================= cases
KINDS = ("plain", "jr_vjp", "jr_jvp", "reference_jr", "loop", "infer_stacked", "infer_loop", "infer_vmap",
         "uap", "uap_common")
LABELS = {
    "plain": "plain step, stacked", "jr_vjp": "JR step vjp, stacked", "jr_jvp": "JR step jvp, stacked",
    "reference_jr": "JR step, reference loop (double backprop)", "loop": "plain step, loop of members",
    "infer_stacked": "inference, stacked", "infer_loop": "inference, loop of members",
    "infer_vmap": "inference, torch.func vmap", "uap": "SGD-UAP iteration, fastjac",
    "uap_common": "SGD-UAP iteration, common impl.",
}


@dataclass(frozen=True)
class CaseSpec:
    """One benchmark case. ``backend``: a backend name, "auto" (the automatic choice) or "-" (the case
    runs plain PyTorch modules and uses no fastjac backend). ``k``: perturbations (UAP cases only)."""
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
        return LABELS[self.kind] + (f", K={self.k}" if self.kind in ("uap", "uap_common") else "")


def make_members(arch: str, members: int, *, seed: int = 0, device: str = "cpu") -> list[nn.Sequential]:
    torch.manual_seed(seed)
    return [models.build(arch).to(device) for _ in range(members)]


def make_batch(batch: int = BATCH, *, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs x [B, 1, 28, 28] in [0, 1) and labels y [B] in [0, 10)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *models.INPUT_SHAPE, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return x.to(device), y.to(device)


def _backend_arg(spec: CaseSpec) -> str | None:
    return None if spec.backend in ("auto", "-") else spec.backend


def _stacked_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over members of each member's mean CE (as ``fastjac.train`` forms it); logits [M, B, C]."""
    labels = y.unsqueeze(0).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / y.shape[0]


def _adam_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _ensemble_loop(members: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    if len(members) == 1:
        return members[0]
    return lambda x: torch.stack([member(x) for member in members]).mean(0)


def _common_uap(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, k: int):
    """The structure of common SGD-UAP code: for each of the K perturbations in turn, a leaf delta
    [1, *input] repeated over the batch, the model's parameters left requiring grad (so ``backward`` also
    forms every parameter gradient), then the sign step and projection. An ensemble is a loop over its
    member modules, output = mean logits."""
    model = _ensemble_loop(members)
    params = [p for member in members for p in member.parameters()]
    deltas = [torch.zeros(1, *x.shape[1:], device=x.device, requires_grad=True) for _ in range(k)]

    def step():
        for delta, eps in zip(deltas, UAP_EPS[:k]):
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


def build(spec: CaseSpec, device: str = "cpu") -> Callable[[], torch.Tensor]:
    """A closure running one call of ``spec`` on fresh members (seed 0) and a fixed random batch.

    It returns the call's result, for a sanity check: the loss (training steps, a scalar), the ensemble
    output [B, C] (inference) or the perturbations [K, *input] after the iteration (UAP).
    """
    if spec.kind not in KINDS:
        raise ValueError(f"unknown case kind {spec.kind!r}; known: {', '.join(KINDS)}")
    if spec.kind in ("uap", "uap_common") and not 1 <= spec.k <= len(UAP_EPS):
        raise ValueError(f"k must be in 1..{len(UAP_EPS)}, got {spec.k}")
    members = make_members(spec.arch, spec.members, device=device)
    x, y = make_batch(spec.batch, device=device)
    backend = _backend_arg(spec)
    kind = spec.kind

    if kind in ("plain", "jr_vjp", "jr_jvp"):
        ensemble = Ensemble(members).train()
        optimizer = make_optimizer(ensemble.parameters(), **ADAM_OPTIONS)
        if kind == "plain":
            def step():
                return _adam_step(optimizer, _stacked_ce(ensemble.member_logits(x, backend=backend), y))
        else:
            mode = kind[3:]

            def step():
                logits, penalty = penalty_and_logits(ensemble, x, nproj=1, mode=mode, backend=backend,
                                                     check_values=False)  # as fastjac.train calls it
                return _adam_step(optimizer, _stacked_ce(logits, y) + JR_LAMBDA / 2 * penalty.sum())
        return step

    if kind in ("reference_jr", "loop"):
        optimizer = make_optimizer([p for member in members for p in member.parameters()], **ADAM_OPTIONS)
        if kind == "loop":
            def step():
                return _adam_step(optimizer, sum(F.cross_entropy(member(x), y) for member in members))
        else:
            def step():  # Hoffman et al.'s structure: one forward per member, CE + double-backprop penalty
                loss = 0.0
                for member in members:
                    inputs = x.detach().requires_grad_(True)
                    logits = member(inputs)
                    v = reference.sphere_projections(1, x.shape[0], logits.shape[-1], device=x.device)
                    penalty = reference.penalty_vjp_outputs(inputs, logits, v)
                    loss = loss + F.cross_entropy(logits, y) + JR_LAMBDA / 2 * penalty
                return _adam_step(optimizer, loss)
        return step

    if kind == "infer_stacked":
        ensemble = Ensemble(members).eval()
        return torch.no_grad()(lambda: ensemble.member_logits(x, backend=backend).mean(0))
    if kind == "infer_loop":
        model = _ensemble_loop([member.eval() for member in members])
        return torch.no_grad()(lambda: model(x))
    if kind == "infer_vmap":
        params, buffers = torch.func.stack_module_state([member.eval() for member in members])
        template = copy.deepcopy(members[0]).to("meta")

        def call(p, b, inputs):
            return torch.func.functional_call(template, (p, b), (inputs,))

        batched = torch.func.vmap(call, in_dims=(0, 0, None))
        return torch.no_grad()(lambda: batched(params, buffers, x).mean(0))

    if kind == "uap":  # one fastjac sgd_uap call on one batch = one iteration for all K perturbations
        model = members[0] if spec.members == 1 else Ensemble(members)
        batches, eps = [(x, y)], list(UAP_EPS[:spec.k])
        return lambda: sgd_uap(model, batches, eps=eps, epochs=1, beta=UAP_BETA, step_decay=UAP_STEP_DECAY,
                               backend=backend).delta
    return _common_uap(members, x, y, spec.k)


def flops(spec: CaseSpec) -> int:
    """GEMM/convolution FLOPs of one call of ``spec`` (``step_flops``)."""
    macs = layer_macs(models.build(spec.arch))
    return step_flops(spec.kind, macs, spec.batch, spec.members, spec.k)


def anchor(spec: CaseSpec, auto: str) -> CaseSpec | None:
    """The case ``spec`` is compared with (ratio = spec's median / anchor's median); ``auto`` is the name
    the automatic backend resolved to (the JR and inference anchors use it)."""
    same = dict(arch=spec.arch, members=spec.members)
    if spec.kind == "plain":
        return None if spec.backend == "auto" else CaseSpec("plain", backend="auto", **same)
    if spec.kind in ("jr_vjp", "jr_jvp"):
        return CaseSpec("plain", backend="auto" if spec.backend == auto else spec.backend, **same)
    if spec.kind == "reference_jr":
        return CaseSpec("jr_vjp", backend=auto, **same)
    if spec.kind == "loop":
        return CaseSpec("plain", backend="auto", **same)
    if spec.kind == "infer_stacked":
        return None if spec.backend == "auto" else CaseSpec("infer_stacked", backend="auto", **same)
    if spec.kind in ("infer_loop", "infer_vmap"):
        return CaseSpec("infer_stacked", backend="auto", **same)
    if spec.kind == "uap":
        return CaseSpec("uap_common", k=spec.k, **same)
    return None


def cases(arch: str, members: int, backend_names: Sequence[str]) -> list[CaseSpec]:
    """Every case of one (arch, M) group; ``backend_names`` are the explicit backends to run."""
    same = dict(arch=arch, members=members)
    specs = [CaseSpec("plain", backend="auto", **same)]
    specs += [CaseSpec("plain", backend=name, **same) for name in backend_names]
    specs += [CaseSpec(kind, backend=name, **same) for kind in ("jr_vjp", "jr_jvp") for name in backend_names]
    specs += [CaseSpec("reference_jr", **same), CaseSpec("loop", **same)]
    specs += [CaseSpec("infer_stacked", backend="auto", **same)]
    specs += [CaseSpec("infer_stacked", backend=name, **same) for name in backend_names]
    specs += [CaseSpec("infer_loop", **same), CaseSpec("infer_vmap", **same)]
    specs += [CaseSpec(kind, k=k, backend="auto" if kind == "uap" else "-", **same)
              for k in UAP_KS for kind in ("uap", "uap_common")]
    return specs


def bench_backends(device: str = "cpu") -> list[str]:
    """Available backends to benchmark on ``device``: all but Triton on the CPU (an interpreter there),
    and 'cuda' only on a CUDA device ('cpp' is a CPU backend)."""
    names = [name for name in backends.available() if name != "triton" or str(device).startswith("cuda")]
    if str(device).startswith("cuda"):
        return [name for name in names if name != "cpp"]
    return [name for name in names if name != "cuda"]


# ============================================================================================= table
CLOCKS = ("wall", "cpu")
NOISY_IQR = 0.5


def run_table(quick: bool = False, archs: Sequence[str] = ARCHS, members: Sequence[int] = MEMBERS, file=None,
              *, device: str = "cpu", clock: str = "wall") -> list[dict]:
    """Run every case of every (arch, M) group, each group timed interleaved -> one dict per case.

    Row keys: name, kind, arch, M, K, backend, median_ms (wall clock), iqr_ms, cpu_ms (median process
    CPU time), time_ms (the median of ``clock``: what images/s, GFLOP/s and ratios use), runs, mem_bytes,
    samples_per_s (images per second: K*B / time for the UAP cases, B / time otherwise), gflops,
    peak_gflops (the group's GEMM, timed interleaved with its cases), pct_peak, anchor (the anchor's
    name/backend), ratio (time / anchor's time), clock, noisy (wall clock only: the row's or its
    anchor's IQR exceeds NOISY_IQR times the median, the mark of a run disturbed by other work).
    ``clock="cpu"`` suits a machine shared with other work when torch runs one thread: CPU time then
    excludes the time the process waits for a core. ``file``: where progress lines go (None: quiet).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    names = bench_backends(device)
    auto = backends.current(device)
    timing_options = dict(warmup=1, repeats=5, max_time=4.0) if quick else dict(warmup=3, repeats=20, max_time=20.0)

    rows: list[dict] = []
    for arch in archs:
        for m in members:
            specs = cases(arch, m, names)
            started = time.perf_counter()
            closures = {spec.key: build(spec, device) for spec in specs}
            closures["gemm"], gemm_flops = gemm_closure(device=device)
            timings = measure_interleaved(closures, device=device, **timing_options)
            peak = gemm_flops / timings["gemm"].seconds(clock) / 1e9
            if file is not None:
                print(f"[bench] {arch} M={m}: {len(specs)} cases in {time.perf_counter() - started:.1f}s, GEMM "
                      f"{peak:.1f} GFLOP/s, load average {_load_average()}", file=file, flush=True)
            for spec in specs:
                timing = timings[spec.key]
                reference_spec = anchor(spec, auto)
                reference_timing = None if reference_spec is None else timings.get(reference_spec.key)
                gflops = flops(spec) / timing.seconds(clock) / 1e9
                rows.append(dict(
                    name=spec.label, kind=spec.kind, arch=arch, M=m, K=spec.k,
                    backend=f"auto={auto}" if spec.backend == "auto" else spec.backend,
                    median_ms=timing.median_s * 1e3, iqr_ms=timing.iqr_s * 1e3, cpu_ms=timing.cpu_median_s * 1e3,
                    time_ms=timing.seconds(clock) * 1e3, clock=clock, runs=timing.runs, mem_bytes=timing.peak_mem_bytes,
                    samples_per_s=spec.batch * (spec.k if spec.kind.startswith("uap") else 1) / timing.seconds(clock),
                    gflops=gflops, peak_gflops=peak, pct_peak=100 * gflops / peak,
                    anchor=None if reference_timing is None else _short(reference_spec, auto),
                    ratio=None if reference_timing is None else timing.seconds(clock) / reference_timing.seconds(clock),
                    noisy=clock == "wall" and any(t.iqr_s > NOISY_IQR * t.median_s
                                                  for t in (timing, reference_timing) if t is not None)))
    return rows


def _short(spec: CaseSpec, auto: str) -> str:
    short = {"plain": "plain", "jr_vjp": "vjp", "jr_jvp": "jvp", "infer_stacked": "stacked", "uap_common": "common"}
    name = short.get(spec.kind, spec.kind)
    if spec.backend == "auto":
        return f"{name} (auto={auto})"
    return name if spec.backend == "-" else f"{name} ({spec.backend})"


def _load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(rows: Sequence[dict], device: str = "cpu", clock: str = "wall") -> dict:
    """The machine, the software, and the GEMM peaks the groups of ``rows`` measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__, clock=clock,
                python=platform.python_version(), device=device,
                gemm_peak_gflops=sorted({(row["arch"], row["M"]): row["peak_gflops"] for row in rows}.values()),
                date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                backends=", ".join(backends.available()), auto_backend=backends.current(device))
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


def format_markdown(rows: Sequence[dict], header_info: dict) -> str:
    """A markdown table of ``rows`` headed by the machine (``header_info`` from ``machine_info``)."""
    info = header_info
    clock = rows[0]["clock"] if rows else "wall"
    device = info.get("gpu", f"CPU {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads")
    memory_header = "peak MiB" if str(info.get("device", "cpu")).startswith("cuda") else "saved-act MiB"
    lines = [
        f"Machine: {device}; torch {info['torch']}, Python {info['python']}; backends available: "
        f"{info['backends']} (automatic: {info['auto_backend']}).",
        f"Practical peak: a {GEMM_SIZE}^3 float32 matmul timed in every group ({info['clock']} clock, "
        f"{info['threads']} threads): {_peak_range(info['gemm_peak_gflops'])} GFLOP/s; % peak uses its own group's. "
        f"Date: {info['date']}; load average at the end: {info['load_average']}.",
        "",
        f"| case | arch | M | backend | wall median ms | wall IQR ms | CPU ms | runs | {memory_header} | images/s | "
        f"GFLOP/s | % peak | anchor | {clock} time / anchor |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}" + (" (noisy)" if row.get("noisy") else "")
        lines.append(
            f"| {row['name']} | {row['arch']} | {row['M']} | {row['backend']} | {row['median_ms']:.2f} | "
            f"{row['iqr_ms']:.2f} | {row['cpu_ms']:.2f} | {row['runs']} | {_memory_cell(row['mem_bytes'])} | "
            f"{row['samples_per_s']:.0f} | {row['gflops']:.1f} | {row['pct_peak']:.0f} | {row['anchor'] or ''} | {ratio} |")
    lines += [
        "",
        f"B = {BATCH}, nproj = 1, float32, random data; lambda_JR = {JR_LAMBDA}; every step includes backward and "
        "an Adam step. Each (arch, M) group is timed interleaved (shuffled round-robin), so a ratio compares "
        "closures run under the same load. CPU ms: median process CPU time per call (all threads). "
        f"(noisy): the row's or its anchor's wall IQR exceeds {NOISY_IQR:g} x its median, i.e. other work "
        "disturbed the run; do not read that ratio. "
        f"images/s, GFLOP/s, % peak and ratios use the {clock} clock "
        f"({'median process CPU time' if clock == 'cpu' else 'median wall time'}). "
        "GFLOP/s count GEMM/convolution FLOPs from the layer shapes "
        "(`fastjac.benchmark.step_flops`); the common UAP counts the parameter gradients it forms. "
        + ("peak MiB: growth of torch.cuda.max_memory_allocated over one call."
           if memory_header == "peak MiB" else
           "saved-act MiB: bytes autograd saves for backward in one call (saved_tensors_hooks, once per storage); "
           "not a full peak (no parameters, gradients, optimizer state or temporaries); 0 under no_grad."),
    ]
    return "\n".join(lines)


# =========================================================================================== targets
def _find(rows, kind, arch="mlp", m=5, backend=None, k=1) -> dict | None:
    for row in rows:
        if row["kind"] == kind and row["arch"] == arch and row["M"] == m and row["K"] == k and (
                backend is None or row["backend"] == backend):
            return row
    return None


def check_targets(rows: Sequence[dict], auto: str | None = None, arch: str = "mlp", m: int = 5) -> list[dict]:
    """The throughput targets on (arch, M) with the automatic backend -> [{target, ratio, ok, spec}].

    ``spec`` is the fastjac case to profile when the target is missed. Missing rows give ratio None.
    """
    auto = auto or backends.current("cpu")
    auto_label = f"auto={auto}"

    noisy_rows: list[str] = []

    def median(kind, backend=None, k=1):
        row = _find(rows, kind, arch, m, backend, k)
        if row is not None and row.get("noisy"):
            noisy_rows.append(kind)
        return None if row is None else row["time_ms"]

    plain = median("plain", auto_label)
    vjp, jvp = median("jr_vjp", auto), median("jr_jvp", auto)
    reference_jr, loop = median("reference_jr"), median("loop")
    infer, infer_loop, infer_vmap = median("infer_stacked", auto_label), median("infer_loop"), median("infer_vmap")
    uap1, uap4, common1 = median("uap", auto_label, 1), median("uap", auto_label, 4), median("uap_common", k=1)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    same = dict(arch=arch, members=m)
    noisy = set(noisy_rows)
    vjp_spec, jvp_spec = CaseSpec("jr_vjp", backend=auto, **same), CaseSpec("jr_jvp", backend=auto, **same)
    targets = [
        ("jvp JR step <= 2.2x plain stacked step", ratio(jvp, plain), lambda r: r <= 2.2, jvp_spec),
        ("vjp JR step <= 2.5x plain stacked step", ratio(vjp, plain), lambda r: r <= 2.5, vjp_spec),
        ("reference JR / vjp JR >= 1.3x", ratio(reference_jr, vjp), lambda r: r >= 1.3, vjp_spec),
        ("reference JR / jvp JR >= 1.6x", ratio(reference_jr, jvp), lambda r: r >= 1.6, jvp_spec),
        ("plain stacked step at least loop speed (loop / stacked >= 1)", ratio(loop, plain), lambda r: r >= 1.0,
         CaseSpec("plain", backend="auto", **same)),
        ("inference at least loop speed (loop / stacked >= 1)", ratio(infer_loop, infer), lambda r: r >= 1.0,
         CaseSpec("infer_stacked", backend="auto", **same)),
        ("inference at least vmap speed (vmap / stacked >= 1)", ratio(infer_vmap, infer), lambda r: r >= 1.0,
         CaseSpec("infer_stacked", backend="auto", **same)),
        ("UAP K=1 >= 2x common implementation (common / fastjac >= 2)", ratio(common1, uap1), lambda r: r >= 2.0,
         CaseSpec("uap", backend="auto", k=1, **same)),
        ("UAP K=4 iteration <= 4x K=1 iteration", ratio(uap4, uap1), lambda r: r <= 4.0,
         CaseSpec("uap", backend="auto", k=4, **same)),
    ]
    kinds = [("jr_jvp", "plain"), ("jr_vjp", "plain"), ("reference_jr", "jr_vjp"), ("reference_jr", "jr_jvp"),
             ("loop", "plain"), ("infer_loop", "infer_stacked"), ("infer_vmap", "infer_stacked"), ("uap_common", "uap"),
             ("uap", "uap")]
    return [dict(target=name, ratio=value, ok=None if value is None else bool(test(value)), spec=spec,
                 noisy=bool(noisy & set(used)))
            for (name, value, test, spec), used in zip(targets, kinds)]


def format_targets(results: Sequence[dict], arch: str = "mlp", m: int = 5) -> str:
    lines = [f"Targets ({arch}, M={m}, automatic backend; checked, not asserted):", ""]
    for result in results:
        status = "n/a " if result["ok"] is None else ("PASS" if result["ok"] else "MISS")
        value = "not measured" if result["ratio"] is None else f"{result['ratio']:.2f}x"
        lines.append(f"- {status} {result['target']}: measured {value}"
                     + (" (noisy: a row it uses was disturbed by other work)" if result.get("noisy") else ""))
    return "\n".join(lines)


def profile_top_ops(spec: CaseSpec, *, calls: int = 5, row_limit: int = 12, device: str = "cpu") -> str:
    """torch.profiler table of the top ops (by self CPU time) over ``calls`` calls of ``spec``."""
    fn = build(spec, device)
    for _ in range(2):
        fn()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if str(device).startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
    sort = "self_cuda_time_total" if str(device).startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=48)


# ================================================================================ estimator variance
def _variance_batch(batch: int, device: str) -> tuple[torch.Tensor, str]:
    """The first ``batch`` Fashion-MNIST test images when the data are installed, else smooth random
    images (a blurred uniform field, clamped to [0, 1])."""
    try:
        from fastjac import data

        x, _ = data.load("fashion-mnist", "test")
        return x[:batch].to(device), f"the first {batch} Fashion-MNIST test images"
    except Exception as error:  # no data here: the report says which batch it used
        generator = torch.Generator().manual_seed(0)
        field = torch.rand(batch, *models.INPUT_SHAPE, generator=generator)
        x = F.avg_pool2d(field, 5, stride=1, padding=2).mul(2).sub(0.5).clamp(0, 1)
        return x.to(device), f"{batch} smooth random images (Fashion-MNIST not available: {error})"


def estimator_variance(*, arch: str = "mlp", members: int = 5, draws: int = 200, batch: int = BATCH,
                       rows: Sequence[dict] | None = None, device: str = "cpu", quick: bool = False,
                       clock: str = "wall") -> dict:
    """Spread of the nproj = 1 vjp and jvp estimates of each member's batch-mean ||J||_F^2, at init.

    For each estimator: over ``draws`` independent projections, the mean (with its standard error, to
    compare with the exact value from jacrev), the standard deviation of one estimate (what one training
    step sees), its relative variance (var / exact^2, averaged over members), and time x relative
    variance with the time (``clock``) of one JR training step (from ``rows`` when they hold the (arch, M) steps
    on the automatic backend, else measured here): the cost of reaching a given variance by averaging
    steps; lower is better.
    """
    ensemble = Ensemble(make_members(arch, members, device=device)).eval()
    x, source = _variance_batch(batch, device)
    with torch.no_grad():
        exact = penalty_and_logits(ensemble, x, mode="exact")[1].double()  # [M]
        estimates = {mode: torch.stack([penalty_and_logits(ensemble, x, nproj=1, mode=mode)[1].double()
                                        for _ in range(draws)]) for mode in ("vjp", "jvp")}  # [draws, M]
    auto = backends.current(device)
    step_ms = {}
    for mode in ("vjp", "jvp"):
        row = None if rows is None else _find(rows, f"jr_{mode}", arch, members, auto)
        if row is not None:
            step_ms[mode] = row["time_ms"]
    if len(step_ms) < 2:
        specs = {mode: CaseSpec(f"jr_{mode}", arch, members, auto, batch=batch) for mode in ("vjp", "jvp")}
        options = dict(warmup=1, repeats=5) if quick else dict(warmup=3, repeats=20, max_time=10.0)
        timings = measure_interleaved({mode: build(spec, device) for mode, spec in specs.items()}, device=device,
                                      memory=False, **options)
        step_ms = {mode: timing.seconds(clock) * 1e3 for mode, timing in timings.items()}
    report = dict(arch=arch, members=members, draws=draws, batch=batch, source=source, clock=clock,
                  exact=exact.tolist(), estimators={})
    for mode, values in estimates.items():
        std = values.std(dim=0)  # [M]
        relative_variance = (std.pow(2) / exact.pow(2)).mean().item()
        report["estimators"][mode] = dict(
            mean=values.mean(0).tolist(), sem=(std / math.sqrt(draws)).tolist(), std=std.tolist(),
            relative_std=(std / exact).mean().item(), relative_variance=relative_variance,
            step_ms=step_ms[mode], time_x_variance=step_ms[mode] * relative_variance)
    return report


def format_variance(report: dict) -> str:
    lines = [
        f"Estimator variance ({report['arch']}, M={report['members']} at init, nproj=1, batch of "
        f"{report['source']}; {report['draws']} draws per estimator):",
        "",
        "| estimator | member | exact | mean of draws +- s.e. | std of one estimate | std / exact |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, stats in report["estimators"].items():
        for index, exact in enumerate(report["exact"]):
            lines.append(f"| {mode} | {index} | {exact:.4g} | {stats['mean'][index]:.4g} +- {stats['sem'][index]:.2g} | "
                         f"{stats['std'][index]:.3g} | {stats['std'][index] / exact:.3f} |")
    lines += ["", f"| estimator | JR step ms ({report['clock']} clock) | "
                  "relative variance (var/exact^2, mean over members) | "
                  "step ms x relative variance (lower is better) |", "|---|---:|---:|---:|"]
    for mode, stats in report["estimators"].items():
        lines.append(f"| {mode} | {stats['step_ms']:.2f} | {stats['relative_variance']:.4g} | "
                     f"{stats['time_x_variance']:.4g} |")
    return "\n".join(lines)


# =============================================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m fastjac bench``: run the table, the target checks and the estimator-variance report."""
    parser = argparse.ArgumentParser(
        prog="python -m fastjac bench",
        description="Throughput benchmarks of fastjac against loops, torch.func vmap, the reference JR step and a "
                    "common SGD-UAP implementation, all timed in one run (see fastjac/benchmark.py).")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and draws (a smoke run, noisy)")
    parser.add_argument("--arch", choices=ARCHS, action="append",
                        help="architecture(s) to run (repeatable; default: all)")
    parser.add_argument("--members", type=int, action="append", help=f"ensemble size(s) M (default: {MEMBERS})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); 1 is "
                        "the robust setting on a machine shared with other work")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="clock for ratios, images/s and GFLOP/s: wall time, or process CPU time (with "
                             "--threads 1 it excludes the time spent waiting for a core on a shared machine)")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--no-variance", action="store_true", help="skip the estimator-variance report")
    parser.add_argument("--profile-misses", action="store_true",
                        help="print a torch.profiler top-ops table for the case of every missed target")
    args = parser.parse_args(argv)
    if any(m < 1 for m in args.members or []):
        parser.error("--members must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    archs, members = tuple(args.arch or ARCHS), tuple(args.members or MEMBERS)

    rows = run_table(args.quick, archs, members, file=sys.stderr, device=args.device, clock=args.clock)
    info = machine_info(rows, args.device, args.clock)
    prog = "python -m fastjac.benchmark" if sys.argv[0].endswith("benchmark.py") else parser.prog
    command = f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = [f"Command: `{command.strip()}`", "", format_markdown(rows, info)]
    target_arch, target_m = ("mlp" if "mlp" in archs else archs[0]), (5 if 5 in members else max(members))
    results = check_targets(rows, backends.current(args.device), target_arch, target_m)
    sections += ["", format_targets(results, target_arch, target_m)]
    if args.profile_misses:
        profiled = set()
        for result in results:
            if result["ok"] is False and result["spec"].key not in profiled:
                profiled.add(result["spec"].key)
                sections += ["", f"Top ops of `{result['spec'].label}` ({result['spec'].backend}; missed: "
                             f"{result['target']}):", "", "```",
                             profile_top_ops(result["spec"], device=args.device), "```"]
    if not args.no_variance and "mlp" in archs:
        report = estimator_variance(members=target_m, draws=50 if args.quick else 200, rows=rows,
                                    device=args.device, quick=args.quick, clock=args.clock)
        sections += ["", format_variance(report)]
    text = "\n".join(sections)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
