"""Same-run comparison of the MLP JR step on the Linear-chain Function against the layer-by-layer engine.

    python bench/chain_vs_engine.py [threads]

Both paths run in one process, interleaved (``fastjac.benchmark.measure_interleaved``), with the
automatic backend; the engine path is the one ``penalty_and_logits`` takes when the chain Function is
switched off (``fastjac.jacobian.CHAIN_BACKENDS = ()``), as the Triton backend always does.
"""
import sys

import torch

from fastjac import benchmark, jacobian


def engine_path(step):
    def call():
        saved, jacobian.CHAIN_BACKENDS = jacobian.CHAIN_BACKENDS, ()
        try:
            return step()
        finally:
            jacobian.CHAIN_BACKENDS = saved
    return call


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    steps = {}
    for kind in ("jr_vjp", "jr_jvp"):
        spec = benchmark.CaseSpec(kind, arch="mlp", members=5, backend="auto")
        steps[f"{kind} chain"] = benchmark.build(spec)
        steps[f"{kind} engine"] = engine_path(benchmark.build(spec))
    steps["reference"] = benchmark.build(benchmark.CaseSpec("reference_jr", arch="mlp", members=5, backend="-"))
    ms = {key: timing.median_s * 1e3 for key, timing in benchmark.measure_interleaved(steps, repeats=40).items()}
    print(f"{threads} thread(s), median wall ms: " + ", ".join(f"{key} {value:.2f}" for key, value in ms.items()))
    for kind in ("jr_vjp", "jr_jvp"):
        chain, engine = ms[f"{kind} chain"], ms[f"{kind} engine"]
        print(f"  {kind}: engine / chain {engine / chain:.3f}, reference / chain {ms['reference'] / chain:.2f}, "
              f"reference / engine {ms['reference'] / engine:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
