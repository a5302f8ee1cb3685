"""CPU memory: keep freed blocks in the process for reuse instead of returning them to the OS.

PyTorch's CPU tensors come from the C library's malloc. glibc's malloc hands large blocks back to the OS
(munmap, and trimming the heap's top) under thresholds it adapts as it goes, and a training step that
frees and reallocates activations of several MB can then fault every page of them in again, each step:
ResNet-8, M = 5, B = 128, this project's 2-core CPU, the stacked plain step took 45,000 minor page faults
per step (68 ms of system time, ~15% of the step) where the loop of members, whose allocation pattern
happened to suit the thresholds, took none; with the thresholds fixed high, neither faults and the
stacked step was 0.96x the loop's time instead of 1.10-1.17x (bench/RESULTS.md). This is PyTorch's own
CPU tuning advice (a caching allocator such as jemalloc or tcmalloc, or these glibc settings).

``keep_freed_memory()`` sets them for the process: blocks up to 32 MiB (glibc's largest mmap threshold)
come from the heap, and the heap is trimmed only when 1 GiB lies free at its top. The process then holds
on to its peak memory. fastjac's command line and its benchmark call it (every row of a table shares the
setting); a program of the user's may call it too. ``FASTJAC_KEEP_FREED_MEMORY=0`` turns it off. Off glibc
(macOS, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("fastjac.memory")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit systems
TRIM_THRESHOLD = 1 << 30
ENV = "FASTJAC_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds as described above; True where they were set (glibc, not turned off)."""
    if os.environ.get(ENV, "1") == "0":
        log.debug("malloc thresholds left alone: %s=0", ENV)
        return False
    if platform.libc_ver()[0] != "glibc":
        log.debug("malloc thresholds left alone: not glibc")
        return False
    libc = ctypes.CDLL(None)
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
    log.debug("malloc thresholds set: %s", applied)
    return applied
