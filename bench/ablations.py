"""Same-run ablations: a fastjac path against itself with one design decision switched off.

    python bench/ablations.py chain [threads]       MLP JR step: Linear-chain Function vs layer-by-layer engine
    python bench/ablations.py plain [threads]       MLP plain step on cpp: ChainLogits vs layer-by-layer engine
    python bench/ablations.py uap-passes [threads]  SGD-UAP, K = 4: passes sized to the cache vs one pass
    python bench/ablations.py masks [threads]       JR vjp steps: ReLU masks on the epilogue launcher vs a float product
    python bench/ablations.py subsample [threads]   ResNet-8 steps: strided 1x1 convs as subsample + stride 1 vs ATen's

Both sides run in one process, interleaved (``fastjac.benchmark.measure_interleaved``), automatic backend.
"""
import dataclasses
import sys
from contextlib import contextmanager

import torch

from fastjac import backends, benchmark, ensemble, layers
from fastjac.ops import stream_epilogue


@contextmanager
def patched(module, name, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def switched_off(step, capability, value):
    """``step`` with the automatic backend's ``capability`` (a ``fastjac.backends.Backend`` field) set to
    ``value`` while it runs."""
    name = backends.current()
    changed = dataclasses.replace(backends.get(name), **{capability: value})

    def call():
        saved = backends._built[name]
        backends._built[name] = changed
        try:
            return step()
        finally:
            backends._built[name] = saved
    return call


def with_attribute(step, owner, name, value):
    """``step`` with ``owner.name`` set to ``value`` while it runs."""
    def call():
        with patched(owner, name, value):
            return step()
    return call


def chain() -> None:
    """The engine path is what penalty_and_logits takes with the chain Function off (as on Triton)."""
    steps = {}
    for kind in ("jr_vjp", "jr_jvp"):
        spec = benchmark.CaseSpec(kind, arch="mlp", members=5, backend="auto")
        steps[f"{kind} chain"] = benchmark.build(spec)
        steps[f"{kind} engine"] = switched_off(benchmark.build(spec), "chain_products", None)
    steps["reference"] = benchmark.build(benchmark.CaseSpec("reference_jr", arch="mlp", members=5, backend="-"))
    ms = report(steps, repeats=40)
    for kind in ("jr_vjp", "jr_jvp"):
        chained, engine = ms[f"{kind} chain"], ms[f"{kind} engine"]
        print(f"  {kind}: engine / chain {engine / chained:.3f}, reference / chain {ms['reference'] / chained:.2f}, "
              f"reference / engine {ms['reference'] / engine:.2f}")


def plain() -> None:
    """The engine path is what member_logits takes with the plain chain Function off."""
    spec = benchmark.CaseSpec("plain", arch="mlp", members=5, backend="cpp")
    steps = {"chain": benchmark.build(spec),
             "engine": switched_off(benchmark.build(spec), "plain_chain", False),
             "loop": benchmark.build(benchmark.CaseSpec("loop", arch="mlp", members=5, backend="-"))}
    ms = report(steps, repeats=40)
    print(f"  plain step: engine / chain {ms['engine'] / ms['chain']:.3f}, loop / chain {ms['loop'] / ms['chain']:.2f}, "
          f"loop / engine {ms['loop'] / ms['engine']:.2f}")


def uap_passes() -> None:
    """One pass is what sgd_uap does with an unbounded CPU_PASS_BYTES (as on a GPU)."""
    for arch in ("lenet", "mlp"):
        steps = {}
        for k in (1, 4):
            spec = benchmark.CaseSpec("uap", arch=arch, members=5, k=k, backend="auto")
            steps[f"{arch} K={k} cache-sized"] = benchmark.build(spec)
            steps[f"{arch} K={k} one pass"] = with_attribute(benchmark.build(spec), ensemble, "CPU_PASS_BYTES", 2**62)
        ms = report(steps, repeats=10 if arch == "lenet" else 30)
        for way in ("cache-sized", "one pass"):
            print(f"  {arch} {way}: K=4 / K=1 {ms[f'{arch} K=4 {way}'] / ms[f'{arch} K=1 {way}']:.2f}")


def masks() -> None:
    """The float product is what scale_rows did before masked_streams."""
    product = lambda g, mask, launchers=None: g * mask.unsqueeze(1)  # noqa: E731
    for arch, repeats in (("resnet", 10), ("lenet", 30), ("mlp", 40)):
        spec = benchmark.CaseSpec("jr_vjp", arch=arch, members=5, backend="auto")
        steps = {"launcher": benchmark.build(spec),
                 "product": with_attribute(benchmark.build(spec), stream_epilogue, "masked_streams", product)}
        ms = report(steps, repeats=repeats)
        print(f"  {arch} vjp: launcher / product {ms['launcher'] / ms['product']:.3f}")


def subsample() -> None:
    """ATen's strided kernel is what Conv2d._conv ran before Conv2d.subsamples."""
    steps = {}
    for kind in ("plain", "jr_vjp", "jr_jvp"):
        spec = benchmark.CaseSpec(kind, arch="resnet", members=5, backend="auto")
        steps[f"{kind} subsample"] = benchmark.build(spec)
        steps[f"{kind} strided"] = with_attribute(benchmark.build(spec), layers.Conv2d, "subsamples",
                                                  property(lambda self: False))
    ms = report(steps, repeats=8)
    for kind in ("plain", "jr_vjp", "jr_jvp"):
        print(f"  {kind}: subsample / strided {ms[f'{kind} subsample'] / ms[f'{kind} strided']:.3f}")


def report(steps: dict, repeats: int) -> dict:
    ms = {key: timing.median_s * 1e3 for key, timing in benchmark.measure_interleaved(steps, repeats=repeats).items()}
    print(f"{torch.get_num_threads()} thread(s), median wall ms: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    return ms


if __name__ == "__main__":
    ABLATIONS = {"chain": chain, "plain": plain, "uap-passes": uap_passes, "masks": masks, "subsample": subsample}
    if len(sys.argv) < 2 or sys.argv[1] not in ABLATIONS:
        sys.exit(f"usage: python bench/ablations.py {{{'|'.join(ABLATIONS)}}} [threads]")
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    ABLATIONS[sys.argv[1]]()
