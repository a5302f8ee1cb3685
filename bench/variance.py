"""Spread of the nproj = 1 vjp and jvp estimates of each member's batch-mean ||J||_F^2, at init, and
what it costs to reach a given variance with each estimator:

    python -m bench.variance [--arch mlp] [--members 5] [--draws 200] [--quick] [--threads N] [--clock cpu]

For each estimator: over ``draws`` independent projections, the mean (with its standard error, to
compare with the exact value from jacrev), the standard deviation of one estimate (what one training
step sees), its relative variance (var / exact^2, averaged over members), and time x relative
variance, with the time of one JR training step (the two steps timed interleaved, automatic backend):
the cost of reaching a given variance by averaging steps; lower is better.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from fastjac import backends, benchmark, data, models
from fastjac.ensemble import Ensemble
from fastjac.jacobian import penalty_and_logits

MODES = ("vjp", "jvp")


def variance_batch(batch: int, device: str) -> tuple[torch.Tensor, str]:
    """The first ``batch`` Fashion-MNIST test images when the data are installed, else smooth random
    images (a blurred uniform field, clamped to [0, 1]); and a line saying which."""
    try:
        x, _ = data.load("fashion-mnist", "test")
        return x[:batch].to(device), f"the first {batch} Fashion-MNIST test images"
    except data.DataError as error:  # no data here: the report says which batch it used
        generator = torch.Generator().manual_seed(0)
        field = torch.rand(batch, *models.INPUT_SHAPE, generator=generator)
        x = F.avg_pool2d(field, 5, stride=1, padding=2).mul(2).sub(0.5).clamp(0, 1)
        return x.to(device), f"{batch} smooth random images (Fashion-MNIST not available: {error})"


def estimator_variance(*, arch: str = "mlp", members: int = 5, draws: int = 200, batch: int = benchmark.BATCH,
                       device: str = "cpu", quick: bool = False, clock: str = "wall") -> dict:
    """The report (see the module docstring) as a dict: per estimator mean, sem, std [M], relative_std,
    relative_variance, step_ms, time_x_variance; and exact [M]."""
    ensemble = Ensemble(benchmark.make_members(arch, members, device=device)).eval()
    x, source = variance_batch(batch, device)
    with torch.no_grad():
        exact = penalty_and_logits(ensemble, x, mode="exact")[1].double()  # [M]
        estimates = {mode: torch.stack([penalty_and_logits(ensemble, x, nproj=1, mode=mode)[1].double()
                                        for _ in range(draws)]) for mode in MODES}  # [draws, M]
    specs = {mode: benchmark.CaseSpec(f"jr_{mode}", arch, members, backends.current(device), batch=batch)
             for mode in MODES}
    options = dict(warmup=1, repeats=5) if quick else dict(warmup=3, repeats=20, max_time=10.0)
    timings = benchmark.measure_interleaved({mode: benchmark.build(spec, device) for mode, spec in specs.items()},
                                            device=device, memory=False, **options)
    report = dict(arch=arch, members=members, draws=draws, batch=batch, source=source, clock=clock,
                  exact=exact.tolist(), estimators={})
    for mode, values in estimates.items():
        std = values.std(dim=0)  # [M]
        relative_variance = (std.pow(2) / exact.pow(2)).mean().item()
        step_ms = timings[mode].seconds(clock) * 1e3
        report["estimators"][mode] = dict(
            mean=values.mean(0).tolist(), sem=(std / math.sqrt(draws)).tolist(), std=std.tolist(),
            relative_std=(std / exact).mean().item(), relative_variance=relative_variance,
            step_ms=step_ms, time_x_variance=step_ms * relative_variance)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.variance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mlp", choices=list(models.ARCHITECTURES))
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--draws", type=int, help="projections per estimator (default 200; 50 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer draws and timed steps (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--clock", choices=benchmark.CLOCKS, default="wall")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    if args.members < 1 or (args.draws is not None and args.draws < 2):
        parser.error("--members must be >= 1 and --draws >= 2")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = estimator_variance(arch=args.arch, members=args.members, draws=args.draws or (50 if args.quick else 200),
                                device=args.device, quick=args.quick, clock=args.clock)
    benchmark.write_report(format_variance(report), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
