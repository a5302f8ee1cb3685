"""Same-run timing of the training steps on one architecture (default ResNet-8, M = 5, B = 128): the plain
stacked step, a loop of the member modules, the JR steps (vjp, jvp) on the stacked engine, the same JR
steps on the generic torch.func path (the engine switched off for that ensemble), and the reference JR
steps: a loop of members with Hoffman's double backprop (vjp), or with the reference's input-space
estimator (jvp: torch.func.jvp per member and projection, beside the logits' own forward, as the
generic fallback ran before the torch.func path). Every step is CE (+ lambda/2 * penalty) and one Adam
step, as ``python -m fastjac bench`` forms them. ``--arch untraceable`` is a LeNet-like member with
data-dependent control flow: torch.fx cannot trace it, so its JR steps run on the generic path.

A design tool for the engine, not the project's benchmark (``python -m fastjac bench``): cases are timed
interleaved (round-robin in shuffled order), so ratios within one run compare like with like; absolute
times on a shared machine mean little.

    python bench/resnet_steps.py [--arch resnet] [--members 5] [--batch 128] [--rounds 7] [--threads 2]
                                 [--cases plain loop jr_vjp ...]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastjac import Ensemble, keep_freed_memory, models, reference
from fastjac.jacobian import penalty_and_logits

JR_LAMBDA = 0.1


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3, fused=True)


def _step(optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _stacked_ce(logits, y):
    labels = y.unsqueeze(0).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / y.shape[0]


class Untraceable(nn.Module):
    """LeNet-like, with a branch on the data: symbolic tracing cannot follow it (nor vmap over members)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2).flatten(1)
        h = self.fc1(h)
        h = torch.tanh(h) if h.mean() > 0 else F.relu(h)
        return self.fc3(F.relu(self.fc2(h)))


def cases(arch: str, members: int, batch: int) -> dict:
    """name -> a closure running one training step on fresh members (seed 0) and a fixed random batch."""
    torch.manual_seed(0)
    mods = [Untraceable() if arch == "untraceable" else models.build(arch) for _ in range(members)]
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, *models.INPUT_SHAPE, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    steps = {}

    def ensemble_step(mode, generic=False):
        ensemble = Ensemble([m for m in mods]).train()
        if generic:  # the engine switched off for this ensemble: every call takes the torch.func path
            ensemble.graph, ensemble.unsupported = None, "forced generic path (bench/resnet_steps.py)"
        optimizer = _adam(ensemble.parameters())
        if mode == "plain":
            return lambda: _step(optimizer, _stacked_ce(ensemble.member_logits(x), y))

        def step():
            logits, penalty = penalty_and_logits(ensemble, x, nproj=1, mode=mode, check_values=False)
            _step(optimizer, _stacked_ce(logits, y) + JR_LAMBDA / 2 * penalty.sum())
        return step

    steps["plain"] = ensemble_step("plain")
    steps["jr_vjp"] = ensemble_step("vjp")
    steps["jr_jvp"] = ensemble_step("jvp")
    steps["generic_plain"] = ensemble_step("plain", generic=True)
    steps["generic_vjp"] = ensemble_step("vjp", generic=True)
    steps["generic_jvp"] = ensemble_step("jvp", generic=True)
    loop_members = [m.train() for m in mods]
    loop_optimizer = _adam([p for m in loop_members for p in m.parameters()])
    steps["loop"] = lambda: _step(loop_optimizer, sum(F.cross_entropy(m(x), y) for m in loop_members))

    def reference_step():  # Hoffman et al.'s structure: one forward per member, CE + double-backprop penalty
        loss = 0.0
        for member in loop_members:
            inputs = x.detach().requires_grad_(True)
            logits = member(inputs)
            v = reference.sphere_projections(1, batch, logits.shape[-1])
            loss = loss + F.cross_entropy(logits, y) + JR_LAMBDA / 2 * reference.penalty_vjp_outputs(inputs, logits, v)
        _step(loop_optimizer, loss)

    def reference_jvp_step():  # the reference's input-space estimator per member, logits from their own forward
        u = reference.gaussian_projections(1, x.shape)
        loss = 0.0
        for member in loop_members:
            penalty = reference.penalty_jvp(member, x, u)
            loss = loss + F.cross_entropy(member(x), y) + JR_LAMBDA / 2 * penalty
        _step(loop_optimizer, loss)

    steps["reference"] = reference_step
    steps["reference_jvp"] = reference_jvp_step
    return steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet", choices=[*models.ARCHITECTURES, "untraceable"])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", help="subset of the cases (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as python -m fastjac bench does: every case shares it
    warnings.simplefilter("ignore")  # the forced generic path warns once
    steps = cases(args.arch, args.members, args.batch)
    names = args.cases or list(steps)
    for name in names:  # warm-up
        steps[name]()
    times = {name: [] for name in names}
    order = list(names)
    for _ in range(args.rounds):
        random.shuffle(order)
        for name in order:
            started = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(f"{args.arch} M={args.members} B={args.batch}, {args.threads} threads, {args.rounds} rounds "
          f"(shared machine: ratios only)")
    base = medians.get("plain")
    for name in names:
        ratio = f"{medians[name] / base:5.2f}x plain" if base else ""
        anchor = "reference_jvp" if name.endswith("jvp") and "reference_jvp" in medians else "reference"
        vs_ref = f"  {anchor}/this {medians[anchor] / medians[name]:5.2f}" if anchor in medians else ""
        print(f"  {name:14s} {medians[name]:9.1f} ms  {ratio}{vs_ref}")


if __name__ == "__main__":
    main()
