"""The command line as a user runs it: train -> attack -> evaluate on real Fashion-MNIST, --help, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastjac.cli import main

COMMANDS = ["train", "attack", "evaluate", "reproduce", "verify", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command):
    result = subprocess.run([sys.executable, "-m", "fastjac", command, "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_train_attack_evaluate(tmp_path, capsys):
    model = tmp_path / "model.pt"
    assert main(["train", "--members", "2", "--jr-lambda", "0.1", "0", "--epochs", "1", "--samples", "2000",
                 "--out", str(model)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert model.is_file() and Path(str(model) + ".ckpt").is_file()
    assert report["history"][0]["epoch"] == 1 and 0.3 < report["test"]["clean_accuracy"] <= 1

    out = tmp_path / "attack"
    assert main(["attack", "--model", str(model), "--eps", "0.05", "0.1", "--epochs", "1", "--samples", "500",
                 "--out", str(out)]) == 0
    attack = json.loads(capsys.readouterr().out)
    assert len(attack["uap_accuracy"]) == 2 and attack["eps"] == [0.05, 0.1]
    saved = torch.load(out / "uap.pt", weights_only=True)
    assert saved["delta"].shape == (2, 1, 28, 28)
    # element-wise: a list comparison (<=) is lexicographic and would never check the second bound
    for k, (bound, eps) in enumerate(zip(saved["delta"].abs().amax(dim=(1, 2, 3)).tolist(), [0.05, 0.1])):
        assert bound <= eps + 1e-7, f"delta[{k}]: max |delta| {bound} > eps {eps}"
    assert len(list(out.glob("uap_*.png"))) == 2
    assert json.loads((out / "metrics.json").read_text())["uap_accuracy"] == attack["uap_accuracy"]

    assert main(["evaluate", "--model", str(model), "--uap", str(out / "uap.pt")]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["uap_accuracy"] == attack["uap_accuracy"]
    assert evaluation["clean_accuracy"] == report["test"]["clean_accuracy"]


def test_targeted_attack_from_cli(tmp_path, capsys):
    model = tmp_path / "single.pt"
    assert main(["train", "--epochs", "1", "--samples", "2000", "--out", str(model)]) == 0
    capsys.readouterr()
    assert main(["attack", "--model", str(model), "--eps", "0.2", "--target", "3", "--epochs", "2",
                 "--samples", "1000", "--out", str(tmp_path / "targeted")]) == 0
    assert json.loads(capsys.readouterr().out)["targets"] == [3]


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert main(["evaluate", "--model", str(corrupt)]) == 2
    assert "corrupt" in capsys.readouterr().err
    model = tmp_path / "m.pt"
    assert main(["train", "--epochs", "1", "--samples", "256", "--out", str(model)]) == 0
    capsys.readouterr()
    assert main(["attack", "--model", str(model), "--eps", "1.5", "--out", str(tmp_path / "a")]) == 2
    assert "eps" in capsys.readouterr().err


def test_verify_prints_every_backend(capsys):
    from fastjac.verify import default_backends

    assert main(["verify", "--arch", "mlp"]) == 0
    output = capsys.readouterr().out
    report = json.loads(output[output.index("{"):])
    assert set(report["backends"]) == set(default_backends()) and "torch" in report["backends"]
    for by_dtype in report["backends"].values():
        assert max(by_dtype["float64"].values()) < 1e-10
