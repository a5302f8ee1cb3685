"""Ensemble inference under no_grad (B = 128): the stacked engine on every backend, a loop over the
members, and torch.func's stack_module_state + functional_call + vmap."""
import pytest

from fastjac.benchmark import ARCHS, MEMBERS, CaseSpec, bench_backends

BACKENDS = bench_backends("cpu")  # every available backend but Triton (an interpreter on the CPU)


@pytest.mark.parametrize("members", MEMBERS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_inference_stacked(run_case, arch, members, backend):
    run_case(CaseSpec("infer_stacked", arch, members, backend))


@pytest.mark.parametrize("members", MEMBERS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["infer_loop", "infer_vmap"])
def test_inference_baseline(run_case, arch, members, kind):
    run_case(CaseSpec(kind, arch, members))
