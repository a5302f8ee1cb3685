"""Ensemble inference under no_grad (B = 128): the stacked engine on every backend, a loop over the
members, and torch.func's stack_module_state + functional_call + vmap."""
import pytest

from bench.suite import case_params


@pytest.mark.parametrize("spec", case_params({"infer_stacked", "infer_loop", "infer_vmap"}))
def test_inference(run_case, spec):
    run_case(spec)
