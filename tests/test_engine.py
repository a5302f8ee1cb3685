"""The stacked engine (Ensemble.member_logits, jacobian_penalty on the fused path) against fastjac.reference
applied to the unstacked members, on every backend and device (unavailable ones are skips with the
reason; the reference always runs in float64 on the CPU).

Values AND the gradients w.r.t. every stacked parameter, with one shared random upstream weight per
member, in float64 (tolerance from float64 rounding) plus float32 runs whose tolerance is a small multiple
of a plain float32 PyTorch run's own error against float64.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastjac
from fastjac import Ensemble, backends, jacobian_penalty, models, reference
from fastjac.testing import RTOL64, member_grads, stacked_grads, upstream_weights
from tests.engine_cases import (F32, F64, assert_grads_close, assert_penalty_matches_reference, make_input,
                                make_projections, reference_penalty)
from tests.helpers import assert_close, backend_devices


# (backend, device): fast path on `device`, reference in float64 on the CPU
BACKENDS = backend_devices(interpreter_skip="triton on the CPU interpreter: minutes per case at these shapes; "
                                            "tests/test_triton_backend.py runs it on small shapes")


pytestmark = pytest.mark.usefixtures("one_thread")


def on_device(ensemble, x, device):
    """The ensemble and the input on ``device``; results are compared on the CPU."""
    return ensemble.to(device), x.to(device)


# ------------------------------------------------------------------------------------------- builders
def make_members(arch, count, dtype=F64, seed=0):
    torch.manual_seed(seed)
    if arch == "mlp":  # odd, non-power-of-two widths
        build = lambda: models.mlp(hidden=(7, 5))  # noqa: E731
    elif arch == "lenet":
        build = lambda: models.lenet(channels=(3, 4), hidden=(6, 5))  # noqa: E731
    else:
        build = OTHER_ARCHS[arch]
    members = [build().to(dtype) for _ in range(count)]
    for member in members:
        member.eval()  # Dropout in OTHER_ARCHS is the identity in eval mode (fused)
    return members


def conv_stride_avgpool():
    """Conv2d stride 2 / padding 1, AvgPool2d, a standalone ReLU after the pooling layer (not fused into a
    conv), a bias-free conv, MaxPool2d with ceil_mode and an odd output, Identity and eval-mode Dropout."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1),      # 28 -> 14
        nn.AvgPool2d(2),                              # 14 -> 7
        nn.ReLU(),                                    # standalone ReLU, rows layout
        nn.Conv2d(3, 4, 3, padding=1, bias=False),    # 7 -> 7
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),    # 7 -> 3
        nn.Flatten(),
        nn.Linear(36, 7),
        nn.Identity(),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(7, 5),
    )


def pool_first():
    """Pooling on the shared input batch (before any member weight), a standalone ReLU on the shared
    layout, a bias-free Linear and a standalone ReLU on the member-major layout."""
    return nn.Sequential(
        nn.MaxPool2d(2),                                              # 28 -> 14, shared
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),  # 14 -> 7, shared
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(49, 6, bias=False),
        nn.ReLU(),
        nn.ReLU(),
        nn.Linear(6, 5),
    )


def dilated_overlapping_pools():
    """Dilated padded Conv2d, overlapping padded MaxPool2d windows (one input pixel is the argmax of several
    windows: the transposed path must add, not overwrite) and AvgPool2d with divisor_override."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, dilation=2, padding=1),        # 28 -> 26
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),             # 26 -> 13
        nn.AvgPool2d(3, stride=2, divisor_override=5),    # 13 -> 6
        nn.Flatten(),
        nn.Linear(72, 5),
    )


OTHER_ARCHS = {"conv_s2_avgpool": conv_stride_avgpool, "pool_first": pool_first,
               "dilated_overlap": dilated_overlapping_pools}


# --------------------------------------------------------------------------------------- member logits
@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("arch", ["mlp", "lenet", *OTHER_ARCHS])
@pytest.mark.parametrize("members", [1, 5])
def test_member_logits_shared_input(backend, device, arch, members):
    mods = make_members(arch, members)
    ensemble, x_dev = on_device(Ensemble(copy.deepcopy(mods)).eval(), make_input(3), device)
    assert ensemble.graph is not None, "this architecture should run on the stacked engine"
    x = make_input(3)
    logits = ensemble.member_logits(x_dev, backend=backend)
    expected = reference.member_logits(mods, x)
    assert_close(logits, expected, rtol=RTOL64, atol=RTOL64 * float(expected.detach().abs().max()), name="member logits")
    # gradients with one random upstream [M, B, C]
    grad_out = torch.randn(expected.shape, dtype=F64)
    assert_grads_close(stacked_grads(ensemble, (logits * grad_out.to(device)).sum()),
                       member_grads(mods, (expected * grad_out).sum()),
                       rtol=RTOL64, atol_scale=RTOL64, name="member logits")
    assert_close(ensemble(x_dev), expected.mean(0), rtol=RTOL64, atol=RTOL64 * float(expected.detach().abs().max()),
                 name="ensemble forward")


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_member_logits_per_member_input(backend, device, arch):
    mods = make_members(arch, 3)
    x = torch.rand(3, 2, 1, 28, 28, dtype=F64)  # [M, B, ...]: member m sees x[m]
    ensemble, x_dev = on_device(Ensemble(copy.deepcopy(mods)).eval(), x, device)
    logits = ensemble.member_logits(x_dev, per_member=True, backend=backend)
    expected = torch.stack([member(x[m]) for m, member in enumerate(mods)])
    assert_close(logits, expected, rtol=RTOL64, atol=RTOL64 * float(expected.detach().abs().max()), name="per-member logits")
    grad_out = torch.randn(expected.shape, dtype=F64)
    assert_grads_close(stacked_grads(ensemble, (logits * grad_out.to(device)).sum()),
                       member_grads(mods, (expected * grad_out).sum()),
                       rtol=RTOL64, atol_scale=RTOL64, name="per-member logits")
    with pytest.raises(ValueError, match="per-member inputs"):
        ensemble.member_logits(x_dev[:2], per_member=True, backend=backend)


# ------------------------------------------------------------------------- penalty vs reference, float64
@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
@pytest.mark.parametrize("members", [1, 5])  # 5: differs from every batch size and nproj used
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
@pytest.mark.parametrize("nproj", [1, 3])
def test_penalty_matches_reference_float64(backend, device, arch, members, batch, mode, target, nproj):
    mods = make_members(arch, members)
    x = make_input(batch)
    ensemble, x_dev = on_device(Ensemble(copy.deepcopy(mods)).eval(), x, device)
    assert_penalty_matches_reference(mods, ensemble, x, mode, target, make_projections(mode, nproj, x, 10), backend,
                                     arch, x_dev)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("arch", list(OTHER_ARCHS))
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
def test_penalty_other_layer_kinds_float64(backend, device, arch, mode, target):
    """AvgPool2d, standalone ReLUs after pooling / on the shared input, strided padded Conv2d, bias-free
    layers, pooling before any weight: each has its own transposed path in the engine."""
    mods = make_members(arch, 3)
    x = make_input(3)
    ensemble, x_dev = on_device(Ensemble(copy.deepcopy(mods)).eval(), x, device)
    assert ensemble.graph is not None
    assert_penalty_matches_reference(mods, ensemble, x, mode, target, make_projections(mode, 2, x, 5), backend,
                                     arch, x_dev)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_penalty_per_member_input(backend, device, arch, mode):
    mods = make_members(arch, 3)
    x = torch.rand(3, 2, 1, 28, 28, dtype=F64)
    ensemble, x_dev = on_device(Ensemble(copy.deepcopy(mods)).eval(), x, device)
    projections = make_projections(mode, 2, x[0], 10)
    value = jacobian_penalty(ensemble, x_dev, nproj=2, mode=mode, projections=projections.to(device), backend=backend,
                             per_member=True)
    fn = {"vjp": reference.penalty_vjp, "jvp": reference.penalty_jvp}[mode]
    expected = torch.stack([fn(member, x[m], projections) for m, member in enumerate(mods)])
    assert_close(value, expected, rtol=RTOL64, atol=0, name="per-member penalty")
    w = upstream_weights(3, F64)
    assert_grads_close(stacked_grads(ensemble, (w.to(device) * value).sum()), member_grads(mods, (w * expected).sum()),
                       rtol=RTOL64, atol_scale=RTOL64, name="per-member penalty")


# ------------------------------------------------------------------------------------------- float32
def float32_atol(ref32, ref64):
    """4x the error of a plain float32 PyTorch run against float64 (the fast path may be a small multiple
    worse, STYLE.md 4), floored at 16 * eps32 * max|ref64| for outputs where float32 happens to be exact."""
    ref32, ref64 = ref32.detach(), ref64.detach()
    plain_error = float((ref32.double() - ref64).abs().max())
    return 4 * plain_error + 16 * torch.finfo(F32).eps * float(ref64.abs().max())


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_penalty_float32_within_plain_float32_error(backend, device, arch, mode):
    mods64 = make_members(arch, 3, F64)
    mods32 = [copy.deepcopy(m).to(F32) for m in mods64]
    x64 = make_input(3, F64)
    p64 = make_projections(mode, 3, x64, 10)
    x32, p32 = x64.to(F32), p64.to(F32)
    ensemble, x_dev = on_device(Ensemble(copy.deepcopy(mods32)).eval(), x32, device)
    value = jacobian_penalty(ensemble, x_dev, nproj=3, mode=mode, projections=p32.to(device), backend=backend)
    assert value.dtype == F32
    ref64 = reference_penalty(mods64, x64, mode, "members", p64)
    # the plain float32 run on the fast path's device: on a GPU, cuDNN convolutions may use TF32 (torch's
    # default), for plain PyTorch as much as for fastjac
    mods32 = [m.to(device) for m in mods32]
    ref32 = reference_penalty(mods32, x32.to(device), mode, "members", p32.to(device))
    assert_close(value, ref64, rtol=0, atol=float32_atol(ref32.cpu(), ref64), name="float32 penalty")
    w64 = upstream_weights(3, F64)
    got = stacked_grads(ensemble, (w64.to(F32).to(device) * value).sum())
    want64 = member_grads(mods64, (w64 * ref64).sum())
    want32 = member_grads(mods32, (w64.to(F32).to(device) * ref32).sum())
    for key in want64:
        assert_close(got[key], want64[key], rtol=0, atol=float32_atol(want32[key].cpu(), want64[key]),
                     name=f"float32 penalty d/d{key}")


# --------------------------------------------------------------------------------------- exact & single
@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
def test_vjp_nproj_minus_one_is_exact(backend, device, arch, target):
    mods = make_members(arch, 3)
    x = make_input(2)
    ensemble, x_dev = on_device(Ensemble(copy.deepcopy(mods)).eval(), x, device)
    value = jacobian_penalty(ensemble, x_dev, nproj=-1, mode="vjp", target=target, backend=backend)
    if target == "members":
        expected = torch.stack([reference.penalty_exact(member, x) for member in mods])
        w = upstream_weights(3, F64)
    else:
        expected = reference.penalty_exact(reference.ensemble_model(mods), x)
        w = upstream_weights(1, F64)[0]
    assert_close(value, expected, rtol=RTOL64, atol=0, name="vjp nproj=-1")
    assert_grads_close(stacked_grads(ensemble, (w.to(device) * value).sum()), member_grads(mods, (w * expected).sum()),
                       rtol=RTOL64, atol_scale=RTOL64, name="vjp nproj=-1")
    # mode="exact" (reference jacrev on the live stacked parameters) agrees too
    exact = jacobian_penalty(ensemble, x_dev, mode="exact", target=target, backend=backend)
    assert_close(exact, expected, rtol=RTOL64, atol=0, name="mode=exact")


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_single_module_matches_reference(backend, device, arch, mode):
    (module,) = make_members(arch, 1)
    ref_module = copy.deepcopy(module)
    x = make_input(3)
    projections = make_projections(mode, 2, x, 10)
    module, x_dev = on_device(module, x, device)
    value = jacobian_penalty(module, x_dev, nproj=2, mode=mode, projections=projections.to(device), backend=backend)
    assert value.shape == ()
    expected = reference_penalty([ref_module], x, mode, "ensemble", projections)
    assert_close(value, expected, rtol=RTOL64, atol=0, name="single module penalty")
    assert_grads_close(engine_grads_module(module, value), member_grads([ref_module], expected),
                       rtol=RTOL64, atol_scale=RTOL64, name="single module penalty")


def engine_grads_module(module, value):
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {name: (torch.zeros_like(p) if g is None else g).unsqueeze(0) for (name, p), g in zip(params.items(), grads)}


# ------------------------------------------------------------------------------------- generic path
def hardtanh_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 7), nn.Hardtanh(), nn.Linear(7, 5))


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
def test_unfused_architecture_generic_path_correct_and_warns_once(monkeypatch, mode, target):
    monkeypatch.setattr(fastjac.ensemble, "_warned", set())  # "once" is per process; start from a clean slate
    torch.manual_seed(0)
    mods = [hardtanh_mlp().double() for _ in range(3)]
    ensemble = Ensemble(copy.deepcopy(mods))
    assert ensemble.graph is None and "Hardtanh" in ensemble.unsupported
    x = make_input(2)
    projections = make_projections(mode, 2, x, 5)
    with pytest.warns(UserWarning, match="generic"):
        value = jacobian_penalty(ensemble, x, nproj=2, mode=mode, target=target, projections=projections)
    expected = reference_penalty(mods, x, mode, target, projections)
    assert_close(value, expected, rtol=RTOL64, atol=0, name="generic path penalty")
    w = upstream_weights(3, F64) if target == "members" else upstream_weights(1, F64)[0]
    assert_grads_close(stacked_grads(ensemble, (w * value).sum()), member_grads(mods, (w * expected).sum()),
                       rtol=RTOL64, atol_scale=RTOL64, name="generic path penalty")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        logits = ensemble.member_logits(x)
        jacobian_penalty(ensemble, x, nproj=2, mode=mode, target=target, projections=projections)
    assert_close(logits, reference.member_logits(mods, x), rtol=RTOL64, atol=1e-14, name="generic logits")


def test_dropout_in_training_mode_takes_generic_path_with_warning(monkeypatch):
    monkeypatch.setattr(fastjac.ensemble, "_warned", set())
    mods = make_members("conv_s2_avgpool", 2)
    ensemble = Ensemble(copy.deepcopy(mods)).train()
    with pytest.warns(UserWarning, match="Dropout"):
        ensemble.member_logits(make_input(2))
    ensemble.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ensemble.fused()


# ------------------------------------------------------------------------------------- unbiasedness
# The engine draws its own projections (from `generator`). 40 calls of nproj = 100 give 4000 independent
# draws as 40 group means; their sample std / sqrt(40) is the estimator's own standard error.
# |mean - exact| < 4 SE is a 4-sigma bound (false alarm ~6e-5 by the CLT on group means of 100 draws),
# seeded, so deterministic. A wrong scale (C, nproj, B) or a non-unit / non-Gaussian draw misses by far more.
@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_fast_path_estimator_is_unbiased(backend, device, mode):
    torch.manual_seed(4)
    mods = [models.mlp(hidden=(9, 7), num_classes=4, in_features=12).double() for _ in range(2)]
    x = torch.rand(2, 12, dtype=F64)
    exact = torch.stack([reference.penalty_exact(m, x) for m in mods]).detach()
    ensemble, x_dev = on_device(Ensemble(mods).eval(), x, device)
    assert float(exact.min()) > 0
    g = torch.Generator(device=device).manual_seed(5)
    with torch.no_grad():
        groups = torch.stack([jacobian_penalty(ensemble, x_dev, nproj=100, mode=mode, backend=backend, generator=g)
                              for _ in range(40)]).cpu()  # [40, M]
    mean, se = groups.mean(0), groups.std(0) / 40 ** 0.5
    assert bool((se > 0).all())
    assert bool(((mean - exact).abs() < 4 * se).all()), f"{mode}: mean {mean.tolist()} exact {exact.tolist()} 4SE {(4 * se).tolist()}"


# ----------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_members_round_trip(arch):
    mods = make_members(arch, 3)
    ensemble = Ensemble(copy.deepcopy(mods)).eval()
    unstacked = ensemble.members()
    assert len(unstacked) == 3
    x = make_input(2)
    for original, copy_ in zip(mods, unstacked):
        assert type(copy_) is type(original)
        for (name, p), (name2, q) in zip(original.named_parameters(), copy_.named_parameters()):
            assert name == name2 and torch.equal(p, q) and q.dtype == F64
        assert torch.equal(copy_(x), original(x))
    again = Ensemble(unstacked).eval()
    assert torch.equal(again.member_logits(x), ensemble.member_logits(x))
    # the copies are detached: editing one leaves the ensemble alone
    before = ensemble.member_logits(x).detach().clone()
    with torch.no_grad():
        next(unstacked[0].parameters()).add_(1.0)
    assert torch.equal(ensemble.member_logits(x), before)


def test_members_keep_the_ensembles_dtype_after_conversion():
    """Ensemble.to(dtype) converts the stacked parameters; the unstacked members must follow (a float32
    copy of a float64 ensemble would silently lose precision, and fail on float64 inputs)."""
    ensemble = Ensemble(make_members("mlp", 2, F32)).double()
    assert ensemble.params()["1.weight"].dtype == F64
    x = make_input(2, F64)
    for index, member in enumerate(ensemble.members()):
        assert all(p.dtype == F64 for p in member.parameters()), f"member {index} is not float64"
        # nn.Linear adds the bias inside addmm, the engine in its epilogue: equal up to float64 rounding
        assert_close(member(x), ensemble.member_logits(x)[index], rtol=1e-13, atol=1e-15, name=f"member {index}")


@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_state_dict_save_load_round_trip(tmp_path, arch):
    ensemble = Ensemble(make_members(arch, 3, seed=0)).eval()
    path = tmp_path / "ensemble.pt"
    torch.save(ensemble.state_dict(), path)
    fresh = Ensemble(make_members(arch, 3, seed=1)).eval()  # different initial weights
    x = make_input(2)
    assert not torch.equal(fresh.member_logits(x), ensemble.member_logits(x))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh.member_logits(x), ensemble.member_logits(x))
    for key, value in ensemble.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
