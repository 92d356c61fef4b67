"""Datasets: where their files are, how to read them, and the tensors every stage trains on.

Resolution is offline first: an explicit directory, ``KDD_DATA_DIR``, the per-user cache, known
system copies, and only then a download through torchvision's dataset classes. The files are read
by the small IDX and CIFAR-pickle readers below, so a copy in any of those places works the same.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from kdd_mlflow import layers
from kdd_mlflow.runtime import first_line

log = logging.getLogger(__name__)

SYSTEM_DIRS = (Path("/usr/share/datasets"),)


@dataclass(frozen=True)
class DatasetInfo:
    """What a stage needs to know about a dataset before touching its files."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    format: str  # "idx" or "cifar"
    torchvision_class: str
    # Names the files may sit under, inside a search root.
    subdirs: tuple[str, ...] = field(default_factory=tuple)
    class_names: tuple[str, ...] = field(default_factory=tuple)


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "mnist", 1, 28, 10, (0.1307,), (0.3081,), "idx", "MNIST",
            ("mnist", "MNIST/raw"), tuple(str(i) for i in range(10)),
        ),
        DatasetInfo(
            "fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,), "idx", "FashionMNIST",
            ("fashion-mnist", "FashionMNIST/raw"),
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        ),
        DatasetInfo(
            "cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "cifar", "CIFAR10",
            ("cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
            ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        ),
        DatasetInfo(
            "cifar100", 3, 32, 100, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), "cifar", "CIFAR100",
            ("cifar-100-python", "cifar100/cifar-100-python"),
        ),
    )
}


class DataUnavailableError(RuntimeError):
    """No copy of the dataset was found and it could not be downloaded."""


class DatasetFileError(ValueError):
    """A dataset file is unreadable or holds what a dataset file must not (the message names the file)."""


def info(name: str) -> DatasetInfo:
    """Metadata of a dataset by name."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None


def cache_dir() -> Path:
    """The per-user cache where downloads go."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdd-mlflow" / "data"


def search_roots(data_dir: str | Path | None = None) -> list[Path]:
    """Directories searched, in order: explicit, ``KDD_DATA_DIR``, user cache, system copies."""
    roots: list[Path] = []
    if data_dir:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get("KDD_DATA_DIR"):
        roots.append(Path(os.environ["KDD_DATA_DIR"]).expanduser())
    roots.append(cache_dir())
    roots.extend(SYSTEM_DIRS)
    return roots


# --- readers ---------------------------------------------------------------------------------

def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    try:
        with _open_maybe_gz(path) as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # a damaged .gz: BadGzipFile, or EOFError when cut short
        raise DatasetFileError(f"{path}: unreadable ({type(exc).__name__}: {first_line(exc)})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetFileError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DatasetFileError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(dtypes[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DatasetFileError(f"{path}: IDX payload is {len(raw) - offset} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def read_cifar_batches(paths: Iterable[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR python-pickle batches into uint8 images (N, 3, 32, 32) and int64 labels.

    The batches are plain dicts of numpy arrays and lists; a restricted unpickler refuses anything
    else, so a tampered file cannot run code.
    """
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                batch = _SafeUnpickler(f, encoding="latin1").load()
            data = np.asarray(batch["data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except DatasetFileError:
            raise
        except Exception as exc:  # a truncated or foreign file fails in many ways (EOFError, KeyError, ...)
            raise DatasetFileError(f"{path}: not a readable CIFAR batch ({type(exc).__name__}: "
                                   f"{first_line(exc)})") from None
    return np.concatenate(images), np.concatenate(labels)



class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, f, **kwargs):
        super().__init__(f, **kwargs)
        self.path = getattr(f, "name", "dataset file")

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DatasetFileError(f"{self.path}: refused to load {module}.{name} (dataset files hold only arrays "
                               "and lists; this one holds code or objects)")


def _find_idx(root: Path, split: str) -> tuple[Path, Path] | None:
    found = []
    for stem in IDX_FILES[split]:
        for candidate in (root / stem, root / f"{stem}.gz"):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            return None
    return found[0], found[1]


def _cifar_files(name: str, root: Path) -> dict[str, list[Path]] | None:
    if name == "cifar10":
        train = [root / f"data_batch_{i}" for i in range(1, 6)]
        test = [root / "test_batch"]
    else:
        train, test = [root / "train"], [root / "test"]
    if all(p.is_file() for p in train + test):
        return {"train": train, "test": test}
    return None


def locate(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The first directory holding a complete copy of the dataset, or None."""
    meta = info(name)
    for root in search_roots(data_dir):
        for sub in ("",) + meta.subdirs:
            candidate = root / sub if sub else root
            if not candidate.is_dir():
                continue
            if meta.format == "idx" and all(_find_idx(candidate, s) for s in IDX_FILES):
                return candidate
            if meta.format == "cifar" and _cifar_files(name, candidate):
                return candidate
    return None


def _download(name: str) -> Path:
    import torchvision.datasets as tvd

    meta = info(name)
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    cls = getattr(tvd, meta.torchvision_class)
    for train in (True, False):
        cls(root=str(target), train=train, download=True)
    found = locate(name, target)
    if found is None:  # torchvision changed its layout
        raise DataUnavailableError(f"downloaded {name} into {target} but could not find its files there")
    return found


def unavailable_message(name: str, data_dir: str | Path | None, reason: str) -> str:
    meta = info(name)
    looked = ", ".join(str(r) for r in search_roots(data_dir))
    wanted = (
        "the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte; .gz or not)"
        if meta.format == "idx"
        else f"the python-pickle batches ({meta.subdirs[0]}/)"
    )
    hint = (
        " On Debian, `apt-get install dataset-fashion-mnist` installs a copy in /usr/share/datasets."
        if name == "fashion-mnist" else ""
    )
    return (
        f"dataset {name!r} is not available: no copy was found in {looked} (each searched directly and "
        f"under {', '.join(meta.subdirs)}), and downloading it failed ({reason}). Put {wanted} in one of "
        f"those directories, point --data-dir or KDD_DATA_DIR at a directory holding them, or run once "
        f"with network access so it downloads into {cache_dir()}.{hint}"
    )


def resolve(name: str, data_dir: str | Path | None = None, download: bool = True) -> Path:
    """Directory holding the dataset's files, downloading into the cache when nothing is found."""
    found = locate(name, data_dir)
    if found is not None:
        return found
    if not download:
        raise DataUnavailableError(unavailable_message(name, data_dir, "downloads disabled"))
    try:
        return _download(name)
    except DataUnavailableError:
        raise
    except Exception as exc:  # network errors come in many types (URLError, socket errors, ...)
        raise DataUnavailableError(unavailable_message(name, data_dir, first_line(exc))) from None


def read_raw(name: str, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """uint8 images (N, C, H, W) and int64 labels for the train and test splits in ``root``."""
    meta = info(name)
    out = {}
    if meta.format == "idx":
        for split in IDX_FILES:
            img_path, lab_path = _find_idx(root, split)
            images, labels = read_idx(img_path), read_idx(lab_path).astype(np.int64)
            if images.ndim != 3 or len(images) != len(labels):
                raise ValueError(f"{img_path}: expected (N, H, W) images matching {len(labels)} labels")
            out[split] = (images[:, None], labels)
    else:
        files = _cifar_files(name, root)
        key = "labels" if name == "cifar10" else "fine_labels"
        for split in ("train", "test"):
            out[split] = read_cifar_batches(files[split], key)
    for split, (images, labels) in out.items():
        shape = (meta.channels, meta.image_size, meta.image_size)
        if images.shape[1:] != shape:
            raise ValueError(f"{name} {split}: images are {images.shape[1:]}, expected {shape}")
        if labels.min() < 0 or labels.max() >= meta.num_classes:
            raise ValueError(f"{name} {split}: labels outside [0, {meta.num_classes})")
    return out


# --- tensors every stage trains on ------------------------------------------------------------

@dataclass
class Split:
    """Normalised images and their labels, held as tensors, with where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str = ""  # e.g. fashion-mnist-train, fashion-mnist-subset-ipc10, synthetic-RUN_ID
    source: str = ""  # the directory the files were read from, or the run artifact (runs:/...)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


@dataclass
class RealData:
    """A dataset ready for training: train (minus validation), validation and test splits."""

    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    class_indices: list[torch.Tensor]  # indices into train.images, per class

    def sample_class(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """n distinct random training images of class c."""
        idx = self.class_indices[c]
        if n > len(idx):
            raise ValueError(f"class {c} has {len(idx)} training images, {n} requested")
        return self.train.images[idx[torch.randperm(len(idx), generator=generator)[:n]]]

    def random_subset(self, ipc: int, generator: torch.Generator) -> Split:
        """ipc random training images per class, ordered by class."""
        images = torch.cat([self.sample_class(c, ipc, generator) for c in range(self.info.num_classes)])
        labels = torch.arange(self.info.num_classes).repeat_interleave(ipc)
        return Split(images, labels, f"{self.info.name}-subset-ipc{ipc}", self.train.source)


def normalise(images: np.ndarray | torch.Tensor, meta: DatasetInfo) -> torch.Tensor:
    """uint8 images to float32 (x / 255 - mean) / std, row-major (``layers.row_major``)."""
    x = torch.tensor(np.asarray(images), dtype=torch.float32) / 255.0
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    return layers.row_major((x - mean) / std)


def denormalise(images: torch.Tensor, meta: DatasetInfo) -> torch.Tensor:
    """Back to [0, 1] pixel space, for viewing."""
    mean = torch.tensor(meta.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(meta.std, device=images.device).view(1, -1, 1, 1)
    return images * std + mean


def validation_indices(labels: np.ndarray, val_size: int, num_classes: int) -> np.ndarray:
    """A stratified validation split that depends only on the labels and its size, never on a run's seed."""
    rng = np.random.default_rng(20220607)
    per_class = val_size // num_classes
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if per_class > len(idx) // 2:
            raise ValueError(f"validation split of {val_size} leaves too little of class {c} for training")
        chosen.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(chosen))


def load(
    name: str,
    data_dir: str | Path | None = None,
    val_size: int = 5000,
    train_limit: int | None = None,
    download: bool = True,
) -> RealData:
    """Resolve, read and normalise a dataset, carving a validation split from its training set.

    ``train_limit`` keeps only the first N training images after the validation split (stratified
    order is kept by taking whole classes evenly), for quick runs and tests.
    """
    meta = info(name)
    root = resolve(name, data_dir, download=download)
    log.info("reading %s from %s", name, root)
    raw = read_raw(name, root)
    train_images, train_labels = raw["train"]
    val_idx = validation_indices(train_labels, val_size, meta.num_classes)
    keep = np.ones(len(train_labels), dtype=bool)
    keep[val_idx] = False
    train_idx = np.flatnonzero(keep)
    if train_limit is not None and train_limit < len(train_idx):
        rng = np.random.default_rng(1)
        per_class = max(1, train_limit // meta.num_classes)
        train_idx = np.sort(np.concatenate([
            rng.permutation(train_idx[train_labels[train_idx] == c])[:per_class] for c in range(meta.num_classes)
        ]))
    source = str(root)
    train = Split(normalise(train_images[train_idx], meta), torch.as_tensor(train_labels[train_idx]), f"{name}-train",
                  source)
    val = Split(normalise(train_images[val_idx], meta), torch.as_tensor(train_labels[val_idx]), f"{name}-val", source)
    test = Split(normalise(raw["test"][0], meta), torch.as_tensor(raw["test"][1]), f"{name}-test", source)
    class_indices = [torch.nonzero(train.labels == c).flatten() for c in range(meta.num_classes)]
    return RealData(meta, train, val, test, class_indices)


class ZCA:
    """ZCA whitening fitted on training images (regularised as in the MTT reference, eps 0.1).

    Distillation happens in whitened space; ``inverse`` maps images back for viewing.
    """

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, inverse_matrix: torch.Tensor):
        self.mean, self.matrix, self.inverse_matrix = mean, matrix, inverse_matrix

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = 0.1) -> ZCA:
        x = images.flatten(1).double()
        mean = x.mean(0)
        x = x - mean
        cov = x.T @ x / (len(x) - 1)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        scale = (eigvals.clamp(min=0) + eps).sqrt()
        matrix = (eigvecs / scale) @ eigvecs.T
        inverse = (eigvecs * scale) @ eigvecs.T
        return cls(mean.float(), matrix.float(), inverse.float())

    def __call__(self, images: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        m, w = self.mean.to(images.device), self.matrix.to(images.device)
        return torch.cat([((c.flatten(1) - m) @ w).view_as(c) for c in images.split(batch_size)])

    def inverse(self, images: torch.Tensor) -> torch.Tensor:
        m, w = self.mean.to(images.device), self.inverse_matrix.to(images.device)
        return (images.flatten(1) @ w + m).view_as(images)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"zca.mean": self.mean, "zca.matrix": self.matrix, "zca.inverse": self.inverse_matrix}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> ZCA:
        return cls(t["zca.mean"], t["zca.matrix"], t["zca.inverse"])


def whiten(real: RealData) -> ZCA:
    """Fit ZCA on the training split and apply it to every split in place."""
    zca = ZCA.fit(real.train.images)
    for split in (real.train, real.val, real.test):
        split.images = zca(split.images)
    return zca
