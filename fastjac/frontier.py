"""Trade-off frontiers of the reproduce study, with bootstrap confidence intervals over seeds.

Pure functions on result rows (the dicts of ``results.json``: ``name``, ``seed``, ``clean_accuracy``,
``uap_accuracy`` {eps key: value} and ``frontiers``, the methods a row is a point of). Accuracies are
fractions in [0, 1] throughout; the report functions print percentage points.

- A method's **points** are its configurations (one per lambda, or per (k, lambda) for mixed ensembles),
  each the mean over seeds of (clean accuracy, UAP accuracy at one eps).
- Its **frontier** is the upper Pareto envelope of those points: the points that no other point beats in
  both accuracies, sorted by clean accuracy, joined by straight lines. UAP accuracy is then a decreasing
  function of clean accuracy, defined on the envelope's own clean-accuracy range (never extrapolated).
- Two methods A and B are compared on their **common** clean-accuracy range: the UAP-accuracy gap
  A - B at matched clean accuracy on a grid over that range, and the (signed) area between the two
  frontiers over it; the mean gap is area / width.
- **Bootstrap over seeds**: each replicate draws the seeds with replacement (the same draw for every
  configuration of every method: the comparison is paired), recomputes every configuration's mean, every
  frontier and every statistic; percentile intervals. A seeded generator makes it reproducible.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from fastjac import _io

# Method order: single models first; a pair (A, B) compares a later method A with an earlier B (A - B).
METHODS = ("jr", "wide-jr", "je-members", "je-ensemble", "je-mixed")

# How often a nominal 95% percentile interval of a mean over n seeds covers the true mean, normal data,
# simulated (tests/test_frontier.py checks these): with few seeds a percentile interval cannot be wider
# than the seeds' own spread, so it runs short.
COVERAGE_95 = {3: 0.74, 5: 0.84, 10: 0.89}


def eps_key(eps: float) -> str:
    """The key of one eps in a row's ``uap_accuracy`` dict (as reproduce writes it)."""
    return f"{eps:g}"


def pareto_frontier(clean, uap) -> tuple[np.ndarray, np.ndarray]:
    """The upper Pareto envelope of the points (clean[i], uap[i]).

    Args: clean, uap: [n] accuracies; NaN entries (a configuration without data) are ignored.
    Returns (clean [k], uap [k]) of the non-dominated points, clean strictly increasing and uap strictly
    decreasing (of points with equal clean accuracy only the most robust one can be on it); k = 0 when no
    point has data.
    """
    clean, uap = np.asarray(clean, dtype=float), np.asarray(uap, dtype=float)
    if clean.shape != uap.shape or clean.ndim != 1:
        raise ValueError(f"clean and uap must be 1-D arrays of one length, got shapes {clean.shape} and {uap.shape}")
    valid = np.flatnonzero(~(np.isnan(clean) | np.isnan(uap)))
    kept, best = [], -math.inf
    for i in sorted(valid, key=lambda i: (-clean[i], -uap[i])):  # most accurate first
        if uap[i] > best:  # more robust than every more accurate point: not dominated
            kept.append(i)
            best = uap[i]
    kept.reverse()
    return clean[kept], uap[kept]


def frontier_at(frontier: tuple[np.ndarray, np.ndarray], clean) -> np.ndarray:
    """UAP accuracy of ``frontier`` (from :func:`pareto_frontier`) at clean accuracies ``clean`` [g]:
    linear between the envelope's points, NaN outside its clean-accuracy range. Returns [g]."""
    xs, ys = frontier
    clean = np.asarray(clean, dtype=float)
    if xs.size == 0:
        return np.full(clean.shape, np.nan)
    values = np.interp(clean, xs, ys)
    return np.where((clean >= xs[0]) & (clean <= xs[-1]), values, np.nan)


def common_range(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[float, float] | None:
    """The clean-accuracy interval [lo, hi] on which both frontiers are defined, or None (no overlap, or
    a single point: nothing to integrate over)."""
    if a[0].size == 0 or b[0].size == 0:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[0][-1], b[0][-1])
    return (float(lo), float(hi)) if hi > lo else None


def area_between(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Signed area between frontiers a and b over their common range: integral of (a - b) d(clean).

    Exact for piecewise-linear frontiers (trapezoids between the union of both breakpoints).
    Returns (area, width of the common range); (NaN, 0.0) without a common range.
    """
    span = common_range(a, b)
    if span is None:
        return math.nan, 0.0
    lo, hi = span
    breaks = np.concatenate([[lo, hi], a[0], b[0]])
    knots = np.unique(breaks[(breaks >= lo) & (breaks <= hi)])
    gap = frontier_at(a, knots) - frontier_at(b, knots)
    return float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(knots))), hi - lo


def seed_resamples(seeds: int, replicates: int, generator: np.random.Generator) -> np.ndarray:
    """Bootstrap draws of ``seeds`` seeds with replacement: [replicates, seeds] counts (each row sums to
    ``seeds``: how often each seed is drawn)."""
    draws = generator.integers(0, seeds, size=(replicates, seeds))
    return (draws[:, :, None] == np.arange(seeds)).sum(axis=1)


def resampled_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Means over seeds under resampling: values [C, S] (NaN = no run for that seed), counts [R, S]
    (from :func:`seed_resamples`, or ones [1, S] for the plain mean). Returns [R, C]; NaN where a replicate
    drew none of a configuration's seeds."""
    present = ~np.isnan(values)
    total = counts @ np.where(present, values, 0.0).T
    weight = counts @ present.T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def percentile_interval(samples, level: float) -> tuple[float, float]:
    """Central ``level`` percentile interval of ``samples`` [R], NaN ignored; (NaN, NaN) when fewer than
    half the samples are defined (the statistic does not exist in most replicates)."""
    samples = np.asarray(samples, dtype=float)
    defined = samples[~np.isnan(samples)]
    if defined.size == 0 or defined.size < samples.size / 2:
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(defined, [tail, 100 - tail])
    return float(lo), float(hi)


def method_points(rows: list[dict], method: str, eps: float) -> tuple[list[str], list, np.ndarray, np.ndarray]:
    """The configurations of ``method`` and their per-seed accuracies at ``eps``.

    Returns (names [C], seeds [S], clean [C, S], uap [C, S]) with NaN where a (configuration, seed) has no
    row; seeds are every seed of any row (so every method of one study shares the seed axis).
    """
    for row in rows:
        if "frontiers" not in row:
            raise ValueError(f"row {row.get('name')!r} has no 'frontiers' key: it was written by a study "
                             "without frontier methods")
        if eps_key(eps) not in row["uap_accuracy"]:
            raise ValueError(f"row {row['name']!r} (seed {row['seed']}) has no UAP accuracy at eps {eps:g}; it has "
                             f"eps {', '.join(row['uap_accuracy'])}")
    seeds = sorted({row["seed"] for row in rows})
    names = list(dict.fromkeys(row["name"] for row in rows if method in row["frontiers"]))
    clean = np.full((len(names), len(seeds)), np.nan)
    uap = np.full((len(names), len(seeds)), np.nan)
    for row in rows:
        if method in row["frontiers"]:
            i, s = names.index(row["name"]), seeds.index(row["seed"])
            clean[i, s], uap[i, s] = row["clean_accuracy"], row["uap_accuracy"][eps_key(eps)]
    return names, seeds, clean, uap


def _describe_regions(grid: np.ndarray, mask: np.ndarray) -> list[list[float]]:
    """Contiguous runs of True in ``mask`` as [first, last] grid values."""
    regions = []
    for value, group in itertools.groupby(zip(grid, mask), key=lambda pair: bool(pair[1])):
        points = [c for c, _ in group]
        if value:
            regions.append([float(points[0]), float(points[-1])])
    return regions


def _dominance(a_above: np.ndarray, b_above: np.ndarray, overlap: np.ndarray) -> str:
    """One word for a pair from its grid masks (A's interval above 0, B's, interval containing 0; grid
    points where fewer than half the replicates define the gap are in none of them):
    'a' / 'b' (that method above wherever the interval is defined), 'crossing' (each above somewhere),
    'partly-a' / 'partly-b' (above somewhere, overlapping elsewhere), 'overlap' (never above)."""
    above_a, above_b = bool(np.any(a_above)), bool(np.any(b_above))
    if above_a and above_b:
        return "crossing"
    if above_a:
        return "partly-a" if np.any(overlap) else "a"
    if above_b:
        return "partly-b" if np.any(overlap) else "b"
    return "overlap"


def _verdict(a: str, b: str, dominance: str, grid: np.ndarray, gap: np.ndarray, a_above, b_above, overlap,
             undefined) -> str:
    """A plain sentence for the table from :func:`_dominance`'s word and the grid masks."""
    def regions(mask):
        return ", ".join(f"{100 * lo:.1f}%" if lo == hi else f"{100 * lo:.1f}–{100 * hi:.1f}%"
                         for lo, hi in _describe_regions(grid, mask))

    def where(mask, sign):
        return f"{regions(mask)} (by up to {100 * np.max(sign * gap[mask]):.1f} points)"

    if dominance in ("a", "b"):
        winner, loser, sign, mask = (a, b, 1, a_above) if dominance == "a" else (b, a, -1, b_above)
        text = (f"**{winner} dominates {loser}** over the common range (by {100 * np.min(sign * gap[mask]):.1f}–"
                f"{100 * np.max(sign * gap[mask]):.1f} points)")
    elif dominance == "overlap":
        text = "intervals overlap over the common range: neither dominates"
    else:
        parts = [f"{a} above at clean {where(a_above, 1)}"] if np.any(a_above) else []
        parts += [f"{b} above at clean {where(b_above, -1)}"] if np.any(b_above) else []
        text = "; ".join(parts) + ("; intervals overlap elsewhere" if np.any(overlap) else "")
    if np.any(undefined):
        text += f" (no interval at clean {regions(undefined)}: most resamples' frontiers do not reach it)"
    return text


def compare(rows: list[dict], eps, *, methods=None, grid_points: int = 41, replicates: int = 2000,
            level: float = 0.95, seed: int = 0) -> dict:
    """Frontiers of every method and every pair's comparison, per eps, with bootstrap intervals.

    Args:
        rows: result rows (with ``frontiers``); eps: the eps grid; methods: the methods to compare
            (default: those of :data:`METHODS` that any row belongs to).
        grid_points: clean-accuracy grid size over each common range (and each method's own range).
        replicates, level, seed: the bootstrap (resamples, interval level, generator seed).
    Returns {"methods", "seeds", "level", "replicates", "eps": {eps key: {"frontiers": {method: {...}},
    "pairs": [{...}]}}}: per method its points, envelope and a band (grid [g], lo/hi [g]); per pair
    (a, b) the common range, the grid [g], each frontier's UAP accuracy on it [g], the gap a - b [g] with
    intervals, the mean gap and the area
    with intervals, the regions where either is above (interval excludes 0) and a verdict sentence.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not isinstance(replicates, int) or replicates < 1:
        raise ValueError(f"replicates must be an int >= 1, got {replicates!r}")
    present = {m for row in rows for m in row.get("frontiers", ())}
    methods = [m for m in METHODS if m in present] if methods is None else list(methods)
    seeds = sorted({row["seed"] for row in rows})
    counts = seed_resamples(len(seeds), replicates, np.random.default_rng(seed))
    plain = np.ones((1, len(seeds)))
    report = {"methods": methods, "seeds": seeds, "level": level, "replicates": replicates, "bootstrap_seed": seed,
              "eps": {}}
    for e in eps:
        estimate, resampled, fronts = {}, {}, {}
        for method in methods:
            names, _, clean, uap = method_points(rows, method, e)
            mean_clean, mean_uap = resampled_means(clean, plain)[0], resampled_means(uap, plain)[0]
            estimate[method] = pareto_frontier(mean_clean, mean_uap)
            boot_clean, boot_uap = resampled_means(clean, counts), resampled_means(uap, counts)
            resampled[method] = [pareto_frontier(c, u) for c, u in zip(boot_clean, boot_uap)]
            xs = estimate[method][0]
            grid = np.linspace(xs[0], xs[-1], grid_points) if xs.size else np.empty(0)
            band = np.stack([frontier_at(f, grid) for f in resampled[method]]) if xs.size else np.empty((0, 0))
            intervals = [percentile_interval(band[:, j], level) for j in range(grid.size)]
            fronts[method] = {
                "points": [{"name": n, "clean": float(c), "uap": float(u)} for n, c, u in zip(names, mean_clean, mean_uap)],
                "envelope": {"clean": xs.tolist(), "uap": estimate[method][1].tolist()},
                "band": {"clean": grid.tolist(), "lo": [lo for lo, _ in intervals], "hi": [hi for _, hi in intervals]},
            }
        pairs = []
        for j, a in enumerate(methods):
            for b in methods[:j]:
                pairs.append(_compare_pair(a, b, estimate, resampled, grid_points, level))
        report["eps"][eps_key(e)] = {"frontiers": fronts, "pairs": pairs}
    return report


def _compare_pair(a: str, b: str, estimate: dict, resampled: dict, grid_points: int, level: float) -> dict:
    span = common_range(estimate[a], estimate[b])
    entry = {"a": a, "b": b, "common_range": list(span) if span else None}
    if span is None:
        entry.update({"dominance": "no-range", "verdict": "no common clean-accuracy range"})
        return entry
    grid = np.linspace(*span, grid_points)
    uap_a, uap_b = frontier_at(estimate[a], grid), frontier_at(estimate[b], grid)
    gap = uap_a - uap_b
    boot_gap = np.stack([frontier_at(fa, grid) - frontier_at(fb, grid) for fa, fb in zip(resampled[a], resampled[b])])
    gap_ci = np.array([percentile_interval(boot_gap[:, j], level) for j in range(grid_points)])
    area, width = area_between(estimate[a], estimate[b])
    boot = np.array([area_between(fa, fb) for fa, fb in zip(resampled[a], resampled[b])])  # [R, (area, width)]
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_mean_gap = np.where(boot[:, 1] > 0, boot[:, 0] / boot[:, 1], np.nan)
    undefined = np.isnan(gap_ci[:, 0])
    a_above, b_above = gap_ci[:, 0] > 0, gap_ci[:, 1] < 0  # the gap's interval excludes 0
    overlap = ~undefined & ~a_above & ~b_above
    dominance = _dominance(a_above, b_above, overlap)
    entry.update({
        "grid": grid.tolist(), "uap_a": uap_a.tolist(), "uap_b": uap_b.tolist(), "gap": gap.tolist(),
        "gap_ci": gap_ci.tolist(),
        "mean_gap": area / width, "mean_gap_ci": list(percentile_interval(boot_mean_gap, level)),
        "area": area, "area_ci": list(percentile_interval(boot[:, 0], level)),
        "a_above": _describe_regions(grid, a_above), "b_above": _describe_regions(grid, b_above),
        "dominance": dominance, "verdict": _verdict(a, b, dominance, grid, gap, a_above, b_above, overlap, undefined),
    })
    return entry


def eps_monotonicity(rows: list[dict], eps) -> list[dict]:
    """Rows whose UAP accuracy rises with eps (a larger-eps UAP fooling fewer inputs than a smaller one
    is a sign of an attack that stopped early). Returns one entry per (row, eps pair) that rises:
    {name, seed, eps_small, eps_large, rise} (rise in accuracy, a fraction)."""
    ordered = sorted(eps)
    issues = []
    for row in rows:
        for small, large in itertools.combinations(ordered, 2):
            rise = row["uap_accuracy"][eps_key(large)] - row["uap_accuracy"][eps_key(small)]
            if rise > 0:
                issues.append({"name": row["name"], "seed": row["seed"], "eps_small": small, "eps_large": large,
                               "rise": rise})
    return issues


def _interval(pair, scale: float = 100, digits: int = 1) -> str:
    lo, hi = pair
    return "n/a" if math.isnan(lo) else f"[{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def markdown_report(report: dict) -> str:
    """The item-2 tables: per eps, per method pair, the UAP-accuracy gap at matched clean accuracy (mean
    over the common range, and its extremes), the area between the frontiers, intervals and a verdict."""
    level = f"{100 * report['level']:g}%"
    lines = [f"Gap = UAP accuracy of A minus that of B at the same clean accuracy, in points, on the common "
             f"clean-accuracy range of the two frontiers; area = integral of the gap over that range "
             f"(points × points); mean gap = area / width. Brackets: {level} percentile bootstrap intervals "
             f"over seeds {report['seeds']} ({report['replicates']} paired resamples). \"Above\" means the "
             f"gap's interval excludes 0 there. With few seeds these intervals are too narrow: a nominal 95% "
             f"percentile interval of a mean covers it about "
             + ", ".join(f"{100 * rate:.0f}% of the time with {n} seeds" for n, rate in COVERAGE_95.items())
             + " (normal data, simulated); read a verdict from 3 seeds as a lead, not a finding.", ""]
    header = ["A − B", "common clean range %", f"mean gap [{level}]", f"area [{level}]",
              "largest gap A − B [CI] at clean %: UAP % A vs B", "smallest gap A − B [CI] at clean %: UAP % A vs B",
              "verdict"]
    for key, entry in report["eps"].items():
        lines += [f"### ε = {key}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for pair in entry["pairs"]:
            name = f"{pair['a']} − {pair['b']}"
            if pair["common_range"] is None:
                lines.append(f"| {name} | none | | | | | {pair['verdict']} |")
                continue
            gap = np.array(pair["gap"])

            def at(j: int) -> str:
                return (f"{100 * gap[j]:+.1f} {_interval(pair['gap_ci'][j])} at {100 * pair['grid'][j]:.1f}: "
                        f"{100 * pair['uap_a'][j]:.1f} vs {100 * pair['uap_b'][j]:.1f}")

            lo, hi = pair["common_range"]
            cells = [name, f"{100 * lo:.1f}–{100 * hi:.1f}",
                     f"{100 * pair['mean_gap']:+.1f} {_interval(pair['mean_gap_ci'])}",
                     f"{1e4 * pair['area']:+.1f} {_interval(pair['area_ci'], 1e4)}",
                     at(int(np.nanargmax(gap))), at(int(np.nanargmin(gap))), pair["verdict"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _save(figure, path) -> None:
    """A PNG written atomically (never half a file after an interruption); the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        _io.atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(figure)


def plot_frontiers(report: dict, path) -> None:
    """One panel per eps: each method's points (hollow: dominated; black diamonds: points of several
    methods), its envelope as a line and its bootstrap band; a legend names the methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(METHODS, ("tab:blue", "tab:cyan", "tab:red", "tab:purple", "tab:orange")))
    panels = list(report["eps"].items())
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for axis, (key, entry) in zip(axes[0], panels):
        owners = {}  # point name -> the methods it belongs to (the plain ensemble is the end of every JE frontier)
        for method, front in entry["frontiers"].items():
            for point in front["points"]:
                owners.setdefault(point["name"], []).append(method)
        for method, front in entry["frontiers"].items():
            color = colors.get(method, "gray")
            envelope = set(zip(front["envelope"]["clean"], front["envelope"]["uap"]))
            for point in front["points"]:
                on = (point["clean"], point["uap"]) in envelope
                shared = len(owners[point["name"]]) > 1
                axis.plot(100 * point["clean"], 100 * point["uap"], "D" if shared else "o",
                          color="black" if shared else color, markersize=4,
                          markerfacecolor=("black" if shared else color) if on else "none")
            axis.plot([100 * c for c in front["envelope"]["clean"]], [100 * u for u in front["envelope"]["uap"]],
                      "-", color=color, label=method)
            band = front["band"]
            lo, hi = np.array(band["lo"], dtype=float), np.array(band["hi"], dtype=float)
            axis.fill_between(100 * np.array(band["clean"]), 100 * lo, 100 * hi, color=color, alpha=0.15,
                              linewidth=0)
        axis.set_title(f"SGD-UAP ε = {key}")
        axis.set_xlabel("clean accuracy (%)")
        axis.set_ylabel("UAP accuracy (%)")
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False,
                  title=f"frontiers (line: Pareto envelope of the mean points, hollow: dominated, band: "
                        f"{100 * report['level']:g}% bootstrap interval; black diamonds: points of several frontiers, "
                        f"e.g. the plain ensemble)", title_fontsize=8)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    _save(figure, path)


def plot_gaps(report: dict, path) -> None:
    """The summary of the comparison, one column per eps. Top row: per method pair, the mean UAP gap A - B
    at matched clean accuracy over the common range with its interval (red: the interval above 0, blue:
    below, gray: containing 0). Below, one row per single-model reference B (jr, wide-jr, where present):
    the gap A - B of every other method along clean accuracy, with its pointwise interval band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(METHODS, ("tab:blue", "tab:cyan", "tab:red", "tab:purple", "tab:orange")))
    panels = list(report["eps"].items())
    pairs = panels[0][1]["pairs"] if panels else []
    labels = [f"{p['a']} − {p['b']}" for p in pairs]
    references = [m for m in ("jr", "wide-jr") if m in report["methods"]]
    heights = [0.32 * len(labels) + 0.8] + [2.6] * len(references)
    figure, axes = plt.subplots(1 + len(references), len(panels), figsize=(4.4 * len(panels), sum(heights) + 0.6),
                                squeeze=False, gridspec_kw={"height_ratios": heights})
    for column, (key, entry) in enumerate(panels):
        axis = axes[0][column]
        for row, pair in enumerate(entry["pairs"]):
            if pair["common_range"] is None:
                continue
            lo, hi = pair["mean_gap_ci"]
            color = "gray" if math.isnan(lo) or lo <= 0 <= hi else ("tab:red" if lo > 0 else "tab:blue")
            if not math.isnan(lo):
                axis.plot([100 * lo, 100 * hi], [row, row], "-", color=color, linewidth=2)
            axis.plot(100 * pair["mean_gap"], row, "o", color=color)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_title(f"ε = {key}: mean gap", fontsize=10)
        axis.set_xlabel("mean UAP gap A − B (points)")
        axis.set_yticks(range(len(labels)), labels if column == 0 else [], fontsize=7)
        axis.set_ylim(len(labels) - 0.5, -0.5)
        axis.grid(axis="x", alpha=0.3)
        for axis, reference in zip(axes[1:, column], references):
            for pair in entry["pairs"]:
                if pair["b"] != reference or pair["common_range"] is None:
                    continue
                grid = 100 * np.array(pair["grid"])
                ci = 100 * np.array(pair["gap_ci"], dtype=float)
                color = colors.get(pair["a"], "gray")
                axis.plot(grid, 100 * np.array(pair["gap"]), "-", color=color, label=f"{pair['a']} − {reference}")
                axis.fill_between(grid, ci[:, 0], ci[:, 1], color=color, alpha=0.15, linewidth=0)
            axis.axhline(0, color="black", linewidth=0.8)
            axis.set_title(f"ε = {key}: gap to {reference} along clean accuracy", fontsize=9)
            axis.set_xlabel("clean accuracy (%)")
            axis.set_ylabel("UAP gap (points)")
            axis.grid(alpha=0.3)
            if column == 0 and axis.get_legend_handles_labels()[0]:  # no curve without a common range
                axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    _save(figure, path)
