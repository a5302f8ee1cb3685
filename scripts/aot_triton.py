#!/usr/bin/env python
"""Compile every Triton kernel of kernels/ for every configuration its launchers use, for sm_80 and
sm_90, with no GPU and no interpreter, and report registers, spills and shared memory per kernel.

    python scripts/aot_triton.py            # the full matrix (every launch variant x autotune config)
    python scripts/aot_triton.py --quick    # the CI matrix (tests/test_aot_triton.py): every config each
                                            # kernel keeps in float32 (IEEE) and float64, once, on its
                                            # heaviest flags
    options: --arch 80 90 (targets), --kernels NAME... (only kernels whose name contains one of these),
             --jobs N (compiler processes), --table (every variant, not only the per-kernel summary),
             --markdown FILE (write the summary as a Markdown table)

How: TRITON_INTERPRET must be unset (the script refuses otherwise): the kernels' ``configs()`` then list
the GPU autotune configs. The launchers of kernels/*.py are called on ``meta`` tensors for every option
they take (float32 with IEEE or TF32 dots, float64; bias, ReLU, shared or per-member input, stream
counts that give every SLOTS value, the perturbation mode, split reductions). Each autotuned kernel's
``run`` is replaced by a recorder, so nothing launches: a call records the kernel's arguments. Each
recorded launch is expanded over the configs that the kernel's own pruning keeps for it, bound by
Triton's runtime binder for the target (the specialisation a launch on a GPU computes: dtypes, integer
and pointer divisibility; pointers taken 16-byte aligned, as torch allocates them) and compiled with
``triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32))``. Registers and spills come from
ptxas's report, shared memory from the compiled kernel's metadata.

Exit status 1 on any compile error or any variant over its target's shared memory (sm_80: 163 KB,
sm_90: 227 KB per block); the offending variants are printed.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import itertools
import multiprocessing
import os
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("aot_triton: TRITON_INTERPRET=1 is set; the kernels would be interpreted. Unset it (the test "
             "runs this script in a subprocess without it).")
# Every run compiles for real: a private cache (ptxas's report is printed only when ptxas runs).
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastjac-aot-")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: E402

from kernels import _common  # noqa: E402
from kernels import stacked_linear, stream_epilogue, uap_step  # noqa: E402

KERNEL_MODULES = (stacked_linear, stream_epilogue, uap_step)
SHARED_LIMIT = _common.SHARED_MEMORY_LIMIT
META = torch.device("meta")


# --------------------------------------------------------------------------------- launches, recorded

@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the autotuner, its positional arguments (tensors as MockTensor) and
    its constexpr keyword arguments; ``scenario`` names the launcher call that made it."""
    kernel: triton.runtime.Autotuner
    args: tuple
    kwargs: dict
    scenario: str


def autotuned_kernels() -> dict:
    """name -> Autotuner of every autotuned kernel in kernels/*.py."""
    found = {}
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.Autotuner):
                found[name] = value
    return found


@contextlib.contextmanager
def recording(launches: list, scenario: list):
    """Replace every autotuned kernel's run by a recorder appending to ``launches``."""
    kernels = autotuned_kernels()

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            mocked = tuple(MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a for a in args)
            launches.append(Launch(kernel, mocked, dict(kwargs), scenario[0]))
        return run

    for kernel in kernels.values():
        kernel.run = recorder(kernel)
    try:
        yield
    finally:
        for kernel in kernels.values():
            del kernel.run


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    """torch's CUDA matmul precision, which the GEMM kernels follow (``_common.dot_precision``)."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def empty(*shape, dtype=torch.float32):
    return torch.empty(shape, device=META, dtype=dtype)


def mask_like(m, rows, features):
    return torch.empty((m, rows * features), device=META, dtype=torch.bool)


# The MLP 784-256-256-10 with M = 5 members and B = 128 (the benchmark's shapes): a hidden layer for the
# GEMMs, LeNet's first convolution (6 channels, 28x28) for the standalone epilogue.
M, B, IN, OUT = 5, 128, 784, 256
STREAM_COUNTS = (1, 2, 3, 5)  # SLOTS 1, 2, 4, 8 in float32 (float64 caps SLOTS at 4)


def linear_launches(dtype, bias: bool, relu: bool, streams: int, shared: bool):
    """The stacked Linear forward and backward: x shared [R, IN] (the first layer) or per member."""
    rows, fan_in = streams * B, (IN if shared else OUT)
    x = empty(rows, fan_in, dtype=dtype) if shared else empty(M, rows, fan_in, dtype=dtype)
    weight, b = empty(M, OUT, fan_in, dtype=dtype), (empty(M, OUT, dtype=dtype) if bias else None)
    stacked_linear.stacked_linear_forward(x, weight, b, streams, relu)
    mask = mask_like(M, B, OUT) if relu else None
    stacked_linear.stacked_linear_backward(empty(M, rows, OUT, dtype=dtype), x, weight, mask, streams, bias, True)


def perturbed_launches(dtype, bias: bool, relu: bool, count: int):
    """The perturbed first layer of an attack on K = ``count`` perturbations (split batch reduction)."""
    x, delta = empty(B, IN, dtype=dtype), empty(count, IN, dtype=dtype)
    weight, b = empty(M, OUT, IN, dtype=dtype), (empty(M, OUT, dtype=dtype) if bias else None)
    uap_step.perturbed_linear_forward(x, delta, weight, b, relu)
    mask = mask_like(M, count * B, OUT) if relu else None
    uap_step.perturbed_linear_backward(empty(M, count * B, OUT, dtype=dtype), x, delta, weight, mask)


def epilogue_launches(dtype, bias: bool, relu: bool):
    """LeNet's first conv, row-major: O = 1, I = B*M*C*H*W, NB = M*C, rep = H*W (split bias reduction)."""
    y, nb, rep = empty(1, 2, B * M * 6 * 28 * 28, dtype=dtype), M * 6, 28 * 28
    stream_epilogue.stream_epilogue_forward(y, empty(1, nb, dtype=dtype) if bias else None, rep, relu)
    mask = torch.empty((1, y.shape[2]), device=META, dtype=torch.bool) if relu else None
    stream_epilogue.stream_epilogue_backward(y, mask, nb, rep, bias)


def uap_launches(dtype):
    """perturb forward and backward (K = 1: split batch reduction) and the sign step."""
    x, delta = empty(B, 1, 28, 28, dtype=dtype), empty(1, 1, 28, 28, dtype=dtype)
    uap_step.perturb_forward(x, delta)
    uap_step.perturb_backward(empty(1, B, 1, 28, 28, dtype=dtype), x, delta)
    uap_step.uap_step(delta, empty(1, 1, 28, 28, dtype=dtype), empty(1, dtype=dtype), empty(1, dtype=dtype))


def scenarios(quick: bool):
    """(name, tf32, call) for every launcher option; ``quick`` keeps each kernel's heaviest flags only."""
    dtypes = [(torch.float32, False), (torch.float64, False)] + ([] if quick else [(torch.float32, True)])
    booleans = (True,) if quick else (True, False)
    for (dtype, tf32), bias, relu in itertools.product(dtypes, booleans, booleans):
        tag = f"{str(dtype)[6:]}{'-tf32' if tf32 else ''} bias={bias} relu={relu}"
        for streams, shared in itertools.product(STREAM_COUNTS[-1:] if quick else STREAM_COUNTS, (True, False)):
            yield (f"stacked_linear {tag} streams={streams} shared={shared}", tf32,
                   functools.partial(linear_launches, dtype, bias, relu, streams, shared))
        for count in ((1,) if quick else (1, 4)):
            yield f"perturbed_linear {tag} K={count}", tf32, functools.partial(perturbed_launches, dtype, bias, relu, count)
        if not tf32:  # the elementwise kernels have no dot
            yield f"stream_epilogue {tag}", tf32, functools.partial(epilogue_launches, dtype, bias, relu)
    for dtype in (torch.float32, torch.float64):
        yield f"uap_step {str(dtype)[6:]}", False, functools.partial(uap_launches, dtype)


def record(quick: bool) -> list:
    launches, scenario = [], [""]
    # A split reduction needs the SM count of a real device: take an H100's (132 SMs) for the meta tensors.
    fill = _common.PROGRAMS_OFF_GPU
    _common.PROGRAMS_OFF_GPU = 2 * 132
    try:
        with recording(launches, scenario):
            for name, tf32, call in scenarios(quick):
                scenario[0] = name
                with matmul_precision(tf32):
                    call()
    finally:
        _common.PROGRAMS_OFF_GPU = fill
    return launches


# ------------------------------------------------------------------------------------- variants, compiled

@dataclasses.dataclass
class Variant:
    kernel: str
    arch: int
    constexprs: dict  # the launch's flags and the config's block sizes
    num_warps: int
    num_stages: int
    scenario: str
    launch: Launch
    config: triton.Config


def expand(launches: list, archs, quick: bool) -> list:
    """Every (launch, pruned config, arch) once per distinct specialisation (the runtime's cache key);
    ``quick``: once per (kernel, arch, dtype, config), from the first (heaviest) launch that uses it."""
    variants, seen = [], set()
    for launch in launches:
        kernel = launch.kernel
        kernel.nargs = dict(zip(kernel.arg_names, launch.args))
        configs = kernel.prune_configs(launch.kwargs)
        kernel.nargs = None
        for config, arch in itertools.product(configs, archs):
            _, signature, constexprs, attrs, _ = bind(launch, config, arch)
            if quick:
                key = (kernel.base_fn.__name__, arch, "*fp64" in signature.values(), str(config))
            else:
                key = (kernel.base_fn.__name__, arch, str(signature), str(constexprs), str(attrs), str(config))
            if key in seen:
                continue
            seen.add(key)
            flags = {name: value for name, value in {**launch.kwargs, **config.kwargs}.items()}
            variants.append(Variant(kernel.base_fn.__name__, arch, flags, config.num_warps, config.num_stages,
                                    launch.scenario, launch, config))
    return variants


def bind(launch: Launch, config: triton.Config, arch: int):
    """(options, signature, constexprs, attrs, jit function) exactly as JITFunction.run computes them."""
    jit = launch.kernel.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {**launch.kwargs, **config.all_kwargs(), "debug": False}
    # The compilation knobs JITFunction.run adds to the options; they differ between triton versions
    # (fpsan_homomorphic_casts is newer than triton 3.6, the version of torch 2.11's CUDA builds).
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(triton.knobs.compilation, knob):
            kwargs[knob] = getattr(triton.knobs.compilation, knob)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    return options, signature, constexprs, attrs, jit


PTXAS = re.compile(r"(\d+) bytes spill stores.*?Used (\d+) registers", re.S)


def compile_one(variant: Variant) -> dict:
    """Compile one variant; returns registers, spill bytes, shared bytes, or the error."""
    options, signature, constexprs, attrs, jit = bind(variant.launch, variant.config, variant.arch)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", variant.arch, 32), options=options.__dict__)
    except Exception as error:  # noqa: BLE001 - every compiler failure is a finding to report
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        where_why = " ... ".join(dict.fromkeys(lines[:1] + lines[-1:]))  # Triton: the source position, the reason
        return {"error": f"{type(error).__name__}: {where_why}"}
    match = PTXAS.search(log.getvalue())
    return {"registers": int(match.group(2)) if match else -1, "spills": int(match.group(1)) if match else -1,
            "shared": compiled.metadata.shared, "seconds": time.perf_counter() - start}


def describe(variant: Variant) -> str:
    """The variant's constexprs, short: flags that are set, block sizes, warps and stages."""
    parts = []
    for name, value in variant.constexprs.items():
        if isinstance(value, bool):
            if value:
                parts.append(name)
        elif name == "ACC":
            parts.append("f64" if value == triton.language.float64 else "f32")
        elif name == "PRECISION":
            parts.append(value)
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts) + f" w{variant.num_warps} s{variant.num_stages}"


def _compile_indexed(index: int) -> dict:
    return compile_one(_VARIANTS[index])


_VARIANTS: list = []


def run(quick: bool, archs, jobs: int, kernels=None) -> tuple[list, list]:
    global _VARIANTS
    launches = [launch for launch in record(quick)
                if not kernels or any(name in launch.kernel.base_fn.__name__ for name in kernels)]
    _VARIANTS = expand(launches, archs, quick)
    context = multiprocessing.get_context("fork")  # workers inherit the recorded variants
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        results = list(pool.map(_compile_indexed, range(len(_VARIANTS))))
    return _VARIANTS, results


# ------------------------------------------------------------------------------------------------ report

def failures(variants, results) -> list[str]:
    found = []
    for variant, result in zip(variants, results):
        where = f"{variant.kernel} sm_{variant.arch} [{describe(variant)}] ({variant.scenario})"
        if "error" in result:
            found.append(f"COMPILE ERROR {where}: {result['error']}")
        elif result["shared"] > SHARED_LIMIT[variant.arch]:
            found.append(f"SHARED MEMORY {where}: {result['shared']} bytes > {SHARED_LIMIT[variant.arch]}")
    return found


def summary_rows(variants, results) -> list[tuple]:
    """Per (kernel, arch, dtype): variants, max registers, max spill bytes, max shared KB, spilling variants."""
    groups = collections.defaultdict(list)
    for variant, result in zip(variants, results):
        if "error" in result:
            continue
        dtype = "f64" if variant.constexprs.get("ACC") == triton.language.float64 or any(
            isinstance(a, MockTensor) and a.dtype == torch.float64 for a in variant.launch.args) else "f32"
        groups[(variant.kernel, variant.arch, dtype)].append((variant, result))
    rows = []
    for (kernel, arch, dtype), items in sorted(groups.items()):
        worst = max(items, key=lambda item: (item[1]["spills"], item[1]["registers"]))
        rows.append((kernel, f"sm_{arch}", dtype, len(items), max(r["registers"] for _, r in items),
                     max(r["spills"] for _, r in items), round(max(r["shared"] for _, r in items) / 1024, 1),
                     sum(r["spills"] > 0 for _, r in items), describe(worst[0])))
    return rows


HEADER = ("kernel", "target", "dtype", "variants", "max registers", "max spill bytes", "max shared KB",
          "spilling variants", "heaviest variant (most spills, then registers)")


def markdown(rows) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI matrix (heaviest flags, every config)")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--kernels", nargs="+", help="only the kernels whose name contains one of these")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--table", action="store_true", help="print every variant, not only the summary")
    parser.add_argument("--markdown", type=pathlib.Path, help="write the summary table to this file")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    variants, results = run(args.quick, args.arch, args.jobs, args.kernels)
    if args.table:
        for variant, result in zip(variants, results):
            cells = result.get("error") or (f"regs {result['registers']:3d} spills {result['spills']:5d} "
                                            f"shared {result['shared'] / 1024:6.1f} KB {result['seconds']:5.1f} s")
            print(f"{variant.kernel:28s} sm_{variant.arch} {cells}  [{describe(variant)}]")
    rows = summary_rows(variants, results)
    print(markdown(rows))
    if args.markdown:
        args.markdown.write_text(markdown(rows) + "\n")
    found = failures(variants, results)
    kernels = sorted({variant.kernel for variant in variants})
    print(f"\naot_triton: {len(variants)} variants of {len(kernels)} kernels ({', '.join(kernels)}) for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} in {time.perf_counter() - start:.0f} s "
          f"({'quick' if args.quick else 'full'} matrix, triton {triton.__version__})")
    missing = sorted(set(autotuned_kernels()) - set(kernels))
    if missing and not args.kernels:
        found.append(f"NOT COMPILED: no launcher scenario reaches {', '.join(missing)}")
    if not variants:
        found.append("NOTHING COMPILED: no kernel matches --kernels")
    for line in found:
        print(line)
    print("aot_triton: FAILED" if found else "aot_triton: ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
