"""``python -m fastjac {train,attack,evaluate,reproduce,verify,bench}``: results as JSON on stdout.

Every input and output is checked before any compute: the device and backend, the output paths (a directory
where a file is wanted, a file fastjac did not write: refused without ``--force``, a directory it cannot
write into), the model and UAP files, the data. A run holds a lock on its output and removes the temporary
files a killed run left there. Errors a user can cause end in one line on stderr, ``fastjac COMMAND: error:
...``, with exit code 2 for bad input (arguments, files, data, backend, device) and 1 for a run that failed
(divergence, an output in use by another run, a disk error); Ctrl-C prints one line and exits 130, leaving
no half-written file.

Under ``torchrun --nproc-per-node R`` (or any launcher that sets WORLD_SIZE > 1 and the env:// rendezvous),
train, attack and evaluate join the process group (gloo on CPUs, NCCL on GPUs: rank r uses cuda:LOCAL_RANK)
and spread the work over the R ranks (``fastjac.distributed``): the result equals the single-process run's.
Rank 0 alone reads and writes the files and prints the report; an error reaches every rank.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch

from fastjac import distributed, memory
from fastjac.experiments import PRESETS
from fastjac.models import ARCHITECTURES

EXIT_BAD_INPUT, EXIT_FAILED_RUN, EXIT_INTERRUPTED = 2, 1, 130
ATTACK_OUTPUTS = ("uap.pt", "metrics.json", "uap_*.png")


# ------------------------------------------------------------------------------------------- arguments
def _number(kind, accept, what: str):
    """An argparse type: ``kind(text)`` for which ``accept`` holds, else a usage error naming ``what``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


POSITIVE_INT = _number(int, lambda v: v >= 1, "an integer >= 1")
NON_NEGATIVE_INT = _number(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE_FLOAT = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _add_data(parser):
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    parser.add_argument("--data-root", default=None,
                        help="directory with the IDX files (else FASTJAC_DATA, else Debian's Fashion-MNIST); "
                             "a directory named here or in FASTJAC_DATA is used or fails, never replaced")


def _add_backend(parser):
    parser.add_argument("--backend", default=None, help="force a backend (see fastjac.backends.available())")


def _add_device(parser):
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu); the model, the data "
                             "and the UAPs go there")


def _add_arch(parser):
    parser.add_argument("--arch", default="mlp", choices=list(ARCHITECTURES))


def _add_force(parser, what: str):
    parser.add_argument("--force", action="store_true", help=f"overwrite {what} even if fastjac did not write it")


def _add_timeout(parser):
    parser.add_argument("--timeout", type=POSITIVE_FLOAT, default=None,
                        help="under torchrun: seconds a rank waits for the others in a collective before it stops "
                             "with an error (default FASTJAC_DIST_TIMEOUT, else 1800); with --jr-target members "
                             "the ranks meet once per epoch, so it must exceed their epoch-time difference")


def _add_parallel(parser):
    parser.add_argument("--parallel", default="data", choices=["data", "members"],
                        help="under torchrun: split the data over the ranks (every rank holds the whole model) or an "
                             "ensemble's members")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastjac", description="Jacobian Ensembles: train, attack, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a (JR) model or ensemble; writes a model file")
    _add_arch(p)
    p.add_argument("--members", type=NON_NEGATIVE_INT, default=0, help="ensemble size M (0: a single model)")
    p.add_argument("--jr-lambda", type=float, nargs="+", default=[0.0], help="one value, or one per member")
    p.add_argument("--jr-target", default="members", choices=["members", "ensemble"])
    p.add_argument("--jr-mode", default="vjp", choices=["vjp", "jvp", "exact"])
    p.add_argument("--nproj", type=int, default=1, help="projections per sample (>= 1; -1: exact, vjp only)")
    p.add_argument("--member-data", default="shared", choices=["shared", "independent"])
    p.add_argument("--epochs", type=POSITIVE_INT, default=2)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3)
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--samples", type=POSITIVE_INT, default=None, help="train on a random subset of this many images")
    p.add_argument("--out", required=True, help="model file to write (training resumes from OUT.ckpt)")
    _add_force(p, "OUT and OUT.ckpt")
    _add_data(p)
    _add_backend(p)
    _add_device(p)
    _add_timeout(p)

    p = commands.add_parser("attack", help="fit SGD-UAPs (several eps at once) against a model file")
    p.add_argument("--model", required=True)
    p.add_argument("--eps", type=float, nargs="+", default=[0.1])
    p.add_argument("--target", type=NON_NEGATIVE_INT, default=None, help="target class (targeted attack)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=10)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128)
    p.add_argument("--samples", type=POSITIVE_INT, default=10000, help="training images to fit the UAPs on")
    p.add_argument("--out", required=True, help="directory for uap.pt, PNG images and metrics.json")
    _add_force(p, "files in OUT")
    _add_data(p)
    _add_backend(p)
    _add_device(p)
    _add_parallel(p)
    _add_timeout(p)

    p = commands.add_parser("evaluate", help="clean and UAP metrics of a model file on the test set")
    p.add_argument("--model", required=True)
    p.add_argument("--uap", default=None, help="a UAP file written by attack (uap.pt) or reproduce (uaps/*.pt)")
    _add_data(p)
    _add_backend(p)
    _add_device(p)
    _add_parallel(p)
    _add_timeout(p)

    p = commands.add_parser("reproduce", help="the accuracy/robustness trade-off study (resumable)")
    _add_data(p)
    p.add_argument("--arch", default=None, choices=list(ARCHITECTURES),
                   help="member architecture (default: the one the preset is sized for)")
    p.add_argument("--preset", default="quick", choices=list(PRESETS))
    p.add_argument("--out", default=None, help="output directory (default runs/<dataset>-<arch>-<preset>)")
    _add_force(p, "files in OUT")
    _add_device(p)

    p = commands.add_parser("verify", help="compare every available backend against the reference")
    _add_arch(p)
    p.add_argument("--model", default=None, help="verify on a trained model file instead of a random init")
    p.add_argument("--backends", nargs="+", default=None,
                   help="backends to check (default: every available one, less the Triton CPU interpreter)")
    _add_device(p)

    commands.add_parser("bench", help="throughput benchmarks (arguments after 'bench' go to the harness)", add_help=False)
    return parser


def _device(args) -> torch.device:
    """--device, checked: cpu, or a CUDA device this process can see (under torchrun: cuda is this rank's GPU)."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: fastjac runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is visible to this process")
        device = distributed.local_device(device) if _launched() else device
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
                             + (f" (this is local rank {device.index})" if _launched() else ""))
    return device


def _launched() -> bool:
    """True under a launcher (torchrun) of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _join(args, device: torch.device):
    """The process group of a torchrun launch (joined on the first call), or None for one process."""
    return distributed.init(device, timeout=args.timeout) if _launched() else None


@contextlib.contextmanager
def _output_lock(world, path):
    """``_io.output_lock(path)`` held by rank 0 for every rank (its error, e.g. another run holds it, raised on all)."""
    from fastjac import _io

    with contextlib.ExitStack() as stack:
        distributed.on_rank0(world, lambda: stack.enter_context(_io.output_lock(path)))
        yield


def _first(world) -> bool:
    return world is None or world.is_first


def _check_backend(args, device: torch.device) -> None:
    from fastjac import backends

    if args.backend is not None:
        backends.resolve(args.backend, device.type)


# -------------------------------------------------------------------------------------------- commands
def _cmd_train(args) -> dict | None:
    from fastjac import _io, data, models
    from fastjac.ensemble import Ensemble
    from fastjac.experiments import subset
    from fastjac.metrics import evaluate
    from fastjac.train import train

    device = _device(args)
    _check_backend(args, device)
    world = _join(args, device)
    out, checkpoint = distributed.on_rank0(world, lambda: (
        _io.check_output_file(args.out, _io.is_model_file, force=args.force),
        _io.check_output_file(f"{args.out}.ckpt", _io.is_checkpoint_file, force=args.force, argument="checkpoint")))
    train_data = [t.to(device) for t in subset(*data.load(args.dataset, "train", args.data_root), args.samples, args.seed)]
    test_data = [t.to(device) for t in data.load(args.dataset, "test", args.data_root)]
    with _output_lock(world, out):
        def clean():
            _io.remove_orphans(out.parent, out.name)  # .OUT.*.tmp and .OUT.ckpt.*.tmp of a killed run
            if args.force and checkpoint.exists() and not _io.is_checkpoint_file(checkpoint):
                checkpoint.unlink()

        distributed.on_rank0(world, clean)
        torch.manual_seed(args.seed)
        model = Ensemble([models.build(args.arch) for _ in range(args.members)]) if args.members else models.build(args.arch)
        model = model.to(device)
        lam = args.jr_lambda[0] if len(args.jr_lambda) == 1 else args.jr_lambda
        result = train(model, train_data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, jr_lambda=lam,
                       jr_target=args.jr_target, jr_mode=args.jr_mode, nproj=args.nproj, seed=args.seed,
                       member_data=args.member_data, checkpoint=checkpoint, progress=True, backend=args.backend)
        distributed.on_rank0(world, lambda: _io.save_model(
            model, out, arch=args.arch, meta={"jr_lambda": lam, "jr_target": args.jr_target, "history": result.history}))
    metrics = evaluate(model, *test_data, backend=args.backend)
    return {"model": args.out, "history": result.history, "test": metrics} if _first(world) else None


def _is_attack_directory(directory: Path) -> bool:
    from fastjac import _io

    try:
        _io.load_uap(directory / "uap.pt")
    except (OSError, ValueError):
        return False
    return True


def _cmd_attack(args) -> dict | None:
    from fastjac import _io, data
    from fastjac.experiments import save_uap_image, subset
    from fastjac.metrics import evaluate
    from fastjac.uap import sgd_uap

    device = _device(args)
    _check_backend(args, device)
    world = _join(args, device)
    out = distributed.on_rank0(world, lambda: _io.check_output_directory(args.out, ATTACK_OUTPUTS, _is_attack_directory,
                                                                         force=args.force))
    model = distributed.on_rank0(world, lambda: _io.load_model(args.model)[0]).to(device)
    x, y = (t.to(device) for t in subset(*data.load(args.dataset, "train", args.data_root), args.samples, 1))
    test_data = [t.to(device) for t in data.load(args.dataset, "test", args.data_root)]
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, x.shape[0], args.batch_size)]
    distributed.on_rank0(world, lambda: out.mkdir(parents=True, exist_ok=True))
    with _output_lock(world, out):
        distributed.on_rank0(world, lambda: _io.remove_orphans(out))
        spread = None if world is None else args.parallel
        result = sgd_uap(model, batches, eps=args.eps, epochs=args.epochs, target=args.target, progress=_first(world),
                         backend=args.backend, distributed=spread)
        metrics = evaluate(model, *test_data, result.delta, backend=args.backend, distributed=spread)
        report = {"model": args.model, "eps": result.eps, "targets": result.targets,
                  "attack_seconds": result.seconds, **metrics}

        def write():
            _io.save_uap(out / "uap.pt", result.delta, result.eps, result.targets, meta={"model": args.model})
            for k, (delta, eps) in enumerate(zip(result.delta, result.eps)):
                save_uap_image(delta.unsqueeze(0), [eps], out / f"uap_{k}_eps{eps:g}.png", f"{Path(args.model).name}")
            _io.atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))

        distributed.on_rank0(world, write)
    return report if _first(world) else None


def _cmd_evaluate(args) -> dict | None:
    from fastjac import _io, data
    from fastjac.metrics import evaluate

    device = _device(args)
    _check_backend(args, device)
    world = _join(args, device)
    model = distributed.on_rank0(world, lambda: _io.load_model(args.model)[0]).to(device)
    delta = None if args.uap is None else distributed.on_rank0(world, lambda: _io.load_uap(args.uap)["delta"]).to(device)
    x, y = (t.to(device) for t in data.load(args.dataset, "test", args.data_root))
    metrics = evaluate(model, x, y, delta, backend=args.backend, distributed=None if world is None else args.parallel)
    return {"model": args.model, **metrics} if _first(world) else None


def _cmd_reproduce(args) -> dict:
    from fastjac.experiments import reproduce

    arch = args.arch or PRESETS[args.preset].arch
    out = args.out or f"runs/{args.dataset}-{arch}-{args.preset}"
    results = reproduce(dataset=args.dataset, arch=arch, preset=args.preset, out=out, root=args.data_root,
                        device=_device(args), force=args.force)
    return {"out": out, "rows": len(results["rows"])}


def _cmd_verify(args) -> dict:
    from fastjac.verify import verify

    return verify(arch=args.arch, model_path=args.model, names=args.backends, device=_device(args))


# ------------------------------------------------------------------------------------------ error handling
def _exit_code(error: BaseException) -> int | None:
    """2 for an error in what the user gave, 1 for a run that failed, None for a bug (keep the traceback)."""
    from fastjac import _io
    from fastjac.backends import BackendUnavailable

    if isinstance(error, (ValueError, TypeError, KeyError, BackendUnavailable, FileNotFoundError, FileExistsError,
                          PermissionError, IsADirectoryError, NotADirectoryError)):
        return EXIT_BAD_INPUT
    if isinstance(error, (FloatingPointError, _io.OutputInUse, OSError, distributed.CommunicationError)):
        return EXIT_FAILED_RUN
    return None


def _one_line(error: BaseException) -> str:
    text = f"missing entry {error}" if isinstance(error, KeyError) else str(error) or type(error).__name__
    return " ".join(text.split())


def _run(command: str, handler) -> int:
    """Run ``handler()``; print its report; turn the errors a user can cause into one line and an exit code.
    Under torchrun every rank exits with the same code; rank 0 prints (other ranks: their communication errors,
    which are their own)."""
    def first() -> bool:
        world = distributed.current()
        return world is None or world.is_first

    def show(message, category, filename, lineno, file=None, line=None):  # warnings as one line too
        if first():
            print(f"fastjac {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    memory.keep_freed_memory()
    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            report = handler()
        except KeyboardInterrupt:
            if first():
                print(f"fastjac {command}: interrupted; resume with the same command", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as error:  # noqa: BLE001 - classified below; anything else is a bug and re-raised
            code = _exit_code(error)
            if code is None:
                raise
            if first() or isinstance(error, distributed.CommunicationError):
                print(f"fastjac {command}: error: {_one_line(error)}", file=sys.stderr)
            return code
    if isinstance(report, int):  # bench returns its own exit code
        return report
    if report is not None:  # None: a rank other than 0 under torchrun
        print(json.dumps(report, indent=2))
    return 0


SPREAD_COMMANDS = ("train", "attack", "evaluate")  # the commands that run under torchrun


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if _launched() and command in ("reproduce", "verify", "bench"):
        print(f"fastjac {command}: error: runs in one process; launch it without torchrun (train, attack and "
              f"evaluate spread over ranks)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if command == "bench":
        from fastjac.benchmark import main as bench_main

        return _run("bench", lambda: bench_main(argv[1:]))
    args = _parser().parse_args(argv)
    handler = {"train": _cmd_train, "attack": _cmd_attack, "evaluate": _cmd_evaluate, "reproduce": _cmd_reproduce,
               "verify": _cmd_verify}[args.command]
    try:
        return _run(args.command, lambda: handler(args))
    finally:
        distributed.shutdown()
