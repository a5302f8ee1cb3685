"""experiments.COSTS from a reproduce run: each run's train and attack seconds divided by what the cost
model multiplies that kind's constant by (``experiments.cost_terms`` at the run's own sizes), the median
per kind.

    python scripts/calibrate_costs.py RUN_DIR [--from N]

--from N skips the first N rows of results.json (e.g. runs made beside other work).
"""
import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from fastjac import experiments

SIZES = ("epochs", "train_samples", "uap_samples", "uap_epochs", "uap_restarts", "eps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a reproduce output directory (its results.json)")
    parser.add_argument("--from", dest="first", type=int, default=0)
    args = parser.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    study = results["study"]
    arch = study["arch"]
    # the run's own sizes (the preset may have changed since)
    preset = dataclasses.replace(experiments.PRESETS[study["preset"]], **{k: study["settings"][k] for k in SIZES})
    configs = {c.name: c for c in experiments.configurations(preset, arch)}
    samples = {field.name: [] for field in dataclasses.fields(experiments.Costs)}
    for row in results["rows"][args.first:]:
        config = configs.get(row["name"])
        if config is None:  # a configuration the preset no longer has
            continue
        terms = experiments.cost_terms(config, preset, arch, preset.uap_epochs, preset.uap_restarts)
        (train, train_factor), (attack, attack_factor) = terms.items()
        samples[train].append(row["train_seconds"] / train_factor)
        samples[attack].append(row["attack_seconds"] / attack_factor)
    for name, values in samples.items():
        median = f"{statistics.median(values):.2f}" if values else "-"
        print(f"{name:14s} {median:>7s}  ({len(values)} runs)")
    print(f"COSTS[{arch!r}] now: {experiments.COSTS.get(arch)}")


if __name__ == "__main__":
    main()
