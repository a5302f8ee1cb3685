"""experiments.COSTS from a reproduce run: each run's train and attack seconds divided by what the cost
model multiplies that kind's constant by (epochs of 60,000 images, members or width; orders, fit images
and the fit-set evaluation), the median per kind.

    python scripts/calibrate_costs.py RUN_DIR [--from N]

--from N skips the first N rows of results.json (e.g. runs made beside other work).
"""
import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from fastjac import experiments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a reproduce output directory (its results.json)")
    parser.add_argument("--from", dest="first", type=int, default=0)
    args = parser.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    study = results["study"]
    preset, arch = experiments.PRESETS[study["preset"]], study["arch"]
    settings = study["settings"]  # the run's own sizes (the preset may have changed since)
    configs = {c.name: c for c in experiments.configurations(preset, arch)}
    epochs = settings["epochs"] * (settings["train_samples"] or 60000) / 60000
    attack = (settings["uap_restarts"] * (settings["uap_epochs"] + experiments.FIT_EVALUATION_FRACTION)
              * settings["uap_samples"] / 10000 * len(settings["eps"]) / 3)
    samples = {name: [] for name in (field.name for field in dataclasses.fields(experiments.Costs))}
    for row in results["rows"][args.first:]:
        config = configs.get(row["name"])
        if config is None:  # a configuration the preset no longer has
            continue
        lam = config.jr_lambda if isinstance(config.jr_lambda, list) else [config.jr_lambda]
        regularized = any(value > 0 for value in lam)
        if config.members == 0 and not config.arch_kwargs:
            size, train_kind, attack_kind = 1.0, "single_jr" if regularized else "single", "attack_single"
        else:
            wide = experiments.parameter_count(arch, **config.arch_kwargs) / experiments.parameter_count(arch)
            size = config.members or wide
            train_kind, attack_kind = "member_jr" if regularized else "member", "attack_member"
        samples[train_kind].append(row["train_seconds"] / epochs / size)
        samples[attack_kind].append(row["attack_seconds"] / attack / size)
    for name, values in samples.items():
        median = f"{statistics.median(values):.2f}" if values else "-"
        print(f"{name:14s} {median:>7s}  ({len(values)} runs)")
    print(f"COSTS[{arch!r}] now: {experiments.COSTS.get(arch)}")


if __name__ == "__main__":
    main()
