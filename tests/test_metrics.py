"""fastjac.evaluate (batched over K perturbations, streamed in chunks) against fastjac.reference.evaluate."""
import copy

import pytest
import torch

import fastjac
from fastjac import Ensemble, models, reference
from tests.test_reference import PixelClassifier, hand_counted_case

F64 = torch.float64
N, CHUNK = 50, 7  # 7 < 50 and does not divide it: the last chunk is short (50 = 7 * 7 + 1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def test_images():
    """N real test images, float64 (tests that need float32 convert)."""
    x, y = fastjac.data.load("fashion-mnist", "test")
    return x[:N].double(), y[:N]


@pytest.fixture(scope="module")
def trained():
    """Quickly trained float32 models (1 epoch, 2000 real images): untrained ones predict one class for
    everything and no perturbation changes a prediction, which would test nothing."""
    x, y = fastjac.data.load("fashion-mnist", "train")
    torch.manual_seed(0)
    result = {"single": models.mlp(hidden=(13,)),
              "mlp": Ensemble([models.mlp(hidden=(13, 7)) for _ in range(3)]),
              "lenet": Ensemble([models.lenet(channels=(3, 4), hidden=(6,)) for _ in range(3)])}
    for model in result.values():
        fastjac.train(model, (x[:2000], y[:2000]), epochs=1, batch_size=100, lr=3e-3, progress=False)
    return result


def make_model(trained, kind, dtype):
    """(model under test, reference function computing the same logits from unstacked members)."""
    if kind == "single":
        model = copy.deepcopy(trained[kind]).to(dtype)
        return model, copy.deepcopy(model)
    # unstack first, then convert (Ensemble.members() after Ensemble.to(dtype) is tested in test_engine.py)
    members = [member.to(dtype) for member in trained[kind].members()]
    return Ensemble(copy.deepcopy(members)), reference.ensemble_model(members)


def make_deltas(dtype):
    g = torch.Generator().manual_seed(1)
    # eps 0.1 and 0.3 random-sign perturbations: large enough to change some predictions
    return torch.stack([eps * torch.sign(torch.randn(1, 28, 28, generator=g)) for eps in (0.1, 0.3)]).to(dtype)


def top2_gap(f, x, deltas):
    """Smallest gap between the two largest logits over every evaluated input: if it is far above the
    rounding difference of the two paths, both must agree on every argmax."""
    with torch.no_grad():
        rows = torch.cat([x, torch.clamp(x.unsqueeze(0) + deltas.unsqueeze(1), 0, 1).flatten(0, 1)])
        top = f(rows).topk(2, dim=1).values
    return float((top[:, 0] - top[:, 1]).min())


@pytest.mark.parametrize("kind", ["mlp", "lenet", "single"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_evaluate_matches_reference(test_images, trained, kind, dtype):
    x, y = test_images
    x = x.to(dtype)
    model, f = make_model(trained, kind, dtype)
    deltas = make_deltas(dtype)
    # float32 paths differ by ~1e-6 relative in the logits; a gap of 1e-4 rules out argmax flips
    assert top2_gap(f, x, deltas) > 1e-4, "near-tied logits: the comparison would be ill-posed"
    got = fastjac.evaluate(model, x, y, deltas, chunk_size=CHUNK)
    want = reference.evaluate(f, x, y, deltas)
    assert got.keys() == want.keys()
    assert got["clean_accuracy"] == pytest.approx(want["clean_accuracy"], abs=1e-12)
    for key in ("uap_accuracy", "evasion_rate", "fooling_rate"):
        assert len(got[key]) == 2
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert max(got["fooling_rate"]) > 0, "the perturbations should change some predictions"


@pytest.mark.filterwarnings("ignore:fastjac. running on the generic")  # PixelClassifier is not a Sequential
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_evaluate_counts_by_hand(dtype, chunk_size):
    """Every metric against counts made by hand on a model whose predictions are known (the reference is
    checked on the same case in test_reference.py)."""
    x, y, delta, expected = hand_counted_case(dtype)
    metrics = fastjac.evaluate(PixelClassifier(), x, y, delta, chunk_size=chunk_size)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


def test_chunk_size_does_not_change_the_result(test_images, trained):
    x, y = test_images
    model, _ = make_model(trained, "mlp", F64)
    deltas = make_deltas(F64)
    results = [fastjac.evaluate(model, x, y, deltas, chunk_size=size) for size in (1, CHUNK, N, 1000)]
    assert all(result == results[0] for result in results[1:])


def test_zero_delta_fools_nothing(test_images, trained):
    x, y = test_images
    model, _ = make_model(trained, "mlp", F64)
    metrics = fastjac.evaluate(model, x, y, torch.zeros(2, 1, 28, 28, dtype=F64), chunk_size=CHUNK)
    assert metrics["fooling_rate"] == [0.0, 0.0]
    assert metrics["uap_accuracy"] == [metrics["clean_accuracy"]] * 2


def test_single_delta_without_k_axis(test_images, trained):
    x, y = test_images
    model, _ = make_model(trained, "mlp", F64)
    delta = make_deltas(F64)[1]  # [*input] = [1, 28, 28]
    single = fastjac.evaluate(model, x, y, delta, chunk_size=CHUNK)
    batched = fastjac.evaluate(model, x, y, delta.unsqueeze(0), chunk_size=CHUNK)
    assert single == batched
    assert len(single["uap_accuracy"]) == 1


def test_no_delta_gives_empty_lists(test_images, trained):
    x, y = test_images
    model, f = make_model(trained, "mlp", F64)
    metrics = fastjac.evaluate(model, x, y, chunk_size=CHUNK)
    assert metrics["uap_accuracy"] == metrics["evasion_rate"] == metrics["fooling_rate"] == []
    assert metrics["clean_accuracy"] == pytest.approx(reference.evaluate(f, x, y)["clean_accuracy"], abs=1e-12)


@pytest.mark.parametrize("shape", [(2, 1, 27, 27), (28, 28), (2, 28, 28, 1), (2, 2, 28, 28)])
def test_wrong_delta_shape_raises(test_images, trained, shape):
    x, y = test_images
    model, _ = make_model(trained, "mlp", F64)
    with pytest.raises(ValueError, match=r"delta must be \[K, 1, 28, 28\]"):
        fastjac.evaluate(model, x, y, torch.zeros(shape, dtype=F64))


def test_bad_inputs_raise(test_images, trained):
    x, y = test_images
    model, _ = make_model(trained, "mlp", F64)
    delta = make_deltas(F64)
    delta[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="delta contains NaN"):
        fastjac.evaluate(model, x, y, delta)
    with pytest.raises(ValueError, match=r"y must have shape \[50\]"):
        fastjac.evaluate(model, x, y[:-1])
    with pytest.raises(TypeError, match="y must be an integer tensor"):
        fastjac.evaluate(model, x, y.double())


def test_training_mode_is_restored(test_images, trained):
    x, y = test_images
    model, _ = make_model(trained, "mlp", F64)
    model.train()
    fastjac.evaluate(model, x, y, make_deltas(F64), chunk_size=CHUNK)
    assert model.training
