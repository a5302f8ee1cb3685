"""The throughput targets, checked (not asserted) on the rows of one ``python -m fastjac bench`` run:

    python -m bench.targets [the options of python -m fastjac bench] [--profile-misses]

prints the table, then for every architecture that has targets the verdicts at M = 5 (or the largest
M run), and with ``--profile-misses`` a torch.profiler top-ops table of the fastjac case of every
missed target. Every target is a ratio of two rows of one (arch, M) group, which were timed
interleaved: the engine and SGD-UAP targets and issue 10's user-loop targets on the MLP, issue 11's on
ResNet-8 (``--arch resnet``), and the generic path's on ``branchy`` and ``lenet_hardtanh``
(fastjac/benchmark.py).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastjac import backends, benchmark

TARGET_MEMBERS = 5


@dataclass(frozen=True)
class Target:
    """``numerator`` time / ``denominator`` time <= ``bound`` (``at_most``) or >= ``bound``. A side is
    (kind, backend, K) with backend "auto" (the automatic row), "named" (the backend the automatic choice
    resolves to, by name) or "-"; ``profile``: the fastjac side, profiled when the target is missed."""
    text: str
    numerator: tuple[str, str, int]
    denominator: tuple[str, str, int]
    bound: float
    at_most: bool
    profile: tuple[str, str, int]


def _at_most(text, numerator, denominator, bound, profile=None):
    return Target(text, numerator, denominator, bound, True, profile or numerator)


def _at_least(text, numerator, denominator, bound, profile=None):
    return Target(text, numerator, denominator, bound, False, profile or denominator)


PLAIN, LOOP, REFERENCE = ("plain", "auto", 1), ("loop", "-", 1), ("reference_jr", "-", 1)
VJP, JVP = ("jr_vjp", "named", 1), ("jr_jvp", "named", 1)
USER_VJP, USER_JVP = ("user_vjp", "auto", 1), ("user_jvp", "auto", 1)


def jr_step_targets(jvp_plain: float, vjp_plain: float, reference_vjp: float, reference_jvp: float) -> list[Target]:
    """The JR step's cost against a plain step and its speed-up over the reference."""
    return [
        _at_most(f"jvp JR step <= {jvp_plain}x plain stacked step", JVP, PLAIN, jvp_plain),
        _at_most(f"vjp JR step <= {vjp_plain}x plain stacked step", VJP, PLAIN, vjp_plain),
        _at_least(f"reference JR / vjp JR >= {reference_vjp}x", REFERENCE, VJP, reference_vjp),
        _at_least(f"reference JR / jvp JR >= {reference_jvp}x", REFERENCE, JVP, reference_jvp),
    ]


ENGINE = jr_step_targets(2.2, 2.5, 1.3, 1.6) + [
    _at_least("plain stacked step at least loop speed (loop / stacked >= 1)", LOOP, PLAIN, 1.0),
    _at_least("inference at least loop speed (loop / stacked >= 1)", ("infer_loop", "-", 1),
              ("infer_stacked", "auto", 1), 1.0),
    _at_least("inference at least vmap speed (vmap / stacked >= 1)", ("infer_vmap", "-", 1),
              ("infer_stacked", "auto", 1), 1.0),
    _at_least("UAP K=1 >= 2x common implementation (common / fastjac >= 2)", ("uap_common", "-", 1),
              ("uap", "auto", 1), 2.0),
    _at_most("UAP K=4 iteration <= 4x K=1 iteration", ("uap", "auto", 4), ("uap", "auto", 1), 4.0),
]

USER_LOOP = [  # issue 10
    _at_most("user-loop vjp step within 1.05x of the internal one-pass step", USER_VJP, VJP, 1.05),
    _at_most("user-loop jvp step within 1.05x of the internal one-pass step", USER_JVP, JVP, 1.05),
    _at_least("reference JR / user-loop vjp >= 1.3x", REFERENCE, USER_VJP, 1.3),
    _at_least("reference JR / user-loop jvp >= 1.6x", REFERENCE, USER_JVP, 1.6),
    _at_most("Hoffman-style step within 1.15x of the user-loop ensemble-target step", ("hoffman", "auto", 1),
             ("user_ensemble", "auto", 1), 1.15),
    _at_most("compiled user-loop vjp step no slower than eager", ("user_vjp_compiled", "auto", 1), USER_VJP, 1.0),
    _at_most("compiled user-loop jvp step no slower than eager", ("user_jvp_compiled", "auto", 1), USER_JVP, 1.0),
    _at_least("fastjac eager faster than the compiled torch.func peer (peer / user-loop jvp >= 1; the ratio "
              "whatever it is)", ("peer_jvp_compiled", "-", 1), USER_JVP, 1.0),
]

RESNET = jr_step_targets(2.2, 2.6, 1.4, 1.6) + [  # issue 11
    _at_most("plain stacked step <= 1.05x the loop of members", PLAIN, LOOP, 1.05),
]

def generic_targets(jvp: float) -> list[Target]:
    """Issue 11's generic path on a model no engine fuses: at least the reference's speed in both modes, and
    ``jvp`` times it in the jvp mode."""
    return [
        _at_least("generic path vjp at least reference speed (reference / generic >= 1)", REFERENCE,
                  ("generic_vjp", "auto", 1), 1.0),
        _at_least(f"generic path jvp >= {jvp}x faster than the reference", REFERENCE, ("generic_jvp", "auto", 1),
                  jvp),
    ]


TARGETS = {"mlp": ENGINE + USER_LOOP, "resnet": RESNET, "branchy": generic_targets(1.5),
           "lenet_hardtanh": generic_targets(1.0)}

GPU_ARCHS = ("mlp", "resnet")  # issue 12's GPU targets: MLP and ResNet-8, M = 5, B = 128


def gpu_targets(fused: Sequence[str]) -> list[Target]:
    """Issue 12's targets on a CUDA device, for each backend in ``fused`` (every benchmarked backend but
    ``torch``, which they are measured against): its JR steps against the reference loop and against the
    ``torch`` backend's, and the SGD-UAP iteration against the common implementation."""
    targets = []
    for name in fused:
        for kind in ("jr_vjp", "jr_jvp"):
            mode, side = kind.removeprefix("jr_"), (kind, name, 1)
            targets += [
                _at_least(f"reference JR / {mode} JR ({name}) >= 5x", REFERENCE, side, 5.0),
                _at_least(f"{mode} JR (torch backend) / {mode} JR ({name}) >= 1.5x", (kind, "torch", 1), side, 1.5),
            ]
    return targets + [_at_least("UAP K=1 >= 2x common implementation (common / fastjac >= 2)",
                                ("uap_common", "-", 1), ("uap", "auto", 1), 2.0)]


def targets_for(arch: str, device: str) -> list[Target]:
    """The targets of ``arch``'s rows: issue 12's on a CUDA device, the CPU issues' otherwise."""
    if torch.device(device).type == "cuda":
        fused = [name for name in benchmark.bench_backends(device) if name != "torch"]
        return gpu_targets(fused) if arch in GPU_ARCHS else []
    return TARGETS.get(arch, [])


def _find(rows: Sequence[dict], side: tuple[str, str, int], arch: str, m: int, auto: str) -> dict | None:
    kind, backend, k = side
    wanted = {"auto": f"auto={auto}", "named": auto}.get(backend, backend)
    return next((row for row in rows if (row["kind"], row["arch"], row["M"], row["K"], row["backend"])
                 == (kind, arch, m, k, wanted)), None)


def check_targets(rows: Sequence[dict], arch: str, m: int, auto: str, device: str = "cpu") -> list[dict]:
    """The targets of ``arch`` on its M = ``m`` rows -> [{target, ratio, ok, noisy, spec}]; ``auto``: the
    backend the automatic choice resolved to in that run. A side not measured (absent, or failed) gives
    ratio and ok None; ``spec``: the CaseSpec to profile when missed."""
    results = []
    for target in targets_for(arch, device):
        sides = [_find(rows, side, arch, m, auto) for side in (target.numerator, target.denominator)]
        measured = all(row is not None and row.get("time_ms") is not None for row in sides)
        ratio = sides[0]["time_ms"] / sides[1]["time_ms"] if measured else None
        kind, backend, k = target.profile
        spec = benchmark.CaseSpec(kind, arch, m, {"named": auto}.get(backend, backend), k)
        results.append(dict(target=target.text, ratio=ratio,
                            ok=None if ratio is None else (ratio <= target.bound if target.at_most else ratio >= target.bound),
                            noisy=measured and any(row.get("noisy") for row in sides), spec=spec))
    return results


def format_targets(results: Sequence[dict], arch: str, m: int) -> str:
    lines = [f"Targets ({arch}, M={m}, automatic backend; checked, not asserted):", ""]
    for result in results:
        status = "n/a " if result["ok"] is None else ("PASS" if result["ok"] else "MISS")
        value = "not measured" if result["ratio"] is None else f"measured {result['ratio']:.2f}x"
        lines.append(f"- {status} {result['target']}: {value}"
                     + (" (noisy: a row it uses was disturbed by other work)" if result["noisy"] else ""))
    return "\n".join(lines)


def profile_top_ops(spec: benchmark.CaseSpec, *, calls: int = 5, row_limit: int = 12, device: str = "cpu") -> str:
    """torch.profiler table of the top ops (by self CPU time) over ``calls`` calls of ``spec``."""
    fn = benchmark.build(spec, device)
    for _ in range(2):
        fn()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if str(device).startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
    sort = "self_cuda_time_total" if str(device).startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=48)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = benchmark.make_parser("python -m bench.targets")
    parser.add_argument("--profile-misses", action="store_true",
                        help="print a torch.profiler top-ops table for the case of every missed target")
    args = parser.parse_args(argv)
    rows, text = benchmark.run_from_args(parser, args, argv)
    auto = backends.current(args.device)
    sections = [text]
    profiled = set()
    for arch in dict.fromkeys(row["arch"] for row in rows):
        run = {row["M"] for row in rows if row["arch"] == arch}
        m = TARGET_MEMBERS if TARGET_MEMBERS in run else max(run)
        results = check_targets(rows, arch, m, auto, args.device)
        if not results:
            continue
        sections += ["", format_targets(results, arch, m)]
        for result in results:
            spec = result["spec"]
            if args.profile_misses and result["ok"] is False and spec.key not in profiled:
                profiled.add(spec.key)
                sections += ["", f"Top ops of `{spec.label}` ({arch}, {spec.backend}; missed: {result['target']}):",
                             "", "```", profile_top_ops(spec, device=args.device), "```"]
    benchmark.write_report("\n".join(sections), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
