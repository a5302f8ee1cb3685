"""The report modules on small inputs: the targets' arithmetic on rows whose times are set here
(bench/targets.py), and the estimator-variance study end to end at smoke size (bench/variance.py)."""
import math

import pytest

from bench import targets, variance


def row(kind, backend, time_ms, k=1, error=None, noisy=False):
    return dict(kind=kind, arch="mlp", M=5, K=k, backend=backend, time_ms=None if error else time_ms, error=error,
                noisy=noisy)


def test_targets_take_ratios_of_the_named_rows():
    rows = [row("plain", "auto=cpp", 10.0), row("plain", "cpp", 99.0), row("jr_jvp", "cpp", 20.0),
            row("jr_jvp", "torch", 1.0), row("jr_vjp", "cpp", 26.0, noisy=True), row("reference_jr", "-", 30.0),
            row("uap", "auto=cpp", 5.0, k=1), row("uap", "auto=cpp", 21.0, k=4),
            row("user_vjp", "auto=cpp", 0.0, error="RuntimeError: boom")]
    results = {result["target"]: result for result in targets.check_targets(rows, "mlp", 5, "cpp")}
    jvp = results["jvp JR step <= 2.2x plain stacked step"]
    assert jvp["ratio"] == 2.0 and jvp["ok"] is True and jvp["noisy"] is False  # the auto row, not plain (cpp)
    assert jvp["spec"].kind == "jr_jvp" and jvp["spec"].backend == "cpp"
    reference_jvp = results["reference JR / jvp JR >= 1.6x"]
    assert reference_jvp["ratio"] == 1.5 and reference_jvp["ok"] is False
    assert results["reference JR / vjp JR >= 1.3x"]["noisy"] is True
    uap = results["UAP K=4 iteration <= 4x K=1 iteration"]
    assert math.isclose(uap["ratio"], 4.2) and uap["ok"] is False
    for absent_or_failed in ("inference at least loop speed (loop / stacked >= 1)",
                             "user-loop vjp step within 1.05x of the internal one-pass step"):
        assert results[absent_or_failed]["ratio"] is None and results[absent_or_failed]["ok"] is None
    text = targets.format_targets(list(results.values()), "mlp", 5)
    assert "- PASS jvp JR step" in text and "- MISS reference JR / jvp JR" in text and "- n/a " in text
    assert targets.check_targets(rows, "lenet", 5, "cpp") == []  # no targets for LeNet


def test_gpu_targets_compare_each_fused_backend_with_torch_and_the_reference(monkeypatch):
    monkeypatch.setattr(targets.benchmark, "bench_backends", lambda device: ["torch", "triton"])
    rows = [row("jr_vjp", "torch", 12.0), row("jr_vjp", "triton", 6.0), row("jr_jvp", "torch", 9.0),
            row("jr_jvp", "triton", 8.0), row("reference_jr", "-", 40.0), row("uap", "auto=torch", 2.0),
            row("uap_common", "-", 3.0)]
    results = {result["target"]: result for result in targets.check_targets(rows, "mlp", 5, "torch", "cuda")}
    assert set(results) == {"reference JR / vjp JR (triton) >= 5x", "vjp JR (torch backend) / vjp JR (triton) >= 1.5x",
                            "reference JR / jvp JR (triton) >= 5x", "jvp JR (torch backend) / jvp JR (triton) >= 1.5x",
                            "UAP K=1 >= 2x common implementation (common / fastjac >= 2)"}
    assert results["reference JR / vjp JR (triton) >= 5x"]["ratio"] == 40.0 / 6.0
    assert results["vjp JR (torch backend) / vjp JR (triton) >= 1.5x"]["ok"] is True
    assert results["jvp JR (torch backend) / jvp JR (triton) >= 1.5x"]["ok"] is False
    assert results["UAP K=1 >= 2x common implementation (common / fastjac >= 2)"]["ratio"] == 1.5
    assert targets.check_targets(rows, "lenet", 5, "torch", "cuda") == []  # GPU targets: MLP and ResNet-8


def test_variance_report_runs_and_brackets_the_exact_value():
    report = variance.estimator_variance(arch="mlp", members=2, draws=40, batch=8, quick=True)
    exact = report["exact"]
    assert len(exact) == 2 and all(value > 0 for value in exact)
    for mode, stats in report["estimators"].items():
        for mean, sem, value in zip(stats["mean"], stats["sem"], exact):
            # 40 draws: the mean lies within 5 standard errors of the exact value (seeded, deterministic)
            assert abs(mean - value) < 5 * sem, f"{mode}: mean {mean} vs exact {value} (s.e. {sem})"
        assert stats["step_ms"] > 0 and math.isfinite(stats["time_x_variance"])
    assert "| vjp | 0 |" in variance.format_variance(report)


def test_rounds_sets_the_number_of_timed_calls():
    """``--rounds N``: N timed calls of every case of the group, no fewer, however long they take."""
    rows = targets.benchmark.run_table(archs=["mlp"], members=(1,), kinds=["plain", "loop"], rounds=7)
    assert {r["kind"] for r in rows} == {"plain", "loop"}
    assert all(r["error"] is None and r["runs"] == 7 for r in rows)
    parser = targets.benchmark.make_parser("bench")
    with pytest.raises(SystemExit):
        targets.benchmark.run_from_args(parser, parser.parse_args(["--rounds", "0"]), ["--rounds", "0"])
