"""fastjac.train on real Fashion-MNIST: checkpoint/resume reproducibility, member data modes, both JR
targets and modes, input errors, and that JR really lowers the Jacobian norm."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastjac import Ensemble, jacobian_penalty, models, reference, train
from fastjac.train import epoch_generator, projection_generator
from tests.helpers import assert_close


pytestmark = pytest.mark.usefixtures("one_thread")


def small_ensemble(seed, members=2, hidden=(16,)):
    torch.manual_seed(seed)
    return Ensemble([models.mlp(hidden=hidden) for _ in range(members)])


def stacked(ensemble):
    return {name: p.detach().clone() for name, p in ensemble.params().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        # the resumed run replays the same float operations; 1e-6 only allows for a different summation
        # order inside BLAS between two processes' thread layouts (never hit in practice: torch.equal holds)
        assert torch.equal(a[name], b[name]) or torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


RESUME_SETTINGS = dict(batch_size=64, lr=1e-3, jr_lambda=[0.1, 0.0], jr_mode="vjp", seed=3, progress=False)


# --------------------------------------------------------------------------------------------- resume
def test_resume_from_checkpoint_matches_uninterrupted_run(fashion, tmp_path):
    x, y = fashion[0][:512], fashion[1][:512]
    checkpoint_a, checkpoint_b = tmp_path / "a.pt", tmp_path / "b.pt"

    uninterrupted = small_ensemble(seed=0)
    result_a = train(uninterrupted, (x, y), epochs=2, checkpoint=checkpoint_a, **RESUME_SETTINGS)
    assert [epoch["epoch"] for epoch in result_a.history] == [1, 2]

    first_half = small_ensemble(seed=0)
    train(first_half, (x, y), epochs=1, checkpoint=checkpoint_b, **RESUME_SETTINGS)
    # a fresh ensemble with other initial weights: everything must come from the checkpoint
    resumed = small_ensemble(seed=123)
    with pytest.warns(UserWarning, match="written by a run of 1 epochs, this run trains to epoch 2"):
        result_b = train(resumed, (x, y), epochs=2, checkpoint=checkpoint_b, **RESUME_SETTINGS)
    assert [epoch["epoch"] for epoch in result_b.history] == [1, 2]
    assert result_b.history[0]["loss"] == result_a.history[0]["loss"]

    assert_same_weights(stacked(resumed), stacked(uninterrupted))
    assert not resumed.training, "train() leaves the model in eval mode"

    # a finished run resumed with the same epochs does no more work
    again = small_ensemble(seed=7)
    train(again, (x, y), epochs=2, checkpoint=checkpoint_a, **RESUME_SETTINGS)
    assert_same_weights(stacked(again), stacked(uninterrupted))


def test_checkpoint_from_other_settings_raises(fashion, tmp_path):
    x, y = fashion[0][:128], fashion[1][:128]
    checkpoint = tmp_path / "c.pt"
    train(small_ensemble(0), (x, y), epochs=1, checkpoint=checkpoint, **RESUME_SETTINGS)
    for change in (dict(lr=2e-3), dict(jr_lambda=[0.1, 0.1]), dict(seed=4), dict(jr_mode="jvp")):
        settings = {**RESUME_SETTINGS, **change}
        with pytest.raises(ValueError, match="other settings"):
            train(small_ensemble(0), (x, y), epochs=2, checkpoint=checkpoint, **settings)
    with pytest.raises(ValueError, match="other settings"):  # other data size
        train(small_ensemble(0), (x[:64], y[:64]), epochs=2, checkpoint=checkpoint, **RESUME_SETTINGS)


def test_checkpoint_loads_with_weights_only(fashion, tmp_path):
    x, y = fashion[0][:128], fashion[1][:128]
    checkpoint = tmp_path / "w.pt"
    ensemble = small_ensemble(0)
    train(ensemble, (x, y), epochs=1, checkpoint=checkpoint, **RESUME_SETTINGS)
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 1
    fresh = small_ensemble(5)
    fresh.load_state_dict(state["model"])
    assert_same_weights(stacked(fresh), stacked(ensemble))
    assert not list(tmp_path.glob(".*.tmp")), "atomic save leaves no temporary file behind"


# ---------------------------------------------------------------------------------------- member data
def test_independent_member_data_gives_each_member_its_own_batches(fashion):
    """Two members that start identical stay identical when they see the same batches (shared data, the
    same projection for every member) and drift apart with independent shuffles."""
    x, y = fashion[0][:512], fashion[1][:512]
    torch.manual_seed(0)
    twin = models.mlp(hidden=(16,))
    settings = dict(epochs=1, batch_size=64, lr=1e-3, jr_lambda=0.1, seed=1, progress=False)

    shared = Ensemble([copy.deepcopy(twin), copy.deepcopy(twin)])
    train(shared, (x, y), member_data="shared", **settings)
    independent = Ensemble([copy.deepcopy(twin), copy.deepcopy(twin)])
    train(independent, (x, y), member_data="independent", **settings)

    for name, p in shared.params().items():
        # same data, same weights: the two member rows compute the same numbers (float32 GEMM blocking may
        # differ between rows at the last bit; 1e-5 is ~100 ulps of O(0.1) weights after 8 Adam steps)
        assert torch.allclose(p[0], p[1], rtol=0, atol=1e-5), f"shared members diverged at {name}"
    first = independent.params()["1.weight"]
    assert (first[0] - first[1]).abs().max() > 1e-3, "independent members saw the same batches"
    assert (first - shared.params()["1.weight"]).abs().max() > 1e-3, "independent run equals the shared one"
    for p in independent.params().values():
        assert torch.isfinite(p).all()


def test_independent_member_data_needs_an_ensemble(fashion):
    x, y = fashion[0][:64], fashion[1][:64]
    with pytest.raises(ValueError, match="member_data='independent' needs an Ensemble"):
        train(models.mlp(hidden=(8,)), (x, y), epochs=1, member_data="independent", progress=False)


# --------------------------------------------------------------------------------------- targets, modes
@pytest.mark.parametrize("jr_target, jr_mode", [("ensemble", "vjp"), ("members", "jvp"), ("ensemble", "jvp")])
def test_targets_and_modes_decrease_the_loss(fashion, jr_target, jr_mode):
    x, y = fashion[0][:1024], fashion[1][:1024]
    ensemble = small_ensemble(0)
    result = train(ensemble, (x, y), epochs=3, batch_size=64, lr=1e-3, jr_lambda=0.1, jr_target=jr_target,
                   jr_mode=jr_mode, seed=0, progress=False)
    losses = [epoch["loss"] for epoch in result.history]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[0], losses
    assert all(epoch["penalty"] > 0 for epoch in result.history)


# ------------------------------------------------------------------------------------- the loss itself
@pytest.mark.parametrize("jr_target, jr_mode, jr_lambda", [("members", "vjp", [0.3, 0.0]), ("members", "jvp", [0.2, 0.5]),
                                                           ("ensemble", "vjp", 0.3), ("ensemble", "jvp", 0.3)])
def test_steps_equal_manual_adam_on_the_design_loss(fashion, jr_target, jr_mode, jr_lambda):
    """Three Adam steps of train() equal three steps of a hand-written loop on the reference loss
    (DESIGN.md: members sum_m [CE(f_m) + lambda_m/2 ||J_m||^2]; ensemble CE(mean f) + lambda/2 ||J_ens||^2),
    with the same data order (the epoch's CPU generator) and projections (the epoch's projection generator
    on the data's device, one draw per batch). float64: the two sides differ only by rounding, and
    several Adam steps make the result depend on gradient magnitudes, not just signs."""
    x, y = fashion[0][:48].double(), fashion[1][:48]
    torch.manual_seed(0)
    members = [models.mlp(hidden=(7,)).double() for _ in range(2)]
    ensemble = Ensemble(copy.deepcopy(members))
    train(ensemble, (x, y), epochs=1, batch_size=16, lr=1e-2, jr_lambda=jr_lambda, jr_target=jr_target,
          jr_mode=jr_mode, nproj=2, seed=5, progress=False)

    params = [p for member in members for p in member.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    order = torch.randperm(48, generator=epoch_generator(5, 0))
    g = projection_generator(5, 0, x.device)
    estimator = reference.penalty_vjp if jr_mode == "vjp" else reference.penalty_jvp
    for start in range(0, 48, 16):
        bx, by = x[order[start:start + 16]], y[order[start:start + 16]]
        if jr_mode == "vjp":
            projections = reference.sphere_projections(2, 16, 10, generator=g, dtype=torch.float64)
        else:
            projections = reference.gaussian_projections(2, bx.shape, generator=g, dtype=torch.float64)
        if jr_target == "members":
            loss = sum(F.cross_entropy(m(bx), by) + lam / 2 * estimator(m, bx, projections)
                       for m, lam in zip(members, jr_lambda))
        else:
            f = reference.ensemble_model(members)
            loss = F.cross_entropy(f(bx), by) + jr_lambda / 2 * estimator(f, bx, projections)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, stacked_param in ensemble.params().items():
        expected = torch.stack([dict(m.named_parameters())[name].detach() for m in members])
        # Adam divides by sqrt(v): a rounding-level gradient difference on a tiny gradient can move a
        # weight by up to ~lr * 1e-6 relative; 1e-9 absolute is far below a wrong term (~lr = 1e-2)
        assert_close(stacked_param, expected, rtol=1e-9, atol=1e-9, name=f"{jr_target}/{jr_mode} {name}")


# ----------------------------------------------------------------------------------------- bad inputs
def _data(fashion, n=64):
    return fashion[0][:n].clone(), fashion[1][:n].clone()


def test_nan_in_x_raises(fashion):
    x, y = _data(fashion)
    x[3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="data x contains NaN"):
        train(small_ensemble(0), (x, y), epochs=1, progress=False)


def test_float_labels_raise(fashion):
    x, y = _data(fashion)
    with pytest.raises(TypeError, match="data y must be an integer tensor"):
        train(small_ensemble(0), (x, y.float()), epochs=1, progress=False)


def test_label_shape_mismatch_raises(fashion):
    x, y = _data(fashion)
    with pytest.raises(ValueError, match=r"data y must have shape \[64\]"):
        train(small_ensemble(0), (x, y[:63]), epochs=1, progress=False)


def test_nproj_zero_raises(fashion):
    x, y = _data(fashion)
    with pytest.raises(ValueError, match="nproj must be >= 1"):
        train(small_ensemble(0), (x, y), epochs=1, jr_lambda=0.1, nproj=0, progress=False)


def test_negative_jr_lambda_raises(fashion):
    x, y = _data(fashion)
    with pytest.raises(ValueError, match="jr_lambda values must be finite and >= 0"):
        train(small_ensemble(0), (x, y), epochs=1, jr_lambda=-0.1, progress=False)
    with pytest.raises(ValueError, match="jr_lambda values must be finite and >= 0"):
        train(small_ensemble(0), (x, y), epochs=1, jr_lambda=[0.1, -1.0], progress=False)


def test_jr_lambda_list_of_wrong_length_raises(fashion):
    x, y = _data(fashion)
    with pytest.raises(ValueError, match="jr_lambda has 3 values for 2 members"):
        train(small_ensemble(0), (x, y), epochs=1, jr_lambda=[0.1, 0.1, 0.1], progress=False)


def test_ensemble_target_with_lambda_list_raises(fashion):
    x, y = _data(fashion)
    with pytest.raises(ValueError, match="jr_target='ensemble' takes one jr_lambda"):
        train(small_ensemble(0), (x, y), epochs=1, jr_lambda=[0.1, 0.2], jr_target="ensemble", progress=False)


def test_unknown_target_and_mode_raise(fashion):
    x, y = _data(fashion)
    with pytest.raises(ValueError, match="jr_target must be one of"):
        train(small_ensemble(0), (x, y), epochs=1, jr_target="member", progress=False)
    with pytest.raises(ValueError, match="jr_mode must be one of"):
        train(small_ensemble(0), (x, y), epochs=1, jr_mode="fd", progress=False)


def test_bad_inputs_leave_the_model_untouched(fashion):
    x, y = _data(fashion)
    ensemble = small_ensemble(0)
    before = stacked(ensemble)
    with pytest.raises(ValueError):
        train(ensemble, (x, y), epochs=1, jr_lambda=[0.1], progress=False)
    assert_same_weights(stacked(ensemble), before)


# -------------------------------------------------------------------------------------- JR does its job
def test_jr_lowers_the_exact_jacobian_norm(fashion):
    x, y, x_test, _ = fashion
    data = (x[:1024], y[:1024])
    torch.manual_seed(0)
    init = models.mlp(hidden=(32,))
    plain, regularized = copy.deepcopy(init), copy.deepcopy(init)
    settings = dict(epochs=2, batch_size=64, lr=1e-3, seed=0, progress=False)
    train(plain, data, jr_lambda=0.0, **settings)
    train(regularized, data, jr_lambda=1.0, **settings)
    probe = x_test[:64]
    penalty_plain = jacobian_penalty(plain, probe, mode="exact").item()
    penalty_reg = jacobian_penalty(regularized, probe, mode="exact").item()
    # JR with lambda = 1 is a strong pull on ||J||^2 (its gradient is O(1) against CE's); a factor 2 is a
    # conservative margin for 32 Adam steps
    assert penalty_reg < 0.5 * penalty_plain, (penalty_reg, penalty_plain)
