"""Helpers shared by the Triton kernels (kernels/*.py): autotune configs, keys and pruning, accumulator
dtype and dot precision, the launch device guard, and how finely a reduction is split to fill a GPU.

Kernels are leaves: nothing here or in kernels/*.py imports fastjac. The ops in fastjac/ops validate
shapes and dtypes once, before they call a kernel launcher; a launcher only checks that its tensors sit
on one device Triton can run on (``launch_device``).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Shared memory a program may use (bytes): the opt-in maximum per block of sm_80 (163 KB) and sm_90
# (227 KB). Configs are pruned against the smaller, so every config runs on both (scripts/aot_triton.py
# checks the compiled kernels against each target's own limit).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SHARED_MEMORY_BUDGET = min(SHARED_MEMORY_LIMIT.values())

# FASTJAC_TRITON_CONFIGS=first: every GEMM kernel keeps one config, the first its pruning keeps, so it is
# not autotuned and each variant compiles once. For the test suite on a GPU host (tests/conftest.py sets
# it): on the first GPU run every worker compiled every config of every kernel it met (~24 s per worker
# before its first Triton test). Benchmarks and users autotune over every config.
FIRST_CONFIG_ONLY = os.environ.get("FASTJAC_TRITON_CONFIGS") == "first"

# Programs a launch off a GPU aims for (the interpreter on the CPU, meta tensors): no SMs to fill, so
# reductions stay whole. Module-level so tests can raise it to exercise the split reductions.
PROGRAMS_OFF_GPU = 1


def gpu_configs(table) -> list:
    """triton.Config objects of a table [(block sizes dict, num_warps, num_stages)]."""
    return [triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in table]


def configs(gpu, interpreted) -> list:
    """Autotune configs: the ``gpu`` table on a GPU, only ``interpreted`` (a block sizes dict) under the
    interpreter, where autotuning would only burn minutes."""
    if INTERPRET:
        return [triton.Config(interpreted, num_warps=1, num_stages=1)]
    return gpu_configs(gpu)


# Elementwise kernels (one BLOCK of a flat dimension per program).
ELEMENTWISE_CONFIGS = dict(gpu=[({"BLOCK": 512}, 4, 1), ({"BLOCK": 1024}, 4, 1), ({"BLOCK": 2048}, 8, 1)],
                           interpreted={"BLOCK": 64})


def bucket(n: int) -> int:
    """Autotune key of a size that changes with the batch (the last partial batch, evaluation): the next
    power of two, so a new batch size re-tunes only when it crosses one (a few seconds on a GPU). The
    kernels take these keys as arguments they never read, declared ``do_not_specialize`` so that they do
    not multiply the compiled variants."""
    return triton.next_power_of_2(max(int(n), 1))


def acc_dtype(dtype: torch.dtype):
    """Accumulator dtype for inputs of ``dtype``: float64 stays float64, everything else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def is_float64(meta: dict) -> bool:
    """Whether a launch's constexprs (autotune pruning kwargs) say float64 (its ``ACC``)."""
    return meta.get("ACC") == tl.float64


def torch_matmul_allows_tf32() -> bool:
    """Whether torch lets float32 CUDA matmuls use TF32, read without the legacy ``allow_tf32`` flag (which
    raises in torch >= 2.9 once the ``fp32_precision`` API has been used): the CUDA matmul setting, else
    the global one, else (neither set through the new API) ``torch.get_float32_matmul_precision()``."""
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:  # a torch before the fp32_precision API
        return torch.get_float32_matmul_precision() != "highest"
    if matmul == "none":  # "none" inherits the global setting
        matmul = getattr(torch.backends, "fp32_precision", "none")
    if matmul == "none":
        return torch.get_float32_matmul_precision() != "highest"
    return matmul == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the GEMM kernels' ``tl.dot`` for ``dtype`` operands.

    Policy: float32 GEMMs follow torch's own setting for CUDA matmuls. By default (torch's "highest" /
    "ieee") they run in IEEE float32, so a Triton GEMM and an ATen GEMM have errors of one size: the tests'
    float32 tolerances (a small multiple of L * eps32 for a sum of L products) assume this. A user who
    allows TF32 for torch's matmuls gets TF32 here too (inputs rounded to 10 mantissa bits: errors ~1e-3
    relative, which those tolerances do not cover). float64 operands ignore the precision (always IEEE);
    "tf32", Triton's default, is passed for them so that one compiled variant serves both settings.
    """
    if dtype == torch.float32 and not torch_matmul_allows_tf32():
        return "ieee"
    return "tf32"


# Registers per thread (of 255) that a GEMM config's accumulator and one stage of its dot operands may
# take (``tile_registers``). Set from the full matrix of scripts/aot_triton.py (triton 3.9, sm_80 and
# sm_90): IEEE float32 and float64 dots run on FMA units, and configs above ~72 spilled hundreds of
# bytes to kilobytes per thread on sm_80 (e.g. a 256 x 64 accumulator on 8 warps: 7.5 KB), while those
# kept spill at most a few dozen bytes. A heuristic from those compiles, not a measured speed.
MAX_TILE_REGISTERS = 72


def shared_memory_bytes(config, meta: dict, tile_elements) -> int:
    """Estimated shared memory of a GEMM config: ``tile_elements(params)`` elements of one pipeline stage's
    ``tl.dot`` operand tiles (params: the launch's constexprs and the config's block sizes), 8 bytes each
    for float64 and 4 otherwise, times the pipeline stages (an upper bound of what triton 3.9 allocated
    in scripts/aot_triton.py: 1.5 to 2.7 stages' worth)."""
    size = 8 if is_float64(meta) else 4
    return tile_elements({**meta, **config.kwargs}) * size * max(config.num_stages, 1)


def tile_registers(config, meta: dict, tile_elements, acc_elements) -> int:
    """32-bit registers per thread of a config's accumulator (``acc_elements(params)``) and one stage of
    its operand tiles, spread over the program's threads; float64 elements take two."""
    params = {**meta, **config.kwargs}
    per_element = 2 if is_float64(meta) else 1
    return (acc_elements(params) + tile_elements(params)) * per_element // (32 * config.num_warps)


def budget_pruner(*, tile_elements, acc_elements):
    """An ``early_config_prune`` for a GEMM kernel: it keeps the configs within ``MAX_TILE_REGISTERS`` and
    ``SHARED_MEMORY_BUDGET`` (the estimates above, from ``tile_elements(params)`` and
    ``acc_elements(params)``), or the cheapest config when none is."""

    def prune(candidates, named_args, **meta):
        def cost(config):
            return (tile_registers(config, meta, tile_elements, acc_elements),
                    shared_memory_bytes(config, meta, tile_elements))

        kept = [config for config in candidates
                if cost(config)[0] <= MAX_TILE_REGISTERS and cost(config)[1] <= SHARED_MEMORY_BUDGET]
        kept = kept or [min(candidates, key=cost)]
        return kept[:1] if FIRST_CONFIG_ONLY else kept

    return prune


def launch_device(*tensors) -> contextlib.AbstractContextManager:
    """Context to launch a kernel on the tensors' device (not the current one: a ``cuda:1`` tensor while
    ``cuda:0`` is current). All tensors (None skipped) must share one device: CUDA, the CPU under
    TRITON_INTERPRET=1, or ``meta`` (nothing runs: scripts/aot_triton.py records the launches)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise RuntimeError(f"fastjac.kernels: tensors on devices {sorted(map(str, devices))}; "
                           "a Triton launch needs all of them on one")
    device = devices.pop()
    if device.type == "cuda":
        return torch.cuda.device(device)
    if device.type == "meta" or (device.type == "cpu" and INTERPRET):
        return contextlib.nullcontext()
    raise RuntimeError(f"fastjac.kernels: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU), "
                       f"got device {device}")


@functools.cache
def _streaming_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_to_fill(device: torch.device) -> int:
    """Programs a launch on ``device`` should have to keep every SM busy: two per SM on a GPU (one
    waits on memory while the other computes); ``PROGRAMS_OFF_GPU`` elsewhere."""
    if device.type == "cuda":
        return 2 * _streaming_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return PROGRAMS_OFF_GPU


def reduction_splits(device: torch.device, programs: int, length: int, min_chunk: int) -> int:
    """Into how many chunks a reduction of ``length`` terms is split so that ``programs`` programs (the
    launch without a split) become enough to fill ``device``; every chunk keeps >= ``min_chunk`` terms
    so that the partial sums (one per chunk, summed by the launcher) stay a small extra traffic."""
    wanted = triton.cdiv(programs_to_fill(device), max(programs, 1))
    return max(1, min(wanted, length // max(min_chunk, 1)))
