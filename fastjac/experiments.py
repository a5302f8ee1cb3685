"""``reproduce``: the accuracy/robustness trade-off study of Co et al. (2022), one command.

Configurations: a baseline single model; JR single models over a lambda grid; a plain ensemble
(lambda = 0); Jacobian Ensembles with a uniform per-member lambda, with mixed lambdas (k of the M members
regularized), and with the ensemble target (joint training); in the frontier presets also a single
model with about M times a member's parameters (wider layers) and its own JR grid. Each is trained,
attacked with SGD-UAP over the whole eps grid in one batched run (fitted on training data), and evaluated
on the test set. Every finished (configuration, seed) is written to results.json at once, so a rerun
into the same directory skips it; training checkpoints each epoch, so an interrupted configuration
resumes too. A run holds a lock on its directory (no job is ever done twice by two runs), and every file
is written atomically under a unique temporary name. The frontier presets add the trade-off frontiers
with bootstrap intervals (``fastjac.frontier``), a SGD-UAP over several batch orders (restarts), and an
attack-strength check (longer attacks over more orders on a few models).
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastjac import __version__, _io, data, frontier, models
from fastjac._checks import check_int
from fastjac.ensemble import Ensemble
from fastjac.metrics import evaluate
from fastjac.train import train
from fastjac.uap import sgd_uap


@dataclass(frozen=True)
class AttackCheck:
    """A stronger SGD-UAP on a few trained models: does the reported robustness survive an attack that
    runs longer and from more batch orders? The stronger attack runs ``epochs_factor`` x the preset's
    epochs over the preset's orders plus ``extra_restarts`` new ones, chosen per eps as the study's attack
    is (:func:`fit_uaps`). A model is flagged when its UAP accuracy under it is more than ``tolerance``
    below the study's."""
    configurations: tuple          # names of configurations attacked again
    seeds: tuple = (0,)
    epochs_factor: int = 3
    extra_restarts: int = 3
    tolerance: float = 0.02


@dataclass(frozen=True)
class Preset:
    epochs: int
    members: int
    lambdas: tuple                 # the JR single-model grid (the baseline, lambda = 0, always runs)
    je_lambdas: tuple              # Jacobian Ensembles, target "members", one lambda for every member
    je_ensemble_lambdas: tuple     # Jacobian Ensembles, target "ensemble" (joint training)
    mixed: tuple                   # (k, lambda) pairs: k of the M members regularized with lambda, the rest plain
    eps: tuple
    seeds: tuple
    train_samples: int | None      # None = the whole training split
    test_samples: int | None       # None = the whole test split
    uap_samples: int               # training images the UAPs are fitted on
    uap_epochs: int
    batch_size: int = 128
    uap_restarts: int = 1          # batch orders the UAPs are fitted in; the strongest on the fit set is kept
    wide_lambdas: tuple = ()       # a single model with ~M x a member's parameters: its JR grid (0 = plain); () = none
    attack_check: AttackCheck | None = None
    frontier: bool = False         # write the frontier analysis (frontier.md, frontier.json, frontier*.png)
    arch: str = "mlp"              # the architecture the preset is sized for: reproduce's default


def _mixed_grid(members: int, lambdas: tuple) -> tuple:
    """Mixed ensembles with k = 1 .. M-1 regularized members at each lambda."""
    return tuple((k, lam) for lam in lambdas for k in range(1, members))


_EPS = (0.05, 0.1, 0.15)
PRESETS = {
    "smoke": Preset(epochs=1, members=3, lambdas=(0.1,), je_lambdas=(0.1,), je_ensemble_lambdas=(0.1,),
                    mixed=((2, 0.1),), eps=(0.1,), seeds=(0,), train_samples=3000, test_samples=2000,
                    uap_samples=1000, uap_epochs=2),
    "quick": Preset(epochs=3, members=5, lambdas=(0.05, 0.2, 1.0), je_lambdas=(0.2,), je_ensemble_lambdas=(0.2,),
                    mixed=((3, 0.2),), eps=_EPS, seeds=(0,), train_samples=None, test_samples=None,
                    uap_samples=10000, uap_epochs=5),
    "full": Preset(epochs=8, members=5, lambdas=(0.02, 0.05, 0.2, 1.0), je_lambdas=(0.05, 0.2),
                   je_ensemble_lambdas=(0.2,), mixed=((3, 0.2),), eps=_EPS, seeds=(0, 1, 2), train_samples=None,
                   test_samples=None, uap_samples=20000, uap_epochs=10),
    # The frontier study (issue 14), each sized to <= 90 min on this project's 2-core CPU when otherwise
    # idle (estimated by estimate_seconds() / measured on a run from scratch: frontier 85 / 62.4 min,
    # frontier-lenet 74 / 73.8 min; docs/results/frontier*/results.md).
    # SGD-UAP runs one epoch in several batch orders: one order settles within an epoch to a perturbation
    # set by its last batches, and orders differ (fit_uaps). On the MLP the orders' outcomes are bimodal
    # with a rare low mode (jr-0.01, seed 0, eps 0.15: 4 of 40 orders reach 56.4-56.7%, the others
    # 58.7-64.9%), so its attack runs 20 orders over 5,000 fit images rather than 10 over 10,000 (the same
    # cost): with 10 the attack check flagged jr-0.01 (59.3 -> 56.6 under 3x the epochs in 13 orders).
    # LeNet's JR model showed no such tail (4 and 20 orders: the same accuracy within 0.3 points), so its
    # attack has 3 orders over 4,000 fit images; with its grid (jr-1 and je-ensemble 0.005 left out: below
    # the JE points' clean range / next to the plain ensemble) and 20,000 training images it fits the 90
    # minutes (its first run, 30,000 images, 4 orders over 5,000: ~2 min per ensemble run, ~114 min in all).
    # docs/results/frontier/attack-orders.md has the measurements.
    # The attack check's models: the baseline, one JR model and one Jacobian Ensemble at the knee.
    "frontier-smoke": Preset(epochs=1, members=2, lambdas=(0.5,), je_lambdas=(0.5,), je_ensemble_lambdas=(0.5,),
                             mixed=_mixed_grid(2, (0.05, 0.5)), eps=(0.05, 0.1), seeds=(0, 1), train_samples=512,
                             test_samples=256, uap_samples=128, uap_epochs=1, uap_restarts=2, wide_lambdas=(0.0, 0.5),
                             frontier=True, attack_check=AttackCheck(("baseline", "je-members-m2-0.5"), extra_restarts=1)),
    "frontier": Preset(epochs=5, members=5, lambdas=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 1.0),
                       je_lambdas=(0.005, 0.01, 0.02, 0.05, 0.2), je_ensemble_lambdas=(0.005, 0.02, 0.05, 0.2),
                       mixed=_mixed_grid(5, (0.02, 0.2)), eps=_EPS, seeds=(0, 1, 2), train_samples=None,
                       test_samples=None, uap_samples=5000, uap_epochs=1, uap_restarts=20,
                       wide_lambdas=(0.0, 0.005, 0.02, 0.05, 0.2), frontier=True, attack_check=AttackCheck(("baseline", "jr-0.01", "je-members-m5-0.01"))),
    "frontier-lenet": Preset(epochs=2, members=5, lambdas=(0.005, 0.02, 0.05, 0.2), je_lambdas=(0.005, 0.02, 0.2),
                             je_ensemble_lambdas=(0.02, 0.2), mixed=_mixed_grid(5, (0.02, 0.2)), eps=_EPS,
                             seeds=(0, 1, 2), train_samples=20000, test_samples=None, uap_samples=4000, uap_epochs=1,
                             uap_restarts=3, wide_lambdas=(0.0, 0.02, 0.2), frontier=True, arch="lenet",
                             attack_check=AttackCheck(("baseline", "jr-0.02", "je-members-m5-0.02"))),
}


@dataclass(frozen=True)
class Configuration:
    name: str
    kind: str                      # baseline | jr | ensemble | jacobian-ensemble
    members: int                   # 0 = a single model
    jr_lambda: float | list
    jr_target: str = "members"
    arch_kwargs: dict = field(default_factory=dict)  # passed to models.build (the wide single model's widths)
    frontiers: tuple = ()          # the methods (fastjac.frontier.METHODS) this configuration is a point of


def configurations(preset: Preset, arch: str | None = None) -> list[Configuration]:
    """Every configuration of ``preset`` for architecture ``arch`` (default: the preset's)."""
    m = preset.members
    mixed_lambdas = {lam for _, lam in preset.mixed}
    plain_ensemble = ("je-members", "je-ensemble", "je-mixed")  # lambda = 0 (k = 0) end of every JE frontier
    configs = [
        Configuration("baseline", "baseline", 0, 0.0, frontiers=("jr",)),
        *[Configuration(f"jr-{value:g}", "jr", 0, value, frontiers=("jr",)) for value in preset.lambdas],
        Configuration(f"ensemble-m{m}", "ensemble", m, 0.0, frontiers=plain_ensemble),
        *[Configuration(f"je-members-m{m}-{value:g}", "jacobian-ensemble", m, value,
                        frontiers=("je-members", "je-mixed") if value in mixed_lambdas else ("je-members",))
          for value in preset.je_lambdas],
        *[Configuration(f"je-mixed-m{m}-{lam:g}x{k}", "jacobian-ensemble", m, [lam] * k + [0.0] * (m - k),
                        frontiers=("je-mixed",)) for k, lam in preset.mixed],
        *[Configuration(f"je-ensemble-m{m}-{value:g}", "jacobian-ensemble", m, value, "ensemble",
                        frontiers=("je-ensemble",)) for value in preset.je_ensemble_lambdas],
    ]
    if preset.wide_lambdas:
        wide = wide_kwargs(arch or preset.arch, m)
        configs += [Configuration(f"wide-jr-{value:g}" if value else "wide-baseline", "jr" if value else "baseline",
                                  0, value, arch_kwargs=wide, frontiers=("wide-jr",)) for value in preset.wide_lambdas]
    return configs


# The arguments of each architecture's builder that set its widths (scaled together by wide_kwargs).
WIDTH_ARGUMENTS = {"mlp": ("hidden",), "lenet": ("channels", "hidden"), "resnet": ("width",)}


def parameter_count(arch: str, **kwargs) -> int:
    """Parameters of one ``models.build(arch, **kwargs)`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in models.build(arch, **kwargs).parameters())


def wide_kwargs(arch: str, factor: float) -> dict:
    """Builder arguments of a wider ``arch`` with about ``factor`` x the default member's parameters: every
    width argument (WIDTH_ARGUMENTS) scaled by one multiplier, found by bisection and rounded to ints."""
    if arch not in WIDTH_ARGUMENTS or arch not in models.ARCHITECTURES:
        known = ", ".join(a for a in WIDTH_ARGUMENTS if a in models.ARCHITECTURES)
        raise ValueError(f"no width arguments known for architecture {arch!r}; known: {known}")
    return dict(_wide_widths(arch, float(factor)))


@functools.cache
def _wide_widths(arch: str, factor: float) -> tuple:
    """wide_kwargs' search (cached: configurations() asks once per preset); the items as a tuple."""
    defaults = {name: inspect.signature(models.ARCHITECTURES[arch]).parameters[name].default
                for name in WIDTH_ARGUMENTS[arch]}

    def scaled(multiplier: float) -> dict:
        return {name: (tuple(max(1, round(w * multiplier)) for w in value) if isinstance(value, (tuple, list))
                       else max(1, round(value * multiplier))) for name, value in defaults.items()}

    target = factor * parameter_count(arch)
    lo, hi = 1.0, 2.0
    while parameter_count(arch, **scaled(hi)) < target:
        hi *= 2
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if parameter_count(arch, **scaled(mid)) < target else (lo, mid)
    best = min((lo, hi), key=lambda m: abs(parameter_count(arch, **scaled(m)) - target))
    return tuple(scaled(best).items())


@dataclass(frozen=True)
class Costs:
    """Seconds of one training epoch over 60,000 images, and of one SGD-UAP epoch over 10,000 fit images
    with 3 eps, on this project's 2-core CPU (2 threads, cpp backend)."""
    single: float                  # a plain epoch of one default-width model
    single_jr: float               # ... with JR (vjp, nproj = 1)
    member: float                  # a plain epoch per member of a stacked ensemble
    member_jr: float
    attack_single: float
    attack_member: float           # per member


# MLP: the `full` preset rerun with the current code (docs/results/rerun-chain/results.json: train and
# attack seconds averaged over seeds and over the configurations of each shape; 8 epochs, 20,000 x 10 UAP
# fit). LeNet: measured on the 35 runs of the first frontier-lenet run (2026-11-30; 30,000 training images,
# 4 orders over 5,000 fit images; scripts/calibrate_costs.py): the median per kind; member_jr and
# attack_member from the 5 runs made alone on the machine (12.5 and 3.24; all 22 and 25 runs: 11.8, 3.0),
# the single-model values from runs beside other work (so if anything high). They are 1.2-1.7x the values
# derived from the MLP's before, which had put that preset at 82 min; it took ~2 min per ensemble run.
# A wide single model with ~F x a member's parameters (and FLOPs) is costed as F members.
COSTS = {"mlp": Costs(single=1.45, single_jr=2.77, member=0.86, member_jr=1.61, attack_single=0.41, attack_member=0.28),
         "lenet": Costs(single=7.8, single_jr=25.1, member=4.76, member_jr=12.5, attack_single=6.4, attack_member=3.24)}
JOB_OVERHEAD_SECONDS = 2.0         # per run: test-set evaluation, UAP image, checkpoints (a rough allowance)
# Evaluating K perturbations on the fit set (to choose among batch orders) against one SGD-UAP epoch over
# it: (K + 1) inference row blocks against K forward + input-gradient ones (bench/RESULTS.md table 1, MLP
# M = 5: inference 4.7 ms, SGD-UAP K = 4 38 ms per batch of 128: 4 x 4.7 / (3 x 9.5) for K = 3).
FIT_EVALUATION_FRACTION = 0.66


def cost_terms(config: Configuration, preset: Preset, arch: str, attack_epochs: int, orders: int) -> dict:
    """What the cost model multiplies each of a run's two ``Costs`` constants by: {constant name: factor}
    for training ``config`` (epochs of 60,000 images times members or width) and attacking it for
    ``attack_epochs`` SGD-UAP epochs in each of ``orders`` batch orders (0 epochs: training only; with
    several orders, the fit-set evaluation that chooses among them)."""
    lam = config.jr_lambda if isinstance(config.jr_lambda, list) else [config.jr_lambda]
    regularized = any(value > 0 for value in lam)
    if config.members == 0 and not config.arch_kwargs:
        size, train, attack = 1.0, "single_jr" if regularized else "single", "attack_single"
    else:
        size = config.members or parameter_count(arch, **config.arch_kwargs) / parameter_count(arch)
        train, attack = "member_jr" if regularized else "member", "attack_member"
    train_epochs = preset.epochs * (preset.train_samples or 60000) / 60000
    choosing = FIT_EVALUATION_FRACTION if orders > 1 and attack_epochs else 0.0
    attack_epochs = orders * (attack_epochs + choosing) * preset.uap_samples / 10000 * len(preset.eps) / 3
    return {train: train_epochs * size, attack: attack_epochs * size}


def _job_seconds(config: Configuration, preset: Preset, arch: str, attack_epochs: int, orders: int) -> float | None:
    """Estimated seconds of training ``config`` and attacking it for ``attack_epochs`` SGD-UAP epochs in
    each of ``orders`` batch orders (0 epochs: training only), or None without costs for ``arch``."""
    costs = COSTS.get(arch)
    if costs is None:
        return None
    terms = cost_terms(config, preset, arch, attack_epochs, orders)
    return sum(getattr(costs, name) * factor for name, factor in terms.items())


def estimate_seconds(preset: Preset, arch: str, done=frozenset()) -> float | None:
    """Estimated seconds of the whole study on this project's CPU (COSTS), less the (name, seed) runs in
    ``done``; None without costs for ``arch``."""
    if arch not in COSTS:
        return None
    configs = {c.name: c for c in configurations(preset, arch)}
    jobs = [_job_seconds(c, preset, arch, preset.uap_epochs, preset.uap_restarts) for s in preset.seeds
            for c in configs.values() if (c.name, s) not in done]
    check = preset.attack_check
    if check is not None:  # the check reloads trained models: its cost is the longer attacks only
        epochs, orders = preset.uap_epochs * check.epochs_factor, preset.uap_restarts + check.extra_restarts
        jobs += [_job_seconds(configs[name], preset, arch, epochs, orders) - _job_seconds(configs[name], preset, arch, 0, 1)
                 for name in check.configurations for _ in check.seeds]
    return sum(jobs) + JOB_OVERHEAD_SECONDS * len(jobs)


def _environment() -> dict:
    return {"fastjac": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": _cpu_name(), "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def subset(x, y, count, seed):
    """A seeded random subset of ``count`` samples (all of them when count is None or too large)."""
    if count is not None:
        check_int(count, "samples", 1)
    if count is None or count >= x.shape[0]:
        return x, y
    index = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return x[index], y[index]


def _train_model(config: Configuration, seed: int, preset: Preset, arch: str, train_data, out: Path,
                 progress: bool) -> torch.nn.Module:
    """Build and train one configuration at one seed; resumes from (or, finished, just loads) its checkpoint."""
    torch.manual_seed(seed)

    def member():
        return models.build(arch, **config.arch_kwargs)

    model = Ensemble([member() for _ in range(config.members)]) if config.members else member()
    model = model.to(train_data[0].device)
    lam = config.jr_lambda if config.members else float(config.jr_lambda)
    checkpoint = out / "checkpoints" / f"{config.name}-seed{seed}.pt"
    train(model, train_data, epochs=preset.epochs, batch_size=preset.batch_size, jr_lambda=lam,
          jr_target=config.jr_target, seed=seed, checkpoint=checkpoint, progress=progress)
    return model


def _fit_batches(train_data, preset: Preset, seed: int) -> list:
    """The UAP fit set of one seed: a seeded subset of the training data, as [(x [B,*input], y [B])]."""
    x_fit, y_fit = subset(*train_data, preset.uap_samples, seed + 1)
    return [(x_fit[i:i + preset.batch_size], y_fit[i:i + preset.batch_size])
            for i in range(0, x_fit.shape[0], preset.batch_size)]


def batch_order(count: int, seed: int, order: int) -> list:
    """The ``order``-th order of a seed's ``count`` fit batches: 0 is their own, others seeded permutations."""
    if order == 0:
        return list(range(count))
    return torch.randperm(count, generator=torch.Generator().manual_seed(1_000_003 * seed + order)).tolist()


def fit_uaps(model: torch.nn.Module, train_data, preset: Preset, seed: int, *, epochs: int, orders: int,
             progress: bool = False) -> tuple:
    """SGD-UAPs for every eps of ``preset``, fitted in ``orders`` orders of the seed's fit batches.

    Order 0 is the fit set's own; order o > 0 a permutation seeded by (seed, o). Per eps, the order whose
    perturbation leaves the lowest UAP accuracy on the fit set is kept (training data: the test set never
    chooses). Why orders: with its step of 0.8 eps, SGD-UAP settles within one epoch to a perturbation set
    by the last batches it saw; measured on the MLP (one seed), 1 to 30 epochs in one order gave the same
    test UAP accuracy within 0.2 points, while six other orders moved it by up to 7 points, ranked alike
    on the fit and the test set.
    Returns (the sgd_uap result of order 0 with ``delta`` [K, *input] replaced by the chosen perturbations,
    the fit-set UAP accuracy of every order [orders][K]; [] for a single order: nothing to choose).
    """
    batches = _fit_batches(train_data, preset, seed)
    x_fit, y_fit = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    result, fit = None, []
    for o in range(orders):
        order = batch_order(len(batches), seed, o)
        attack = sgd_uap(model, [batches[i] for i in order], eps=list(preset.eps), epochs=epochs, progress=progress)
        if orders == 1:
            return attack, fit
        fit.append(evaluate(model, x_fit, y_fit, attack.delta)["uap_accuracy"])
        if result is None:
            result, best = attack, list(fit[-1])
            continue
        for k, accuracy in enumerate(fit[-1]):
            if accuracy < best[k]:
                result.delta[k], best[k] = attack.delta[k], accuracy
    return result, fit


def _run_one(config: Configuration, seed: int, preset: Preset, arch: str, train_data, test_data, out: Path,
             progress: bool) -> dict:
    started = time.perf_counter()
    model = _train_model(config, seed, preset, arch, train_data, out, progress)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    attack = fit_uaps(model, train_data, preset, seed, epochs=preset.uap_epochs, orders=preset.uap_restarts,
                      progress=progress)[0]
    attack_seconds = time.perf_counter() - started
    metrics = evaluate(model, *test_data, attack.delta)
    _io.save_uap(out / "uaps" / f"{config.name}-seed{seed}.pt", attack.delta, attack.eps, attack.targets,
                 meta={"configuration": config.name, "seed": seed, "arch": arch})
    save_uap_image(attack.delta, preset.eps, out / "uaps" / f"{config.name}-seed{seed}.png", config.name)
    keyed = lambda values: {f"{e:g}": v for e, v in zip(preset.eps, values)}  # noqa: E731
    return {"name": config.name, "kind": config.kind, "members": max(config.members, 1), "jr_lambda": config.jr_lambda,
            "jr_target": config.jr_target, "arch_kwargs": config.arch_kwargs, "frontiers": list(config.frontiers),
            "parameters": sum(p.numel() for p in model.parameters()), "seed": seed, "clean_accuracy": metrics["clean_accuracy"],
            "uap_accuracy": keyed(metrics["uap_accuracy"]), "evasion_rate": keyed(metrics["evasion_rate"]),
            "fooling_rate": keyed(metrics["fooling_rate"]), "train_seconds": round(train_seconds, 2),
            "attack_seconds": round(attack_seconds, 2)}


def _attack_check_one(config: Configuration, seed: int, preset: Preset, arch: str, default_row: dict, train_data,
                      test_data, out: Path, progress: bool) -> dict:
    """The stronger SGD-UAP of ``preset.attack_check`` on one trained model (loaded from its checkpoint).

    Returns {name, seed, uap_epochs, orders, default (the study's test UAP accuracy per eps), strong (the
    stronger attack's, chosen on the fit set as the study's is), drop (default - strong), flagged (a drop
    above the tolerance), seconds}.
    """
    check = preset.attack_check
    model = _train_model(config, seed, preset, arch, train_data, out, progress)
    epochs, orders = preset.uap_epochs * check.epochs_factor, preset.uap_restarts + check.extra_restarts
    started = time.perf_counter()
    attack, _ = fit_uaps(model, train_data, preset, seed, epochs=epochs, orders=orders, progress=progress)
    strong = evaluate(model, *test_data, attack.delta)["uap_accuracy"]
    keys = [frontier.eps_key(e) for e in preset.eps]
    default = [default_row["uap_accuracy"][key] for key in keys]
    drop = [d - s for d, s in zip(default, strong)]
    return {"name": config.name, "seed": seed, "uap_epochs": epochs, "orders": orders,
            "default": dict(zip(keys, default)), "strong": dict(zip(keys, strong)), "drop": dict(zip(keys, drop)),
            "flagged": max(drop) > check.tolerance, "seconds": round(time.perf_counter() - started, 2)}


def attack_check_markdown(entries: list[dict], preset: Preset, monotonicity: list[dict]) -> str:
    """The attack-strength section: the check's table and verdict, and the eps sweep's monotonicity."""
    check = preset.attack_check
    lines = ["## Attack strength", ""]
    if check is not None:
        lines += [f"The study's SGD-UAP ({preset.uap_epochs} epochs in each of {preset.uap_restarts} batch orders over "
                  f"{preset.uap_samples} fit images, per ε the order with the lowest fit-set UAP accuracy) against "
                  f"{check.epochs_factor}x the epochs in {preset.uap_restarts + check.extra_restarts} orders, chosen "
                  f"the same way; test-set UAP accuracy. Flagged: a drop of more than {100 * check.tolerance:g} points.",
                  ""]
        header = ["configuration", "seed"] + [f"UAP acc % ε={e:g}: study → strong (drop)" for e in preset.eps] + ["flagged"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for entry in entries:
            cells = [entry["name"], str(entry["seed"])]
            cells += [f"{100 * entry['default'][k]:.1f} → {100 * entry['strong'][k]:.1f} ({100 * entry['drop'][k]:+.1f})"
                      for k in map(frontier.eps_key, preset.eps)]
            lines.append("| " + " | ".join(cells + ["**yes**" if entry["flagged"] else "no"]) + " |")
        flagged = [f"{e['name']} (seed {e['seed']})" for e in entries if e["flagged"]]
        expected = len(check.configurations) * len(check.seeds)
        if len(entries) < expected:
            lines += ["", f"Incomplete: {len(entries)} of {expected} checks ran."]
        lines += ["", f"**Flagged: {', '.join(flagged)}.** The study's attack stopped early for these models: rerun "
                      f"with the stronger setting (uap_epochs x {check.epochs_factor}, uap_restarts + "
                      f"{check.extra_restarts})." if flagged else
                  "No model's UAP accuracy dropped by more than "
                  f"{100 * check.tolerance:g} points under the stronger attack: the study's attack setting stands.", ""]
    lines += [f"**ε sweep:** {len(monotonicity)} (run, ε pair) cases where UAP accuracy rises with ε."]
    lines += [f"- {m['name']} seed {m['seed']}: ε {m['eps_small']:g} → {m['eps_large']:g}, +{100 * m['rise']:.1f} points"
              for m in monotonicity[:20]]
    return "\n".join(lines) + "\n"


def save_uap_image(delta: torch.Tensor, eps, path: Path, title: str) -> None:
    """A PNG of the K perturbations ``delta [K, 1, H, W]`` side by side, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, delta.shape[0], figsize=(2.2 * delta.shape[0], 2.4), squeeze=False)
    for axis, perturbation, value in zip(axes[0], delta, eps):
        axis.imshow(perturbation[0].cpu().numpy(), cmap="seismic", vmin=-value, vmax=value)
        axis.set_title(f"eps={value:g}", fontsize=8)
        axis.axis("off")
    figure.suptitle(title, fontsize=8)
    try:
        _io.atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(figure)


def summarize(rows: list[dict], eps) -> list[dict]:
    """One entry per configuration: mean and std (over seeds) of clean and UAP accuracy."""
    summary = []
    for name in dict.fromkeys(row["name"] for row in rows):
        group = [row for row in rows if row["name"] == name]
        entry = {key: group[0][key] for key in ("name", "kind", "members", "jr_lambda", "jr_target")}
        entry["seeds"] = [row["seed"] for row in group]

        def stats(values):
            return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        entry["clean_accuracy"] = stats([row["clean_accuracy"] for row in group])
        entry["uap_accuracy"] = {f"{e:g}": stats([row["uap_accuracy"][f"{e:g}"] for row in group]) for e in eps}
        entry["train_seconds"] = statistics.fmean(row["train_seconds"] for row in group)
        summary.append(entry)
    return summary


def markdown_table(rows: list[dict], eps) -> str:
    summary = summarize(rows, eps)
    seeds = max(len(entry["seeds"]) for entry in summary)
    spread = seeds > 1
    fmt = (lambda pair: f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}") if spread else (lambda pair: f"{100 * pair[0]:.1f}")
    header = ["configuration", "kind", "M", "λ", "target", "clean acc %"] + [f"UAP acc % (ε={e:g})" for e in eps] + ["train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summary:
        lam = entry["jr_lambda"]
        lam = "/".join(f"{v:g}" for v in lam) if isinstance(lam, list) else f"{lam:g}"
        cells = [entry["name"], entry["kind"], str(entry["members"]), lam, entry["jr_target"], fmt(entry["clean_accuracy"])]
        cells += [fmt(entry["uap_accuracy"][f"{e:g}"]) for e in eps] + [f"{entry['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"\nMean ± std over seeds {summary[0]['seeds']}." if spread else ""
    return "\n".join(lines) + note + "\n"


def measured_time(results: dict) -> str:
    """The study's measured time: the sum of its runs' wall clocks (``seconds``: training, attack, test-set
    evaluation and files) and of the attack check's; rows written before runs kept ``seconds`` count
    their train + attack seconds, said as such. A resumed study's stops are not counted."""
    rows, check = results["rows"], results.get("attack_check", [])
    total = sum(row.get("seconds", row["train_seconds"] + row["attack_seconds"]) for row in rows)
    total += sum(entry["seconds"] for entry in check)
    untimed = sum("seconds" not in row for row in rows)
    partial = f" ({untimed} of the runs without a wall clock: their train + attack seconds)" if untimed else ""
    return (f"Measured time: {total / 60:.1f} min, the sum of {len(rows)} runs' wall clocks{partial}"
            + (f" and {len(check)} attack checks" if check else "") + f" ({results['environment']['threads']} threads).")


# Beyond this many configurations the point names overlap in plot_tradeoff; frontier.png is then the
# readable view (a legend per method).
NAMED_POINTS = 12


def plot_tradeoff(rows: list[dict], eps, path: Path) -> None:
    """Clean accuracy (x) vs UAP accuracy (y), one point per configuration, one panel per eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"baseline": "black", "jr": "tab:blue", "ensemble": "tab:orange", "jacobian-ensemble": "tab:red"}
    summary = summarize(rows, eps)
    figure, axes = plt.subplots(1, len(eps), figsize=(4.2 * len(eps), 4), squeeze=False)
    for axis, e in zip(axes[0], eps):
        for entry in summary:
            (cx, sx), (uy, sy) = entry["clean_accuracy"], entry["uap_accuracy"][f"{e:g}"]
            axis.errorbar(100 * cx, 100 * uy, xerr=100 * sx, yerr=100 * sy, fmt="o", color=colors[entry["kind"]],
                          capsize=2)
            if len(summary) <= NAMED_POINTS:
                axis.annotate(entry["name"], (100 * cx, 100 * uy), fontsize=6, xytext=(3, 3), textcoords="offset points")
        axis.set_title(f"SGD-UAP ε = {e:g}")
        axis.set_xlabel("clean accuracy (%)")
        axis.set_ylabel("UAP accuracy (%)")
        axis.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=k) for k, c in colors.items()]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    figure.tight_layout()
    try:
        _io.atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(figure)


# What reproduce writes into its output directory (results.json marks the directory as fastjac's own).
OUTPUTS = ("results.json", "results.md", "tradeoff.png", "uaps", "checkpoints", "frontier.md", "frontier.json",
           "frontier.png", "frontier-gaps.png")


def _read_results(path: Path) -> dict | None:
    """results.json of an earlier run, or None; a damaged file is an error naming it (never overwritten)."""
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it is not overwritten: repair or remove it, or "
                         f"choose another --out") from None
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list) or "study" not in results:
        raise ValueError(f"{path} is not a fastjac reproduce results file (expected keys study and rows); choose "
                         f"another --out")
    return results


def is_results_directory(directory: Path) -> bool:
    """True when ``directory`` holds a readable results.json of reproduce: fastjac's own output."""
    try:
        return _read_results(Path(directory) / "results.json") is not None
    except (OSError, ValueError):
        return False


def check_output(out, force: bool = False) -> Path:
    """reproduce's output directory usable before any work: not a file, writable, a results.json that is
    readable (a damaged one is an error naming it, never overwritten), and no file of another program where
    results go (unless ``force``)."""
    if Path(out).is_dir():
        _read_results(Path(out) / "results.json")
    return _io.check_output_directory(out, OUTPUTS, is_results_directory, force=force)


def write_frontier_outputs(results: dict, preset: Preset, out: Path, heading: str) -> dict:
    """frontier.md (the item-2 tables and the attack-strength section), frontier.json (every number of
    the comparison), frontier.png (the frontiers) and frontier-gaps.png (the summary); returns the report."""
    rows = results["rows"]
    report = frontier.compare(rows, preset.eps)

    def method_line(method: str) -> str:
        points = {row["name"]: row["parameters"] for row in rows if method in row["frontiers"]}
        sizes = ", ".join(f"{count / 1e6:.2f}" for count in sorted(set(points.values())))
        return f"- **{method}** ({sizes} M parameters): {', '.join(points)}"

    methods = "\n".join(method_line(m) for m in report["methods"])
    text = (f"# {heading}: trade-off frontiers\n\nMethods and their points (each the mean over seeds):\n\n{methods}\n\n"
            f"![frontiers](frontier.png)\n\n![gaps](frontier-gaps.png)\n\n"
            f"## UAP accuracy at matched clean accuracy\n\n{frontier.markdown_report(report)}\n"
            + attack_check_markdown(results.get("attack_check", []), preset, frontier.eps_monotonicity(rows, preset.eps)))
    _io.atomic_write_text(out / "frontier.md", text)
    _io.atomic_write_text(out / "frontier.json", json.dumps(_json_safe(report), indent=2))
    frontier.plot_frontiers(report, out / "frontier.png")
    frontier.plot_gaps(report, out / "frontier-gaps.png")
    return report


def _json_safe(value):
    """NaN (an undefined interval) -> null: strict JSON for every reader."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def reproduce(*, dataset: str = "fashion-mnist", arch: str | None = None, preset: str = "quick", out="runs/reproduce",
              root=None, progress: bool = True, device=None, force: bool = False) -> dict:
    """Run (or resume) the study into ``out`` on ``device`` (default: the CPU); returns the results.json
    content. The directory is locked for the run (a second run into it raises OutputInUse), and temporary
    files a killed run left there are removed at the start.

    arch: the member architecture (default: the one the preset is sized for, ``Preset.arch``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    settings = PRESETS[preset]
    arch = settings.arch if arch is None else arch
    models.build(arch)  # fail early on an unknown architecture
    device = torch.device("cpu" if device is None else device)
    out = check_output(out, force)
    out.mkdir(parents=True, exist_ok=True)
    with _io.output_lock(out):
        for directory in (out, out / "uaps", out / "checkpoints"):
            _io.remove_orphans(directory)
        return _reproduce_locked(dataset, arch, preset, settings, out, root, progress, device)


def _reproduce_locked(dataset, arch, preset, settings, out: Path, root, progress, device) -> dict:
    (out / "uaps").mkdir(exist_ok=True)
    results_path = out / "results.json"
    identity = {"dataset": dataset, "arch": arch, "preset": preset, "settings": asdict(settings)}
    identity["settings"] = json.loads(json.dumps(identity["settings"]))  # tuples -> lists, as read back
    results = {"study": identity, "environment": _environment(), "rows": []}
    if settings.attack_check is not None:
        results["attack_check"] = []
    previous = _read_results(results_path)
    if previous is not None:
        if previous.get("study") != identity:
            raise ValueError(f"{results_path} holds a study with other settings ({previous.get('study')}); "
                             f"use another --out")
        results["rows"] = previous["rows"]
        if settings.attack_check is not None:
            results["attack_check"] = previous.get("attack_check", [])  # absent when stopped before the check
    done = {(row["name"], row["seed"]) for row in results["rows"]}
    configs = configurations(settings, arch)
    if progress:
        _print_plan(preset, settings, arch, configs, done)

    train_data = [t.to(device) for t in subset(*data.load(dataset, "train", root), settings.train_samples, 0)]
    test_data = [t.to(device) for t in subset(*data.load(dataset, "test", root), settings.test_samples, 0)]
    jobs = [(c, s) for s in settings.seeds for c in configs]
    pace = _Pace(settings, arch)
    for number, (config, seed) in enumerate(jobs, start=1):
        if (config.name, seed) in done:
            continue
        if progress:
            print(f"[{number}/{len(jobs)}] {config.name} (seed {seed}){pace.remaining(done)}", file=sys.stderr,
                  flush=True)
        started = time.perf_counter()
        row = _run_one(config, seed, settings, arch, train_data, test_data, out, progress)
        row["seconds"] = round(time.perf_counter() - started, 2)  # the whole run: train, attack, test, files
        results["rows"].append(row)
        done.add((config.name, seed))
        pace.finished(config, row["seconds"])
        _io.atomic_write_text(results_path, json.dumps(results, indent=2))
        if progress:
            accuracies = ", ".join(f"ε={e}: {100 * a:.1f}%" for e, a in row["uap_accuracy"].items())
            print(f"    clean {100 * row['clean_accuracy']:.1f}%, UAP {accuracies} "
                  f"(train {row['train_seconds']:.0f}s, attack {row['attack_seconds']:.0f}s)", file=sys.stderr, flush=True)
    if settings.attack_check is not None:
        _run_attack_check(results, results_path, settings, arch, configs, train_data, test_data, out, progress)
    _io.atomic_write_text(results_path, json.dumps(results, indent=2))
    heading = f"fastjac reproduce: {dataset}, {arch}, preset {preset}"
    table = markdown_table(results["rows"], settings.eps)
    _io.atomic_write_text(out / "results.md", f"# {heading}\n\n{table}\n{measured_time(results)}\n")
    plot_tradeoff(results["rows"], settings.eps, out / "tradeoff.png")
    files = "results.json, results.md, tradeoff.png, uaps/"
    if settings.frontier:
        write_frontier_outputs(results, settings, out, heading)
        files += ", frontier.md, frontier.json, frontier.png, frontier-gaps.png"
    if progress:
        print(table, file=sys.stderr)
        print(f"results in {out}/: {files}", file=sys.stderr)
    return results


def _run_attack_check(results: dict, results_path: Path, settings: Preset, arch: str, configs, train_data, test_data,
                      out: Path, progress: bool) -> None:
    """The attack-strength check of ``settings.attack_check``: each (configuration, seed) written to
    results.json as it finishes, so a rerun skips it."""
    check, by_name = settings.attack_check, {c.name: c for c in configs}
    checked = {(entry["name"], entry["seed"]) for entry in results["attack_check"]}
    rows = {(row["name"], row["seed"]): row for row in results["rows"]}
    for seed in check.seeds:
        for name in check.configurations:
            if (name, seed) in checked:
                continue
            if progress:
                print(f"[attack check] {name} (seed {seed}): SGD-UAP x{check.epochs_factor} epochs, "
                      f"{settings.uap_restarts + check.extra_restarts} orders", file=sys.stderr, flush=True)
            entry = _attack_check_one(by_name[name], seed, settings, arch, rows[(name, seed)], train_data, test_data,
                                      out, progress)
            results["attack_check"].append(entry)
            _io.atomic_write_text(results_path, json.dumps(results, indent=2))
            if progress:
                drops = ", ".join(f"ε={k}: {100 * v:+.1f}" for k, v in entry["drop"].items())
                print(f"    UAP accuracy drop (points) {drops}{'  FLAGGED' if entry['flagged'] else ''} "
                      f"({entry['seconds']:.0f}s)", file=sys.stderr, flush=True)


def _print_plan(name: str, settings: Preset, arch: str, configs, done) -> None:
    """What the study will run and how long it should take, on stderr."""
    runs = len(configs) * len(settings.seeds)
    check = settings.attack_check
    extra = f" + an attack check on {len(check.configurations) * len(check.seeds)} models" if check else ""
    left = estimate_seconds(settings, arch, frozenset(done))
    sized = "" if arch == settings.arch else f" (the preset is sized for {settings.arch})"
    estimate = (f"estimated {left / 60:.0f} min left on this project's 2-core CPU when otherwise idle "
                f"(experiments.COSTS)" if left is not None else f"no time estimate for {arch} (no experiments.COSTS)")
    print(f"preset {name}, {arch}{sized}: {runs} runs ({len(configs)} configurations x {len(settings.seeds)} seeds)"
          f"{extra}; {len(done)} already done; {estimate}", file=sys.stderr, flush=True)


class _Pace:
    """The remaining time of a running study: the estimate (COSTS) scaled by how fast the finished runs
    went against their own estimate."""

    def __init__(self, settings: Preset, arch: str):
        self.settings, self.arch, self.estimated, self.measured = settings, arch, 0.0, 0.0

    def finished(self, config: Configuration, seconds: float) -> None:
        estimate = _job_seconds(config, self.settings, self.arch, self.settings.uap_epochs, self.settings.uap_restarts)
        if estimate is not None:
            self.estimated, self.measured = self.estimated + estimate + JOB_OVERHEAD_SECONDS, self.measured + seconds

    def remaining(self, done) -> str:
        left = estimate_seconds(self.settings, self.arch, frozenset(done))
        if left is None:
            return ""
        pace = self.measured / self.estimated if self.estimated else 1.0
        return f", ~{pace * left / 60:.0f} min left"

