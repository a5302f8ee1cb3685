"""The public one-pass API: ``jacobian_penalty(..., return_logits=True)`` gives the logits and the penalty
of ONE pass, equal to the separate calls (member_logits / the model, and the penalty alone)."""
import pytest
import torch

import fastjac
from fastjac import Ensemble, jacobian_penalty, models
from fastjac.jacobian import make_projections
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_return_logits_matches_separate_calls(mode, target, arch):
    build = (lambda: models.mlp(hidden=(7, 5))) if arch == "mlp" else (lambda: models.lenet((3, 4), (6, 5)))
    ensemble = Ensemble([build().to(F64) for _ in range(3)])
    x = torch.rand(4, 1, 28, 28, dtype=F64)
    projections = make_projections(mode, 2, x.shape, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    penalty, logits = jacobian_penalty(ensemble, x, mode=mode, target=target, projections=projections,
                                       return_logits=True)
    assert_close(logits, ensemble.member_logits(x), rtol=1e-12, atol=0, name="logits")
    assert_close(penalty, jacobian_penalty(ensemble, x, mode=mode, target=target, projections=projections),
                 rtol=1e-12, atol=0, name="penalty")


def test_return_logits_single_module_is_batch_by_classes():
    model = models.mlp(hidden=(7, 5)).to(F64)
    x = torch.rand(4, 1, 28, 28, dtype=F64)
    penalty, logits = jacobian_penalty(model, x, return_logits=True)
    assert penalty.shape == () and logits.shape == (4, 10)
    assert_close(logits, model(x), rtol=1e-12, atol=0, name="logits")


def test_bad_input_is_named_at_the_boundary():
    lenet = Ensemble([models.lenet() for _ in range(2)])
    with pytest.raises(ValueError, match=r"x has sample shape \[1, 32, 32\], which the model cannot take"):
        jacobian_penalty(lenet, torch.rand(3, 1, 32, 32))
    with pytest.raises(TypeError, match="x is float64 but the model's parameters are float32"):
        jacobian_penalty(lenet, torch.rand(3, 1, 28, 28, dtype=F64))
    with pytest.raises(ValueError, match="x contains NaN"):
        jacobian_penalty(lenet, torch.full((3, 1, 28, 28), float("nan")))
