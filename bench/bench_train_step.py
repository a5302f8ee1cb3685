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


def test_flop_counts():
    """The FLOP model the table's GFLOP/s rest on (``fastjac.benchmark.step_flops``) matches DESIGN.md:
    jvp = 2 x a plain step, vjp = 2.33 x for 784-256-256-10, and the shapes counted from the modules."""
    from fastjac import models
    from fastjac.benchmark import layer_macs, mlp_forward_flops, step_flops

    macs = layer_macs(models.mlp())
    assert 2 * 128 * sum(macs) == mlp_forward_flops([784, 256, 256, 10], 128)
    plain = step_flops("plain", macs, 128)
    assert step_flops("jr_jvp", macs, 128) == 2 * plain
    assert abs(step_flops("jr_vjp", macs, 128) / plain - 2.33) < 0.005
    assert step_flops("uap_common", macs, 128, k=4) * 2 == step_flops("uap", macs, 128, k=4) * 3
    assert layer_macs(models.lenet()) == [6 * 28 * 28 * 25, 16 * 10 * 10 * 6 * 25, 400 * 120, 120 * 84, 84 * 10]
