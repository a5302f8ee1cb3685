"""One SGD-UAP iteration (one batch of B = 128) for K perturbations: fastjac's ``sgd_uap`` against the
common implementation (K sequential attacks, parameter gradients formed too)."""
import pytest

from bench.suite import case_params


@pytest.mark.parametrize("spec", case_params({"uap", "uap_common"}))
def test_uap(run_case, spec):
    run_case(spec)
