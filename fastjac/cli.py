"""``python -m fastjac {train,attack,evaluate,reproduce,verify,bench}``: results as JSON on stdout."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _add_data(parser):
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    parser.add_argument("--data-root", default=None, help="directory with the IDX files (else FASTJAC_DATA, Debian's path)")


def _add_backend(parser):
    parser.add_argument("--backend", default=None, help="force a backend (see fastjac.backends.available())")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastjac", description="Jacobian Ensembles: train, attack, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a (JR) model or ensemble; writes a model file")
    p.add_argument("--arch", default="mlp", choices=["mlp", "lenet"])
    p.add_argument("--members", type=int, default=0, help="ensemble size M (0: a single model)")
    p.add_argument("--jr-lambda", type=float, nargs="+", default=[0.0], help="one value, or one per member")
    p.add_argument("--jr-target", default="members", choices=["members", "ensemble"])
    p.add_argument("--jr-mode", default="vjp", choices=["vjp", "jvp", "exact"])
    p.add_argument("--nproj", type=int, default=1)
    p.add_argument("--member-data", default="shared", choices=["shared", "independent"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=None, help="train on a random subset of this many images")
    p.add_argument("--out", required=True, help="model file to write (training resumes from OUT.ckpt)")
    _add_data(p)
    _add_backend(p)

    p = commands.add_parser("attack", help="fit SGD-UAPs (several eps at once) against a model file")
    p.add_argument("--model", required=True)
    p.add_argument("--eps", type=float, nargs="+", default=[0.1])
    p.add_argument("--target", type=int, default=None, help="target class (targeted attack)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=10000, help="training images to fit the UAPs on")
    p.add_argument("--out", required=True, help="directory for uap.pt, PNG images and metrics.json")
    _add_data(p)
    _add_backend(p)

    p = commands.add_parser("evaluate", help="clean and UAP metrics of a model file on the test set")
    p.add_argument("--model", required=True)
    p.add_argument("--uap", default=None, help="a uap.pt written by attack")
    _add_data(p)
    _add_backend(p)

    p = commands.add_parser("reproduce", help="the accuracy/robustness trade-off study (resumable)")
    _add_data(p)
    p.add_argument("--arch", default="mlp", choices=["mlp", "lenet"])
    p.add_argument("--preset", default="quick", choices=["smoke", "quick", "full"])
    p.add_argument("--out", default=None, help="output directory (default runs/<dataset>-<arch>-<preset>)")

    p = commands.add_parser("verify", help="compare every available backend against the reference")
    p.add_argument("--arch", default="mlp", choices=["mlp", "lenet"])
    p.add_argument("--model", default=None, help="verify on a trained model file instead of a random init")
    p.add_argument("--backends", nargs="+", default=None,
                   help="backends to check (default: every available one, less the Triton CPU interpreter)")

    commands.add_parser("bench", help="throughput benchmarks (arguments after 'bench' go to the harness)", add_help=False)
    return parser


def _cmd_train(args) -> dict:
    from fastjac import _io, data, models
    from fastjac.ensemble import Ensemble
    from fastjac.experiments import subset
    from fastjac.metrics import evaluate
    from fastjac.train import train

    torch.manual_seed(args.seed)
    model = Ensemble([models.build(args.arch) for _ in range(args.members)]) if args.members else models.build(args.arch)
    lam = args.jr_lambda[0] if len(args.jr_lambda) == 1 else args.jr_lambda
    train_data = subset(*data.load(args.dataset, "train", args.data_root), args.samples, args.seed)
    result = train(model, train_data, epochs=args.epochs,
                   batch_size=args.batch_size, lr=args.lr, jr_lambda=lam, jr_target=args.jr_target,
                   jr_mode=args.jr_mode, nproj=args.nproj, seed=args.seed, member_data=args.member_data,
                   checkpoint=args.out + ".ckpt", progress=True, backend=args.backend)
    _io.save_model(model, args.out, arch=args.arch, meta={"jr_lambda": lam, "jr_target": args.jr_target,
                                                            "history": result.history})
    metrics = evaluate(model, *data.load(args.dataset, "test", args.data_root), backend=args.backend)
    return {"model": args.out, "history": result.history, "test": metrics}


def _cmd_attack(args) -> dict:
    from fastjac import _io, data
    from fastjac.experiments import save_uap_image, subset
    from fastjac.metrics import evaluate
    from fastjac.uap import sgd_uap

    model, _ = _io.load_model(args.model)
    x, y = subset(*data.load(args.dataset, "train", args.data_root), args.samples, 1)
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, x.shape[0], args.batch_size)]
    result = sgd_uap(model, batches, eps=args.eps, epochs=args.epochs, target=args.target, progress=True,
                     backend=args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"delta": result.delta, "eps": result.eps, "targets": result.targets}, out / "uap.pt")
    for k, (delta, eps) in enumerate(zip(result.delta, result.eps)):
        save_uap_image(delta.unsqueeze(0), [eps], out / f"uap_{k}_eps{eps:g}.png", f"{Path(args.model).name}")
    metrics = evaluate(model, *data.load(args.dataset, "test", args.data_root), result.delta, backend=args.backend)
    report = {"model": args.model, "eps": result.eps, "targets": result.targets, "attack_seconds": result.seconds,
              **metrics}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


def _cmd_evaluate(args) -> dict:
    from fastjac import _io, data
    from fastjac.metrics import evaluate

    model, _ = _io.load_model(args.model)
    delta = None
    if args.uap is not None:
        delta = _io.load(args.uap)["delta"]
    return {"model": args.model, **evaluate(model, *data.load(args.dataset, "test", args.data_root), delta,
                                            backend=args.backend)}


def _cmd_reproduce(args) -> dict:
    from fastjac.experiments import reproduce

    out = args.out or f"runs/{args.dataset}-{args.arch}-{args.preset}"
    results = reproduce(dataset=args.dataset, arch=args.arch, preset=args.preset, out=out, root=args.data_root)
    return {"out": out, "rows": len(results["rows"])}


def _cmd_verify(args) -> dict:
    from fastjac.verify import verify

    return verify(arch=args.arch, model_path=args.model, names=args.backends)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from fastjac.benchmark import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    handler = {"train": _cmd_train, "attack": _cmd_attack, "evaluate": _cmd_evaluate, "reproduce": _cmd_reproduce,
               "verify": _cmd_verify}[args.command]
    try:
        report = handler(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"fastjac {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0
