"""Members as torch.fx graphs (fastjac/graph.py): functional calls, nested modules and residual adds fuse,
each ReLU fuses into the layer before it only where that layer feeds nothing else, and what cannot be
traced or fused is named. Residual graphs against the reference: logits, penalties (both modes and
targets, nproj 1 and 3, M 1 and 5) and every parameter gradient in float64."""
import copy
import operator
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastjac
from fastjac import Ensemble, layers
from fastjac.graph import INPUT, parse
from tests.engine_cases import (F64, assert_logits_match_reference, assert_penalty_matches_reference, make_input,
                                make_projections)

pytestmark = pytest.mark.usefixtures("one_thread")


class Functional(nn.Module):
    """Every supported spelling of a functional call, in a nested module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, stride=2)                   # 28 -> 13
        self.inner = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)))
        self.fc1 = nn.Linear(3 * 13 * 13, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = torch.relu(self.inner(h)) + h                          # torch.relu, x + y (operator.add)
        h = torch.flatten(h, 1)
        a = self.fc1(h).relu()                                     # x.relu()
        b = torch.tanh(self.fc2(a))
        c = torch.add(a, F.gelu(b))                                # torch.add
        return self.head(c.flatten(1))                             # x.flatten(1)


class ResidualMLP(nn.Module):
    """Residual adds in the member-major layout, a fork read by three layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(784, 9), nn.Linear(9, 9), nn.Linear(9, 9), nn.Linear(9, 5)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        h = h + self.fc3(F.relu(self.fc2(h))) + torch.sigmoid(h)
        return self.fc4(h)


class ResidualCNN(nn.Module):
    """An identity block and a projection block (rows layout), then an add of a Linear (member-major)
    and a flattened conv output (rows): the two layouts meet in one add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)                        # 28 -> 14
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding=1))
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)                        # 14 -> 7
        self.shortcut = nn.Conv2d(4, 6, 1, stride=2, bias=False)
        self.fc = nn.Linear(6 * 49, 10)
        self.side = nn.Conv2d(6, 10, 7)                                            # 7 -> 1
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = F.relu(self.block(h) + h)
        h = F.relu(self.down(h) + self.shortcut(h))
        return self.head(F.relu(self.fc(h.flatten(1)) + self.side(h).flatten(1)))


class InputResidual(nn.Module):
    """An add of a per-member conv output and the shared input itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(784, 5)

    def forward(self, x):
        return self.fc(torch.tanh(x + self.conv(x)).flatten(1))


GRAPHS = {"functional": Functional, "residual_mlp": ResidualMLP, "residual_cnn": ResidualCNN,
          "input_residual": InputResidual}


def make_graph_case(name, members, train=False, seed=0):
    torch.manual_seed(seed)
    mods = [GRAPHS[name]().to(F64).train(train) for _ in range(members)]
    ensemble = Ensemble(copy.deepcopy(mods)).train(train)
    assert ensemble.graph is not None and ensemble.fused(), f"{name}: {ensemble.unsupported}"
    return mods, ensemble, make_input(3, low=-1.0)


# ------------------------------------------------------------------------------------------- parsing
def test_functional_calls_and_nested_modules_map_to_layers():
    graph = parse(Functional())
    kinds = [type(node.layer).__name__ for node in graph.nodes]
    assert kinds == ["Conv2d", "Conv2d", "Add", "Flatten", "Linear", "Linear", "Tanh", "GELU", "Add", "Flatten",
                     "Linear"]
    stem, inner = graph.nodes[0].layer, graph.nodes[1].layer
    assert stem.relu and inner.relu, "F.relu / torch.relu after a conv read by nothing else fuse into it"
    assert inner.name == "inner.0.0", "nested modules keep their parameter names"
    assert graph.nodes[2].inputs == (1, 0), "the residual add reads both convs' (fused ReLU) outputs"
    assert graph.nodes[4].layer.relu, "x.relu() fuses into fc1"
    assert not graph.nodes[5].layer.relu
    assert graph.nodes[0].inputs == (INPUT,) and graph.output == len(graph.nodes) - 1


def test_relu_after_a_forked_layer_is_not_fused():
    """fc1's output is read by the ReLU and (through the ReLU's own output) twice more: the ReLU reads it
    alone, so it fuses; a layer whose raw output is read twice keeps a separate ReLU."""
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(F.relu(h) + h)

    graph = parse(Fork())
    assert [type(node.layer).__name__ for node in graph.nodes] == ["Linear", "ReLU", "Add", "Linear"]
    assert not graph.nodes[0].layer.relu


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 7), nn.Linear(7, 5)

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        if h.sum() > 0:  # data-dependent control flow: symbolic tracing cannot follow it
            h = torch.tanh(h)
        return self.fc2(h)


class ViewBySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 5)

    def forward(self, x):
        return self.fc(x.view(x.size(0), -1))


class DirectParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(784, 5))

    def forward(self, x):
        return x.flatten(1) @ self.weight


@pytest.mark.parametrize("module, reason", [
    (Untraceable(), "torch.fx cannot trace Untraceable"),
    (nn.Sequential(nn.Flatten(), nn.Linear(784, 5), nn.Hardtanh()), "node 2: Hardtanh is not fused"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), "node 0: Conv2d with padding_mode"),
    (nn.Sequential(nn.Flatten(0), nn.Linear(784, 5)), "Flatten(start_dim=0"),
    (ViewBySize(), "node size: size() is not fused"),
    (DirectParameter(), "reads the attribute weight"),
    (nn.Sequential(nn.ReLU(), nn.Flatten()), "no Linear or Conv2d layer"),
])
def test_unsupported_members_are_named(module, reason):
    with pytest.raises(layers.Unsupported, match=re.escape(reason)):
        parse(module)


def test_unfusable_member_warns_once_naming_the_node(monkeypatch):
    monkeypatch.setattr(fastjac.ensemble, "_warned", set())
    ensemble = Ensemble([nn.Sequential(nn.Flatten(), nn.Linear(784, 5), nn.Hardtanh()) for _ in range(2)])
    with pytest.warns(UserWarning, match="generic torch.func path .*node 2: Hardtanh is not fused"):
        ensemble.member_logits(make_input(2, F64).float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensemble.member_logits(make_input(2, F64).float())


def test_registered_functions_map_to_module_kinds():
    """Every functional spelling in the table builds a layer of the kind its module would."""
    assert type(layers.layer_for_call("n", F.relu, (None,), {})) is layers.ReLU
    assert type(layers.layer_for_call("n", "flatten", (None, 1), {})) is layers.Flatten
    assert layers.layer_for_call("n", F.leaky_relu, (None, 0.3), {}) == layers.LeakyReLU(0.3)
    assert layers.layer_for_call("n", F.gelu, (None,), {"approximate": "tanh"}) == layers.GELU("tanh")
    assert type(layers.layer_for_call("n", operator.add, (None, None), {})) is layers.Add
    pool = layers.layer_for_call("n", F.max_pool2d, (None, 3, 2, 1), {"ceil_mode": True})
    assert (pool.kernel, pool.stride, pool.padding, pool.ceil_mode) == ((3, 3), (2, 2), (1, 1), True)
    with pytest.raises(layers.Unsupported, match="alpha=2"):
        layers.layer_for_call("n", torch.add, (None, None), {"alpha": 2})


# ----------------------------------------------------------------------------------- against reference
@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("train", [False, True])
def test_graph_logits_match_reference(name, train):
    mods, ensemble, x = make_graph_case(name, 5, train)
    assert_logits_match_reference(mods, ensemble, x, None, name)


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("members", [1, 5])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
@pytest.mark.parametrize("nproj", [1, 3])
def test_graph_penalty_matches_reference(name, members, mode, target, nproj):
    mods, ensemble, x = make_graph_case(name, members, train=name == "residual_cnn")
    assert_penalty_matches_reference(mods, ensemble, x, mode, target, make_projections(mode, nproj, x, 5), None, name)


def test_graph_per_member_input():
    mods, ensemble, _ = make_graph_case("residual_cnn", 3)
    x = make_input(6, low=-1.0).view(3, 2, 1, 28, 28)
    for mode in ("vjp", "jvp"):
        projections = make_projections(mode, 2, x[0], 5)
        value = fastjac.jacobian_penalty(ensemble, x, nproj=2, mode=mode, projections=projections, per_member=True)
        fn = {"vjp": fastjac.reference.penalty_vjp, "jvp": fastjac.reference.penalty_jvp}[mode]
        expected = torch.stack([fn(member, x[m], projections) for m, member in enumerate(mods)])
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
