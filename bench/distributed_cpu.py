"""Member-parallel training on this CPU: 2 ranks x 1 thread against 1 process x 2 threads, same run.

Each configuration trains the same ensemble (MLP 784-256-256-10 members, Fashion-MNIST, batch 128, JR vjp,
lambda 0.1) for one epoch in a fresh process; the configurations run in turn, ``--repeats`` times, and the
table gives the median of each and of the per-round ratio. 1 process x 1 thread is there to read the other
two against: on a machine shared with other work, 2 OpenMP threads can lose much more than 2 processes. The
time is the epoch's own (``TrainResult.history``: no start-up, no data loading); under 2 ranks, rank 0's
epoch, which ends with the epoch's all-reduce.

Usage: python bench/distributed_cpu.py [--members 4] [--samples 8192] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"members": dict(jr_target="members"), "ensemble": dict(jr_target="ensemble")}


def worker(members: int, samples: int, target: str) -> None:
    """One epoch of training (spread over the ranks when launched as several); prints its seconds (rank 0)."""
    import torch

    import fastjac
    from fastjac import distributed, models

    world = distributed.init("cpu", timeout=600)
    x, y = fastjac.data.load("fashion-mnist", "train")
    torch.manual_seed(0)
    model = fastjac.Ensemble([models.mlp() for _ in range(members)])
    result = fastjac.train(model, (x[:samples], y[:samples]), epochs=1, jr_lambda=0.1, progress=False,
                           **TARGETS[target])
    if world is None or world.is_first:
        print(json.dumps({"seconds": result.history[0]["seconds"], "threads": torch.get_num_threads()}))
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int, threads: int, members: int, samples: int, target: str) -> float:
    """Epoch seconds of one launch of ``ranks`` processes with ``threads`` intra-op threads each."""
    command = [sys.executable, __file__, "--worker", "--members", str(members), "--samples", str(samples),
               "--target", target]
    port = _free_port()
    processes = []
    for rank in range(ranks):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=1800)[0] for process in processes]
    if any(process.returncode for process in processes):
        raise RuntimeError(f"a launch of {ranks} ranks failed")
    return json.loads(outputs[0])["seconds"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", choices=list(TARGETS), default=None, help="one target (default: both)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.members, args.samples, args.target)
        return
    print(f"| target | 1 process x 1 thread (s) | 1 process x 2 threads (s) | 2 ranks x 1 thread (s) | "
          f"1x2 / 2x1, median of {args.repeats} rounds (range) | 1x1 / 2x1 |\n|---|---|---|---|---|---|")
    for target in [args.target] if args.target else list(TARGETS):
        times = {(1, 1): [], (1, 2): [], (2, 1): []}
        for _ in range(args.repeats):
            for ranks, threads in times:
                times[ranks, threads].append(run(ranks, threads, args.members, args.samples, target))
        ratios = [one_two / two_one for one_two, two_one in zip(times[1, 2], times[2, 1])]
        serial = [one_one / two_one for one_one, two_one in zip(times[1, 1], times[2, 1])]
        medians = " | ".join(f"{statistics.median(times[key]):.2f}" for key in times)
        print(f"| {target} | {medians} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{statistics.median(serial):.2f} ({min(serial):.2f}-{max(serial):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
