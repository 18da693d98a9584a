"""Tests of the image loaders on small files written here in each standard format.

The IDX and pickle writers below follow the format specs byte by byte (and a Python 2 style
CIFAR pickle is assembled opcode by opcode), so the readers are checked against an independent
encoder, not against themselves. The real MNIST files are checked against the canonical MD5 of
their decompressed content.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowlab.data.images import (
    DIGITS_TEST_SIZE,
    IMAGE_DATASETS,
    ImageData,
    image_dataset,
    load_cifar10,
    load_digits,
    load_mnist,
    read_idx,
    split_validation,
)
from flowlab.errors import ConfigError, DataError

MNIST_DIR = Path("/work/shared/data/mnist")
IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
             np.float64: 0x0E}  # fmt: skip


def idx_bytes(array: np.ndarray, code: int | None = None) -> bytes:
    """An IDX file: 0x0000, type code, ndim, big-endian uint32 sizes, big-endian values."""
    code = IDX_CODES[array.dtype.type] if code is None else code
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range
    return images, rng.integers(0, 10, size=n, dtype=np.uint8)


def write_mnist(folder: Path, n_train: int = 4, n_test: int = 3) -> dict[str, tuple]:
    """Train files gzip-compressed with .gz names, test files raw: both must be found."""
    folder.mkdir(exist_ok=True)
    out = {}
    for split, prefix, n, compress in (("train", "train", n_train, True),
                                       ("test", "t10k", n_test, False)):
        images, labels = mnist_arrays(n, seed=n)
        suffix = ".gz" if compress else ""
        write(folder / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), compress)
        write(folder / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), compress)
        out[split] = images, labels
    return out


# --- IDX -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_every_type_code(tmp_path, dtype, compress):
    values = np.array([[0, 1, -2], [3, 100, -7]]) if dtype is not np.uint8 else \
        np.array([[0, 1, 2], [3, 200, 255]])
    if dtype in (np.float32, np.float64):
        values = values + 0.25
    array = values.astype(dtype)
    got = read_idx(write(tmp_path / "a.idx", idx_bytes(array), compress))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)
    got.flat[0] = 1  # a writable copy, not a view of the file's bytes


def test_read_idx_detects_gzip_by_magic_not_name(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw_named_gz = write(tmp_path / "raw.gz", idx_bytes(array))
    gz_named_raw = write(tmp_path / "compressed-ubyte", idx_bytes(array), compress=True)
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)


def test_read_idx_zero_length_and_one_dimension(tmp_path):
    assert read_idx(write(tmp_path / "e", idx_bytes(np.zeros((0, 28), np.uint8)))).shape == (0, 28)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "v", idx_bytes(np.arange(5,
                                  dtype=np.int32)))), np.arange(5))


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_size_must_match_header(tmp_path, compress):
    good = idx_bytes(np.arange(12, dtype=np.int16).reshape(3, 4))  # 4 + 8 + 24 bytes
    cut = write(tmp_path / "cut", good[:-1], compress)
    with pytest.raises(DataError, match=r"cut: truncated.*36 bytes.*holds 35 bytes"):
        read_idx(cut)
    extra = write(tmp_path / "extra", good + b"\0\0", compress)
    with pytest.raises(DataError, match=r"extra: trailing bytes.*36 bytes.*holds 38 bytes"):
        read_idx(extra)
    header = write(tmp_path / "header", good[:9], compress)
    with pytest.raises(DataError, match="header: truncated IDX header"):
        read_idx(header)


def test_read_idx_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.*file not found"):
        read_idx(tmp_path / "nope")
    array = np.zeros((2, 2), np.uint8)
    bad_magic = write(tmp_path / "magic", b"\x01" + idx_bytes(array)[1:])
    with pytest.raises(DataError, match="magic: bad IDX magic number 0x01000802"):
        read_idx(bad_magic)
    bad_type = write(tmp_path / "type", idx_bytes(array, code=0x0A))
    with pytest.raises(DataError, match="type: bad IDX magic"):
        read_idx(bad_type)
    with pytest.raises(DataError, match="short: 2 bytes"):
        read_idx(write(tmp_path / "short", b"\0\0"))
    broken_gz = write(tmp_path / "broken", gzip.compress(idx_bytes(array))[:-6])
    with pytest.raises(DataError, match="broken: a corrupt or truncated gzip"):
        read_idx(broken_gz)
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path)  # a folder is not a file


# --- MNIST ---------------------------------------------------------------------------------


def test_load_mnist_reads_both_splits(tmp_path):
    written = write_mnist(tmp_path)
    for split, (images, labels) in written.items():
        data = load_mnist(tmp_path, split)
        assert isinstance(data, ImageData)
        assert data.images.dtype == torch.uint8 and data.images.shape == (len(labels), 1, 28, 28)
        assert data.labels.dtype == torch.int64
        np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(data.labels.numpy(), labels)
        assert (data.levels, data.name, data.split, data.dim) == (256, "mnist", split, 784)
    fashion = load_mnist(tmp_path, "test", kind="fashion")
    assert fashion.name == "fashion-mnist" and len(fashion) == 3


def test_load_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "absent")
    with pytest.raises(ConfigError, match="split"):
        load_mnist(tmp_path, "valid")
    with pytest.raises(ConfigError, match="kind"):
        load_mnist(tmp_path, kind="kmnist")
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: file not found"):
        load_mnist(tmp_path, "test")

    images, labels = mnist_arrays(4, seed=1)
    cases = {
        "N differs": (images, labels[:3], r"labels-idx1-ubyte: 3 labels for the 4 images"),
        "label 10": (images, np.array([0, 10, 1, 2], np.uint8), r"labels.*0\.\.9.*0\.\.10"),
        "27 rows": (images[:, :27], labels, r"images-idx3-ubyte: expected uint8 images"),
        "int16 pixels": (images.astype(np.int16) + 1, labels, "expected uint8 images"),
        "int labels": (images, labels.astype(np.int32), "expected uint8 labels"),
    }
    for case, (bad_images, bad_labels, message) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        write(folder / "train-images-idx3-ubyte", idx_bytes(bad_images))
        write(folder / "train-labels-idx1-ubyte", idx_bytes(bad_labels))
        with pytest.raises(DataError, match=message):
            load_mnist(folder)


@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="MNIST is not on this machine")
def test_real_mnist():
    canonical_md5 = {"train": "6bbc9ace898e44ae57da46a324031adb",
                     "test": "2646ac647ad5339dbf082846283269ea"}
    for split, n in (("train", 60000), ("test", 10000)):
        data = image_dataset("mnist", MNIST_DIR, split)
        assert data.images.shape == (n, 1, 28, 28) and data.levels == 256
        assert int(data.images.min()) == 0 and int(data.images.max()) == 255
        assert sorted(data.labels.unique().tolist()) == list(range(10))
        # the decompressed file rebuilt from what was read has the canonical checksum
        content = bytes([0, 0, 8, 3]) + struct.pack(">3I", n, 28, 28)
        content += data.images.numpy().tobytes()
        assert hashlib.md5(content).hexdigest() == canonical_md5[split]


# --- CIFAR-10 ------------------------------------------------------------------------------


def cifar_batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def write_cifar(folder: Path, bytes_keys: bool = True) -> dict[str, tuple]:
    """Batches of 2 training images each and a test batch of 3, as pickle.dumps of dicts."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = cifar_batch(3 if name == "test_batch" else 2, seed=i)
        key = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
        # labels as a list of ints in the official files; numpy arrays are accepted too
        batch = {key("data"): data, key("labels"): labels.tolist() if i % 2 else labels,
                 key("batch_label"): "batch", key("filenames"): [b"a.png"] * len(labels)}
        (folder / name).write_bytes(pickle.dumps(batch))
        out[name] = data, labels
    return out


def python2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch as Python 2 cPickle (protocol 2) wrote it, opcode by opcode: str keys and
    the array payload as byte strings, numpy 1 module names."""

    def string(s: bytes) -> bytes:  # SHORT_BINSTRING or BINSTRING
        return (b"U" + bytes([len(s)]) if len(s) < 256 else b"T" + struct.pack("<I", len(s))) + s

    def global_(module: str, name: str) -> bytes:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    dtype = (global_("numpy", "dtype") + string(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (global_("numpy.core.multiarray", "_reconstruct") + global_("numpy", "ndarray")
             + b"K\x00\x85" + string(b"b") + b"\x87R"
             + b"(K\x01" + b"J" + struct.pack("<i", data.shape[0]) + b"J"
             + struct.pack("<i", data.shape[1]) + b"\x86" + dtype + b"\x89"
             + string(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (b"\x80\x02}(" + string(b"batch_label") + string(b"testing batch 1 of 1")
            + string(b"data") + array + string(b"labels") + label_list + b"u.")


def test_load_cifar10_reads_batches(tmp_path):
    for bytes_keys in (True, False):
        folder = tmp_path / f"keys_{bytes_keys}"
        written = write_cifar(folder, bytes_keys)
        train, test = load_cifar10(folder, "train"), load_cifar10(folder, "test")
        assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
        assert (train.levels, train.name, test.split) == (256, "cifar10", "test")
        data, labels = written["data_batch_3"]
        # the second image of batch 3; pixel (c, h, w) is data[c * 1024 + h * 32 + w]
        image = train.images[5]
        for c, h, w in ((0, 0, 0), (1, 5, 7), (2, 31, 30)):
            assert image[c, h, w] == data[1, c * 1024 + h * 32 + w]
        np.testing.assert_array_equal(train.labels[4:6].numpy(), labels)
        np.testing.assert_array_equal(test.images.reshape(3, -1).numpy(),
                                      written["test_batch"][0])


def test_load_cifar10_python2_pickle_and_subfolder(tmp_path):
    data, labels = cifar_batch(2, seed=7)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(python2_pickle(data, labels.tolist()))
    test = load_cifar10(tmp_path, "test")  # the parent of the extracted folder works too
    np.testing.assert_array_equal(test.images.reshape(2, -1).numpy(), data)
    np.testing.assert_array_equal(test.labels.numpy(), labels)


class _WritesAFile:
    """Unpickling this calls exec, which writes a file: what a malicious pickle does."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return exec, (f"open({str(self.target)!r}, 'w').write('pwned')",)


def test_load_cifar10_refuses_code(tmp_path):
    target = tmp_path / "pwned.txt"
    folder = tmp_path / "cifar"
    folder.mkdir()
    evil = pickle.dumps({b"data": _WritesAFile(target), b"labels": [0]})
    pickle.loads(evil)  # with a plain unpickler the payload runs
    assert target.exists()
    target.unlink()
    (folder / "test_batch").write_bytes(evil)
    with pytest.raises(DataError, match=r"refusing to load builtins\.exec from .*test_batch: "
                                        "not a CIFAR-10 batch"):
        load_cifar10(folder, "test")
    assert not target.exists()
    # a global hidden inside an array's state is refused as well
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.array([_WritesAFile(target)]),
                                                      "labels": [0]}))
    with pytest.raises(DataError, match="refusing to load builtins.exec"):
        load_cifar10(folder, "test")
    assert not target.exists()


def test_load_cifar10_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "absent")
    folder = tmp_path / "cifar"
    write_cifar(folder)
    (folder / "data_batch_4").unlink()
    (folder / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="data_batch_4: file not found.*extract"):
        load_cifar10(folder)

    data, labels = cifar_batch(3, seed=0)
    cases = {
        "not a dict": ([data, labels], "holds a list"),
        "no labels": ({b"data": data}, "no 'labels' entry"),
        "3071 columns": ({b"data": data[:, 1:], b"labels": labels}, r"uint8 array \(N, 3072\)"),
        "int16 data": ({b"data": data.astype(np.int16), b"labels": labels}, "found int16"),
        "data not an array": ({b"data": data.tolist(), b"labels": labels}, "found list"),
        "N differs": ({b"data": data, b"labels": labels[:2]}, "2 labels for 3 images"),
        "label 10": ({b"data": data, b"labels": [0, 10, 3]}, r"0\.\.9, found values in 0\.\.10"),
        "float labels": ({b"data": data, b"labels": [0.5, 1, 2]}, "list of integers"),
    }
    for batch, message in cases.values():
        (folder / "test_batch").write_bytes(pickle.dumps(batch))
        with pytest.raises(DataError, match=f"test_batch: .*{message}"):
            load_cifar10(folder, "test")
    good = pickle.dumps({b"data": data, b"labels": labels})
    for content in (good[:-20], b"not a pickle at all"):  # truncated, garbage
        (folder / "test_batch").write_bytes(content)
        with pytest.raises(DataError, match="test_batch: not a readable CIFAR-10 pickle"):
            load_cifar10(folder, "test")


# --- digits --------------------------------------------------------------------------------


def test_load_digits_fixed_split():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits as sklearn_digits

    train, test = load_digits("train"), load_digits("test")
    assert (len(train), len(test)) == (1797 - DIGITS_TEST_SIZE, DIGITS_TEST_SIZE)
    assert train.images.shape[1:] == (1, 8, 8) and (train.levels, train.dim) == (17, 64)
    assert int(train.images.max()) == 16 and int(train.images.min()) == 0
    # together they are the whole data set, each image once
    full = sklearn_digits()
    rows = np.concatenate([train.images.reshape(-1, 64).numpy(),
                           test.images.reshape(-1, 64).numpy()])
    labels = np.concatenate([train.labels.numpy(), test.labels.numpy()])
    expected = np.column_stack([full.data.astype(np.uint8), full.target])
    got = np.column_stack([rows, labels])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
    # fixed: the same images every call, every class in the test split
    assert torch.equal(load_digits("test").images, test.images)
    assert set(test.labels.tolist()) == set(range(10))


def test_load_digits_checks_values_and_dependency(monkeypatch):
    pytest.importorskip("sklearn")
    import sklearn.datasets

    class Bunch:
        def __init__(self, data, target):
            self.data, self.target = data, target

    for bad, message in ((17.0, r"0\.\.16 \(17 levels\), found values in 0\.0\.\.17\.0"),
                         (2.5, "non-integer")):
        data = np.zeros((10, 64))
        data[3, 5] = bad
        monkeypatch.setattr(sklearn.datasets, "load_digits",
                            lambda data=data: Bunch(data, np.arange(10)))
        with pytest.raises(DataError, match=f"scikit-learn's digits.*{message}"):
            load_digits()
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ConfigError, match="scikit-learn.*pip install scikit-learn"):
        load_digits()


# --- validation split, sampling and the registry -------------------------------------------


def numbered_images(n: int) -> ImageData:
    """Image i holds the value i in its first pixel, so the parts can be traced back."""
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return ImageData(images, torch.arange(n) % 10, levels=256, name="numbered")


def test_split_validation_disjoint_and_deterministic():
    data = numbered_images(100)
    train, valid = split_validation(data, fraction=0.2, seed=3)
    assert (len(train), len(valid)) == (80, 20) and (train.split, valid.split) == ("train", "valid")
    ids_train = set(train.images[:, 0, 0, 0].tolist())
    ids_valid = valid.images[:, 0, 0, 0].tolist()
    assert ids_train.isdisjoint(ids_valid) and ids_train | set(ids_valid) == set(range(100))
    assert ids_valid == sorted(ids_valid)  # original order kept
    assert torch.equal(valid.labels, valid.images[:, 0, 0, 0].long() % 10)
    again = split_validation(data, count=20, seed=3)[1]
    assert again.images[:, 0, 0, 0].tolist() == ids_valid
    other = split_validation(data, count=20, seed=4)[1]
    assert other.images[:, 0, 0, 0].tolist() != ids_valid
    assert ids_valid != list(range(20)) and ids_valid != list(range(80, 100))  # shuffled
    assert len(split_validation(data, fraction=0.001)[1]) == 1  # at least one image


def test_split_validation_errors():
    data = numbered_images(10)
    for kwargs, message in (({}, "exactly one"), ({"fraction": 0.1, "count": 1}, "exactly one"),
                            ({"fraction": 1.0}, r"in \(0, 1\)"), ({"count": 10}, r"1\.\.9"),
                            ({"count": 0}, r"1\.\.9"), ({"count": 2.0}, "count=2.0"),
                            ({"count": 2, "seed": 1.5}, "seed")):
        with pytest.raises(ConfigError, match=message):
            split_validation(data, **kwargs)
    test = ImageData(data.images, data.labels, 256, "numbered", split="test")
    with pytest.raises(ConfigError, match="used only by evaluation"):
        split_validation(test, count=2)


def test_sample_draws_stored_images():
    data = numbered_images(50)
    draw = data.sample(200, generator=torch.Generator().manual_seed(1))
    assert draw.shape == (200, 1, 2, 2) and draw.dtype == torch.uint8
    again = data.sample(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(again, draw.double())
    assert len(draw[:, 0, 0, 0].unique()) > 30  # with replacement, from the whole set
    with pytest.raises(ConfigError, match="sample size"):
        data.sample(-1)


def test_image_dataset_registry(tmp_path):
    assert IMAGE_DATASETS == ("mnist", "fashion-mnist", "cifar10", "digits")
    with pytest.raises(DataError, match="unknown image dataset 'svhn'.*mnist, fashion-mnist"):
        image_dataset("svhn", tmp_path)
    for name in ("mnist", "fashion-mnist", "cifar10"):
        with pytest.raises(ConfigError, match="pass folder="):
            image_dataset(name)
    with pytest.raises(ConfigError, match="takes no folder"):
        image_dataset("digits", tmp_path)
    write_mnist(tmp_path / "m")
    write_cifar(tmp_path / "c")
    assert image_dataset("fashion-mnist", tmp_path / "m", "test").name == "fashion-mnist"
    assert len(image_dataset("mnist", tmp_path / "m")) == 4
    assert len(image_dataset("cifar10", tmp_path / "c", "test")) == 3
    with pytest.raises(ConfigError, match="split"):
        image_dataset("mnist", tmp_path / "m", "valid")


def test_image_data_checks_its_fields():
    with pytest.raises(DataError, match="uint8 tensor"):
        ImageData(torch.zeros(2, 1, 2, 2), torch.zeros(2), 256, "x")
    with pytest.raises(DataError, match="labels"):
        ImageData(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3), 256, "x")
    with pytest.raises(DataError, match="levels"):
        ImageData(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2), 300, "x")
