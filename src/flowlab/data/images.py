"""Image datasets from their standard files: MNIST and Fashion-MNIST (IDX), CIFAR-10 (python
pickle batches) and scikit-learn's bundled 8x8 digits.

Nothing here downloads: every loader takes the folder that holds the files and fails with a
:class:`~flowlab.errors.DataError` naming the file when one is missing, has the wrong size,
magic number or format, or holds values outside the range its pixel depth allows. CIFAR-10
batches are pickles; they are read by an unpickler that builds nothing but numpy arrays, so a
malicious file cannot run code (the same policy as :mod:`flowlab.train.checkpoint`).

Every loader returns an :class:`ImageData`: integer pixels ``(N, C, H, W)`` as ``uint8`` with
values in ``0..levels-1``, integer labels ``(N,)``, and the pixel depth ``levels`` that
:mod:`flowlab.data.preprocess` needs to dequantize and to count bits per dimension. The test
split is for evaluation only: carve a validation set out of the training split with
:func:`split_validation`.
"""

from __future__ import annotations

import gzip
import io
import math
import numbers
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowlab.errors import ConfigError, DataError

SPLITS = ("train", "test")

# --- the container -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageData:
    """A set of images with ``levels`` intensity levels per pixel.

    Attributes:
        images: ``(N, C, H, W)`` ``uint8`` tensor of pixel values in ``0..levels-1``.
        labels: ``(N,)`` ``int64`` tensor of class labels.
        levels: number of intensity levels per pixel (256 for 8-bit images, 17 for digits).
        name: the dataset's name (a key of :data:`IMAGE_DATASETS`).
        split: ``"train"``, ``"test"`` or ``"valid"`` (a part of the training split).
    """

    images: torch.Tensor
    labels: torch.Tensor
    levels: int
    name: str
    split: str = "train"

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise DataError(f"{self.name}: images must be a uint8 tensor (N, C, H, W), got "
                            f"{self.images.dtype} of shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                            f"{tuple(self.labels.shape)}")
        if not 2 <= self.levels <= 256:
            raise DataError(f"{self.name}: levels must be in 2..256 for uint8 pixels, got "
                            f"{self.levels}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (f"ImageData(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={self.shape}, levels={self.levels})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The event shape ``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    @property
    def dim(self) -> int:
        """Pixels per image, ``C * H * W``: the ``D`` of bits per dimension."""
        return math.prod(self.shape)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``n`` images drawn uniformly with replacement, ``(n, C, H, W)`` pixel values.

        The indices are drawn on the generator's device (CPU without one), so a generator in
        the same state picks the same images. Values stay integers in ``0..levels-1`` whatever
        ``dtype`` is asked for; dequantize them with :mod:`flowlab.data.preprocess`.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ConfigError(f"sample size must be an int >= 0, got {n!r}")
        if len(self) == 0:
            raise DataError(f"{self.name} ({self.split}) holds no images to sample from")
        draw_device = generator.device if generator is not None else torch.device("cpu")
        index = torch.randint(0, len(self), (int(n),), generator=generator, device=draw_device)
        out = self.images[index.to(self.images.device)]
        return out.to(device=device if device is not None else draw_device, dtype=dtype)

    def subset(self, index: torch.Tensor, split: str) -> ImageData:
        """The images at ``index`` (a 1-D index tensor), as a new :class:`ImageData`."""
        return ImageData(self.images[index], self.labels[index], self.levels, self.name, split)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}; carve a validation "
                          "set out of 'train' with split_validation")


def _check_levels(pixels: np.ndarray, levels: int, source: str) -> None:
    """DataError naming ``source`` unless every pixel is an integer in ``0..levels-1``."""
    if pixels.size == 0:
        return
    if not np.issubdtype(pixels.dtype, np.integer):
        if not np.isfinite(pixels).all() or (np.floor(pixels) != pixels).any():
            raise DataError(f"{source}: pixel values must be integers in 0..{levels - 1}; "
                            "found non-integer values")
    low, high = pixels.min(), pixels.max()
    if low < 0 or high > levels - 1:
        raise DataError(f"{source}: pixel values must lie in 0..{levels - 1} ({levels} levels), "
                        f"found values in {low}..{high}")


def _check_labels(labels: np.ndarray, classes: int, source: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() > classes - 1):
        raise DataError(f"{source}: labels must lie in 0..{classes - 1}, found values in "
                        f"{labels.min()}..{labels.max()}")


def _folder(folder: str | Path, what: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"{what}: folder {path} does not exist or is not a folder; pass the "
                        "folder that holds the dataset's files (nothing is downloaded)")
    return path


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err})") from err


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------

# IDX type code -> big-endian numpy dtype (the format's own table)
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file, gzip-compressed or not, in native byte order.

    IDX layout (all integers big-endian): two zero bytes, a type code (0x08 uint8, 0x09 int8,
    0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions ``k``,
    ``k`` sizes as uint32, then the values in C order. Compression is recognised by the gzip
    magic bytes, not by the file name. The payload must be exactly as long as the header says:
    a truncated file or trailing bytes raise :class:`DataError` with both byte counts.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: a corrupt or truncated gzip file ({err})") from err
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header (4 bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000 then "
                        f"a type code in {[hex(c) for c in _IDX_TYPES]}); not an IDX file")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, "
                        f"the file holds {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "trailing bytes after the data"
        raise DataError(f"{path}: {problem}: an IDX array {shape} of {dtype.name} takes "
                        f"{expected} bytes, the file holds {len(raw)} bytes (decompressed)")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a writable copy in native byte order


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / stem}: file not found (nor {stem}.gz); the folder must hold the "
                    "standard MNIST file names")


MNIST_KINDS = {"mnist": "mnist", "fashion": "fashion-mnist"}


def load_mnist(folder: str | Path, split: str = "train", kind: str = "mnist") -> ImageData:
    """MNIST or Fashion-MNIST from the standard IDX files in ``folder``.

    The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (``split="train"``,
    60000 images) and ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (``"test"``, 10000),
    each optionally gzip-compressed with a ``.gz`` suffix. Both datasets use the same names and
    format; ``kind`` (``"mnist"`` or ``"fashion"``) only sets the name. Returns ``(N, 1, 28, 28)``
    uint8 images with 256 levels and labels in 0..9.
    """
    _check_split(split)
    if kind not in MNIST_KINDS:
        raise ConfigError(f"kind must be one of {tuple(MNIST_KINDS)}, got {kind!r}")
    name = MNIST_KINDS[kind]
    root = _folder(folder, name)
    prefix = "train" if split == "train" else "t10k"
    image_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{image_path}: expected uint8 images (N, 28, 28), found {images.dtype} "
                        f"of shape {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{label_path}: expected uint8 labels (N,), found {labels.dtype} of "
                        f"shape {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{label_path}: {labels.shape[0]} labels for the {images.shape[0]} "
                        f"images of {image_path}")
    _check_labels(labels, 10, str(label_path))
    _check_levels(images, 256, str(image_path))
    return ImageData(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        levels=256,
        name=name,
        split=split,
    )


# --- CIFAR-10 (python pickle batches) ------------------------------------------------------


def _numpy_constructors() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR-10 batch refers to: numpy's array and scalar reconstructors.

    The functions are taken from what numpy itself pickles, so no private module is imported;
    each is listed under its numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) module name.
    """
    array = np.zeros(1, dtype=np.uint8)
    reconstruct = array.__reduce__()[0]  # _reconstruct(ndarray, shape, typecode), then state
    frombuffer = array.__reduce_ex__(5)[0]  # _frombuffer(buffer, dtype, shape, order)
    scalar = np.int64(0).__reduce__()[0]  # scalar(dtype, bytes): numpy integers in a list
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray,
                                              ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


_CIFAR_GLOBALS = _numpy_constructors()


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global, so
    unpickling cannot call arbitrary functions (the way a malicious pickle runs code)."""

    def __init__(self, file: io.BytesIO, source: Path) -> None:
        # latin1 decodes Python 2 strings (the official batches are Python 2 pickles); numpy
        # reads array payloads decoded that way back as the original bytes
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise DataError(f"refusing to load {module}.{name} from {self.source}: not a "
                            "CIFAR-10 batch (only numpy arrays may be rebuilt)")
        return found


def _unpickle_batch(path: Path) -> dict:
    raw = _read_bytes(path)
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except Exception as err:  # any malformed pickle: UnpicklingError, EOFError, ValueError...
        raise DataError(f"{path}: not a readable CIFAR-10 pickle batch ({type(err).__name__}: "
                        f"{err})") from err
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, not the dict of a CIFAR-10 "
                        "batch")
    return batch


def _entry(batch: dict, key: str, path: Path) -> object:
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    raise DataError(f"{path}: no {key!r} entry; found keys {sorted(map(repr, batch))}: not a "
                    "CIFAR-10 batch")


CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR10_SUBFOLDER = "cifar-10-batches-py"  # what the official archive extracts to


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_batch(path)
    data, labels = _entry(batch, "data", path), _entry(batch, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        found = (f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray)
                 else type(data).__name__)
        raise DataError(f"{path}: 'data' must be a uint8 array (N, 3072), found {found}")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: 'labels' is not a list of integers ({err})") from err
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise DataError(f"{path}: 'labels' must be a list of integers, found {labels.dtype} of "
                        f"shape {labels.shape}")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    _check_labels(labels, 10, str(path))
    _check_levels(data, 256, str(path))
    return data, labels.astype(np.int64)


def load_cifar10(folder: str | Path, split: str = "train") -> ImageData:
    """CIFAR-10 from the python-pickle batches in ``folder`` (or in its ``cifar-10-batches-py``).

    ``split="train"`` reads ``data_batch_1`` .. ``data_batch_5`` (50000 images), ``"test"``
    reads ``test_batch`` (10000). Each batch is a dict with ``data``, a uint8 array
    ``(N, 3072)`` holding each image's red, green and blue planes of 32x32 row-major pixels, and
    ``labels``, N integers in 0..9 (keys as ``bytes`` or ``str``). Returns ``(N, 3, 32, 32)``
    uint8 images with 256 levels. Only numpy arrays are rebuilt from the pickles: any other
    object raises :class:`DataError` before it is created.
    """
    _check_split(split)
    root = _folder(folder, "cifar10")
    names = CIFAR10_FILES[split]
    if not (root / names[0]).exists() and (root / _CIFAR10_SUBFOLDER).is_dir():
        root = root / _CIFAR10_SUBFOLDER
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        hint = ""
        if any(root.glob("cifar-10-python.tar.gz")):
            hint = "; extract cifar-10-python.tar.gz first"
        raise DataError(f"{root / missing[0]}: file not found (CIFAR-10 {split} needs "
                        f"{', '.join(names)}){hint}")
    parts = [_read_cifar_batch(root / name) for name in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    return ImageData(torch.from_numpy(data), torch.from_numpy(labels), 256, "cifar10", split)


# --- scikit-learn's 8x8 digits -------------------------------------------------------------

DIGITS_TEST_SIZE = 297  # of 1797: 1500 train, 297 test
_DIGITS_SPLIT_SEED = 0


def _fixed_permutation(n: int, seed: int) -> np.ndarray:
    """A pseudo-random permutation of ``0..n-1`` fixed by ``seed`` alone.

    The indices are sorted by a 64-bit SplitMix64 hash of ``(seed, index)``, integer arithmetic
    that no numpy or torch version changes, so a split stays the same everywhere.
    """
    mask = (1 << 64) - 1
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & mask)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.argsort(z, kind="stable")


def load_digits(split: str = "train") -> ImageData:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16: 17 levels).

    The data ship with scikit-learn (``sklearn.datasets.load_digits``; nothing is downloaded),
    an optional dependency. The split is fixed: the images are ordered by
    :func:`_fixed_permutation` with seed 0 and the first ``DIGITS_TEST_SIZE`` = 297 form the
    test split, the other 1500 the training split, each kept in the original order.
    """
    _check_split(split)
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ConfigError("the digits dataset ships with scikit-learn, an optional dependency "
                          "that is not installed: pip install scikit-learn") from err
    source = "scikit-learn's digits data (sklearn.datasets.load_digits)"
    bunch = sklearn_digits()
    pixels, labels = np.asarray(bunch.data), np.asarray(bunch.target)
    if pixels.ndim != 2 or pixels.shape[1] != 64 or labels.shape != (pixels.shape[0],):
        raise DataError(f"{source}: expected (N, 64) pixels and N labels, found {pixels.shape} "
                        f"and {labels.shape}")
    _check_levels(pixels, 17, source)
    _check_labels(labels, 10, source)
    order = _fixed_permutation(pixels.shape[0], _DIGITS_SPLIT_SEED)
    chosen = order[:DIGITS_TEST_SIZE] if split == "test" else order[DIGITS_TEST_SIZE:]
    chosen = np.sort(chosen)
    images = pixels[chosen].astype(np.uint8).reshape(-1, 1, 8, 8)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels[chosen].astype(np.int64)),
                     levels=17, name="digits", split=split)


# --- validation split ----------------------------------------------------------------------


def split_validation(
    data: ImageData,
    *,
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 0,
) -> tuple[ImageData, ImageData]:
    """``(train, valid)``: a validation set carved out of a training split, and the rest.

    Give either ``fraction`` in (0, 1) (the validation size is ``round(fraction * N)``, at least
    1 and at most N - 1) or ``count``. The choice depends only on ``N`` and ``seed`` (a fixed
    hash, see :func:`_fixed_permutation`), so it is the same on every run and machine; both
    parts keep the original order. A test split is refused: it is for evaluation only.
    """
    if data.split != "train":
        raise ConfigError(f"split_validation takes a training split, got the {data.split!r} "
                          f"split of {data.name}; the test set is used only by evaluation")
    n = len(data)
    if (fraction is None) == (count is None):
        raise ConfigError("give exactly one of fraction= and count= for the validation split")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
                or not 0.0 < fraction < 1.0:
            raise ConfigError(f"fraction must be a number in (0, 1), got {fraction!r}")
        count = min(max(round(fraction * n), 1), n - 1)
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) \
            or not 1 <= count <= n - 1:
        raise ConfigError(f"the validation split needs 1..{n - 1} of the {n} training images, "
                          f"got count={count!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    order = _fixed_permutation(n, int(seed))
    valid = torch.from_numpy(np.sort(order[: int(count)]))
    train = torch.from_numpy(np.sort(order[int(count) :]))
    return data.subset(train, "train"), data.subset(valid, "valid")


# --- the registry --------------------------------------------------------------------------

IMAGE_DATASETS = ("mnist", "fashion-mnist", "cifar10", "digits")


def image_dataset(name: str, folder: str | Path | None = None, split: str = "train") -> ImageData:
    """The image dataset ``name`` (one of :data:`IMAGE_DATASETS`) read from ``folder``.

    ``mnist``, ``fashion-mnist`` and ``cifar10`` need the folder holding their files;
    ``digits`` ships with scikit-learn and takes none.
    """
    if name not in IMAGE_DATASETS:
        raise DataError(f"unknown image dataset {name!r}; choose one of: "
                        f"{', '.join(IMAGE_DATASETS)}")
    _check_split(split)
    if name == "digits":
        if folder is not None:
            raise ConfigError("the digits dataset ships with scikit-learn and takes no folder; "
                              "drop folder=")
        return load_digits(split)
    if folder is None:
        raise ConfigError(f"{name} is read from its standard files: pass folder= (the folder "
                          "holding them); nothing is downloaded")
    if name == "cifar10":
        return load_cifar10(folder, split)
    return load_mnist(folder, split, kind="fashion" if name == "fashion-mnist" else "mnist")
