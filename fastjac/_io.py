"""Files fastjac writes and reads.

Writes are atomic (a unique temporary file in the target's directory, fsync, rename): an interruption never
leaves a half-written output, and two processes never share a temporary name. Output paths are checked
before any compute (a directory where a file is wanted, a file fastjac did not write, a directory it cannot
write into), and a run holds a lock on its output for its whole duration. Model, checkpoint and UAP files
are read with ``weights_only=True`` (no code runs) and checked against their format before anything is built
from them; every error names the file.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import tempfile
from pathlib import Path

import torch

from fastjac._checks import all_finite

try:
    import fcntl
except ImportError:  # not POSIX (Windows): outputs are written atomically but not locked
    fcntl = None

MODEL_FORMAT = "fastjac-model/1"
UAP_FORMAT = "fastjac-uap/1"
CHECKPOINT_FORMAT = "fastjac-checkpoint/1"

# Sane bounds for the numbers a model file asks to build: far above any real member (the paper's models
# have widths <= 1024 and ensembles <= 10), far below what would exhaust memory before the weights are read.
MAX_MEMBERS = 1024
MAX_WIDTH = 2**20
MAX_LAYERS = 64


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; outputs get the usual permissions (0o666 less the umask)
FILE_MODE = 0o666 & ~_umask()


class OutputError(ValueError):
    """An output path cannot be used (a directory, a file fastjac did not write, not writable)."""


class OutputInUse(RuntimeError):
    """Another process holds the lock on an output."""


# ------------------------------------------------------------------------------------------------ writes
def _temporary_name(path: Path) -> str:
    """The prefix of ``path``'s temporary files: ``.NAME.<random>.tmp`` beside it (see remove_orphans)."""
    return f".{path.name}."


def atomic_write(path, write, *, binary: bool = True) -> None:
    """Call ``write(handle)`` on a new temporary file beside ``path``, fsync, then rename it over ``path``.

    The temporary name is unique (mkstemp), so concurrent writers never clobber each other's halves; on any
    exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_name(path), suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text), binary=False)


def remove_orphans(directory, name: str | None = None) -> list[Path]:
    """Delete the temporary files a killed run left in ``directory``: those of output ``name``
    (``.NAME.*.tmp``), or every ``.*.tmp`` when name is None. Call it only while holding the output's lock
    (``output_lock``): another live run's temporary files look the same. Returns the removed paths."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    prefix = "." if name is None else f".{name}."
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------ output checks, locks
def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_directory(directory, argument: str = "--out") -> None:
    """``directory`` exists (or can be created under its nearest existing ancestor) and accepts new files.

    Probes by creating (and deleting) a file: os.access would say yes to root on a read-only mount."""
    existing = _nearest_existing(Path(directory))
    if not existing.is_dir():
        raise OutputError(f"{argument} {directory}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OutputError(f"{argument} {directory}: cannot write into {existing} ({error.strerror})") from None


def check_output_file(path, own, *, force: bool = False, argument: str = "--out") -> Path:
    """An output file path usable now: not a directory, writable, and either new, one of fastjac's own files
    (``own(path)`` is True) or ``force``. Returns it as a Path."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{argument} {path} is a directory; expected a file path")
    if path.exists() and not force and not own(path):
        raise OutputError(f"{argument} {path} exists and was not written by fastjac; refusing to overwrite it "
                          f"(pass --force to overwrite it, or choose another path)")
    check_writable_directory(path.parent, argument)
    return path


def check_output_directory(directory, names, own, *, force: bool = False, argument: str = "--out") -> Path:
    """An output directory usable now: not a file, writable, and none of the files it will hold (``names``:
    file names or glob patterns) is in the way unless the directory is fastjac's own output (``own(dir)``,
    or it holds the lock file of an earlier fastjac run) or ``force``. Returns it as a Path."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{argument} {directory} exists and is not a directory")
    if directory.is_dir() and not force and not (directory / DIRECTORY_LOCK).exists() and not own(directory):
        in_the_way = sorted({p.name for pattern in names for p in directory.glob(pattern)})
        if in_the_way:
            raise OutputError(f"{argument} {directory} holds {', '.join(in_the_way)}, not written by fastjac; "
                              f"refusing to overwrite (pass --force, or choose another directory)")
    check_writable_directory(directory, argument)
    return directory


DIRECTORY_LOCK = ".fastjac.lock"


def _lock_path(path: Path) -> Path:
    """A directory's lock lives inside it; a file's beside it (``.NAME.lock``)."""
    return path / DIRECTORY_LOCK if path.is_dir() else path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path):
    """Hold an exclusive lock on output ``path`` (a file, or an existing directory) for the block.

    Raises OutputInUse at once when another process holds it (a second run into the same output would redo
    or clobber the first one's work). The lock is an fcntl lock: the kernel releases it when the process
    dies, so a killed run never leaves a stale lock; the lock file itself stays (empty of meaning). Without
    fcntl (not POSIX) the block runs unlocked."""
    lock = _lock_path(Path(path))
    lock.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    handle = open(lock, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputInUse(f"{path} is in use by another fastjac run ({holder}); wait for it to finish or "
                              f"choose another output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


# ------------------------------------------------------------------------------------------------- reads
def load(path, what: str = "checkpoint"):
    """Read a fastjac file with ``weights_only=True`` (no arbitrary code); errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # unreadable (permissions, I/O): its own message names the file
        raise
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a corrupt or foreign file
        raise ValueError(f"{what} {path} is corrupt or not a fastjac file: {error}") from error


def _format_of(path) -> str | None:
    """The ``format`` entry of a fastjac file, or None for anything else (unreadable, foreign, absent)."""
    try:
        record = load(path)
    except (OSError, ValueError):
        return None
    return record.get("format") if isinstance(record, dict) else None


def is_model_file(path) -> bool:
    return _format_of(path) == MODEL_FORMAT


CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "config", "history")


def is_checkpoint_file(path) -> bool:
    """A training checkpoint: format CHECKPOINT_FORMAT, or the keys of one written before formats were
    recorded."""
    try:
        record = load(path)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and (record.get("format") == CHECKPOINT_FORMAT
                                         or all(key in record for key in CHECKPOINT_KEYS))


def check_finite_state(state: dict, path) -> None:
    """Every floating tensor of a state dict finite: a model with NaN weights predicts garbage silently."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or inf values (a diverged or damaged model)")


# ------------------------------------------------------------------------------------------------- models
def save_model(model, path, *, arch: str, arch_kwargs: dict | None = None, meta: dict | None = None) -> None:
    """A model file: the architecture to rebuild it (``fastjac.models.build``), member count, weights."""
    from fastjac.ensemble import Ensemble

    members = model.num_members if isinstance(model, Ensemble) else 0
    atomic_save({"format": MODEL_FORMAT, "arch": arch, "arch_kwargs": dict(arch_kwargs or {}), "members": members,
                 "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": dict(meta or {})},
                path)


def _check_arch_kwargs(kwargs, builder, path) -> None:
    """Keyword arguments a builder accepts, with ints (or short lists of ints) in sane bounds."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: arch_kwargs must be a dict, got {type(kwargs).__name__}")
    accepted = set(inspect.signature(builder).parameters)
    for key, value in kwargs.items():
        if key not in accepted:
            raise ValueError(f"{path}: arch_kwargs has {key!r}, which the architecture does not take "
                             f"(known: {', '.join(sorted(accepted))})")
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(values) > MAX_LAYERS:
            raise ValueError(f"{path}: arch_kwargs[{key!r}] has {len(values)} entries (at most {MAX_LAYERS})")
        for item in values:
            if not isinstance(item, int) or isinstance(item, bool) or not 1 <= item <= MAX_WIDTH:
                raise ValueError(f"{path}: arch_kwargs[{key!r}] must hold ints in [1, {MAX_WIDTH}], got {value!r}")


def _build(record: dict, device):
    from fastjac import models
    from fastjac.ensemble import Ensemble

    with torch.device(device):
        build = lambda: models.build(record["arch"], **record["arch_kwargs"])  # noqa: E731
        return Ensemble([build() for _ in range(record["members"])]) if record["members"] else build()


def load_model(path):
    """(model, record) from a file written by ``save_model``; the model is in eval mode, on the CPU.

    The record is checked before any real tensor is allocated: format and keys, the architecture and its
    arguments (bounded), the member count (bounded, and equal to the stacked tensors' leading size); then
    the model is built on the meta device (no memory) and its tensor names and shapes compared with the
    file's; the weights must be finite."""
    from fastjac import models

    record = load(path, "model file")
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a fastjac model file (expected a dict with format {MODEL_FORMAT!r}, "
                         f"as written by `train`)")
    missing = {"arch", "arch_kwargs", "members", "state"} - set(record)
    if missing:
        raise ValueError(f"{path}: model file lacks {', '.join(sorted(missing))}")
    arch, members, state = record["arch"], record["members"], record["state"]
    if arch not in models.ARCHITECTURES:
        raise ValueError(f"{path}: unknown architecture {arch!r} (known: {', '.join(models.ARCHITECTURES)})")
    _check_arch_kwargs(record["arch_kwargs"], models.ARCHITECTURES[arch], path)
    if not isinstance(members, int) or isinstance(members, bool) or not 0 <= members <= MAX_MEMBERS:
        raise ValueError(f"{path}: members must be an int in [0, {MAX_MEMBERS}] (0: a single model), got {members!r}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: state must be a dict of tensors")
    try:
        skeleton = _build(record, "meta")
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot build architecture {arch!r} with {record['arch_kwargs']}: {error}") from None
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        differences = sorted(set(expected.items()) ^ set(found.items()), key=str)[:3]
        raise ValueError(f"{path}: weights do not fit architecture {arch!r} with {members} members and "
                         f"{record['arch_kwargs']} (first differences, name and shape: {differences})")
    check_finite_state(state, path)
    model = _build(record, "cpu")
    model.load_state_dict(state)
    return model.eval(), record


# ---------------------------------------------------------------------------------------------------- UAPs
def save_uap(path, delta: torch.Tensor, eps, targets, meta: dict | None = None) -> None:
    """The one UAP file every command writes and reads: delta [K, *input], eps [K], targets [K]."""
    atomic_save({"format": UAP_FORMAT, "delta": delta.detach().cpu(), "eps": [float(e) for e in eps],
                 "targets": list(targets), "meta": dict(meta or {})}, path)


def load_uap(path) -> dict:
    """The record of a file written by ``save_uap`` (``attack`` and ``reproduce``), checked: a floating
    delta [K, *input] with finite values and |delta_k| <= eps_k, eps and targets of K entries each."""
    expected = (f"expected a dict with format {UAP_FORMAT!r}, delta [K, *input], eps [K] and targets [K], "
                f"as written by `attack` or `reproduce`")
    record = load(path, "UAP file")
    if not isinstance(record, dict) or record.get("format") != UAP_FORMAT:
        got = type(record).__name__ if not isinstance(record, dict) else f"format {record.get('format')!r}"
        raise ValueError(f"{path} is not a fastjac UAP file ({expected}; got {got})")
    delta, eps, targets = record.get("delta"), record.get("eps"), record.get("targets")
    if not isinstance(delta, torch.Tensor) or not delta.is_floating_point() or delta.dim() < 2:
        raise ValueError(f"{path}: delta must be a floating tensor [K, *input] ({expected})")
    k = delta.shape[0]
    if not isinstance(eps, list) or len(eps) != k or not isinstance(targets, list) or len(targets) != k:
        raise ValueError(f"{path}: eps and targets must be lists of K = {k} entries ({expected})")
    if not all(isinstance(e, float) and math.isfinite(e) and 0 < e <= 1 for e in eps):
        raise ValueError(f"{path}: eps must be floats in (0, 1], got {eps}")
    if not all_finite(delta):
        raise ValueError(f"{path}: delta holds NaN or inf values")
    for index, bound in enumerate(eps):
        if float(delta[index].abs().max()) > bound * (1 + 1e-6):
            raise ValueError(f"{path}: delta[{index}] exceeds its eps {bound} (max |delta| "
                             f"{float(delta[index].abs().max()):.4g})")
    return record
