"""Checkpoint files: written atomically (a crash never leaves a half-written file), read safely."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path) -> dict:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary code); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a corrupt or foreign file
        raise ValueError(f"checkpoint {path} is corrupt or not a fastjac checkpoint: {error}") from error


MODEL_FORMAT = "fastjac-model/1"


def save_model(model, path, *, arch: str, arch_kwargs: dict | None = None, meta: dict | None = None) -> None:
    """A model file: the architecture to rebuild it (``fastjac.models.build``), member count, weights."""
    from fastjac.ensemble import Ensemble

    members = model.num_members if isinstance(model, Ensemble) else 0
    atomic_save({"format": MODEL_FORMAT, "arch": arch, "arch_kwargs": dict(arch_kwargs or {}), "members": members,
                 "state": model.state_dict(), "meta": dict(meta or {})}, path)


def load_model(path):
    """(model, record) from a file written by ``save_model``; the model is in eval mode."""
    from fastjac import models
    from fastjac.ensemble import Ensemble

    record = load(path)
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a fastjac model file (expected format {MODEL_FORMAT!r})")
    build = lambda: models.build(record["arch"], **record["arch_kwargs"])  # noqa: E731
    model = Ensemble([build() for _ in range(record["members"])]) if record["members"] else build()
    try:
        model.load_state_dict(record["state"])
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit architecture {record['arch']!r}: {error}") from error
    return model.eval(), record
