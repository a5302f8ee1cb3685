"""fastjac.frontier: Pareto envelopes, interpolation, areas and the seed bootstrap on inputs with known
answers (worked by hand in the comments), a coverage simulation, and the frontier-smoke preset end to end."""
import json
import math

import numpy as np
import pytest

from fastjac import frontier
from fastjac.experiments import PRESETS, configurations, parameter_count, reproduce


def rows_from(points: dict, seeds=(0,), noise: float = 0.0, rng=None, eps: float = 0.1) -> list[dict]:
    """Result rows: points = {method: {name: (clean, uap)}}; per seed, uap + N(0, noise) when noise > 0."""
    rows = []
    for seed in seeds:
        for method, named in points.items():
            for name, (clean, uap) in named.items():
                shift = rng.normal(0, noise) if noise else 0.0
                rows.append({"name": name, "seed": seed, "frontiers": [method], "clean_accuracy": clean,
                             "uap_accuracy": {frontier.eps_key(eps): uap + shift}})
    return rows


# ---- the envelope and its interpolation ----

def test_pareto_frontier_drops_dominated_points_and_sorts_by_clean_accuracy():
    # (0.78, 0.65) is beaten by (0.80, 0.70); (0.84, 0.55) by (0.85, 0.60); (0.85, 0.50) ties on clean
    # accuracy with a more robust point; the NaN point has no data.
    clean = [0.85, 0.78, 0.90, 0.84, 0.80, 0.85, math.nan]
    uap = [0.60, 0.65, 0.40, 0.55, 0.70, 0.50, 0.99]
    xs, ys = frontier.pareto_frontier(clean, uap)
    assert xs.tolist() == [0.80, 0.85, 0.90]
    assert ys.tolist() == [0.70, 0.60, 0.40]


def test_pareto_frontier_of_no_points_is_empty():
    xs, ys = frontier.pareto_frontier([math.nan], [0.5])
    assert xs.size == 0 and ys.size == 0
    assert np.isnan(frontier.frontier_at((xs, ys), [0.5])).all()


def test_frontier_at_interpolates_linearly_and_is_undefined_outside_its_range():
    front = frontier.pareto_frontier([0.80, 0.85, 0.90], [0.70, 0.60, 0.40])
    values = frontier.frontier_at(front, [0.79, 0.80, 0.825, 0.875, 0.90, 0.91])
    # halfway between (0.80, 0.70) and (0.85, 0.60): 0.65; between (0.85, 0.60) and (0.90, 0.40): 0.50
    assert np.isnan(values[[0, 5]]).all()
    assert values[1:5] == pytest.approx([0.70, 0.65, 0.50, 0.40], abs=1e-12)


def test_frontier_is_monotone_and_lies_on_or_above_every_point():
    rng = np.random.default_rng(3)
    for _ in range(50):
        clean, uap = rng.uniform(0.7, 0.9, 12), rng.uniform(0.2, 0.8, 12)
        front = frontier.pareto_frontier(clean, uap)
        assert np.all(np.diff(front[0]) > 0) and np.all(np.diff(front[1]) < 0)
        grid = np.linspace(front[0][0], front[0][-1], 200)
        assert np.all(np.diff(frontier.frontier_at(front, grid)) <= 1e-12)
        # every point is on or below the envelope (left of it: below its most robust point)
        inside = (clean >= front[0][0])
        assert np.all(frontier.frontier_at(front, clean[inside]) >= uap[inside] - 1e-12)
        assert np.all(uap[~inside] <= front[1][0])


# ---- areas between frontiers ----

def test_area_between_two_straight_frontiers():
    a = frontier.pareto_frontier([0.80, 0.90], [0.70, 0.40])  # a(c) = 0.70 - 3 (c - 0.80)
    b = frontier.pareto_frontier([0.82, 0.88], [0.60, 0.45])  # b(c) = 0.60 - 2.5 (c - 0.82)
    # common range [0.82, 0.88]; a - b = 0.04 at 0.82 and 0.01 at 0.88: area = 0.025 * 0.06 = 0.0015
    area, width = frontier.area_between(a, b)
    assert width == pytest.approx(0.06)
    assert area == pytest.approx(0.0015, abs=1e-12)
    assert frontier.area_between(b, a)[0] == pytest.approx(-0.0015, abs=1e-12)


def test_area_between_uses_every_breakpoint():
    a = frontier.pareto_frontier([0.0, 0.5, 1.0], [1.0, 0.9, 0.0])  # integral: 0.475 + 0.225 = 0.7
    b = frontier.pareto_frontier([0.0, 1.0], [0.5, 0.4])            # integral: 0.45
    assert frontier.area_between(a, b)[0] == pytest.approx(0.25, abs=1e-12)


def test_area_between_crossing_frontiers_cancels():
    a = frontier.pareto_frontier([0.0, 1.0], [1.0, 0.0])
    b = frontier.pareto_frontier([0.0, 1.0], [0.6, 0.4])  # a - b = 0.4 - 0.8 c: +0.1 then -0.1
    assert frontier.area_between(a, b)[0] == pytest.approx(0.0, abs=1e-12)


def test_area_between_without_common_range():
    a = frontier.pareto_frontier([0.70, 0.75], [0.8, 0.7])
    b = frontier.pareto_frontier([0.80, 0.85], [0.6, 0.5])
    area, width = frontier.area_between(a, b)
    assert math.isnan(area) and width == 0.0


# ---- the bootstrap ----

def test_seed_resamples_of_two_seeds_follow_the_binomial():
    counts = frontier.seed_resamples(2, 8000, np.random.default_rng(0))
    assert (counts.sum(axis=1) == 2).all()
    frequency = {k: np.mean(counts[:, 0] == k) for k in (0, 1, 2)}  # seed 0 drawn k times: 1/4, 1/2, 1/4
    assert frequency[0] == pytest.approx(0.25, abs=0.02)
    assert frequency[1] == pytest.approx(0.50, abs=0.02)
    assert frequency[2] == pytest.approx(0.25, abs=0.02)


def test_bootstrap_interval_of_two_seeds_spans_them():
    # Resampled means of (a, b) are a, (a + b)/2, b with probability 1/4, 1/2, 1/4: the 95% interval's
    # 2.5th and 97.5th percentiles fall on a and b.
    values = np.array([[0.60, 0.70]])
    means = frontier.resampled_means(values, frontier.seed_resamples(2, 4000, np.random.default_rng(1)))[:, 0]
    assert set(np.round(means, 12)) == {0.60, 0.65, 0.70}
    assert frontier.percentile_interval(means, 0.95) == pytest.approx((0.60, 0.70))


def test_resampled_means_skip_missing_seeds():
    values = np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, 5.0]])
    counts = np.array([[1, 1, 1], [0, 3, 0], [2, 0, 1]])
    means = frontier.resampled_means(values, counts)
    assert means[0].tolist() == [2.0, 5.0]
    assert np.isnan(means[1]).all()           # drew only the missing seed
    assert means[2, 0] == pytest.approx(5 / 3)  # (1 + 1 + 3) / 3
    assert means[2, 1] == 5.0


def test_percentile_interval_needs_most_replicates_defined():
    assert all(math.isnan(v) for v in frontier.percentile_interval([1.0, np.nan, np.nan], 0.9))
    assert frontier.percentile_interval([1.0, 1.0, np.nan], 0.9) == (1.0, 1.0)


def test_bootstrap_intervals_cover_a_known_mean_at_about_the_nominal_rate():
    # 300 simulated studies of 20 seeds drawn from N(0.7, 0.05^2): the 90% percentile interval of the
    # seed mean should cover 0.7 about 90% of the time (percentile intervals run a little short at small
    # n: about 88% here). Binomial sd of the rate over 300 trials: 0.017.
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(300):
        values = rng.normal(0.7, 0.05, size=(1, 20))
        means = frontier.resampled_means(values, frontier.seed_resamples(20, 1000, rng))[:, 0]
        lo, hi = frontier.percentile_interval(means, 0.90)
        covered += lo <= 0.7 <= hi
    assert 0.83 <= covered / 300 <= 0.96


@pytest.mark.parametrize("seeds", sorted(frontier.COVERAGE_95))
def test_small_sample_coverage_stated_in_the_report(seeds):
    # The report's caveat (frontier.COVERAGE_95): nominal 95% intervals of a mean over few seeds cover it
    # less often. 1500 trials: binomial sd <= 0.012.
    rng = np.random.default_rng(seeds)
    covered = 0
    for _ in range(1500):
        values = rng.normal(0.0, 1.0, size=(1, seeds))
        means = frontier.resampled_means(values, frontier.seed_resamples(seeds, 500, rng))[:, 0]
        lo, hi = frontier.percentile_interval(means, 0.95)
        covered += lo <= 0.0 <= hi
    assert covered / 1500 == pytest.approx(frontier.COVERAGE_95[seeds], abs=0.04)


def test_gap_interval_covers_the_true_gap_in_a_simulated_study():
    # A's frontier lies 5 points above B's (parallel lines); each seed's UAP accuracies get N(0, 0.02)
    # noise. The true mean gap is 0.05 everywhere; its 90% interval should cover it most of the time.
    truth_b = {"b-0": (0.80, 0.70), "b-1": (0.84, 0.60), "b-2": (0.88, 0.40)}
    truth_a = {f"a-{i}": (c, u + 0.05) for i, (c, u) in enumerate(truth_b.values())}
    rng = np.random.default_rng(11)
    trials, covered = 40, 0
    for _ in range(trials):
        rows = rows_from({"jr": truth_b, "je-members": truth_a}, seeds=range(10), noise=0.02, rng=rng)
        pair = frontier.compare(rows, [0.1], replicates=200, level=0.9, seed=1)["eps"]["0.1"]["pairs"][0]
        lo, hi = pair["mean_gap_ci"]
        covered += lo <= 0.05 <= hi
    assert covered / trials >= 0.75


def test_bootstrap_is_reproducible_from_its_seed():
    rng = np.random.default_rng(5)
    rows = rows_from({"jr": {"j0": (0.88, 0.4), "j1": (0.85, 0.7)}, "je-members": {"e0": (0.89, 0.45), "e1": (0.86, 0.72)}},
                     seeds=range(8), noise=0.02, rng=rng)  # 8 seeds: the resampled means take many values
    first = frontier.compare(rows, [0.1], replicates=200, seed=3)
    again = frontier.compare(rows, [0.1], replicates=200, seed=3)
    other = frontier.compare(rows, [0.1], replicates=200, seed=4)
    pair = lambda report: report["eps"]["0.1"]["pairs"][0]  # noqa: E731
    assert pair(first)["mean_gap_ci"] == pair(again)["mean_gap_ci"]
    assert pair(first)["gap_ci"] == pair(again)["gap_ci"]
    assert pair(first)["mean_gap_ci"] != pair(other)["mean_gap_ci"]


# ---- comparisons and verdicts ----

def test_compare_parallel_frontiers_without_noise():
    b = {"b-0": (0.80, 0.70), "b-1": (0.84, 0.60), "b-2": (0.88, 0.40)}
    a = {"a-0": (0.82, 0.70), "a-1": (0.86, 0.55), "a-2": (0.90, 0.45)}
    report = frontier.compare(rows_from({"jr": b, "je-members": a}, seeds=(0, 1, 2)), [0.1], grid_points=4,
                              replicates=50)
    pair = report["eps"]["0.1"]["pairs"][0]
    assert (pair["a"], pair["b"]) == ("je-members", "jr")
    assert pair["common_range"] == pytest.approx([0.82, 0.88])
    # on [0.82, 0.88], at 0.82, 0.84, 0.86, 0.88 (every breakpoint of either frontier):
    # b = 0.65, 0.60, 0.50, 0.40 and a = 0.70, 0.625, 0.55, 0.50
    assert pair["gap"] == pytest.approx([0.05, 0.025, 0.05, 0.10])
    area = 0.02 * ((0.05 + 0.025) / 2 + (0.025 + 0.05) / 2 + (0.05 + 0.10) / 2)  # trapezoids: 0.003
    assert pair["area"] == pytest.approx(area)
    assert pair["mean_gap"] == pytest.approx(area / 0.06)
    assert pair["mean_gap_ci"] == pytest.approx([area / 0.06] * 2)  # every seed alike: no spread
    assert pair["dominance"] == "a"
    assert pair["verdict"].startswith("**je-members dominates jr**")


def test_compare_crossing_and_dominated_verdicts():
    b = {"b-0": (0.80, 0.70), "b-1": (0.90, 0.40)}
    crossing = {"a-0": (0.80, 0.60), "a-1": (0.90, 0.50)}  # below b left of 0.85, above right of it
    below = {"c-0": (0.80, 0.60), "c-1": (0.90, 0.30)}
    rows = rows_from({"jr": b, "je-members": crossing, "je-ensemble": below}, seeds=(0, 1))
    pairs = {(p["a"], p["b"]): p for p in frontier.compare(rows, [0.1], replicates=50)["eps"]["0.1"]["pairs"]}
    cross = pairs[("je-members", "jr")]
    assert cross["dominance"] == "crossing"
    assert cross["a_above"][0][0] >= 0.85 - 1e-9 and cross["b_above"][0][1] <= 0.85 + 1e-9  # they cross at 0.85
    assert "je-members above" in cross["verdict"] and "jr above" in cross["verdict"]
    assert pairs[("je-ensemble", "jr")]["dominance"] == "b"
    assert pairs[("je-ensemble", "jr")]["verdict"].startswith("**jr dominates je-ensemble**")


def test_noisy_overlapping_frontiers_are_not_called_dominant():
    rng = np.random.default_rng(2)
    same = {"x-0": (0.80, 0.70), "x-1": (0.90, 0.40)}
    rows = rows_from({"jr": same, "je-members": {f"{k}e": v for k, v in same.items()}}, seeds=range(5), noise=0.05, rng=rng)
    pair = frontier.compare(rows, [0.1], replicates=500)["eps"]["0.1"]["pairs"][0]
    assert pair["dominance"] in ("overlap", "partly-a", "partly-b")
    lo, hi = pair["mean_gap_ci"]
    assert lo < 0 < hi


def test_rows_without_frontiers_or_eps_are_refused():
    with pytest.raises(ValueError, match="frontiers"):
        frontier.method_points([{"name": "baseline", "seed": 0}], "jr", 0.1)
    rows = rows_from({"jr": {"baseline": (0.9, 0.5)}})
    with pytest.raises(ValueError, match="eps 0.2"):
        frontier.compare(rows, [0.2])


def test_eps_monotonicity_reports_rising_accuracy():
    rows = [{"name": "ok", "seed": 0, "uap_accuracy": {"0.05": 0.8, "0.1": 0.6, "0.15": 0.5}},
            {"name": "odd", "seed": 1, "uap_accuracy": {"0.05": 0.8, "0.1": 0.6, "0.15": 0.65}}]
    issues = frontier.eps_monotonicity(rows, [0.05, 0.1, 0.15])
    assert [(i["name"], i["eps_small"], i["eps_large"]) for i in issues] == [("odd", 0.1, 0.15)]
    assert issues[0]["rise"] == pytest.approx(0.05)


# ---- the frontier preset, end to end at smoke scale ----

@pytest.fixture(scope="module")
def frontier_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    return out, reproduce(preset="frontier-smoke", out=out, progress=False)


def test_frontier_smoke_writes_every_output(frontier_smoke):
    out, results = frontier_smoke
    preset = PRESETS["frontier-smoke"]
    for name in ("results.json", "results.md", "tradeoff.png", "frontier.md", "frontier.json", "frontier.png",
                 "frontier-gaps.png"):
        assert (out / name).stat().st_size > 100, name
    names = {c.name for c in configurations(preset)}
    assert {(row["name"], row["seed"]) for row in results["rows"]} == {(n, s) for n in names for s in preset.seeds}
    report = json.loads((out / "frontier.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert set(report["eps"]) == {frontier.eps_key(e) for e in preset.eps}
    assert report["methods"] == list(frontier.METHODS)
    text = (out / "frontier.md").read_text()
    assert "## Attack strength" in text and "je-mixed − jr" in text


def test_frontier_smoke_rows_describe_their_models(frontier_smoke):
    _, results = frontier_smoke
    rows = {row["name"]: row for row in results["rows"]}
    member = parameter_count("mlp")
    assert rows["baseline"]["parameters"] == member
    m = PRESETS["frontier-smoke"].members
    assert rows["wide-baseline"]["parameters"] == pytest.approx(m * member, rel=0.02)
    assert rows["wide-baseline"]["arch_kwargs"]["hidden"][0] > 256
    assert rows[f"ensemble-m{m}"]["frontiers"] == ["je-members", "je-ensemble", "je-mixed"]


def test_frontier_smoke_attack_check(frontier_smoke):
    _, results = frontier_smoke
    preset = PRESETS["frontier-smoke"]
    check = preset.attack_check
    entries = results["attack_check"]
    assert [(e["name"], e["seed"]) for e in entries] == [(n, s) for s in check.seeds for n in check.configurations]
    rows = {(row["name"], row["seed"]): row for row in results["rows"]}
    for entry in entries:
        assert entry["orders"] == preset.uap_restarts + check.extra_restarts
        assert entry["uap_epochs"] == preset.uap_epochs * check.epochs_factor
        assert entry["default"] == rows[(entry["name"], entry["seed"])]["uap_accuracy"]
        for key, strong in entry["strong"].items():
            assert entry["drop"][key] == pytest.approx(entry["default"][key] - strong)
        assert entry["flagged"] == (max(entry["drop"].values()) > check.tolerance)


def test_frontier_smoke_rerun_runs_nothing_again(frontier_smoke):
    out, results = frontier_smoke
    before = (out / "results.json").read_text()
    rerun = reproduce(preset="frontier-smoke", out=out, progress=False)
    as_read = json.loads(json.dumps(results))  # tuples -> lists, as results.json holds them
    assert rerun["rows"] == as_read["rows"] and rerun["attack_check"] == as_read["attack_check"]
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(before)["rows"]
