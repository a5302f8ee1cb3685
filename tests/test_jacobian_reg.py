"""``fastjac.JacobianReg`` (Hoffman et al.'s criterion) on a fastjac Ensemble: the penalty from what the
forward recorded (no second forward, no double backward), equal to Hoffman's double backprop on the
unstacked members for the same projections, for values and every parameter gradient; the fallback for
any other y; bad input. Also the two autograd Functions of the recorded chain path, gradchecked."""
import pytest
import torch
import torch.nn.functional as F

import fastjac
from fastjac import Ensemble, JacobianReg, engine, models, reference
from fastjac.ops import linear_chain
from tests.helpers import assert_close, needs_backend

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
BACKENDS = [pytest.param(name, marks=needs_backend(name)) for name in ("torch", "cpp")]
# float64 on both sides; sums of a few hundred products in another order: ~1e-14 relative at worst
RTOL64 = 1e-10


def build(arch):
    if arch == "mlp":
        return models.mlp(hidden=(7, 5)).to(F64)
    return models.lenet(channels=(3, 4), hidden=(6, 5)).to(F64)


def members_and_ensemble(arch, count=3):
    torch.manual_seed(0)
    members = [build(arch) for _ in range(count)]
    return members, Ensemble(members)


def zeros_for_unused(grads, like):
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def member_gradients(loss, members, names):
    """d loss / d each member's parameters, restacked as [M, ...] in ``names`` order."""
    flat = [member.get_parameter(name) for name in names for member in members]
    grads = zeros_for_unused(torch.autograd.grad(loss, flat, allow_unused=True), flat)
    count = len(members)
    return [torch.stack(grads[k * count:(k + 1) * count]) for k in range(len(names))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
@pytest.mark.parametrize("n", [1, 3, -1])
@pytest.mark.parametrize("output", ["mean", "members"])
def test_fast_path_equals_hoffman_double_backprop(backend, arch, n, output):
    members, ensemble = members_and_ensemble(arch)
    fastjac.backends.use(backend)
    try:
        x = torch.rand(5, 1, 28, 28, dtype=F64, requires_grad=True)
        y = ensemble(x) if output == "mean" else ensemble.member_logits(x)
        assert getattr(y, "_fastjac_record", None) is not None, "the Ensemble's pass was not recorded"
        torch.manual_seed(7)
        fast = JacobianReg(n)(x, y)
    finally:
        fastjac.backends.use(None)
    x_ref = x.detach().requires_grad_(True)
    y_ref = reference.ensemble_logits(members, x_ref) if output == "mean" else reference.member_logits(members, x_ref)
    torch.manual_seed(7)  # the same projections: both paths draw them from the global generator alike
    slow = JacobianReg(n)(x_ref, y_ref)
    assert fast.shape == (() if output == "mean" else (3,))
    assert_close(fast, slow, rtol=RTOL64, atol=0, name="penalty")
    names = list(ensemble.params())
    upstream = torch.rand(fast.shape, dtype=F64) + 0.5  # one shared random upstream weight per member
    fast_grads = zeros_for_unused(torch.autograd.grad((upstream * fast).sum(), list(ensemble.params().values()),
                                                      allow_unused=True), list(ensemble.params().values()))
    slow_grads = member_gradients((upstream * slow).sum(), members, names)
    for name, a, b in zip(names, fast_grads, slow_grads):
        assert_close(a, b, rtol=RTOL64, atol=1e-13 * float(b.abs().max()), name=f"grad {name}")


@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_hoffman_style_training_loss_gradients_equal_the_reference(arch):
    """CE(ens(x)) + lam * JacobianReg(x, ens(x)): every parameter gradient and x.grad as Hoffman's code
    on a loop of the members gives them."""
    members, ensemble = members_and_ensemble(arch)
    t = torch.randint(0, 10, (5,))
    x = torch.rand(5, 1, 28, 28, dtype=F64, requires_grad=True)
    y = ensemble(x)
    torch.manual_seed(3)
    loss = F.cross_entropy(y, t) + 0.3 * JacobianReg(2)(x, y)
    names = list(ensemble.params())
    fast = torch.autograd.grad(loss, [x, *ensemble.params().values()], allow_unused=True)
    x_ref = x.detach().requires_grad_(True)
    y_ref = reference.ensemble_logits(members, x_ref)
    torch.manual_seed(3)
    loss_ref = F.cross_entropy(y_ref, t) + 0.3 * JacobianReg(2)(x_ref, y_ref)
    assert_close(loss, loss_ref, rtol=RTOL64, atol=0, name="loss")
    (x_grad_ref,) = torch.autograd.grad(loss_ref, x_ref, retain_graph=True)
    # x.grad: the CE term's; the penalty adds nothing for piecewise-linear members (its x-gradient is 0 a.e.)
    assert_close(fast[0], x_grad_ref, rtol=RTOL64, atol=1e-14, name="x grad")
    slow = member_gradients(loss_ref, members, names)
    for name, a, b in zip(names, zeros_for_unused(fast[1:], slow), slow):
        assert_close(a, b, rtol=RTOL64, atol=1e-13 * float(b.abs().max()), name=f"grad {name}")


def test_no_second_forward(monkeypatch):
    """The penalty runs only the cotangent chain: neither the engine's forward nor the chain's runs again."""
    for arch in ("mlp", "lenet"):
        _, ensemble = members_and_ensemble(arch)
        x = torch.rand(4, 1, 28, 28, dtype=F64, requires_grad=True)
        y = ensemble(x)
        calls = []
        monkeypatch.setattr(engine.Engine, "forward", lambda *a, **k: calls.append("engine"))
        monkeypatch.setattr(linear_chain, "_forward_layers", lambda *a, **k: calls.append("chain"))
        penalty = JacobianReg(1)(x, y)
        penalty.backward()
        monkeypatch.undo()
        assert calls == [], f"{arch}: JacobianReg ran a forward again: {calls}"


def test_per_member_inputs():
    members, ensemble = members_and_ensemble("mlp")
    x = torch.rand(3, 4, 1, 28, 28, dtype=F64, requires_grad=True)
    y = ensemble.member_logits(x, per_member=True)
    torch.manual_seed(5)
    fast = JacobianReg(2)(x, y)
    torch.manual_seed(5)
    v = reference.sphere_projections(2, 4, 10, dtype=F64)
    expected = torch.stack([0.5 * reference.penalty_vjp(member, x[index].detach(), v)
                            for index, member in enumerate(members)])
    assert_close(fast, expected, rtol=RTOL64, atol=0, name="per-member penalty")


def test_fallback_for_other_modules_is_hoffmans_double_backprop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 10)).to(F64)
    x = torch.rand(4, 1, 28, 28, dtype=F64, requires_grad=True)
    y = model(x)
    torch.manual_seed(2)
    value = JacobianReg(-1)(x, y)
    exact = reference.penalty_exact(model, x.detach())
    assert_close(value, 0.5 * exact, rtol=1e-10, atol=0, name="exact penalty")


def test_bad_input():
    _, ensemble = members_and_ensemble("mlp")
    x = torch.rand(4, 1, 28, 28, dtype=F64, requires_grad=True)
    other = torch.rand(4, 1, 28, 28, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="another tensor than x"):
        JacobianReg()(other, ensemble(x))
    with pytest.raises(ValueError, match="must require grad"):
        JacobianReg()(x.detach(), ensemble(x))
    with pytest.raises(ValueError, match="not computed from x"):
        JacobianReg()(x, torch.rand(4, 10, dtype=F64))
    model = models.mlp(hidden=(7, 5)).to(F64)
    with pytest.raises(ValueError, match="not computed from x"):
        JacobianReg()(x, model(other))
    with pytest.raises(ValueError, match=r"y must be logits \[B=4, C\]"):
        JacobianReg()(x, ensemble(x)[:3])
    with pytest.raises(ValueError, match="nproj"):
        JacobianReg(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False])
def test_recorded_chain_functions_gradcheck_float64(backend, shared):
    """ChainLogits with an input that requires grad, and RecordedPenalty, in float64."""
    torch.manual_seed(0)
    members, widths = 2, (6, 5, 4, 3)
    weights = [torch.randn(members, o, i, dtype=F64, requires_grad=True) for i, o in zip(widths[:-1], widths[1:])]
    biases = [torch.randn(members, o, dtype=F64, requires_grad=True) for o in widths[1:]]
    relus = (True, True, False)
    x = torch.randn(*(() if shared else (members,)), 5, widths[0], dtype=F64, requires_grad=True)

    chosen = fastjac.backends.get(backend)

    def logits(x, *params):
        return linear_chain.chain_logits(chosen, x, params[:3], params[3:], relus)

    assert torch.autograd.gradcheck(logits, (x, *weights, *biases))
    record = linear_chain.ChainRecord(chosen, relus, weights)
    linear_chain.chain_logits(chosen, x.detach(), [w.detach() for w in weights], [b.detach() for b in biases],
                              relus, record)
    v = reference.sphere_projections(2, 5, widths[-1], dtype=F64)
    for target in ("members", "ensemble"):
        def penalty(*ws):
            record.weights = list(ws)
            return linear_chain.recorded_penalty(record, v, 0.7, target)

        assert torch.autograd.gradcheck(penalty, tuple(weights))


def _recorded_penalty_node(tensor):
    """The RecordedPenalty node in the graph of ``tensor``."""
    pending, seen = [tensor.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "RecordedPenalty" in type(node).__name__:
            return node
        pending.extend(next_node for next_node, _ in node.next_functions)
    raise AssertionError("no RecordedPenalty node")


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_hands_its_weight_gradients_to_the_forward(backend):
    """The recorded penalty's backward leaves its weight gradients to the forward's backward (one
    accumulation, no second gradient per weight for autograd to add) exactly when that backward runs in
    the same call; every way of asking for gradients still gets the reference's: a full backward, two
    penalties of one output, the penalty alone, the penalty's gradient w.r.t. y only (no hand-off: the
    forward's backward does not run), ``backward(inputs=...)`` and a retained graph run twice."""
    members, ensemble = members_and_ensemble("mlp")
    params = list(ensemble.params().values())
    names = list(ensemble.params())
    t = torch.randint(0, 10, (5,))
    x_data = torch.rand(5, 1, 28, 28, dtype=F64)

    def losses(reg_count, with_ce, fast):
        x = x_data.clone().requires_grad_(True)
        y = ensemble(x) if fast else reference.ensemble_logits(members, x)
        torch.manual_seed(5)
        loss = F.cross_entropy(y, t) if with_ce else 0.0
        for _ in range(reg_count):
            loss = loss + 0.3 * JacobianReg(1)(x, y)
        return loss, y

    def reference_grads(reg_count=1, with_ce=True):
        loss, _ = losses(reg_count, with_ce, fast=False)
        return member_gradients(loss, members, names)

    def check(grads, expected, what):
        for name, a, b in zip(names, grads, expected):
            assert_close(a, b, rtol=RTOL64, atol=1e-13 * float(b.abs().max()), name=f"{what}: grad {name}")

    fastjac.backends.use(backend)
    try:
        handed = []
        loss, y = losses(1, True, fast=True)
        _recorded_penalty_node(loss).register_hook(lambda grad_inputs, _: handed.append(grad_inputs[-len(params):]))
        ensemble.zero_grad()
        loss.backward()
        assert handed and all(g is None for g in handed[0]), "the penalty returned its weight gradients itself"
        check([p.grad for p in params], reference_grads(), "full backward")
        record = y._fastjac_record.chain
        assert record.handoffs == {}

        loss, _ = losses(2, True, fast=True)
        check(torch.autograd.grad(loss, params), reference_grads(2), "two penalties")

        loss, _ = losses(1, False, fast=True)
        check(torch.autograd.grad(loss, params), reference_grads(with_ce=False), "penalty alone")

        x = x_data.clone().requires_grad_(True)
        y = ensemble(x)
        torch.manual_seed(5)
        penalty = JacobianReg(1)(x, y)
        (grad_y,) = torch.autograd.grad(penalty, y, retain_graph=True, allow_unused=True)
        assert grad_y is None or not grad_y.any()  # the penalty's y is an ordering edge, no gradient
        assert y._fastjac_record.chain.handoffs == {}, "a hand-off was left for a backward that never ran"
        check(torch.autograd.grad(F.cross_entropy(y, t) + 0.3 * penalty, params), reference_grads(),
              "after a y-only gradient")

        loss, _ = losses(1, True, fast=True)
        ensemble.zero_grad()
        loss.backward(inputs=[params[0]])
        check([params[0].grad], reference_grads()[:1], "backward(inputs=...)")

        loss, _ = losses(1, True, fast=True)
        ensemble.zero_grad()
        loss.backward(retain_graph=True)
        loss.backward()
        check([p.grad for p in params], [2 * g for g in reference_grads()], "retained graph, twice")
    finally:
        fastjac.backends.use(None)
