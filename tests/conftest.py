"""Shared fixtures: generated datasets in the real on-disk formats, and an isolated MLflow store."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people; test logs stay readable

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``compress``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def class_images(n: int, size: int, channels: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: each class is a fixed random template plus noise."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(1234).uniform(0, 255, (num_classes, channels, size, size))
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    noise = rng.normal(0, 60, (n, channels, size, size))
    images = np.clip(templates[labels] * 0.6 + 50 + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_idx_dataset(root: Path, n_train: int = 1200, n_test: int = 300, compress: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = class_images(n, 28, 1, 10, seed)
        write_idx(root / f"{split}-images-idx3-ubyte", images[:, 0], compress)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, compress)
    return root


def write_cifar_dataset(root: Path, name: str = "cifar10", n_train: int = 500, n_test: int = 100) -> Path:
    """CIFAR python-pickle batches exactly as the official archives unpack."""
    num_classes = 10 if name == "cifar10" else 100
    key = "labels" if name == "cifar10" else "fine_labels"
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = class_images(n_train, 32, 3, num_classes, 0)
    test_images, test_labels = class_images(n_test, 32, 3, num_classes, 1)

    def dump(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
        batch = {"batch_label": "generated", key: [int(v) for v in labels],
                 "data": images.reshape(len(images), -1), "filenames": [f"{i}.png" for i in range(len(images))]}
        path.write_bytes(pickle.dumps(batch, protocol=2))

    if name == "cifar10":
        for i, chunk in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            dump(folder / f"data_batch_{i}", train_images[chunk], train_labels[chunk])
        dump(folder / "test_batch", test_images, test_labels)
    else:
        dump(folder / "train", train_images, train_labels)
        dump(folder / "test", test_images, test_labels)
    return root


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="no CUDA device"))])
def device(request) -> str:
    """A test that takes ``device`` runs on the CPU and, where there is one, on a CUDA device."""
    return request.param


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the user's cache, KDD_DATA_DIR, system copies or MLflow store; no test downloads."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("KDD_DATA_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setattr("kdd_mlflow.data.SYSTEM_DIRS", ())
    monkeypatch.setattr("kdd_mlflow.data._download", _no_network)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield
    while mlflow.active_run():
        mlflow.end_run()


def _no_network(name: str):
    raise OSError("<urlopen error [Errno 101] Network is unreachable>")


@pytest.fixture
def fake_fashion(tmp_path) -> Path:
    """A generated Fashion-MNIST in IDX format (1200 train, 300 test)."""
    return write_idx_dataset(tmp_path / "data" / "fashion-mnist")


@pytest.fixture
def real_fashion(monkeypatch) -> Path:
    if not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr("kdd_mlflow.data.SYSTEM_DIRS", (REAL_FASHION.parent,))
    return REAL_FASHION
