"""fastjac/memory.py: glibc's malloc kept from returning freed blocks to the OS (page faults each step), the
switch, and that the command line and the benchmark set it."""
import subprocess
import sys
import textwrap

import pytest

from fastjac import benchmark, cli, memory

# eight 4 MiB blocks allocated and freed per step, after malloc was told to return every freed block over
# 128 KiB to the OS at once (what glibc's adaptive thresholds end up doing for some allocation orders,
# here made certain, so that the control faults whatever the process allocated before): each step faults
# their pages in again, unless keep_freed_memory() has set the thresholds since
FAULTS_PER_STEP = textwrap.dedent("""
    import ctypes, resource, sys, torch, fastjac
    libc = ctypes.CDLL(None)
    assert libc.mallopt(-1, 0) and libc.mallopt(-3, 128 << 10)  # M_TRIM_THRESHOLD 0, M_MMAP_THRESHOLD 128 KiB
    if sys.argv[1] == "keep":
        assert fastjac.keep_freed_memory()
    def step():
        blocks = [torch.ones(1 << 20) for _ in range(8)]
        del blocks
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
""")


def _faults_per_step(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(memory.platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_freed_blocks_are_not_faulted_in_again():
    pages = 8 * (4 << 20) // 4096
    assert _faults_per_step("control") >= pages // 2, "the control should fault its blocks in every step"
    assert _faults_per_step("keep") < pages // 20, "keep_freed_memory left glibc returning the blocks"


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_sets_both_thresholds(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delenv(memory.ENV, raising=False)
    assert memory.keep_freed_memory()
    assert libc.calls == [(memory.M_MMAP_THRESHOLD, 32 << 20), (memory.M_TRIM_THRESHOLD, 1 << 30)]


@pytest.mark.parametrize("env,libc_name", [("0", "glibc"), (None, "musl"), (None, "")])
def test_left_alone_when_turned_off_or_not_glibc(monkeypatch, env, libc_name):
    libc = FakeLibc()
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: (libc_name, "1"))
    if env is None:
        monkeypatch.delenv(memory.ENV, raising=False)
    else:
        monkeypatch.setenv(memory.ENV, env)
    assert not memory.keep_freed_memory()
    assert libc.calls == []


def test_command_line_and_benchmark_keep_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["evaluate", "--model", str(tmp_path / "missing.pt")]) == 2  # fails after the setting
    assert calls == [1]
    monkeypatch.setattr(benchmark, "run_table", lambda *a, **k: [])
    parser = benchmark.make_parser("bench")
    benchmark.run_from_args(parser, parser.parse_args(["--arch", "mlp"]), ["--arch", "mlp"])
    assert calls == [1, 1]
