"""When does spreading an ensemble's members over GPUs pay? Bytes per step and a projected speedup.

A model on paper, not a measurement: per training step (or SGD-UAP batch) each rank computes its block of
ceil(M/R) members, then the ranks exchange what ``fastjac.distributed`` all-reduces. The step's FLOPs are
counted (``torch.utils.flop_counter``: the GEMMs and convolutions fastjac's step dispatches, on the torch
backend, one member at batch B) from the models' shapes; a GPU is a FLOP rate plus a fixed time per step
(kernel launches: the stacked engine runs a rank's members in one pass, so this time does not shrink with
fewer members), and a link a bandwidth and a latency, all parameters:

    compute(R) = overhead + ceil(M / R) * F_member / rate
    comm(R)    = sum over the step's all-reduces of 2 (R - 1) / R * bytes / bandwidth + 2 log2(R) * latency
    speedup(R) = compute(1) / (compute(R) + comm(R))

(the bandwidth term of a ring all-reduce, the latency term of a tree, as NCCL picks for small messages).
The exchange sits between the forward and the backward of the same step (the loss needs the sums), so it
does not overlap that step's compute. What crosses per step:
    target "members":      nothing (the ranks meet once per epoch: 4 numbers, and a checkpoint's gather)
    target "ensemble":     the member-logit sums [B, C] and the penalty rows' sums: v^T J [P, B, D] (vjp) or
                           J u [P, B, C] (jvp)
    SGD-UAP, member split: the logit sums [K*B, C] forward and the gradients [K, D] backward
    SGD-UAP, data split:   the gradients and losses [K*D + K] (each rank: ceil(B/R) rows, every member)

Usage: python bench/distributed_projection.py [--rate-tflops 10] [--overhead-us 200] [--bandwidth-gbs 100]
[--latency-us 5] (defaults: an achieved FP32 rate of a current data-centre GPU on these small layers, a
launch-bound step, and a within-node NVLink-class all-reduce; --bandwidth-gbs 12 --latency-us 20 is about
a 100 Gb/s inter-node link). Every default is an assumption, not a measurement: change them to your machine.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastjac import Ensemble, backends, models  # noqa: E402
from fastjac.jacobian import penalty_and_logits  # noqa: E402
from fastjac.uap import perturbed_logits  # noqa: E402

ARCHS = {"mlp": {}, "lenet": {}, "resnet-8": {"depth": 8}}
MEMBERS = (5, 8, 16, 32, 64)
RANKS = (2, 4, 8, 16, 32, 64)
INPUT = (1, 28, 28)
CLASSES = 10


def build(arch: str):
    name = "resnet" if arch.startswith("resnet") else arch
    if name not in models.ARCHITECTURES:
        return None
    return models.build(name, **ARCHS[arch])


def step_flops(arch: str, batch: int, nproj: int) -> dict | None:
    """GEMM/convolution FLOPs of one member's training step (forward + backward) at batch ``batch``: plain,
    JR vjp and JR jvp; and of one SGD-UAP batch (K = 1: forward + the input gradient)."""
    member = build(arch)
    if member is None:
        return None
    torch.manual_seed(0)
    model = Ensemble([member])
    x, y = torch.rand(batch, *INPUT), torch.randint(0, CLASSES, (batch,))
    flops = {}
    backends.use("torch")  # ATen ops only: the counter sees every product
    try:
        for kind in ("plain", "vjp", "jvp"):
            with FlopCounterMode(display=False) as counter:
                if kind == "plain":
                    logits, penalty = model.member_logits(x), 0.0
                else:
                    logits, penalty = penalty_and_logits(model, x, mode=kind, nproj=nproj, target="ensemble")
                (F.cross_entropy(logits.mean(0), y) + penalty).backward()
            flops[kind] = counter.get_total_flops()
        model.eval()
        f = perturbed_logits(model)
        delta = torch.zeros(1, *INPUT, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            torch.autograd.grad(F.cross_entropy(f(x, delta), y), delta)
        flops["uap"] = counter.get_total_flops()
    finally:
        backends.use(None)
    return flops


def exchanges(kind: str, batch: int, nproj: int, element: int = 4) -> list[int]:
    """Bytes of each all-reduce one step (or UAP batch, K = 1) makes, float32 unless ``element`` says otherwise."""
    inputs = math.prod(INPUT)
    counts = {"members": [],
              "ensemble-vjp": [batch * CLASSES + nproj * batch * inputs],
              "ensemble-jvp": [batch * CLASSES + nproj * batch * CLASSES],
              "uap-members": [batch * CLASSES, inputs],  # forward logit sums, backward gradients
              "uap-data": [inputs + 1]}
    return [count * element for count in counts[kind]]


def all_reduce_seconds(size: int, count_bytes: int, bandwidth: float, latency: float) -> float:
    """One all-reduce of ``count_bytes`` over ``size`` ranks: a ring's bandwidth term, a tree's latency term."""
    return 2 * (size - 1) / size * count_bytes / bandwidth + 2 * math.ceil(math.log2(size)) * latency


def speedup(kind: str, members: int, size: int, flops: dict, machine: dict, batch: int, nproj: int) -> float:
    """Projected time on one GPU over the time on ``size`` GPUs for ``members`` members."""
    work = flops["uap"] if kind.startswith("uap") else flops["jvp" if kind == "ensemble-jvp" else "vjp"]

    def compute(ranks: int) -> float:
        if kind == "uap-data":  # every rank runs every member on its ceil(B / R) rows
            return machine["overhead"] + members * work * math.ceil(batch / ranks) / batch / machine["rate"]
        return machine["overhead"] + math.ceil(members / ranks) * work / machine["rate"]

    comm = sum(all_reduce_seconds(size, count, machine["bandwidth"], machine["latency"])
               for count in exchanges(kind, batch, nproj))
    return compute(1) / (compute(size) + comm)


KINDS = ("members", "ensemble-vjp", "ensemble-jvp", "uap-members", "uap-data")


def report(machine: dict, batch: int, nproj: int, kinds=KINDS, member_counts=MEMBERS) -> str:
    lines = [f"Assumptions: {machine['rate'] / 1e12:g} TFLOP/s achieved per GPU plus {machine['overhead'] * 1e6:g} us "
             f"per step, all-reduce at {machine['bandwidth'] / 1e9:g} GB/s with {machine['latency'] * 1e6:g} us per "
             f"tree level, batch {batch}, nproj {nproj}, float32, K = 1 UAP; the members target runs the vjp step; "
             f"no overlap of communication and compute.", ""]
    lines += ["| arch | plain / vjp / jvp step MFLOP per member | UAP batch MFLOP per member | bytes per step: "
              "ensemble vjp / jvp, UAP members / data |", "|---|---|---|---|"]
    counted = {}
    for arch in ARCHS:
        flops = step_flops(arch, batch, nproj)
        if flops is None:
            lines.append(f"| {arch} | not in fastjac.models.ARCHITECTURES here | | |")
            continue
        counted[arch] = flops
        sizes = " / ".join(f"{sum(exchanges(k, batch, nproj)) / 1024:.1f} KiB"
                           for k in ("ensemble-vjp", "ensemble-jvp", "uap-members", "uap-data"))
        lines.append(f"| {arch} | {flops['plain'] / 1e6:.1f} / {flops['vjp'] / 1e6:.1f} / {flops['jvp'] / 1e6:.1f} "
                     f"| {flops['uap'] / 1e6:.1f} | {sizes} |")
    lines += ["", "Projected speedup over one GPU (R GPUs; '-' where R > M: every rank needs a member):", "",
              "| arch | work | M | " + " | ".join(f"R={r}" for r in RANKS) + " |",
              "|---|---|---|" + "---|" * len(RANKS)]
    for arch, flops in counted.items():
        for kind in kinds:
            for members in member_counts:
                cells = []
                for size in RANKS:
                    if size > members and kind != "uap-data":
                        cells.append("-")
                    else:
                        cells.append(f"{speedup(kind, members, size, flops, machine, batch, nproj):.1f}")
                lines.append(f"| {arch} | {kind} | {members} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-tflops", type=float, default=10.0, help="achieved FLOP rate per GPU (TFLOP/s)")
    parser.add_argument("--overhead-us", type=float, default=200.0, help="fixed time per step (microseconds)")
    parser.add_argument("--bandwidth-gbs", type=float, default=100.0, help="all-reduce bus bandwidth (GB/s)")
    parser.add_argument("--latency-us", type=float, default=5.0, help="latency per tree level (microseconds)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--nproj", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--members", nargs="+", type=int, default=list(MEMBERS), help="ensemble sizes M")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    machine = {"rate": args.rate_tflops * 1e12, "overhead": args.overhead_us * 1e-6,
               "bandwidth": args.bandwidth_gbs * 1e9, "latency": args.latency_us * 1e-6}
    print(report(machine, args.batch, args.nproj, args.kinds, args.members))


if __name__ == "__main__":
    main()
