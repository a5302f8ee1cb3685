"""The generic torch.func path (fastjac/generic.py) for members the registry does not fuse, against the
reference: an untraceable member (data-dependent control flow: the per-member loop), an unfusable one
(vmap over the members), an untraceable CNN (the loop's dual numbers and stride-1 convolutions),
BatchNorm in train mode on this path (the running statistics once per pass, no in-place update inside
the transforms: the jvp mode used to crash), single modules and per-member inputs. Logits, penalties
(both modes and targets, nproj 1 and 3, M 1 and 5) and every parameter gradient in float64; every test
twice, members one at a time (the CPU's choice) and under vmap."""
import copy

import pytest
import torch
from torch import nn

import fastjac
from fastjac import Ensemble, generic, jacobian_penalty, reference
from fastjac.ops import conv_transpose
from fastjac.testing import RTOL64, member_grads, stacked_grads, upstream_weights
from tests.engine_cases import (F64, assert_grads_close, assert_logits_match_reference,
                                assert_penalty_matches_reference, make_input, make_projections, reference_penalty)
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
MEMBERS_AT_ONCE = generic.members_at_once  # the library's choice (the ``at_once`` fixture replaces it)


class Gated(nn.Module):
    """Data-dependent control flow on the member's own activations: neither torch.fx nor vmap over the
    members can follow it (each member takes its own branch)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 7), nn.Linear(7, 5)

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        h = torch.tanh(h) if h.sum() > 0 else torch.sigmoid(h)
        return self.fc2(h)


class GatedCNN(nn.Module):
    """An untraceable CNN (members looped): stride-1 convolutions (one with padding="same" and dilation 2),
    BatchNorm, ReLU, MaxPool2d, Linear, and a residual convolution taken on a data-dependent branch. Its
    members run the jvp mode on dual numbers with ``generic.TangentRules`` and the vjp mode with
    ``generic.StrideOneConv2d``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Conv2d(1, 3, 3, padding=1)
        self.block = nn.Conv2d(3, 3, 3, padding="same", dilation=2)
        self.norm, self.pool, self.fc = nn.BatchNorm2d(3), nn.MaxPool2d(2), nn.Linear(3 * 14 * 14, 5)

    def forward(self, x):
        a = self.gate(x)
        if a.sum() > 0:
            a = a + self.block(a)
        return self.fc(self.pool(torch.relu(self.norm(a))).flatten(1))


def hardtanh_cnn():
    """Unfusable (Hardtanh) but vmappable, with a BatchNorm."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=3), nn.BatchNorm2d(3), nn.Hardtanh(), nn.Flatten(),
                         nn.Linear(3 * 9 * 9, 5))


MODELS = {"gated": Gated, "gated_cnn": GatedCNN, "hardtanh_cnn": hardtanh_cnn}
GATES = {"gated": "fc1", "gated_cnn": "gate"}  # the layer whose bias sends member 0 down the other branch
NORMS = {"gated_cnn": "norm", "hardtanh_cnn": "1"}  # the BatchNorm's name


def make_generic_case(name, members, train=False, seed=0):
    torch.manual_seed(seed)
    mods = [MODELS[name]().to(F64).train(train) for _ in range(members)]
    if name in GATES:  # both branches among the members
        with torch.no_grad():
            getattr(mods[0], GATES[name]).bias.fill_(3.0)
    ensemble = Ensemble(copy.deepcopy(mods)).train(train)
    assert ensemble.graph is None
    return mods, ensemble, make_input(3, low=-1.0)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(fastjac.ensemble, "_warned", set())  # the warning is once per process


@pytest.fixture(autouse=True, params=["loop", "vmap"])
def at_once(request, monkeypatch):
    """Every test twice: the CPU's choice (members one at a time) and vmap over the members (other devices'
    choice, forced here so that it is tested on the CPU too). Returns whether vmap is allowed."""
    if request.param == "vmap":
        monkeypatch.setattr(generic, "members_at_once", lambda device: True)
    return request.param == "vmap"


def test_untraceable_member_takes_the_generic_path_with_a_warning(at_once):
    mods, ensemble, x = make_generic_case("gated", 3)
    assert "torch.fx cannot trace Gated" in ensemble.unsupported
    with pytest.warns(UserWarning, match="generic torch.func path .*cannot trace Gated"):
        value = jacobian_penalty(ensemble, x, nproj=2, mode="jvp", projections=make_projections("jvp", 2, x, 5))
    assert_close(value, reference_penalty(mods, x, "jvp", "members", make_projections("jvp", 2, x, 5)),
                 rtol=RTOL64, atol=0, name="gated jvp")
    assert (ensemble._template[0] in generic._LOOPED) == at_once, "vmap cannot run Gated: one member at a time"


def test_unfusable_but_vmappable_member_runs_all_members_at_once_where_vmap_is_chosen(at_once, monkeypatch):
    vmapped = []
    vmap = torch.func.vmap
    monkeypatch.setattr(torch.func, "vmap", lambda *a, **k: vmapped.append(1) or vmap(*a, **k))
    mods, ensemble, x = make_generic_case("hardtanh_cnn", 3)
    with pytest.warns(UserWarning, match="Hardtanh is not fused"):
        assert_logits_match_reference(mods, ensemble, x, None, "hardtanh_cnn")
    assert ensemble._template[0] not in generic._LOOPED
    assert bool(vmapped) == at_once


def test_members_run_at_once_off_the_cpu_only():
    assert not MEMBERS_AT_ONCE(torch.device("cpu"))
    assert MEMBERS_AT_ONCE(torch.device("cuda", 0)) and MEMBERS_AT_ONCE(torch.device("meta"))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("members", [1, 5])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
@pytest.mark.parametrize("nproj", [1, 3])
def test_generic_penalty_matches_reference(name, members, mode, target, nproj):
    mods, ensemble, x = make_generic_case(name, members)
    with pytest.warns(UserWarning, match="generic"):
        assert_penalty_matches_reference(mods, ensemble, x, mode, target, make_projections(mode, nproj, x, 5), None,
                                         name)


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
def test_generic_batchnorm_in_train_mode(name, mode, target):
    """Regression (issue 11): BatchNorm in train mode on the generic path crashed in the jvp mode. It runs,
    equals the reference (whose BatchNorm computes its batch statistics in plain ops: see
    tests/engine_cases.py), and updates the running statistics once, as a plain forward does: members
    vmapped (hardtanh_cnn) and looped (gated_cnn, nproj 1: on dual numbers)."""
    mods, ensemble, x = make_generic_case(name, 3, train=True)
    nproj = 1 if name == "gated_cnn" else 2
    with pytest.warns(UserWarning, match="generic"):
        assert_penalty_matches_reference(mods, ensemble, x, mode, target, make_projections(mode, nproj, x, 5), None,
                                         "generic batchnorm")
    for member in mods:
        member(x)  # one plain training forward each
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        buffer = f"{NORMS[name]}.{key}"
        expected = torch.stack([dict(m.named_buffers())[buffer] for m in mods])
        assert_close(ensemble.buffers_by_name()[buffer], expected, rtol=RTOL64, atol=RTOL64, name=key)


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("method", conv_transpose.METHODS)
def test_looped_members_take_the_dual_numbers_and_the_stride_one_convolutions(mode, method, monkeypatch):
    """One member at a time: the jvp mode (one direction) runs every Conv2d, Linear and MaxPool2d through
    TangentRules, and the vjp mode every stride-1 convolution's input gradient through conv_transpose (each
    method forced in turn), and both equal the reference with their gradients."""
    used = []
    for func, rule in list(generic.TangentRules.RULES.items()):
        monkeypatch.setitem(generic.TangentRules.RULES, func,
                            lambda *a, rule=rule, **k: used.append(rule.__name__) or rule(*a, **k))
    monkeypatch.setattr(conv_transpose, "transpose_method", lambda *args: method)
    transposes = conv_transpose.transpose_forward
    monkeypatch.setattr(conv_transpose, "transpose_forward", lambda *a: used.append(a[-1]) or transposes(*a))
    mods, ensemble, x = make_generic_case("gated_cnn", 2)
    with pytest.warns(UserWarning, match="generic"):
        assert_penalty_matches_reference(mods, ensemble, x, mode, "members", make_projections(mode, 1, x, 5), None,
                                         "looped")
    if mode == "jvp":  # member 0 takes the block: 2 convolutions; member 1 one or two
        assert {"_conv2d_tangent", "_linear_tangent", "_max_pool2d_tangent"} <= set(used)
        assert used.count("_conv2d_tangent") >= 3 and method not in used
    else:  # the first backward transposes member 0's two convolutions and at least member 1's first
        assert set(used) == {method} and len(used) >= 3


def test_generic_member_logits_in_train_mode_update_running_statistics_once():
    mods, ensemble, x = make_generic_case("hardtanh_cnn", 2, train=True)
    with pytest.warns(UserWarning, match="generic"):
        assert_logits_match_reference(mods, ensemble, x, None, "generic train logits")
    expected = torch.stack([m[1].running_var for m in mods])
    assert_close(ensemble.buffers_by_name()["1.running_var"], expected, rtol=RTOL64, atol=RTOL64, name="running_var")


def test_generic_single_module():
    torch.manual_seed(0)
    module = Gated().to(F64)
    module.fc1.bias.data.fill_(-3.0)
    ref_module = copy.deepcopy(module)
    x = make_input(3, low=-1.0)
    for mode in ("vjp", "jvp"):
        projections = make_projections(mode, 2, x, 5)
        with pytest.warns(UserWarning, match="generic"):
            value, logits = jacobian_penalty(module, x, nproj=2, mode=mode, projections=projections,
                                             return_logits=True)
        fastjac.ensemble._warned.clear()
        expected = reference_penalty([ref_module], x, mode, "ensemble", projections)
        assert value.shape == () and logits.shape == (3, 5)
        assert_close(value, expected, rtol=RTOL64, atol=0, name=f"single {mode}")
        assert_close(logits, ref_module(x), rtol=RTOL64, atol=1e-14, name="single logits")
        got = torch.autograd.grad(value, list(module.parameters()), allow_unused=True)
        want = torch.autograd.grad(expected, list(ref_module.parameters()), allow_unused=True)
        for a, e in zip(got, want):  # the last bias does not reach the penalty: None on both sides
            assert (a is None) == (e is None)
            if e is not None:
                assert_close(a, e, rtol=RTOL64, atol=RTOL64 * float(e.abs().max()), name=f"single {mode} grad")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_generic_per_member_input(name, mode):
    mods, ensemble, _ = make_generic_case(name, 3)
    x = make_input(6, low=-1.0).view(3, 2, 1, 28, 28)
    projections = make_projections(mode, 2, x[0], 5)
    with pytest.warns(UserWarning, match="generic"):
        value = jacobian_penalty(ensemble, x, nproj=2, mode=mode, projections=projections, per_member=True)
    fn = {"vjp": reference.penalty_vjp, "jvp": reference.penalty_jvp}[mode]
    expected = torch.stack([fn(member, x[m], projections) for m, member in enumerate(mods)])
    assert_close(value, expected, rtol=RTOL64, atol=0, name="per-member penalty")
    w = upstream_weights(3, F64)
    assert_grads_close(stacked_grads(ensemble, (w * value).sum()), member_grads(mods, (w * expected).sum()),
                       rtol=RTOL64, atol_scale=RTOL64, name="per-member penalty")


def test_exact_mode_still_runs_the_reference():
    mods, ensemble, x = make_generic_case("hardtanh_cnn", 2)
    with pytest.warns(UserWarning, match="generic"):
        value = jacobian_penalty(ensemble, x, mode="exact")
    expected = torch.stack([reference.penalty_exact(m, x) for m in mods])
    assert_close(value, expected, rtol=RTOL64, atol=0, name="exact")
