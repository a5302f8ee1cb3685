"""Offline loading of MNIST-style IDX data (Fashion-MNIST, MNIST) into torch tensors.

Nothing here downloads: files are found under ``root=``, else ``$FASTJAC_DATA``, else (for
Fashion-MNIST only, and only when neither names a directory) Debian's ``dataset-fashion-mnist``
package. An explicit directory is used or fails: never a silent fallback to other data. Every problem with the data
raises :class:`DataError` naming the file involved, so a bad download is easy to spot.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASETS", "DataError", "find_files", "load", "read_idx"]

DATASETS = ("fashion-mnist", "mnist")
SPLITS = ("train", "test")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

# IDX type code -> big-endian numpy dtype (IDX stores multi-byte items big-endian).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


class DataError(ValueError):
    """A dataset file is missing, unreadable or malformed; the message names the file."""


def read_idx(path) -> torch.Tensor:
    """Read one IDX file (raw or gzip, detected by content) into a tensor of the IDX shape.

    Type 0x08 gives uint8; the signed/float types give int8, int16, int32, float32, float64.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e})") from None
    # Detect gzip by its magic bytes, not the name: renamed or pre-extracted files are common.
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\0\0" or code not in _IDX_TYPES or not 1 <= ndim <= 4:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
                        f"(want 0000 + type in {sorted(hex(c) for c in _IDX_TYPES)} + ndim 1..4)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header (need {header} bytes, have {len(raw)})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    count = math.prod(dims)
    want, have = count * dtype.itemsize, len(raw) - header
    if have < want:
        raise DataError(f"{path}: truncated data: shape {dims} needs {want} bytes, file has {have}")
    if have > want:
        raise DataError(f"{path}: {have - want} trailing bytes after data of shape {dims}")
    # astype copies into native byte order: torch needs that, and a writable array.
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="))).reshape(dims)


def _check_choice(name: str, split: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {name}; valid splits: {', '.join(SPLITS)}")


def _explicit_root(root) -> tuple[Path, str] | None:
    """(directory, how it was named) for root= or $FASTJAC_DATA, None when neither is set. An explicit root
    is used alone or fails: a typo in it must never silently load other data (such as Debian's copy)."""
    env = os.environ.get("FASTJAC_DATA")
    if root is not None:
        return Path(root).expanduser(), f"root={str(root)!r}"
    if env:
        return Path(env).expanduser(), f"FASTJAC_DATA={env!r}"
    return None


def _search_dirs(name: str, root) -> list[Path]:
    """Directories to search, in order: under an explicit root (root= or $FASTJAC_DATA) the root itself,
    ``root/<name>`` and torchvision's ``root/<Name>/raw``, and nothing else; without one, Debian's
    Fashion-MNIST package."""
    explicit = _explicit_root(root)
    if explicit is not None:
        base, how = explicit
        if not base.is_dir():
            raise DataError(f"data directory {base} ({how}) does not exist or is not a directory")
        return [base, base / name, base / _TORCHVISION_DIR[name] / "raw"]
    return [DEBIAN_DIR] if name == "fashion-mnist" else []


def find_files(name: str, split: str, root=None) -> tuple[Path, Path]:
    """Return ``(images_path, labels_path)`` for a dataset split, from the first directory
    holding both files (each either uncompressed or ``.gz``)."""
    _check_choice(name, split)
    stems = _FILES[split]
    dirs = _search_dirs(name, root)
    for d in dirs:
        # Prefer the uncompressed file (faster to read) where both exist, as torchvision leaves.
        found = [next((d / f for f in (s, s + ".gz") if (d / f).is_file()), None) for s in stems]
        if all(found):
            return found[0], found[1]
    hint = ("install it with `apt-get install dataset-fashion-mnist`, or pass root= / set "
            "FASTJAC_DATA to a directory with the IDX files" if name == "fashion-mnist" else
            "pass root= or set FASTJAC_DATA to a directory with the IDX files")
    searched = "\n  ".join(str(d) for d in dirs) or "(none: no root= given and FASTJAC_DATA unset)"
    raise DataError(f"{name} {split} files {stems[0]}[.gz] and {stems[1]}[.gz] not found; "
                    f"searched:\n  {searched}\n{hint}")


@functools.lru_cache(maxsize=8)
def _load_checked(images: Path, labels: Path, stamp) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded, validated (uint8 [N,28,28], int64 [N]); cached on paths + (mtime, size) stamp."""
    x, y = read_idx(images), read_idx(labels)
    if x.dtype != torch.uint8 or x.dim() != 3 or tuple(x.shape[1:]) != (28, 28):
        raise DataError(f"{images}: expected uint8 images [N,28,28], got {x.dtype} {list(x.shape)}")
    if y.dim() != 1 or y.dtype.is_floating_point:
        raise DataError(f"{labels}: expected integer labels [N], got {y.dtype} {list(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    y = y.long()
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{labels}: labels must be in 0..9, got range "
                        f"{y.min().item()}..{y.max().item()}")
    return x, y


def load(name: str, split: str, root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset split as ``(x, y)``: x float32 [N,1,28,28] in [0,1], y int64 [N].

    ``name`` is one of :data:`DATASETS`, ``split`` is "train" or "test". Repeated calls reuse
    the decoded files; the returned tensors are fresh, so mutating them never touches the cache.
    """
    images, labels = (p.resolve() for p in find_files(name, split, root))
    try:
        stamp = tuple((s.st_mtime_ns, s.st_size) for s in (images.stat(), labels.stat()))
    except OSError as e:
        raise DataError(f"cannot stat {e.filename}: {e.strerror}") from None
    x, y = _load_checked(images, labels, stamp)
    return x.unsqueeze(1).float().div_(255), y.clone()
