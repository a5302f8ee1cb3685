"""Training steps (forward, loss, backward, Adam step; B = 128, nproj = 1): the plain stacked step, the JR
steps (vjp and jvp) on every backend, the reference JR step and the plain loop over members."""
import pytest

from fastjac.benchmark import ARCHS, MEMBERS, CaseSpec, bench_backends

BACKENDS = bench_backends("cpu")  # every available backend but Triton (an interpreter on the CPU)


@pytest.mark.parametrize("members", MEMBERS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_plain_stacked_step(run_case, arch, members, backend):
    run_case(CaseSpec("plain", arch, members, backend))


@pytest.mark.parametrize("members", MEMBERS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_jr_step(run_case, arch, members, backend, mode):
    run_case(CaseSpec(f"jr_{mode}", arch, members, backend))


@pytest.mark.parametrize("members", MEMBERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_reference_jr_step(run_case, arch, members):
    run_case(CaseSpec("reference_jr", arch, members))


@pytest.mark.parametrize("members", MEMBERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_plain_loop_step(run_case, arch, members):
    run_case(CaseSpec("loop", arch, members))
