"""Where the SGD-UAP's strength comes from: epochs or batch orders.

Attacks one trained model of a reproduce run in each of N batch orders (order 0: the fit set's own;
order o: the permutation fit_uaps uses) at the given epochs, and prints a markdown table of the fit-set
and test-set UAP accuracy per order and eps; then, per epochs count, the test accuracy of the order the
fit set chooses (per eps, as fit_uaps does) and the lowest test accuracy of any order.

    python scripts/attack_orders.py RUN_DIR CONFIGURATION SEED --epochs 1 2 --orders 11 [--fit-samples N]
"""
import argparse
import dataclasses
import time
from pathlib import Path

import torch

from fastjac import data, experiments
from fastjac.metrics import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a reproduce output directory with its checkpoints/")
    parser.add_argument("configuration")
    parser.add_argument("seed", type=int)
    parser.add_argument("--preset", default="frontier")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--orders", type=int, default=11)
    parser.add_argument("--fit-samples", type=int, help="training images the UAPs are fitted on (default: the preset's)")
    args = parser.parse_args()
    preset = experiments.PRESETS[args.preset]
    if args.fit_samples is not None:
        preset = dataclasses.replace(preset, uap_samples=args.fit_samples)
    config = {c.name: c for c in experiments.configurations(preset, preset.arch)}[args.configuration]
    train = experiments.subset(*data.load("fashion-mnist", "train"), preset.train_samples, 0)
    test = experiments.subset(*data.load("fashion-mnist", "test"), preset.test_samples, 0)
    model = experiments._train_model(config, args.seed, preset, preset.arch, train, args.run, False)
    batches = experiments._fit_batches(train, preset, args.seed)
    x_fit, y_fit = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    eps = " / ".join(f"{e:g}" for e in preset.eps)
    print(f"{args.configuration}, seed {args.seed}, {len(batches)} fit batches of {preset.batch_size}: "
          f"UAP accuracy % (eps {eps})\n")
    print("| epochs | order | fit set | test set |\n|---:|---:|---|---|")
    percent = lambda values: " / ".join(f"{100 * v:.1f}" for v in values)  # noqa: E731
    for epochs in args.epochs:
        started, fits, tests = time.perf_counter(), [], []
        for o in range(args.orders):
            order = experiments.batch_order(len(batches), args.seed, o)
            attack = experiments.sgd_uap(model, [batches[i] for i in order], eps=list(preset.eps), epochs=epochs)
            fit = evaluate(model, x_fit, y_fit, attack.delta)["uap_accuracy"]
            held = evaluate(model, *test, attack.delta)["uap_accuracy"]
            fits.append(fit), tests.append(held)
            print(f"| {epochs} | {o} | {percent(fit)} | {percent(held)} |", flush=True)
        chosen = [tests[min(range(len(fits)), key=lambda o: fits[o][k])][k] for k in range(len(preset.eps))]
        lowest = [min(t[k] for t in tests) for k in range(len(preset.eps))]
        print(f"\n{epochs} epochs, {args.orders} orders: test accuracy of the fit set's choice {percent(chosen)}, "
              f"lowest {percent(lowest)} ({time.perf_counter() - started:.0f} s)\n")


if __name__ == "__main__":
    main()
