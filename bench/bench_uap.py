"""One SGD-UAP iteration (one batch of B = 128) for K perturbations: fastjac's ``sgd_uap`` on every
backend against the common implementation (K sequential attacks, parameter gradients formed too)."""
import pytest

from fastjac.benchmark import ARCHS, MEMBERS, UAP_KS, CaseSpec, bench_backends

BACKENDS = bench_backends("cpu")  # every available backend but Triton (an interpreter on the CPU)


@pytest.mark.parametrize("k", UAP_KS)
@pytest.mark.parametrize("members", MEMBERS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_uap_fastjac(run_case, arch, members, k, backend):
    run_case(CaseSpec("uap", arch, members, backend, k=k))


@pytest.mark.parametrize("k", UAP_KS)
@pytest.mark.parametrize("members", MEMBERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_uap_common(run_case, arch, members, k):
    run_case(CaseSpec("uap_common", arch, members, k=k))
