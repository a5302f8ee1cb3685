"""The reproduce study: the smoke preset end to end on real data, its outputs' schema, and resume."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fastjac import _io, experiments, frontier, models
from fastjac.cli import main
from fastjac.experiments import PRESETS, configurations, estimate_seconds, parameter_count, reproduce
from fastjac.metrics import evaluate
from fastjac.uap import sgd_uap

KINDS = {"baseline", "jr", "ensemble", "jacobian-ensemble"}
ROW_KEYS = {"name", "kind", "members", "jr_lambda", "jr_target", "seed", "clean_accuracy", "uap_accuracy",
            "evasion_rate", "fooling_rate", "train_seconds", "attack_seconds"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    return out, reproduce(preset="smoke", out=out, progress=False)


def test_every_configuration_kind_is_present_in_every_preset():
    for preset in PRESETS.values():
        configs = configurations(preset)
        assert {c.kind for c in configs} == KINDS
        targets = {(c.kind, c.jr_target, isinstance(c.jr_lambda, list)) for c in configs}
        assert ("jacobian-ensemble", "ensemble", False) in targets  # joint training
        assert ("jacobian-ensemble", "members", True) in targets    # mixed lambdas
        assert len({c.name for c in configs}) == len(configs)


def test_smoke_outputs_and_schema(smoke_run):
    out, results = smoke_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    eps_keys = {f"{e:g}" for e in PRESETS["smoke"].eps}
    assert {row["kind"] for row in on_disk["rows"]} == KINDS
    for row in on_disk["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert set(row["uap_accuracy"]) == eps_keys
        assert 0.3 < row["clean_accuracy"] <= 1  # real data, learned something in one short epoch
        assert (out / "uaps" / f"{row['name']}-seed{row['seed']}.png").is_file()
    assert on_disk["environment"]["torch"] and on_disk["study"]["preset"] == "smoke"
    assert (out / "tradeoff.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert all(row["name"] in table for row in on_disk["rows"])
    for row in on_disk["rows"]:  # the run's wall clock covers its training and attack
        assert row["seconds"] >= row["train_seconds"] + row["attack_seconds"]
    total = sum(row["seconds"] for row in on_disk["rows"]) / 60
    assert f"Measured time: {total:.1f} min, the sum of {len(on_disk['rows'])} runs' wall clocks" in table


def test_evaluate_reads_the_uap_files_reproduce_writes(smoke_run, tmp_path, capsys):
    """One UAP format: `evaluate --uap` reads reproduce's files (it could not read the bare tensors)."""
    out, results = smoke_run
    row = results["rows"][0]
    uap = out / "uaps" / f"{row['name']}-seed{row['seed']}.pt"
    record = _io.load_uap(uap)
    assert record["eps"] == list(PRESETS["smoke"].eps) and record["targets"] == [None] * len(record["eps"])
    model = tmp_path / "m.pt"
    _io.save_model(models.build("mlp"), model, arch="mlp")
    assert main(["evaluate", "--model", str(model), "--uap", str(uap)]) == 0
    assert len(json.loads(capsys.readouterr().out)["uap_accuracy"]) == len(record["eps"])


def test_rerun_skips_finished_configurations(smoke_run):
    out, results = smoke_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    # Drop the last row: a rerun redoes exactly that configuration (its training checkpoint is
    # complete, so only the attack runs again) and keeps every other row untouched.
    partial = json.loads((out / "results.json").read_text())
    partial["rows"] = rows[:-1]
    (out / "results.json").write_text(json.dumps(partial))
    rerun = reproduce(preset="smoke", out=out, progress=False)
    assert [row["name"] for row in rerun["rows"]] == [row["name"] for row in rows]
    assert rerun["rows"][:-1] == rows[:-1]
    assert rerun["rows"][-1]["clean_accuracy"] == rows[-1]["clean_accuracy"]


def test_other_settings_into_the_same_directory_are_refused(smoke_run):
    out, _ = smoke_run
    with pytest.raises(ValueError, match="other settings"):
        reproduce(preset="smoke", arch="lenet", out=out, progress=False)


def test_unknown_preset_and_arch():
    with pytest.raises(ValueError, match="preset"):
        reproduce(preset="huge", out="unused")
    with pytest.raises(ValueError, match="architecture"):
        reproduce(arch="vgg", out="unused")


# ---- the frontier presets (issue 14) ----

RECORDED = Path(__file__).resolve().parent.parent / "docs" / "results"
FRONTIER_PRESETS = ("frontier", "frontier-lenet")


def test_point_presets_keep_their_configurations():
    # The recorded `full` run and the README's `quick` job: the same names, lambdas and targets as before
    # the frontier presets (a resumed run finds its rows under the same names).
    recorded = {row["name"]: row for row in json.loads((RECORDED / "results.json").read_text())["rows"]}
    full = configurations(PRESETS["full"])
    assert [c.name for c in full] == list(recorded)
    for config in full:
        assert (config.jr_lambda, config.jr_target, max(config.members, 1)) == \
            (recorded[config.name]["jr_lambda"], recorded[config.name]["jr_target"], recorded[config.name]["members"])
    assert [c.name for c in configurations(PRESETS["quick"])] == [
        "baseline", "jr-0.05", "jr-0.2", "jr-1", "ensemble-m5", "je-members-m5-0.2", "je-mixed-m5-0.2x3",
        "je-ensemble-m5-0.2"]


@pytest.mark.parametrize("name", FRONTIER_PRESETS)
def test_frontier_presets_trace_every_method(name):
    preset = PRESETS[name]
    configs = configurations(preset)
    m = preset.members
    for method in frontier.METHODS:
        assert len([c for c in configs if method in c.frontiers]) >= 3, method
    # small lambdas included; LeNet's grid stops at 0.2 (jr-1 lay below every other method's clean accuracy)
    assert min(preset.lambdas) <= 0.005 and max(preset.lambdas) >= 0.2
    mixed = {(sum(v > 0 for v in c.jr_lambda), max(c.jr_lambda)) for c in configs if isinstance(c.jr_lambda, list)}
    lambdas = {lam for _, lam in mixed}
    assert len(lambdas) == 2 and mixed == {(k, lam) for lam in lambdas for k in range(1, m)}
    assert len(preset.seeds) == 3
    wide = [c for c in configs if c.frontiers == ("wide-jr",)]
    assert parameter_count(preset.arch, **wide[0].arch_kwargs) == pytest.approx(m * parameter_count(preset.arch), rel=0.02)
    assert 0.0 in [c.jr_lambda for c in wide] and sum(c.jr_lambda > 0 for c in wide) >= 2
    kinds = {c.name: (c.kind, c.members) for c in configs}
    checked = [kinds[n] for n in preset.attack_check.configurations]
    assert {k for k, _ in checked} == {"baseline", "jr", "jacobian-ensemble"}
    assert preset.attack_check.epochs_factor == 3 and preset.attack_check.extra_restarts >= 2
    assert preset.uap_restarts >= 3 and set(preset.attack_check.seeds) <= set(preset.seeds)


@pytest.mark.parametrize("name", FRONTIER_PRESETS)
def test_frontier_presets_are_sized_to_90_minutes(name):
    assert estimate_seconds(PRESETS[name], PRESETS[name].arch) <= 90 * 60


def test_cost_model_reproduces_the_recorded_full_run():
    # COSTS' MLP values come from this run: the model's sum over its 30 runs must match the measured sum.
    rows = json.loads((RECORDED / "rerun-chain" / "results.json").read_text())["rows"]
    measured = sum(row["train_seconds"] + row["attack_seconds"] for row in rows)
    preset = PRESETS["full"]
    configs = {c.name: c for c in configurations(preset)}
    modelled = sum(experiments._job_seconds(configs[row["name"]], preset, "mlp", preset.uap_epochs, 1) for row in rows)
    assert modelled == pytest.approx(measured, rel=0.05)


def test_wide_kwargs_scale_the_parameters():
    for arch in ("mlp", "lenet"):
        for factor in (2, 5):
            ratio = parameter_count(arch, **experiments.wide_kwargs(arch, factor)) / parameter_count(arch)
            assert ratio == pytest.approx(factor, rel=0.02), (arch, factor)
    # ResNet (the frontier presets with --arch resnet) has one integer width, its parameters ~ width^2:
    # the nearest width, 36 for the 5x model (5.01x)
    for factor in (2, 5):
        width = experiments.wide_kwargs("resnet", factor)["width"]
        errors = [abs(parameter_count("resnet", width=w) / parameter_count("resnet") - factor)
                  for w in (width - 1, width, width + 1)]
        assert errors[1] == min(errors) and errors[1] < 0.1 * factor, (factor, width, errors)
    with pytest.raises(ValueError, match="width arguments"):
        experiments.wide_kwargs("transformer", 5)


def test_reproduce_defaults_to_the_presets_architecture(tmp_path, monkeypatch):
    class Started(Exception):
        pass

    def first_run(config, seed, preset, arch, *args):
        raise Started(arch)

    monkeypatch.setattr(experiments, "_run_one", first_run)
    with pytest.raises(Started) as started:
        reproduce(preset="frontier-lenet", out=tmp_path, progress=False)
    assert started.value.args[0] == "lenet"


def test_no_time_estimate_without_measured_costs(monkeypatch):
    monkeypatch.delitem(experiments.COSTS, "lenet")  # as for an architecture nobody has timed (resnet)
    assert estimate_seconds(PRESETS["frontier-lenet"], "lenet") is None


def test_fit_uaps_keeps_the_strongest_order_per_eps_on_the_fit_set():
    torch.manual_seed(0)
    model = models.mlp(hidden=(32,))
    x, y = torch.rand(300, 1, 28, 28), torch.randint(0, 10, (300,))
    preset = dataclasses.replace(PRESETS["smoke"], eps=(0.05, 0.2), uap_samples=256, batch_size=32)
    one, fit = experiments.fit_uaps(model, (x, y), preset, seed=0, epochs=1, orders=1)
    assert fit == []  # one order: nothing chosen, nothing evaluated
    batches = experiments._fit_batches((x, y), preset, 0)
    assert torch.equal(one.delta, sgd_uap(model, batches, eps=[0.05, 0.2], epochs=1).delta)

    chosen, fit = experiments.fit_uaps(model, (x, y), preset, seed=0, epochs=1, orders=4)
    assert len(fit) == 4 and len({tuple(f) for f in fit}) > 1  # the orders differ
    x_fit, y_fit = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    on_fit = evaluate(model, x_fit, y_fit, chosen.delta)["uap_accuracy"]
    assert on_fit == [min(f[k] for f in fit) for k in range(2)]
