"""Tests for fastjac.data: IDX parsing, file discovery, validation errors, real Fashion-MNIST."""
import gzip
import re
import struct

import numpy as np
import pytest
import torch

from fastjac import data
from fastjac.data import DATASETS, DataError, find_files, load, read_idx

_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
          np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}


def idx_bytes(arr) -> bytes:
    """Valid IDX bytes for a numpy array (big-endian items, as the format requires)."""
    arr = np.asarray(arr)
    head = bytes([0, 0, _CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, gz=False, extra=b""):
    raw = idx_bytes(arr) + extra
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_split(d, split="train", n=5, gz=False, images=None, labels=None):
    """Write a tiny images/labels pair for `split` into directory `d`; returns (x, y) arrays."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if images is None else images
    y = (np.arange(n) % 10).astype(np.uint8) if labels is None else labels
    img, lbl = data._FILES[split]
    suffix = ".gz" if gz else ""
    write_idx(d / (img + suffix), x, gz)
    write_idx(d / (lbl + suffix), y, gz)
    return x, y


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    # Tests must not see a developer's FASTJAC_DATA, nor stale cache entries between tests.
    monkeypatch.delenv("FASTJAC_DATA", raising=False)
    data._load_checked.cache_clear()


# ---------------------------------------------------------------- real data

needs_debian = pytest.mark.skipif(
    not data.DEBIAN_DIR.is_dir(),
    reason=f"{data.DEBIAN_DIR} absent; run `apt-get install dataset-fashion-mnist`")


@needs_debian
def test_real_fashion_mnist_test_split():
    x, y = load("fashion-mnist", "test")
    assert x.dtype == torch.float32 and x.shape == (10000, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (10000,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10


@needs_debian
def test_real_fashion_mnist_train_split_and_cache():
    x, y = load("fashion-mnist", "train")
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert set(y.unique().tolist()) == set(range(10))
    x.fill_(7.0)
    y.fill_(42)  # mutating returned tensors must not leak into the cache
    x2, y2 = load("fashion-mnist", "train")
    assert data._load_checked.cache_info().hits == 1
    assert x2.max() <= 1.0 and y2.max() <= 9


# ---------------------------------------------------------------- read_idx

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("dtype,shape", [
    ("u1", (3, 4, 5)), ("i1", (7,)), ("i2", (2, 3)), ("i4", (2, 2, 2, 2)), ("f4", (4, 3)),
    ("f8", (5,))])
def test_read_idx_round_trip(tmp_path, gz, dtype, shape):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal(shape) * 100).astype(dtype) if dtype[0] != "u" \
        else rng.integers(0, 256, shape, dtype=np.uint8)
    # Misleading name on purpose: compression is detected from content, not the suffix.
    t = read_idx(write_idx(tmp_path / "f.idx", arr, gz))
    assert tuple(t.shape) == shape
    assert t.dtype == torch.from_numpy(arr).dtype
    np.testing.assert_array_equal(t.numpy(), arr)


def test_read_idx_missing_file(tmp_path):
    p = tmp_path / "nope-idx1-ubyte"
    with pytest.raises(DataError, match=re.escape(str(p)) + ".*not found"):
        read_idx(p)


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01",
                                   b"\x00\x00\x08\x00", b"\x00\x00\x08\x05"],
                         ids=["nonzero", "bad-type", "ndim0", "ndim5"])
def test_read_idx_bad_magic(tmp_path, magic):
    p = tmp_path / "bad"
    p.write_bytes(magic + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataError, match=re.escape(str(p)) + ".*magic"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
    p = tmp_path / "short"
    raw = idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10]
    p.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError, match=re.escape(str(p)) + ".*truncated"):
        read_idx(p)


def test_read_idx_truncated_header(tmp_path):
    p = tmp_path / "hdr"
    p.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 2))
    with pytest.raises(DataError, match=re.escape(str(p)) + ".*truncated IDX header"):
        read_idx(p)


def test_read_idx_trailing_bytes(tmp_path):
    p = write_idx(tmp_path / "long", np.zeros(6, np.uint8), extra=b"xyz")
    with pytest.raises(DataError, match=re.escape(str(p)) + ".*3 trailing bytes"):
        read_idx(p)


@pytest.mark.parametrize("body", [b"garbage!" * 8,
                                  gzip.compress(idx_bytes(np.ones(50, np.uint8)))[10:-12]],
                         ids=["garbage", "cut-stream"])
def test_read_idx_corrupt_gzip(tmp_path, body):
    p = tmp_path / "bad.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body)  # valid gzip header
    with pytest.raises(DataError, match=re.escape(str(p)) + ".*corrupt gzip"):
        read_idx(p)


# ---------------------------------------------------------------- discovery

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_load_mnist_from_root(tmp_path, gz):
    xs, ys = write_split(tmp_path, "test", n=7, gz=gz)
    x, y = load("mnist", "test", root=tmp_path)
    assert x.dtype == torch.float32 and x.shape == (7, 1, 28, 28)
    assert y.dtype == torch.int64 and y.tolist() == ys.tolist()
    torch.testing.assert_close(x[:, 0], torch.from_numpy(xs).float() / 255)


def test_load_root_subdir_named_after_dataset(tmp_path):
    write_split(tmp_path / "mnist", "train", n=3)
    assert load("mnist", "train", root=tmp_path)[0].shape == (3, 1, 28, 28)


@pytest.mark.parametrize("name,sub", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_load_torchvision_layout(tmp_path, name, sub):
    write_split(tmp_path / sub / "raw", "train", n=4, gz=True)
    assert find_files(name, "train", root=tmp_path)[0].parent == tmp_path / sub / "raw"
    assert load(name, "train", root=str(tmp_path))[1].shape == (4,)


def test_load_prefers_uncompressed_when_both_exist(tmp_path):
    write_split(tmp_path, "test", n=2)
    write_split(tmp_path, "test", n=2, gz=True)
    img, lbl = find_files("mnist", "test", root=tmp_path)
    assert img.name == "t10k-images-idx3-ubyte" and lbl.name == "t10k-labels-idx1-ubyte"


def test_load_from_env_var(tmp_path, monkeypatch):
    write_split(tmp_path / "MNIST" / "raw", "test", n=6)
    monkeypatch.setenv("FASTJAC_DATA", str(tmp_path))
    x, y = load("mnist", "test")
    assert x.shape == (6, 1, 28, 28) and y.shape == (6,)


def test_cache_sees_rewritten_files(tmp_path):
    write_split(tmp_path, "test", n=3)
    assert load("mnist", "test", root=tmp_path)[0].shape[0] == 3
    write_split(tmp_path, "test", n=5)  # size changes, so the (mtime, size) stamp changes
    assert load("mnist", "test", root=tmp_path)[0].shape[0] == 5


# ---------------------------------------------------------------- load errors

def test_mnist_not_found_lists_dirs(tmp_path):
    with pytest.raises(DataError) as e:
        load("mnist", "train", root=tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "FASTJAC_DATA" in msg
    for d in (tmp_path, tmp_path / "mnist", tmp_path / "MNIST" / "raw"):
        assert str(d) in msg


def test_fashion_not_found_suggests_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.delenv("FASTJAC_DATA", raising=False)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as e:
        load("fashion-mnist", "test")
    assert str(tmp_path / "no-debian") in str(e.value)


# ------------------------------------------------- an explicit root is used or fails (issue 16 item 9)

def test_env_var_at_a_missing_directory_fails_instead_of_loading_debian(tmp_path, monkeypatch):
    """Debian's Fashion-MNIST exists on this machine: a silent fallback would return it."""
    assert data.DEBIAN_DIR.is_dir(), "the fallback this test guards against needs Debian's copy"
    monkeypatch.setenv("FASTJAC_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"missing.*FASTJAC_DATA.*does not exist"):
        load("fashion-mnist", "test")


def test_env_var_without_the_test_files_fails_instead_of_loading_debian(tmp_path, monkeypatch):
    write_split(tmp_path, "train", n=3)  # the train split only
    monkeypatch.setenv("FASTJAC_DATA", str(tmp_path))
    assert load("fashion-mnist", "train")[0].shape == (3, 1, 28, 28)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.*not found") as e:
        load("fashion-mnist", "test")
    assert str(data.DEBIAN_DIR) not in str(e.value)


def test_root_argument_at_a_missing_directory_names_it(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*root=.*does not exist"):
        load("fashion-mnist", "test", root=tmp_path / "nowhere")


def test_root_argument_wins_over_the_env_var(tmp_path, monkeypatch):
    write_split(tmp_path / "a", "test", n=2)
    write_split(tmp_path / "b", "test", n=5)
    monkeypatch.setenv("FASTJAC_DATA", str(tmp_path / "b"))
    assert load("mnist", "test", root=tmp_path / "a")[0].shape[0] == 2
    assert load("mnist", "test")[0].shape[0] == 5


def test_only_images_present_is_not_found(tmp_path):
    write_split(tmp_path, "train", n=2)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*not found"):
        load("mnist", "train", root=tmp_path)


def test_count_mismatch(tmp_path):
    write_split(tmp_path, "test", n=4, labels=np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte has 4 images but .*"
                                        r"t10k-labels-idx1-ubyte has 3 labels"):
        load("mnist", "test", root=tmp_path)


def test_label_out_of_range(tmp_path):
    write_split(tmp_path, "test", n=3, labels=np.array([0, 10, 2], np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: labels must be in 0\.\.9"):
        load("mnist", "test", root=tmp_path)


@pytest.mark.parametrize("images", [np.zeros((2, 28, 27), np.uint8), np.zeros((2, 784), np.uint8),
                                    np.zeros((2, 28, 28), np.float32)],
                         ids=["28x27", "flat", "float"])
def test_bad_image_dims(tmp_path, images):
    write_split(tmp_path, "train", n=2, images=images)
    msg = r"train-images-idx3-ubyte: expected uint8 images \[N,28,28\]"
    with pytest.raises(DataError, match=msg):
        load("mnist", "train", root=tmp_path)


def test_corrupt_file_inside_load_names_it(tmp_path):
    write_split(tmp_path, "test", n=2, gz=True)
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-6])
    with pytest.raises(DataError, match=re.escape(str(p))):
        load("mnist", "test", root=tmp_path)


def test_unknown_dataset():
    with pytest.raises(DataError, match="'cifar'.*" + ".*".join(DATASETS)):
        load("cifar", "train")


def test_bad_split():
    with pytest.raises(ValueError, match="'val'.*train, test"):
        load("mnist", "val")
    assert issubclass(DataError, ValueError)
