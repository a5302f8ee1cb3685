"""The Linear(+ReLU) chain Function (fastjac.ops.linear_chain): float64 gradcheck of its hand-written
backward, and chains of every shape the engine hands it (bias-free layers, a ReLU after the last layer,
shape-free layers in between, one layer) against fastjac.reference on the unstacked members.

The MLP cases of tests/test_engine.py run through this Function as well (backends torch and cpp); here
it is also checked that they do, and the layer-by-layer engine path is kept under test for MLPs.
"""
import copy
import dataclasses

import pytest
import torch
from torch import nn

from fastjac import Ensemble, backends
from fastjac.jacobian import make_projections, penalty_and_logits
from fastjac.ops import linear_chain
from fastjac.testing import (RTOL64, assert_close, assert_grads_close, assert_penalty_matches_reference, stacked_grads,
                             upstream_weights)
from tests.helpers import backend_devices

F64 = torch.float64
BACKENDS = backend_devices()
pytestmark = pytest.mark.usefixtures("one_thread")


def needs_chain(backend, capability):
    """Skip, naming the reason, where the chain Function does not run (``Backend.<capability>`` is off)."""
    if not getattr(backends.get(backend), capability):
        pytest.skip(f"the chain Function does not run on {backend!r} (Backend.{capability} is off)")


def make_input(batch, dtype=F64, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 28, 28, generator=g, dtype=dtype).to(device)


def projections_for(mode, nproj, x, classes, seed=2):
    return make_projections(mode, nproj, x.shape, classes, generator=torch.Generator().manual_seed(seed),
                            dtype=x.dtype).to(x.device)


def chain_inputs(members, widths, batch, relus, biases, per_member, seed=0, margin=1e-3, device="cpu"):
    """x, weights, biases in float64 whose primal pre-activations all stay ``margin`` away from the ReLU
    kink, so gradcheck's perturbations (1e-6) never cross it."""
    for attempt in range(seed, seed + 1000):
        g = torch.Generator().manual_seed(attempt)
        x = torch.randn((members, batch, widths[0]) if per_member else (batch, widths[0]), generator=g, dtype=F64)
        weights = [torch.randn(members, out, fan_in, generator=g, dtype=F64)
                   for fan_in, out in zip(widths[:-1], widths[1:])]
        bias_list = [torch.randn(members, w.shape[1], generator=g, dtype=F64) if has else None
                     for w, has in zip(weights, biases)]
        h, closest = x if per_member else x.expand(members, -1, -1), float("inf")
        for weight, bias, relu in zip(weights, bias_list, relus):
            h = torch.bmm(h, weight.transpose(1, 2)) + (0 if bias is None else bias.unsqueeze(1))
            closest = min(closest, float(h.abs().min()))
            h = h.relu() if relu else h
        if closest > margin:
            return x.to(device), [w.to(device) for w in weights], [None if b is None else b.to(device) for b in bias_list]
    raise AssertionError("no seed kept the pre-activations away from the ReLU kink")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("relus,biases", [((True, False), (True, True)), ((False, True, True), (False, True, False))])
def test_gradcheck_float64(backend, device, mode, target, per_member, relus, biases):
    """On 'cpp' the products are the extension's member-parallel ones (rows split into blocks when the
    tests run with several threads: see test_member_parallel_products_match_aten)."""
    needs_chain(backend, "chain_products")
    members, batch, nproj = 2, 3, 2
    widths = (4, 5, 3) if len(relus) == 2 else (4, 3, 5, 3)
    x, weights, bias_list = chain_inputs(members, widths, batch, relus, biases, per_member, device=device)
    g = torch.Generator().manual_seed(7)
    projections = (torch.randn(nproj, batch, widths[-1], generator=g, dtype=F64) if mode == "vjp"
                   else torch.randn(nproj, batch, widths[0], generator=g, dtype=F64)).to(device)
    spec = linear_chain.ChainSpec(mode, target, relus, biases, 0.7, backends.get(backend))
    params = [p.requires_grad_() for p in weights + [b for b in bias_list if b is not None]]
    count = len(weights)

    def f(*flat):
        ws, bs, rest = list(flat[:count]), [], list(flat[count:])
        for has in biases:
            bs.append(rest.pop(0) if has else None)
        return linear_chain.chain_penalty(spec, x, projections, ws, bs)

    assert torch.autograd.gradcheck(f, params)


def odd_chain():
    """Bias-free first layer, Identity and eval-mode Dropout between layers, a Flatten after a Linear, and a
    ReLU after the last layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 6, bias=False), nn.ReLU(), nn.Identity(),
                         nn.Linear(6, 5), nn.Dropout(0.2), nn.Flatten(), nn.Linear(5, 4), nn.ReLU())


def single_linear():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("build", [odd_chain, single_linear])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
def test_chains_match_reference_float64(backend, device, build, mode, target):
    needs_chain(backend, "chain_products")
    torch.manual_seed(0)
    mods = [build().to(device, F64).eval() for _ in range(3)]
    ensemble = Ensemble(copy.deepcopy(mods)).eval()
    x = make_input(4, device=device)
    classes = mods[0][-1].out_features if isinstance(mods[0][-1], nn.Linear) else mods[0][-2].out_features
    value = assert_penalty_matches_reference(ensemble, mods, x, mode=mode, target=target,
                                             projections=projections_for(mode, 2, x, classes), backend=backend,
                                             label=build.__name__)
    assert "ChainPenaltyBackward" in _grad_fn_names(value)


def _grad_fn_names(tensor):
    names, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_mlp_takes_the_chain_path_and_the_engine_path_agrees(mode):
    """An MLP on torch runs the chain Function; with it switched off, the layer-by-layer engine (the
    Triton backend's path for MLPs) gives the same logits, penalty and gradients."""
    torch.manual_seed(0)
    mods = [nn.Sequential(nn.Flatten(), nn.Linear(784, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(),
                          nn.Linear(5, 10)).to(F64) for _ in range(3)]
    ensemble = Ensemble(mods).eval()
    x = make_input(3)
    projections = projections_for(mode, 2, x, 10)

    def run():
        logits, penalty = penalty_and_logits(ensemble, x, mode=mode, projections=projections, backend=chosen)
        value = (upstream_weights(3) * penalty).sum() + logits.square().mean()
        return logits, penalty, stacked_grads(ensemble, value), _grad_fn_names(penalty)

    chosen = backends.get("torch")
    logits, penalty, grads, names = run()
    assert "ChainPenaltyBackward" in names
    chosen = dataclasses.replace(chosen, chain_products=None)  # the chain Function off, as on Triton
    engine_logits, engine_penalty, engine_grads_, engine_names = run()
    assert "ChainPenaltyBackward" not in engine_names
    assert_close(logits, engine_logits, rtol=RTOL64, atol=0, name="logits")
    assert_close(penalty, engine_penalty, rtol=RTOL64, atol=0, name="penalty")
    assert_grads_close(grads, engine_grads_, rtol=RTOL64, atol_scale=RTOL64, name=f"{mode} chain vs engine")


def test_input_that_requires_grad_takes_the_engine():
    """The chain Function forms no input gradient: such a call goes to the engine, whose logits are
    differentiable w.r.t. x (the penalty of a piecewise-linear network has a zero x-gradient a.e.)."""
    torch.manual_seed(0)
    ensemble = Ensemble([nn.Sequential(nn.Flatten(), nn.Linear(784, 5), nn.ReLU(), nn.Linear(5, 3)).to(F64)
                         for _ in range(2)]).eval()
    x = make_input(2).requires_grad_()
    logits, penalty = penalty_and_logits(ensemble, x, mode="jvp", projections=projections_for("jvp", 1, x, 3),
                                         backend="torch")
    assert "ChainPenaltyBackward" not in _grad_fn_names(penalty)
    (grad,) = torch.autograd.grad(logits.sum(), x)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("members,rows", [(5, 128), (1, 33), (4, 7)])
def test_member_parallel_products_match_aten(threads, members, rows):
    """stacked_addmm_ in every form the chain uses (shared and per-member inputs, bias, transposed
    operands, accumulation) equals ATen's products, with rows split over 1 to 3 threads."""
    if "cpp" not in backends.available():
        pytest.skip("the C++ extension is not built")
    aten = linear_chain.ATenProducts
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(rows, 9, generator=g, dtype=F64)
    per_member = torch.randn(members, rows, 9, generator=g, dtype=F64)
    weight = torch.randn(members, 6, 9, generator=g, dtype=F64)
    bias = torch.randn(members, 6, generator=g, dtype=F64)
    grad_out = torch.randn(members, rows, 6, generator=g, dtype=F64)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        parallel = backends.get("cpp").chain_products()  # built per pass: it reads the thread count
        for h in (shared, per_member):
            for b in (None, bias):
                assert_close(parallel.linear(h, weight, b), aten.linear(h, weight, b), rtol=1e-13, atol=1e-13,
                             name=f"linear {h.dim()}-D input, bias {b is not None}")
            assert_close(parallel.weight_grad(None, grad_out, h), aten.weight_grad(None, grad_out, h),
                         rtol=1e-13, atol=1e-13, name="weight_grad")
            start = torch.randn(members, 6, 9, generator=g, dtype=F64)
            assert_close(parallel.weight_grad(start.clone(), grad_out, h), aten.weight_grad(start.clone(), grad_out, h),
                         rtol=1e-13, atol=1e-13, name="weight_grad accumulated")
        assert_close(parallel.matmul(grad_out, weight), aten.matmul(grad_out, weight), rtol=1e-13, atol=1e-13,
                     name="matmul")
        assert_close(parallel.matmul(grad_out.transpose(1, 2), per_member),
                     aten.matmul(grad_out.transpose(1, 2), per_member), rtol=1e-13, atol=1e-13, name="matmul, transposed")
    finally:
        torch.set_num_threads(saved)


def test_member_parallel_products_reject_bad_shapes():
    pytest.importorskip("fastjac._C", reason="the C++ extension is not built")
    from fastjac import _C

    with pytest.raises(RuntimeError, match="shapes do not chain"):
        _C.stacked_addmm_(torch.empty(2, 3, 4), torch.randn(2, 3, 5), torch.randn(2, 6, 4), None, False)
    with pytest.raises(RuntimeError, match="share one dtype"):
        _C.stacked_addmm_(torch.empty(2, 3, 4), torch.randn(2, 3, 5, dtype=F64), torch.randn(2, 5, 4), None, False)
    with pytest.raises(RuntimeError, match="non-overlapping rows or columns"):  # rows repeated: stride 0
        _C.stacked_addmm_(torch.empty(2, 3, 4), torch.randn(2, 1, 5).expand(2, 3, 5), torch.randn(2, 5, 4), None,
                          False)
    with pytest.raises(RuntimeError, match="bias must be"):
        _C.stacked_addmm_(torch.empty(2, 3, 4), torch.randn(2, 3, 5), torch.randn(2, 5, 4), torch.randn(2, 5), False)



@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("relus,biases", [((True, False), (True, True)), ((False, True, True), (False, True, False))])
def test_chain_logits_gradcheck_float64(backend, device, per_member, relus, biases):
    needs_chain(backend, "chain_products")
    members, batch = 2, 3
    widths = (4, 5, 3) if len(relus) == 2 else (4, 3, 5, 3)
    x, weights, bias_list = chain_inputs(members, widths, batch, relus, biases, per_member, device=device)
    params = [p.requires_grad_() for p in weights + [b for b in bias_list if b is not None]]
    count = len(weights)

    def f(*flat):
        ws, rest = list(flat[:count]), list(flat[count:])
        return linear_chain.chain_logits(backends.get(backend), x, ws, [rest.pop(0) if has else None for has in biases], relus)

    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("per_member", [False, True])
def test_plain_pass_takes_the_chain_and_matches_the_engine_and_the_members(backend, device, per_member):
    """A plain training pass of an MLP on a PLAIN_BACKENDS backend runs ChainLogits; its logits and
    parameter gradients equal the layer-by-layer engine's and the unstacked members'."""
    needs_chain(backend, "plain_chain")
    torch.manual_seed(0)
    mods = [nn.Sequential(nn.Flatten(), nn.Linear(784, 6, bias=False), nn.ReLU(), nn.Identity(), nn.Linear(6, 5),
                          nn.Flatten(), nn.Linear(5, 4), nn.ReLU()).to(device, F64) for _ in range(3)]
    ensemble = Ensemble(copy.deepcopy(mods)).train()
    x = torch.rand(3, 4, 1, 28, 28, dtype=F64, device=device) if per_member else make_input(4, device=device)

    def run():
        logits = ensemble.member_logits(x, per_member=per_member, backend=chosen)
        value = (upstream_weights(3).to(device).view(-1, 1, 1) * logits.square()).sum()
        return logits, stacked_grads(ensemble, value), _grad_fn_names(logits)

    chosen = backends.get(backend)
    logits, grads, names = run()
    assert "ChainLogitsBackward" in names
    chosen = dataclasses.replace(chosen, plain_chain=False)
    engine_logits, engine_grads_, engine_names = run()
    assert "ChainLogitsBackward" not in engine_names
    assert_close(logits, engine_logits, rtol=RTOL64, atol=0, name="logits")
    assert_grads_close(grads, engine_grads_, rtol=RTOL64, atol_scale=RTOL64, name="plain chain vs engine")
    member_logits = torch.stack([m(x[i] if per_member else x) for i, m in enumerate(mods)])
    assert_close(logits, member_logits, rtol=RTOL64, atol=0, name="logits vs the members")
    with torch.no_grad():  # inference stays on the engine
        assert "ChainLogitsBackward" not in _grad_fn_names(ensemble.member_logits(x, per_member=per_member,
                                                                                  backend=backend))
