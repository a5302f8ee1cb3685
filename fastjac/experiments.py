"""``reproduce``: the accuracy/robustness trade-off study of Co et al. (2022), one command.

Configurations: a baseline single model; JR single models over a lambda grid; a plain ensemble
(lambda = 0); Jacobian Ensembles with a uniform per-member lambda, with mixed lambdas (some members
unregularized), and with the ensemble target (joint training). Each is trained, attacked with SGD-UAP
over the whole eps grid in one batched run (fitted on training data), and evaluated on the test set.
Every finished (configuration, seed) is written to results.json at once, so a rerun into the same
directory skips it; training checkpoints each epoch, so an interrupted configuration resumes too. A run
holds a lock on its directory (no job is ever done twice by two runs), and every file is written
atomically under a unique temporary name.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastjac import __version__, _io, data, models
from fastjac._checks import check_int
from fastjac.ensemble import Ensemble
from fastjac.metrics import evaluate
from fastjac.train import train
from fastjac.uap import sgd_uap


@dataclass(frozen=True)
class Preset:
    epochs: int
    members: int
    lambdas: tuple                 # the JR single-model grid
    je_lambdas: tuple              # uniform-lambda Jacobian Ensembles; mixed and ensemble-target use the last
    eps: tuple
    seeds: tuple
    train_samples: int | None      # None = the whole training split
    test_samples: int | None       # None = the whole test split
    uap_samples: int               # training images the UAPs are fitted on
    uap_epochs: int
    batch_size: int = 128


PRESETS = {
    "smoke": Preset(epochs=1, members=3, lambdas=(0.1,), je_lambdas=(0.1,), eps=(0.1,), seeds=(0,),
                    train_samples=3000, test_samples=2000, uap_samples=1000, uap_epochs=2),
    "quick": Preset(epochs=3, members=5, lambdas=(0.05, 0.2, 1.0), je_lambdas=(0.2,), eps=(0.05, 0.1, 0.15), seeds=(0,),
                    train_samples=None, test_samples=None, uap_samples=10000, uap_epochs=5),
    "full": Preset(epochs=8, members=5, lambdas=(0.02, 0.05, 0.2, 1.0), je_lambdas=(0.05, 0.2), eps=(0.05, 0.1, 0.15),
                   seeds=(0, 1, 2), train_samples=None, test_samples=None, uap_samples=20000, uap_epochs=10),
}


@dataclass(frozen=True)
class Configuration:
    name: str
    kind: str                      # baseline | jr | ensemble | jacobian-ensemble
    members: int                   # 0 = a single model
    jr_lambda: float | list
    jr_target: str = "members"


def configurations(preset: Preset) -> list[Configuration]:
    m, lam = preset.members, preset.je_lambdas[-1]
    unregularized = m // 2  # mixed: the first ceil(M/2) members regularized, the rest plain
    mixed = [lam] * (m - unregularized) + [0.0] * unregularized
    return [
        Configuration("baseline", "baseline", 0, 0.0),
        *[Configuration(f"jr-{value:g}", "jr", 0, value) for value in preset.lambdas],
        Configuration(f"ensemble-m{m}", "ensemble", m, 0.0),
        *[Configuration(f"je-members-m{m}-{value:g}", "jacobian-ensemble", m, value) for value in preset.je_lambdas],
        Configuration(f"je-mixed-m{m}-{lam:g}x{m - unregularized}", "jacobian-ensemble", m, mixed),
        Configuration(f"je-ensemble-m{m}-{lam:g}", "jacobian-ensemble", m, lam, "ensemble"),
    ]


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


def _run_one(config: Configuration, seed: int, preset: Preset, arch: str, train_data, test_data, out: Path,
             progress: bool) -> dict:
    torch.manual_seed(seed)
    model = Ensemble([models.build(arch) for _ in range(config.members)]) if config.members else models.build(arch)
    model = model.to(train_data[0].device)
    lam = config.jr_lambda if config.members else float(config.jr_lambda)
    started = time.perf_counter()
    checkpoint = out / "checkpoints" / f"{config.name}-seed{seed}.pt"
    train(model, train_data, epochs=preset.epochs, batch_size=preset.batch_size, jr_lambda=lam,
          jr_target=config.jr_target, seed=seed, checkpoint=checkpoint, progress=progress)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    x_fit, y_fit = subset(*train_data, preset.uap_samples, seed + 1)
    batches = [(x_fit[i:i + preset.batch_size], y_fit[i:i + preset.batch_size])
               for i in range(0, x_fit.shape[0], preset.batch_size)]
    attack = sgd_uap(model, batches, eps=list(preset.eps), epochs=preset.uap_epochs, progress=progress)
    attack_seconds = time.perf_counter() - started
    metrics = evaluate(model, *test_data, attack.delta)
    _io.save_uap(out / "uaps" / f"{config.name}-seed{seed}.pt", attack.delta, attack.eps, attack.targets,
                 meta={"configuration": config.name, "seed": seed, "arch": arch})
    save_uap_image(attack.delta, preset.eps, out / "uaps" / f"{config.name}-seed{seed}.png", config.name)
    keyed = lambda values: {f"{e:g}": v for e, v in zip(preset.eps, values)}  # noqa: E731
    return {"name": config.name, "kind": config.kind, "members": max(config.members, 1), "jr_lambda": config.jr_lambda,
            "jr_target": config.jr_target, "seed": seed, "clean_accuracy": metrics["clean_accuracy"],
            "uap_accuracy": keyed(metrics["uap_accuracy"]), "evasion_rate": keyed(metrics["evasion_rate"]),
            "fooling_rate": keyed(metrics["fooling_rate"]), "train_seconds": round(train_seconds, 2),
            "attack_seconds": round(attack_seconds, 2)}


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
OUTPUTS = ("results.json", "results.md", "tradeoff.png", "uaps", "checkpoints")


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


def reproduce(*, dataset: str = "fashion-mnist", arch: str = "mlp", preset: str = "quick", out="runs/reproduce",
              root=None, progress: bool = True, device=None, force: bool = False) -> dict:
    """Run (or resume) the study into ``out`` on ``device`` (default: the CPU); returns the results.json
    content. The directory is locked for the run (a second run into it raises OutputInUse), and temporary
    files a killed run left there are removed at the start."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    models.build(arch)  # fail early on an unknown architecture
    device = torch.device("cpu" if device is None else device)
    settings = PRESETS[preset]
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
    previous = _read_results(results_path)
    if previous is not None:
        if previous.get("study") != identity:
            raise ValueError(f"{results_path} holds a study with other settings ({previous.get('study')}); "
                             f"use another --out")
        results["rows"] = previous["rows"]
    done = {(row["name"], row["seed"]) for row in results["rows"]}

    train_data = [t.to(device) for t in subset(*data.load(dataset, "train", root), settings.train_samples, 0)]
    test_data = [t.to(device) for t in subset(*data.load(dataset, "test", root), settings.test_samples, 0)]
    jobs = [(c, s) for s in settings.seeds for c in configurations(settings)]
    for number, (config, seed) in enumerate(jobs, start=1):
        if (config.name, seed) in done:
            continue
        if progress:
            print(f"[{number}/{len(jobs)}] {config.name} (seed {seed})", file=sys.stderr, flush=True)
        row = _run_one(config, seed, settings, arch, train_data, test_data, out, progress)
        results["rows"].append(row)
        _io.atomic_write_text(results_path, json.dumps(results, indent=2))
        if progress:
            accuracies = ", ".join(f"ε={e}: {100 * a:.1f}%" for e, a in row["uap_accuracy"].items())
            print(f"    clean {100 * row['clean_accuracy']:.1f}%, UAP {accuracies} "
                  f"(train {row['train_seconds']:.0f}s, attack {row['attack_seconds']:.0f}s)", file=sys.stderr, flush=True)
    _io.atomic_write_text(results_path, json.dumps(results, indent=2))
    table = markdown_table(results["rows"], settings.eps)
    _io.atomic_write_text(out / "results.md", f"# fastjac reproduce: {dataset}, {arch}, preset {preset}\n\n{table}")
    plot_tradeoff(results["rows"], settings.eps, out / "tradeoff.png")
    if progress:
        print(table, file=sys.stderr)
        print(f"results in {out}/: results.json, results.md, tradeoff.png, uaps/", file=sys.stderr)
    return results
