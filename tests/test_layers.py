"""Every layer kind of the registry (fastjac/layers.py) on the stacked engine against fastjac.reference on
the unstacked members: member logits, penalties with explicit projections (both modes, both targets,
nproj 1 and 3, M 1 and 5) and every parameter gradient, in float64; BatchNorm in train and eval mode,
with its running statistics after a step equal to a plain forward's.

Each case is a small member in which the kind under test sits in a given layout (after a Linear:
"members"; after a Conv2d: "rows"; on the input: "shared"). Inputs are uniform in [-1, 1) so that
activations on the input see both signs.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from fastjac import Ensemble, backends, jacobian_penalty, layers
from fastjac.engine import Engine
from fastjac.ops import conv_transpose
from fastjac.testing import RTOL64
from tests.engine_cases import (F64, assert_logits_match_reference, assert_penalty_matches_reference, make_input,
                                make_projections)
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

ACTIVATIONS = {
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"), "silu": nn.SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2), "elu": lambda: nn.ELU(0.7),
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=1.5),  # threshold inside the inputs' range: both branches
}


def after_linear(act):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 7), act(), nn.Linear(7, 5))


def after_conv(act):
    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=3), act(), nn.Flatten(), nn.Linear(2 * 9 * 9, 5))


def on_input(act):
    return nn.Sequential(act(), nn.Conv2d(1, 2, 4, stride=4), nn.Flatten(), nn.Linear(2 * 7 * 7, 5))


def batchnorm1d(**options):
    return lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 6), nn.BatchNorm1d(6, **options), nn.ReLU(),
                                 nn.Linear(6, 5))


def batchnorm2d(**options):
    return lambda: nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, bias=False), nn.BatchNorm2d(3, **options), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(3 * 13 * 13, 5))


def batchnorm_on_input():
    return nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 4, stride=4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 7 * 7, 5))


def adaptive_pool(size):
    return lambda: nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(size), nn.Flatten(),
                                 nn.Linear(2 * (size[0] * size[1] if isinstance(size, tuple) else size * size), 5))


def grouped_conv():
    """groups=2 on a per-member activation and a depthwise conv (groups = channels), bias-free."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def grouped_conv_on_input():
    """groups=2 on the shared input (2 channels): the input is split per member."""
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 5))


def same_padding():
    """padding="same": symmetric (odd kernel, dilation 2) and asymmetric (even kernel: one more pixel last)."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding="same", dilation=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(2, 3, (4, 3), padding="same"), nn.ReLU(), nn.Conv2d(3, 2, 2, padding="same"),
                         nn.Flatten(), nn.Linear(2 * 14 * 14, 5))


def no_bias():
    return nn.Sequential(nn.Conv2d(1, 2, 5, stride=3, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 8 * 8, 6, bias=False), nn.ReLU(), nn.Linear(6, 5, bias=False))


def strided_pointwise():
    """Strided 1x1 convolutions (run as a subsample, then stride 1) on per-member activations: with a fused
    ReLU (stride 3 over 28: the last pixel sampled), and with groups and no bias (stride 2 over 10: the
    last pixel not sampled, its cotangent 0)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1, stride=3), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1, stride=2, groups=2, bias=False),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 5))


def strided_pointwise_on_input():
    """On the shared input, stride (2, 3) over 28 x 28: the last row is not sampled, the last column is."""
    return nn.Sequential(nn.Conv2d(1, 3, 1, stride=(2, 3)), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 14 * 10, 5))


# name -> (builder, train mode, input shape)
CASES = {
    **{f"{name}_{place.__name__}": (lambda act=act, place=place: place(act), False, (1, 28, 28))
       for place in (after_linear, after_conv, on_input) for name, act in ACTIVATIONS.items()},
    **{f"batchnorm1d_{mode}": (batchnorm1d(), mode == "train", (1, 28, 28)) for mode in ("train", "eval")},
    **{f"batchnorm2d_{mode}": (batchnorm2d(), mode == "train", (1, 28, 28)) for mode in ("train", "eval")},
    **{f"batchnorm_on_input_{mode}": (batchnorm_on_input, mode == "train", (1, 28, 28)) for mode in ("train", "eval")},
    "batchnorm2d_no_affine_train": (batchnorm2d(affine=False), True, (1, 28, 28)),
    "batchnorm2d_no_affine_eval": (batchnorm2d(affine=False), False, (1, 28, 28)),
    "batchnorm1d_cumulative_train": (batchnorm1d(momentum=None, eps=1e-3), True, (1, 28, 28)),
    "batchnorm2d_untracked_eval": (batchnorm2d(track_running_stats=False), False, (1, 28, 28)),  # batch stats
    "adaptive_pool_1": (adaptive_pool(1), False, (1, 28, 28)),
    "adaptive_pool_3x2": (adaptive_pool((3, 2)), False, (1, 28, 28)),
    "grouped_conv": (grouped_conv, False, (1, 28, 28)),
    "grouped_conv_on_input": (grouped_conv_on_input, False, (2, 12, 12)),
    "same_padding": (same_padding, False, (1, 28, 28)),
    "no_bias": (no_bias, False, (1, 28, 28)),
    "strided_pointwise": (strided_pointwise, False, (1, 28, 28)),
    "strided_pointwise_on_input": (strided_pointwise_on_input, False, (1, 28, 28)),
}
# the full matrix of modes, targets, nproj and M for every kind in one layout; the other layouts of the
# activations at M = 5, nproj = 3
FULL = [name for name in CASES if not name.endswith(("_after_conv", "_on_input"))]
LAYOUTS = [name for name in CASES if name not in FULL]


def randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Away from the initial values (gamma 1, beta 0, mean 0, var 1), so that every term shows."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if layer.affine:
                    layer.weight.copy_(0.5 + torch.rand(layer.weight.shape, generator=generator, dtype=F64))
                    layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator, dtype=F64) - 0.5)
                if layer.track_running_stats:
                    layer.running_mean.copy_(torch.rand(layer.running_mean.shape, generator=generator, dtype=F64) - 0.5)
                    layer.running_var.copy_(0.5 + torch.rand(layer.running_var.shape, generator=generator, dtype=F64))
                    layer.num_batches_tracked.fill_(3)


def make_case(name, members, seed=0):
    """(unstacked float64 members in the case's mode, their Ensemble, x [3, *shape] in [-1, 1))."""
    build, train, shape = CASES[name]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 10)
    mods = []
    for _ in range(members):
        member = build().to(F64)
        randomize_batchnorm(member, generator)
        mods.append(member.train(train))
    ensemble = Ensemble(copy.deepcopy(mods)).train(train)
    assert ensemble.graph is not None and ensemble.fused(), f"{name} should run on the stacked engine"
    return mods, ensemble, make_input(3, shape=shape, low=-1.0)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.usefixtures("passes")
def test_member_logits_match_reference(name):
    mods, ensemble, x = make_case(name, 5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "fastjac: running on the generic")  # a fused kind never falls back
        assert_logits_match_reference(mods, ensemble, x, None, name)


@pytest.mark.parametrize("name", FULL)
@pytest.mark.parametrize("members", [1, 5])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
@pytest.mark.parametrize("nproj", [1, 3])
@pytest.mark.usefixtures("passes")
def test_penalty_matches_reference(name, members, mode, target, nproj):
    mods, ensemble, x = make_case(name, members)
    assert_penalty_matches_reference(mods, ensemble, x, mode, target, make_projections(mode, nproj, x, 5), None, name)


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
@pytest.mark.usefixtures("passes")
def test_penalty_matches_reference_in_every_layout(name, mode, target):
    mods, ensemble, x = make_case(name, 5)
    assert_penalty_matches_reference(mods, ensemble, x, mode, target, make_projections(mode, 3, x, 5), None, name)


@pytest.mark.parametrize("name", ["same_padding", "strided_pointwise"])
@pytest.mark.parametrize("method", conv_transpose.METHODS)
@pytest.mark.usefixtures("passes")
def test_stride_one_convolutions_transpose_by_either_method(name, method, monkeypatch):
    """The vjp mode transposes a stride-1 Conv2d by ops/conv_transpose (the method timed per shape): each
    method forced in turn equals the reference, penalty and parameter gradients (symmetric and asymmetric
    "same" padding, dilation 2, the 1x1 after a subsample)."""
    used = []
    monkeypatch.setattr(conv_transpose, "transpose_method", lambda *args: method)
    transposes = conv_transpose.transpose_forward
    monkeypatch.setattr(conv_transpose, "transpose_forward", lambda *a: used.append(a[-1]) or transposes(*a))
    mods, ensemble, x = make_case(name, 3)
    assert_penalty_matches_reference(mods, ensemble, x, "vjp", "members", make_projections("vjp", 2, x, 5), None, name)
    assert used and set(used) == {method}


def test_every_registered_kind_has_a_case():
    """Adding a kind means adding its case here: each registered module type appears in some case."""
    covered = {type(module) for build, _, _ in CASES.values() for module in build().modules()}
    covered |= {nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity, nn.Dropout}  # tests/test_engine.py's archs
    missing = set(layers.LAYERS) - covered
    assert not missing, f"layer kinds without a test case: {sorted(t.__name__ for t in missing)}"


# ------------------------------------------------------------------------------ BatchNorm statistics
def running_stats(module_or_state, prefix):
    return [module_or_state[f"{prefix}.{key}"] for key in ("running_mean", "running_var", "num_batches_tracked")]


@pytest.mark.parametrize("name", ["batchnorm1d_train", "batchnorm2d_train", "batchnorm_on_input_train",
                                  "batchnorm1d_cumulative_train"])
@pytest.mark.parametrize("call", ["logits", "vjp", "jvp"])
@pytest.mark.usefixtures("passes")
def test_running_statistics_after_a_step_equal_a_plain_forward(name, call):
    """One training pass of any kind (plain logits, a JR penalty in either mode) updates the running
    statistics once, from the primal rows only, exactly as one plain forward of each member does."""
    mods, ensemble, x = make_case(name, 3)
    if call == "logits":
        ensemble.member_logits(x)
    else:
        jacobian_penalty(ensemble, x, nproj=2, mode=call, projections=make_projections(call, 2, x, 5))
    for member in mods:
        member(x)  # the plain forward of each member, in train mode
    prefix = next(n for n, m in mods[0].named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    got = running_stats(ensemble.buffers_by_name(), prefix)
    want = [torch.stack(values) for values in zip(*(running_stats(dict(m.named_buffers()), prefix) for m in mods))]
    for key, actual, expected in zip(("running_mean", "running_var", "num_batches_tracked"), got, want):
        assert_close(actual, expected, rtol=RTOL64, atol=RTOL64, name=f"{name} {call} {key}")


def test_eval_mode_leaves_running_statistics_alone():
    mods, ensemble, x = make_case("batchnorm2d_eval", 2)
    before = {name: value.clone() for name, value in ensemble.buffers_by_name().items()}
    for mode in ("vjp", "jvp"):
        jacobian_penalty(ensemble, x, nproj=1, mode=mode)
    ensemble.member_logits(x)
    for name, value in ensemble.buffers_by_name().items():
        assert torch.equal(value, before[name]), name


def test_batchnorm_jvp_in_train_mode_runs_regression():
    """Issue 11: a CNN with BatchNorm2d in train mode crashed in mode="jvp" (torch.func refused the in-place
    update of the running statistics). It now runs on the stacked engine, equals the reference, and leaves
    the running statistics as one plain forward does."""
    mods, ensemble, x = make_case("batchnorm2d_train", 5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "fastjac: running on the generic")
        value = assert_penalty_matches_reference(mods, ensemble, x, "jvp", "members",
                                                 make_projections("jvp", 1, x, 5), None, "batchnorm jvp")
    assert bool(torch.isfinite(value).all())
    # one pass of the ensemble (the gradients run no forward): the count went from 3 to 4, once
    assert ensemble.buffers_by_name()["1.num_batches_tracked"].tolist() == [4] * 5


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.usefixtures("passes")
def test_batchnorm_penalty_gradcheck(train, mode):
    """float64 gradcheck of the engine's squared tangents / cotangents w.r.t. the conv weight and
    BatchNorm's gamma and beta: the linearization's parameter gradient, checked against finite
    differences independently of the reference."""
    _, ensemble, x = make_case("batchnorm2d_train" if train else "batchnorm2d_eval", 2)
    x = x[:2]
    graph, state = ensemble.fused_graph(), ensemble.state()
    names = ["0.weight", "1.weight", "1.bias"]
    projections = make_projections(mode, 2, x, 5)

    def penalty(*values):
        run = Engine(graph, {**state, **dict(zip(names, values))}, backends.get("torch"))
        if mode == "jvp":
            return run.forward(x, projections)[1].pow(2).sum()
        _, _, tape = run.forward(x, record=True)
        return run.cotangent(tape, projections, x.shape[0]).pow(2).sum()

    inputs = [state[name].detach().clone().requires_grad_(True) for name in names]
    assert torch.autograd.gradcheck(penalty, inputs)


def test_members_and_state_dict_round_trip_batchnorm_buffers(tmp_path):
    """BatchNorm buffers stay stacked per member ([M, C]) and come back through members() and
    state_dict / a checkpoint file."""
    mods, ensemble, x = make_case("batchnorm2d_eval", 3)
    buffers = ensemble.buffers_by_name()
    assert buffers["1.running_mean"].shape == (3, 3) and buffers["1.num_batches_tracked"].shape == (3,)
    for original, member in zip(mods, ensemble.members()):
        for (name, a), (name2, b) in zip(original.named_buffers(), member.named_buffers()):
            assert name == name2 and torch.equal(a, b), name
        assert not member.training
        assert torch.equal(member(x), original(x))
    path = tmp_path / "ensemble.pt"
    torch.save(ensemble.state_dict(), path)
    fresh = Ensemble(make_case("batchnorm2d_eval", 3, seed=1)[0]).eval()
    assert not torch.equal(fresh.member_logits(x), ensemble.member_logits(x))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh.member_logits(x), ensemble.member_logits(x))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in ensemble.state_dict().items())
