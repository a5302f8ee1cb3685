"""fastjac.reference: the oracle every fast path is tested against, checked here against torch.func /
torch.autograd built by hand, and checked for the statistical property the method rests on
(both random-projection estimators are unbiased for ||J||_F^2).

Everything numerical runs in float64, so "equal" means equal up to float64 rounding of sums of at most
a few thousand terms: rtol 1e-10 is ~1e5 * eps64 (eps64 = 2.2e-16), generous for that and still far below
any real error (a wrong factor, a missing term, a wrong projection scale are all O(1) relative).
"""
import pytest
import torch
import torch.nn.functional as F

import fastjac
from fastjac import models, reference
from tests.helpers import assert_close

F64 = torch.float64
RTOL64 = 1e-10  # see the module docstring
CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mlp(seed=0, in_features=12, hidden=(9, 7), classes=CLASSES):
    """An odd-width float64 MLP whose ReLUs are not all dead on rand inputs (checked by the callers'
    nonzero-exact-value asserts)."""
    torch.manual_seed(seed)
    return models.mlp(hidden=hidden, num_classes=classes, in_features=in_features).to(F64)


def tiny_lenet(seed=0):
    torch.manual_seed(seed + 1)  # seed 0 happens to kill every ReLU of this tiny net
    return models.lenet(channels=(2, 3), hidden=(5,), num_classes=CLASSES).to(F64)


def hand_exact(f, x):
    """mean_b ||J(x_b)||_F^2 from torch.autograd.functional.jacobian, one sample at a time (a different
    implementation from reference.penalty_exact's vmap(jacrev)); create_graph for parameter gradients."""
    total = x.new_zeros(())
    for sample in x:
        jac = torch.autograd.functional.jacobian(lambda s: f(s.unsqueeze(0)).squeeze(0), sample, create_graph=True)
        total = total + jac.pow(2).sum()
    return total / x.shape[0]


def param_grads(value, module):
    return torch.autograd.grad(value, list(module.parameters()), allow_unused=True)


def assert_grads_close(actual, expected, name):
    """Compare two tuples of parameter gradients; None (a parameter the value does not depend on, e.g.
    the last layer's bias for a Jacobian) counts as zeros."""
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        if a is None and e is None:
            continue
        a = torch.zeros_like(e) if a is None else a
        e = torch.zeros_like(a) if e is None else e
        # atol scaled by the tensor's largest gradient: elements that are exactly 0 in exact arithmetic
        # (dead units) come out as rounding noise of the other terms' size.
        assert_close(a, e, rtol=RTOL64, atol=RTOL64 * float(e.abs().max()) + 1e-300, name=f"{name} grad {index}")


def flat_jacobians(f, x):
    """Per-sample Jacobians [B, C, D] (D = prod(input)) by jacrev: the exact operator the estimators see."""
    jac = torch.func.vmap(torch.func.jacrev(lambda s: f(s.unsqueeze(0)).squeeze(0)))(x)
    return jac.reshape(x.shape[0], jac.shape[1], -1).detach()


# ------------------------------------------------------------------------------------------ exact mode
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_exact_matches_hand_built_jacobian_values_and_grads(arch):
    f = tiny_mlp() if arch == "mlp" else tiny_lenet()
    x = torch.rand(3, 12, dtype=F64) if arch == "mlp" else torch.rand(2, 1, 28, 28, dtype=F64)
    exact = reference.penalty_exact(f, x)
    hand = hand_exact(f, x)
    assert hand.item() > 0, "degenerate model: all-zero Jacobian tests nothing"
    assert_close(exact, hand, rtol=RTOL64, atol=0, name="penalty_exact")
    assert_grads_close(param_grads(exact, f), param_grads(hand, f), "penalty_exact")


@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_vjp_basis_equals_exact_values_and_grads(arch):
    """v=None uses the C basis vectors: sum_c ||e_c^T J||^2 = ||J||_F^2 exactly (no factor C)."""
    f = tiny_mlp() if arch == "mlp" else tiny_lenet()
    x = torch.rand(3, 12, dtype=F64) if arch == "mlp" else torch.rand(2, 1, 28, 28, dtype=F64)
    basis = reference.penalty_vjp(f, x, None)
    exact = reference.penalty_exact(f, x)
    assert exact.item() > 0
    assert_close(basis, exact, rtol=RTOL64, atol=0, name="penalty_vjp(None)")
    assert_grads_close(param_grads(basis, f), param_grads(exact, f), "penalty_vjp(None)")


# -------------------------------------------------------------------------------- explicit projections
def test_vjp_explicit_projection_matches_manual():
    f, x = tiny_mlp(), torch.rand(3, 12, dtype=F64)
    g = torch.Generator().manual_seed(5)
    v = reference.sphere_projections(1, 3, CLASSES, generator=g, dtype=F64)
    assert_close(v.norm(dim=-1), torch.ones(1, 3, dtype=F64), rtol=0, atol=1e-14, name="unit rows")
    first = reference.penalty_vjp(f, x, v)

    # manual: C * ||v^T J||^2 averaged over the batch, v^T J by one autograd.grad with v as grad_outputs
    xg = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(f(xg), xg, v[0], create_graph=True)
    manual = CLASSES * vjp.pow(2).sum() / x.shape[0]
    assert_close(first, manual, rtol=RTOL64, atol=0, name="penalty_vjp(v)")
    assert_grads_close(param_grads(first, f), param_grads(manual, f), "penalty_vjp(v)")


def test_jvp_explicit_projection_matches_manual():
    f, x = tiny_mlp(), torch.rand(3, 12, dtype=F64)
    g = torch.Generator().manual_seed(6)
    u = reference.gaussian_projections(1, x.shape, generator=g, dtype=F64)
    assert u.shape == (1, 3, 12)
    first = reference.penalty_jvp(f, x, u)

    # manual: ||J u||^2 averaged over the batch, J u by torch.autograd.functional.jvp (the double-backward
    # trick, independent of torch.func's forward mode used by the reference)
    _, ju = torch.autograd.functional.jvp(f, x, u[0], create_graph=True)
    manual = ju.pow(2).sum() / x.shape[0]
    assert_close(first, manual, rtol=RTOL64, atol=0, name="penalty_jvp(u)")
    assert_grads_close(param_grads(first, f), param_grads(manual, f), "penalty_jvp(u)")


def test_nproj_averages_single_projection_values():
    """nproj > 1 is the mean of the nproj single-projection estimates (not their sum)."""
    f, x = tiny_mlp(), torch.rand(2, 12, dtype=F64)
    g = torch.Generator().manual_seed(7)
    v = reference.sphere_projections(3, 2, CLASSES, generator=g, dtype=F64)
    u = reference.gaussian_projections(3, x.shape, generator=g, dtype=F64)
    for name, fn, p in (("vjp", reference.penalty_vjp, v), ("jvp", reference.penalty_jvp, u)):
        singles = torch.stack([fn(f, x, p[i:i + 1]) for i in range(3)])
        assert_close(fn(f, x, p), singles.mean(), rtol=RTOL64, atol=0, name=f"{name} nproj=3")


# ------------------------------------------------------------------------------------- unbiasedness
# 4000 independent single-projection draws, vectorized: 2 base samples repeated 250 times (B = 500, each
# row its own independent projection) and nproj = 8 in one call, so the call's value is the mean of
# 8 * 500 = 4000 independent nproj=1 estimates. Per-draw values come from the exact per-sample Jacobian and
# the same projections; their sample std / sqrt(n) is the estimator's own standard error. The assertion
# |mean - exact| < 4 * SE is a 4-sigma bound (false-alarm rate ~6e-5 under the CLT), seeded, so it is
# deterministic; a biased estimator (e.g. a missing factor C, or dividing by nproj twice) misses by
# hundreds of SEs.
REPEAT, NPROJ_DRAWS = 250, 8


def _unbiased_setup():
    f = tiny_mlp(seed=1)
    torch.manual_seed(11)
    base = torch.rand(2, 12, dtype=F64)
    x = base.repeat(REPEAT, 1)  # [500, 12]
    exact = reference.penalty_exact(f, base).item()
    assert exact > 0
    return f, base, x, exact


def _assert_within_4_sigma(mean, per_draw, exact, name):
    mean, n = float(mean), per_draw.numel()
    assert n == REPEAT * 2 * NPROJ_DRAWS
    se = float(per_draw.std()) / n ** 0.5
    assert se > 0
    assert abs(mean - exact) < 4 * se, f"{name}: mean {mean} vs exact {exact}: |diff| {abs(mean - exact):.3g} >= 4 SE {4 * se:.3g}"


def test_vjp_estimator_is_unbiased():
    f, _, x, exact = _unbiased_setup()
    g = torch.Generator().manual_seed(21)
    v = reference.sphere_projections(NPROJ_DRAWS, x.shape[0], CLASSES, generator=g, dtype=F64)
    mean = reference.penalty_vjp(f, x, v).detach()
    jac = flat_jacobians(f, x)  # [B, C, D]
    per_draw = CLASSES * torch.einsum("pbc,bcd->pbd", v, jac).pow(2).sum(-1)  # [P, B]
    # the per-draw values are the ones the reference averaged (guards the SE computation itself)
    assert_close(mean, per_draw.mean(), rtol=RTOL64, atol=0, name="per-draw mean")
    _assert_within_4_sigma(mean, per_draw, exact, "vjp")


def test_jvp_estimator_is_unbiased():
    f, _, x, exact = _unbiased_setup()
    g = torch.Generator().manual_seed(22)
    u = reference.gaussian_projections(NPROJ_DRAWS, x.shape, generator=g, dtype=F64)
    mean = reference.penalty_jvp(f, x, u).detach()
    jac = flat_jacobians(f, x)
    per_draw = torch.einsum("bcd,pbd->pbc", jac, u.reshape(NPROJ_DRAWS, x.shape[0], -1)).pow(2).sum(-1)
    assert_close(mean, per_draw.mean(), rtol=RTOL64, atol=0, name="per-draw mean")
    _assert_within_4_sigma(mean, per_draw, exact, "jvp")


# ------------------------------------------------------------------------------------------- SGD-UAP
@pytest.fixture(scope="module")
def trained_mlp():
    """A quickly trained float32 MLP on real Fashion-MNIST (1 epoch, 2000 images), plus held-out data."""
    x, y = fastjac.data.load("fashion-mnist", "train")
    x_test, y_test = fastjac.data.load("fashion-mnist", "test")
    torch.manual_seed(0)
    model = models.mlp(hidden=(32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for start in range(0, 2000, 100):
        loss = F.cross_entropy(model(x[start:start + 100]), y[start:start + 100])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    attack_batches = [(x[2000 + 50 * i:2050 + 50 * i], y[2000 + 50 * i:2050 + 50 * i]) for i in range(8)]
    return model, attack_batches, x_test[:500], y_test[:500]


def test_sgd_uap_untargeted_invariants(trained_mlp):
    model, batches, x_test, y_test = trained_mlp
    eps = 0.1
    delta, losses = reference.sgd_uap(model, batches, eps, epochs=2)
    assert delta.shape == (1, 28, 28)
    assert len(losses) == 2 * len(batches)
    # compared in delta's dtype: float32(0.1) is 0.1000000015, the clamp bound the attack really uses
    bound = torch.tensor(eps, dtype=delta.dtype)
    assert delta.abs().max() <= bound, "||delta||_inf must be <= eps"
    assert delta.abs().max() == bound, "sign steps of 0.8 eps reach the boundary"
    perturbed = torch.clamp(x_test + delta, 0.0, 1.0)
    assert float(perturbed.min()) >= 0.0 and float(perturbed.max()) <= 1.0
    # losses are mean(min(CE, beta)): in [0, beta]
    assert all(0.0 <= loss <= 12.0 for loss in losses)
    metrics = reference.evaluate(model, x_test, y_test, delta.unsqueeze(0))
    assert metrics["uap_accuracy"][0] < metrics["clean_accuracy"], metrics


def test_sgd_uap_targeted_raises_target_rate(trained_mlp):
    model, batches, x_test, _ = trained_mlp
    target, eps = 3, 0.15
    delta, losses = reference.sgd_uap(model, batches, eps, epochs=3, target=target)
    assert delta.abs().max() <= torch.tensor(eps, dtype=delta.dtype)
    assert all(-12.0 <= loss <= 0.0 for loss in losses), "the targeted loss is a negated, clamped CE"
    with torch.no_grad():
        before = (model(x_test).argmax(1) == target).double().mean().item()
        after = (model(torch.clamp(x_test + delta, 0, 1)).argmax(1) == target).double().mean().item()
    # Class 3 is 10% of the test set; a working targeted UAP at eps=0.15 pushes many more images there.
    assert after > before + 0.1, f"target-class rate {before:.3f} -> {after:.3f}"


def test_uap_loss_definition():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 30.0, 0.0]], dtype=F64)
    y = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, y, reduction="none")
    assert float(ce[1]) > 12.0  # the second sample's CE is clamped at beta
    expected = (ce[0] + 12.0) / 2
    assert_close(reference.uap_loss(logits, y, 12.0, None), expected, rtol=1e-15, atol=0, name="untargeted")
    ce_t = F.cross_entropy(logits, torch.tensor([2, 2]), reduction="none").clamp(max=12.0)
    assert_close(reference.uap_loss(logits, y, 12.0, 2), -ce_t.mean(), rtol=1e-15, atol=0, name="targeted")


# ------------------------------------------------------------------------------------------- evaluate
class PixelClassifier(torch.nn.Module):
    """Predicts class floor(10 * x[:, 0, 0, 0]) (clamped to 0..9) with one-hot logits: every prediction, and
    so every metric, can be counted by hand. Inputs sit at 0.05 + 0.1 i and perturbations move them by
    multiples of 0.1, so no value comes near a class boundary."""

    def forward(self, x):
        classes = (10 * x[:, 0, 0, 0]).floor().clamp(0, 9).long()
        return F.one_hot(classes, 10).to(x.dtype)


def hand_counted_case(dtype=F64):
    """(x [10,1,28,28], y [10], delta [3,1,28,28], expected metrics) for PixelClassifier.

    Clean predictions are 0..9; y = [0,1,2,3,4,9,9,9,9,9]: 6 of 10 correct.
    delta 0 (+0.1 at the pixel): predictions 1..9,9 -> right only at i = 8, 9 (2/10); 9 of 10 change.
    delta 1 (-0.2): predictions 0,0,0,1,..,7 -> right only at i = 0 (1/10); 9 of 10 change.
    delta 2 (+0.3 on another pixel): nothing changes -> 6/10, no prediction changes."""
    x = torch.zeros(10, 1, 28, 28, dtype=dtype)
    x[:, 0, 0, 0] = 0.05 + 0.1 * torch.arange(10, dtype=dtype)
    y = torch.tensor([0, 1, 2, 3, 4, 9, 9, 9, 9, 9])
    delta = torch.zeros(3, 1, 28, 28, dtype=dtype)
    delta[0, 0, 0, 0], delta[1, 0, 0, 0], delta[2, 0, 5, 5] = 0.1, -0.2, 0.3
    expected = {"clean_accuracy": 0.6, "uap_accuracy": [0.2, 0.1, 0.6], "evasion_rate": [0.8, 0.9, 0.4],
                "fooling_rate": [0.9, 0.9, 0.0]}
    return x, y, delta, expected


def test_evaluate_counts_by_hand():
    x, y, delta, expected = hand_counted_case()
    metrics = reference.evaluate(PixelClassifier(), x, y, delta)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert reference.evaluate(PixelClassifier(), x, y)["uap_accuracy"] == []


def test_evaluate_on_a_trained_model(trained_mlp):
    model, batches, x_test, y_test = trained_mlp
    delta, _ = reference.sgd_uap(model, batches[:2], 0.1, epochs=1)
    metrics = reference.evaluate(model, x_test, y_test, torch.stack([torch.zeros_like(delta), delta]))
    # delta = 0: clamp(x, 0, 1) = x, so nothing changes
    assert metrics["fooling_rate"][0] == 0.0
    assert metrics["uap_accuracy"][0] == metrics["clean_accuracy"]
    assert 0.5 < metrics["clean_accuracy"] <= 1.0, "the fixture model should have learned something"
