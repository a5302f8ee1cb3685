"""torch.compile through fastjac: the extension's ops are registered with the dispatcher (schemas and fake
kernels: ``torch.library.opcheck``), and a training step built on the one-pass API compiles as ONE graph
(``fullgraph=True``: no graph break inside fastjac) whose loss and every parameter gradient equal eager."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastjac
from fastjac import Ensemble, models
from fastjac.jacobian import make_projections
from fastjac.ops import compiled_cpu, native
from tests.helpers import assert_close, needs_backend

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = [pytest.param(name, marks=needs_backend(name)) for name in ("torch", "cpp")]
needs_extension = pytest.mark.skipif(native.OPS is None, reason="the C++ extension fastjac._C is not built")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_registered_ops_pass_opcheck(dtype):
    """Schema, fake kernel (shapes, dtypes, strides) and mutation annotations of every registered op."""
    ops, m, s, b, f_out, f_in = native.OPS, 2, 3, 4, 5, 6
    rand = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    y, bias = rand(m, s, b * f_out), rand(m, f_out)
    mask = y[:, 0] > 0
    cases = [
        (ops.stream_epilogue_forward, (y, bias, 1, True)),
        (ops.stream_epilogue_forward, (y, None, 1, False)),
        (ops.stream_epilogue_backward, (y, mask, f_out, 1, True)),
        (ops.stream_epilogue_backward, (y, None, f_out, 1, False)),
    ]
    weight = rand(m, f_out, f_in)
    for x in (rand(s * b, f_in), rand(m, s * b, f_in)):
        out, lin_mask = ops.stacked_linear_forward(x, weight, bias, s, True)
        cases += [(ops.stacked_linear_forward, (x, weight, bias, s, True)),
                  (ops.stacked_linear_forward, (x, weight, None, s, False)),
                  (ops.stacked_linear_backward, (torch.randn_like(out), x, weight, lin_mask, s, True, True)),
                  (ops.stacked_linear_backward, (torch.randn_like(out), x, weight, None, s, False, False))]
    a, c = rand(m, b, f_in), rand(m, f_in, f_out)
    cases += [(ops.stacked_addmm_, (rand(m, b, f_out), a, c, bias, False)),
              (ops.stacked_addmm_, (rand(m, b, f_out), a, c, None, True)),
              (ops.stacked_addmm_, (rand(m, b, f_out), rand(b, f_in).expand(m, b, f_in), c.transpose(1, 2).contiguous()
                                    .transpose(1, 2), None, False))]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


@needs_extension
@pytest.mark.parametrize("shared", [True, False])
def test_forward_ops_registered_autograd_gradcheck_float64(shared):
    """The two forward ops are differentiable on their own (registered autograd), in float64."""
    torch.manual_seed(0)
    m, s, b, f_out, f_in = 2, 2, 3, 4, 5
    x = torch.randn(*(() if shared else (m,)), s * b, f_in, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(m, f_out, f_in, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(m, f_out, dtype=torch.float64, requires_grad=True)
    linear = lambda x, w, b: native.OPS.stacked_linear_forward(x, w, b, s, True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(linear, (x, weight, bias))
    y = torch.randn(m, s, b * f_out, dtype=torch.float64, requires_grad=True)
    epilogue = lambda y, bias: native.OPS.stream_epilogue_forward(y, bias, 1, True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(epilogue, (y, bias))


def _loss_fn(ensemble, mode, target, backend):
    def loss(x, y, projections):
        penalty, logits = fastjac.jacobian_penalty(ensemble, x, mode=mode, target=target, backend=backend,
                                                   projections=projections, return_logits=True)
        labels = y.repeat(logits.shape[0])
        return F.cross_entropy(logits.flatten(0, 1), labels) + 0.1 * penalty.sum()
    return loss


def _compare_compiled(arch, mode, target, backend, compiler):
    torch.manual_seed(0)
    build = (lambda: models.mlp(hidden=(16, 8))) if arch == "mlp" else (lambda: models.lenet((3, 4), (6, 5)))
    ensemble = Ensemble([build() for _ in range(3)])
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    projections = make_projections(mode, 2, x.shape, 10, generator=torch.Generator().manual_seed(1))
    loss = _loss_fn(ensemble, mode, target, backend)
    params = list(ensemble.parameters())
    eager = loss(x, y, projections)
    eager_grads = torch.autograd.grad(eager, params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(loss, fullgraph=True, backend=compiler)(x, y, projections)  # fullgraph: no break
    # Dynamo warns once per process where it traces through a functools cache (fastjac keeps plain dicts)
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    compiled_grads = torch.autograd.grad(compiled, params)
    # the compiled graph may fuse or reorder float32 sums: a few float32 ulps of the largest entry
    assert_close(compiled, eager, rtol=1e-5, atol=0, name="loss")
    for index, (a, b) in enumerate(zip(compiled_grads, eager_grads)):
        assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()), name=f"grad {index}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_compiled_step_equals_eager(backend, arch, mode):
    """AOT autograd over the fake kernels (the tracing torch.compile does, without code generation)."""
    _compare_compiled(arch, mode, "members", backend, "aot_eager")


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_compiled_ensemble_target_equals_eager(mode):
    _compare_compiled("mlp", mode, "ensemble", "cpp" if "cpp" in fastjac.backends.available() else "torch",
                      "aot_eager")


def test_inductor_step_equals_eager():
    """The default compiler (inductor: generated C++ around the extension's ops), on the automatic backend
    (one case: its first compilation costs tens of seconds here)."""
    _compare_compiled("mlp", "vjp", "members", None, "inductor")



def test_compiled_cpu_ops_pass_opcheck():
    """The opaque ops compiled CPU graphs call: the ReLU backward (same shapes, and a mask broadcast over
    streams) and the in-place Gaussian draw."""
    grad, activation = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5).relu()
    for args in ((grad, activation), (grad, activation[:, :1])):
        torch.library.opcheck(torch.ops.fastjac.relu_backward.default, args)
    assert_close(torch.ops.fastjac.relu_backward(grad, activation), grad * (activation > 0), rtol=0, atol=0,
                 name="masked gradient")
    torch.library.opcheck(torch.ops.fastjac.normal_.default, (torch.empty(3, 4),),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.manual_seed(3)
    draws = compiled_cpu.randn(2000, dtype=torch.float64, device="cpu")
    torch.manual_seed(3)
    assert_close(draws, torch.empty(2000, dtype=torch.float64).normal_(), rtol=0, atol=0, name="draws")


def _compiled_graph_targets(mode):
    torch.manual_seed(0)
    ensemble = Ensemble([models.mlp(hidden=(16, 8)) for _ in range(2)])
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def loss(x, y):  # the projections drawn inside the compiled step, as in a user's loop
        penalty, logits = fastjac.jacobian_penalty(ensemble, x, mode=mode, backend="torch", return_logits=True)
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(2)) + 0.1 * penalty.sum()

    torch.compile(loss, fullgraph=True, backend=capture)(x, y)
    return {str(node.target) for graph in graphs for module in graph.modules()
            if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes}


def test_compiled_cpu_graph_calls_the_opaque_ops():
    """Under torch.compile on a CPU the chain's ReLU backward and the jvp mode's Gaussian draw are the
    opaque ops, not ATen's threshold_backward and randn (inductor's code for those made the compiled MLP
    steps 1.2x eager here)."""
    vjp, jvp = _compiled_graph_targets("vjp"), _compiled_graph_targets("jvp")
    assert any("fastjac.relu_backward" in target for target in vjp), sorted(vjp)
    assert not any("threshold_backward" in target for target in vjp), sorted(vjp)
    assert any("fastjac.normal_" in target for target in jvp), sorted(jvp)
    assert not any("randn" in target for target in jvp), sorted(jvp)


def test_compiled_draws_differ_between_calls():
    """Two draws of one shape in one compiled function stay two draws (not merged as a common
    subexpression), and each compiled call draws afresh."""
    def two_draws(x):
        first = make_projections("jvp", 1, x.shape, 10)
        second = make_projections("jvp", 1, x.shape, 10)
        return first, second

    x = torch.zeros(4, 3)
    compiled = torch.compile(two_draws, fullgraph=True)
    first, second = compiled(x)
    again, _ = compiled(x)
    assert not torch.equal(first, second) and not torch.equal(first, again)
    assert 0.5 < float(torch.cat([first, second]).std()) < 1.5
