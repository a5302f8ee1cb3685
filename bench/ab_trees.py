"""A/B of two source trees: time a few benchmark cases of the fastjac tree in the current directory.

    cd TREE && python /path/to/bench/ab_trees.py ARCH [THREADS] [REPEATS]   -> "plain 51.70 | jr_vjp ..."

Two versions of fastjac cannot be imported into one process, so run it alternately from the two trees
(A, B, A, B, ... in the same minutes, nothing else running) and compare the medians pairwise: how
bench/RESULTS.md and the README checked the engine before and after the layer registry.
"""
import statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
from fastjac import benchmark
arch = sys.argv[1]
out = []
for kind in ("plain", "jr_vjp", "jr_jvp", "infer_stacked"):
    step = benchmark.build(benchmark.CaseSpec(kind=kind, arch=arch, members=5, backend="auto"))
    for _ in range(2):
        step()
    times = []
    for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 7):
        s = time.perf_counter(); step(); times.append(time.perf_counter() - s)
    out.append(f"{kind} {1e3 * statistics.median(times):.2f}")
print(" | ".join(out))
