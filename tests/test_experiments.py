"""The reproduce study: the smoke preset end to end on real data, its outputs' schema, and resume."""
import json

import pytest

from fastjac import _io, models
from fastjac.cli import main
from fastjac.experiments import PRESETS, configurations, reproduce

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
