"""A/B of two source trees: time a few benchmark cases of the fastjac tree in the current directory.

    cd TREE && python /path/to/bench/ab_trees.py ARCH [THREADS] [REPEATS]   -> "plain 51.70 | jr_vjp ..."

Two versions of fastjac cannot be imported into one process, so run it alternately from the two trees
(A, B, A, B, ... in the same minutes, nothing else running) and compare pairwise (each number is the
fastest of REPEATS calls). How
bench/RESULTS.md and the README checked the engine before and after the layer registry.
"""
import os, sys, time
# the tree in the current directory, not the script's own or an editable install: Python puts the script's
# directory first on sys.path, and an editable install's finder would then supply its own fastjac
sys.path.insert(0, os.getcwd())
import torch
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
import fastjac
from fastjac import benchmark
if os.path.dirname(os.path.dirname(os.path.abspath(fastjac.__file__))) != os.getcwd():
    sys.exit(f"ab_trees: imported fastjac from {fastjac.__file__}, not from {os.getcwd()}")
# as `python -m fastjac bench` runs its cases: without it every step faults freed memory in again, which
# scattered LeNet's jvp pairs 0.59-1.24x (bench/RESULTS.md, 2026-12-01); a tree older than the setting runs without
if hasattr(fastjac, "keep_freed_memory"):
    fastjac.keep_freed_memory()
arch = sys.argv[1]
out = []
for kind in ("plain", "jr_vjp", "jr_jvp", "infer_stacked"):
    step = benchmark.build(benchmark.CaseSpec(kind=kind, arch=arch, members=5, backend="auto"))
    for _ in range(2):
        step()
    times = []
    for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 7):
        s = time.perf_counter(); step(); times.append(time.perf_counter() - s)
    # the fastest call: on this shared VM, other tenants' bursts only ever add time
    out.append(f"{kind} {1e3 * min(times):.2f}")
print(" | ".join(out))
