"""Ensemble construction errors and the backend choice (fastjac.backends): messages that explain themselves."""
import pytest
import torch
from torch import nn

import fastjac.engine
import fastjac.ensemble
from fastjac import Ensemble, backends, models


def test_empty_member_list_raises():
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])


def test_members_with_different_widths_raise():
    with pytest.raises(ValueError, match="differ in parameters"):
        Ensemble([models.mlp(hidden=(7,)), models.mlp(hidden=(8,))])


def test_members_with_different_layer_types_raise():
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(784, 7), nn.Tanh(), nn.Linear(7, 10))
    with pytest.raises(ValueError, match="differ in architecture"):
        Ensemble([models.mlp(hidden=(7,)), tanh])


def test_members_with_different_depths_raise():
    with pytest.raises(ValueError, match="differ in architecture"):
        Ensemble([models.mlp(hidden=(7,)), models.mlp(hidden=(7, 7))])


def test_members_with_different_layer_settings_raise():
    """Same parameter shapes, different conv stride: only the layer settings tell them apart."""
    a = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    b = nn.Sequential(nn.Conv2d(1, 2, 3, dilation=1, stride=1, padding=0), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    Ensemble([a, b])  # identical settings written differently are fine
    c = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    with pytest.raises(ValueError, match="layer settings"):
        Ensemble([a, c])


def test_members_with_different_dtypes_raise():
    with pytest.raises(ValueError, match="differ in parameters"):
        Ensemble([models.mlp(hidden=(7,)), models.mlp(hidden=(7,)).double()])


@pytest.mark.parametrize("position", [0, 1])
def test_non_module_member_raises(position):
    members = [models.mlp(hidden=(7,)), models.mlp(hidden=(7,))]
    members[position] = lambda x: x  # a callable, but not an nn.Module
    with pytest.raises(TypeError, match=f"member {position} is a function, not an nn.Module"):
        Ensemble(members)


def test_ensemble_accepts_any_iterable_and_does_not_alias_members():
    members = [models.mlp(hidden=(7,)) for _ in range(2)]
    ensemble = Ensemble(iter(members))
    assert ensemble.num_members == 2
    with torch.no_grad():
        members[0][1].weight.add_(1.0)
    assert not torch.equal(ensemble.params()["1.weight"][0], members[0][1].weight)


# ------------------------------------------------------------------------------------------- backends
def test_use_unknown_backend_raises_and_keeps_choice():
    before = backends.current()
    with pytest.raises(backends.BackendUnavailable, match="unknown backend 'nonexistent'"):
        backends.use("nonexistent")
    assert backends.current() == before


def test_use_named_backend_then_reset():
    try:
        backends.use("torch")
        assert backends.current() == "torch"
        assert backends.current("cuda") == "torch"
        ensemble = Ensemble([models.mlp(hidden=(7,)) for _ in range(2)])
        assert ensemble.engine().backend.name == "torch"
    finally:
        backends.use(None)


def test_resolve_named_backend_that_cannot_run_raises():
    with pytest.raises(backends.BackendUnavailable, match="nonexistent"):
        backends.resolve("nonexistent")
    ensemble = Ensemble([models.mlp(hidden=(7,)) for _ in range(2)])
    with pytest.raises(backends.BackendUnavailable):
        ensemble.member_logits(torch.rand(2, 1, 28, 28), backend="nonexistent")


def test_backend_named_for_another_device_fails_loudly():
    """A backend named explicitly is checked against the tensors' device: cpp runs on CPU tensors only."""
    if "cpp" not in backends.available():
        pytest.skip("the C++ extension is not built")
    assert backends.resolve("cpp", "cpu").name == "cpp"
    with pytest.raises(backends.BackendUnavailable, match="'cpp' runs on cpu tensors, got tensors on cuda"):
        backends.resolve("cpp", "cuda")
    assert backends.resolve("torch", "cuda").name == "torch"  # torch runs on every device


def test_backends_are_objects_with_capabilities():
    """Code asks these fields, never a name: the torch backend has the chain Functions (ATen products) but
    no plain chain and no fused perturbed layer; cpp adds the plain chain (member-parallel products)."""
    torch_backend = backends.get("torch")
    assert torch_backend.chain_products is not None and not torch_backend.plain_chain
    assert torch_backend.perturbed_linear is None and not torch_backend.own_plain_epilogue
    assert backends.get("torch") is torch_backend  # one object per backend
    if "cpp" in backends.available():
        cpp = backends.get("cpp")
        assert cpp.plain_chain and cpp.chain_products is not None and cpp.device_types == ("cpu",)


def test_env_var_forces_torch(monkeypatch):
    # _why_unavailable is cached per name, but current() reads FASTJAC_BACKEND on every call
    monkeypatch.setenv("FASTJAC_BACKEND", "torch")
    assert backends.current() == "torch"
    assert backends.resolve(None).name == "torch"
    ensemble = Ensemble([models.mlp(hidden=(7,)) for _ in range(2)])
    assert ensemble.engine().backend.name == "torch"
    monkeypatch.delenv("FASTJAC_BACKEND")
    automatic = backends.current()
    assert automatic in backends.available()
    assert automatic == next(name for name in backends.AUTO_ORDER["cpu"] if name in backends.available())


def test_env_var_naming_unknown_backend_fails_loudly(monkeypatch):
    monkeypatch.setenv("FASTJAC_BACKEND", "nonexistent")
    with pytest.raises(backends.BackendUnavailable, match="nonexistent"):
        backends.current()


def test_explicit_use_overrides_env_var(monkeypatch):
    monkeypatch.setenv("FASTJAC_BACKEND", "nonexistent")
    try:
        backends.use("torch")
        assert backends.current() == "torch"
    finally:
        backends.use(None)


def test_available_lists_torch_first_and_only_known_names():
    names = backends.available()
    assert names[0] == "torch"
    assert set(names) <= set(backends.NAMES)


# ------------------------------------------------------------------------ inference in cache-sized passes
def _count_passes(monkeypatch) -> list:
    calls = []
    forward = fastjac.engine.Engine.forward

    def counting(self, x, *args, **kwargs):
        if self.members > 1:  # the ensemble's passes, not the one-member passes they may run (by_member)
            calls.append(x.shape)
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(fastjac.engine.Engine, "forward", counting)
    return calls


def _resnet_ensemble(track_running_stats=True):
    torch.manual_seed(0)
    members = [models.resnet(width=4) for _ in range(3)]
    for member in members:
        for module in member.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.track_running_stats = track_running_stats
    return [member.double().eval() for member in members]


@pytest.mark.parametrize("per_member", [False, True])
def test_inference_in_passes_equals_one_pass_and_the_members(per_member, monkeypatch):
    """Eval-mode logits without gradients on the CPU go in equal passes over the batch when the largest
    layer output would exceed CPU_PASS_BYTES, and equal the members' own logits (rows are independent)."""
    members = _resnet_ensemble()
    ensemble = Ensemble(members).eval()
    x = torch.rand(3, 11, 1, 28, 28, dtype=torch.float64) if per_member else torch.rand(11, 1, 28, 28,
                                                                                         dtype=torch.float64)
    # a CPU pass of this BatchNorm model runs member by member (engine.runs_by_member): a row of it holds
    # one member's activations
    per_row = fastjac.ensemble.largest_activation(ensemble, (1, 28, 28)) * 8 // 3
    monkeypatch.setattr(fastjac.ensemble, "CPU_PASS_BYTES", 4 * per_row)  # 4 rows a pass: 11 -> 3 passes of <= 4
    calls = _count_passes(monkeypatch)
    with torch.no_grad():
        got = ensemble.member_logits(x, per_member=per_member)
        want = torch.stack([member(x[m] if per_member else x) for m, member in enumerate(members)])
    assert [shape[1 if per_member else 0] for shape in calls] == [4, 4, 3]
    assert got.shape == (3, 11, 10)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_inference_runs_in_one_pass_where_rows_are_not_independent(monkeypatch):
    """Batch statistics (train mode, or a BatchNorm without running statistics) and gradients: one pass."""
    monkeypatch.setattr(fastjac.ensemble, "CPU_PASS_BYTES", 1)  # would mean one row per pass
    calls = _count_passes(monkeypatch)
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    untracked = Ensemble(_resnet_ensemble(track_running_stats=False)).eval()
    with torch.no_grad():
        untracked.member_logits(x)
        Ensemble(_resnet_ensemble()).train().member_logits(x)
    Ensemble(_resnet_ensemble()).eval().member_logits(x)  # gradients enabled
    assert [shape[0] for shape in calls] == [5, 5, 5]
