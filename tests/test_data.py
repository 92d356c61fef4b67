import pickle

import numpy as np
import pytest
import torch

from kdd_mlflow import data
from tests.conftest import class_images, write_cifar_dataset, write_idx, write_idx_dataset


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_round_trips(tmp_path, compress):
    images, _ = class_images(7, 28, 1, 10, seed=3)
    path = write_idx(tmp_path / "x-idx3-ubyte", images[:, 0], compress)
    back = data.read_idx(path)
    assert back.shape == (7, 28, 28) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, images[:, 0])


def test_idx_reader_rejects_truncated_file(tmp_path):
    images, _ = class_images(4, 28, 1, 10, seed=3)
    path = write_idx(tmp_path / "x-idx3-ubyte", images[:, 0], compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reader_and_load(tmp_path, name):
    write_cifar_dataset(tmp_path, name, n_train=400, n_test=100)
    real = data.load(name, tmp_path, val_size=100)
    classes = 10 if name == "cifar10" else 100
    assert real.train.images.shape == (300, 3, 32, 32)
    assert real.test.images.shape == (100, 3, 32, 32)
    assert int(real.train.labels.max()) < classes and len(real.class_indices) == classes


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    with pytest.raises(data.DatasetFileError, match=f"{path}: refused to load builtins.print"):
        data.read_cifar_batches([path], "labels")


def test_a_refused_or_damaged_dataset_file_is_one_line_naming_it(tmp_path):
    from click.testing import CliRunner

    from kdd_mlflow import cli

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    root = write_cifar_dataset(tmp_path, "cifar10", n_train=100, n_test=20)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    args = ["train", "--dataset", "cifar10", "--data-dir", str(root), "--val-size", "20", "--epochs", "1"]
    result = CliRunner().invoke(cli.main, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("kdd ")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{batch}: refused to load builtins.print" in errors[0]
    batch.write_bytes(b"\x80\x02}q\x00(X")  # a pickle cut short
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 1 and f"{batch}: not a readable CIFAR batch" in result.stderr


def test_resolution_order(tmp_path, monkeypatch):
    explicit = write_idx_dataset(tmp_path / "explicit", 100, 20)
    env = write_idx_dataset(tmp_path / "env" / "fashion-mnist", 100, 20)
    system = write_idx_dataset(tmp_path / "system" / "fashion-mnist", 100, 20)
    cache = write_idx_dataset(data.cache_dir() / "FashionMNIST" / "raw", 100, 20, compress=False)
    monkeypatch.setattr(data, "SYSTEM_DIRS", (tmp_path / "system",))
    monkeypatch.setenv("KDD_DATA_DIR", str(tmp_path / "env"))
    assert data.locate("fashion-mnist", explicit) == explicit
    assert data.locate("fashion-mnist") == env
    monkeypatch.delenv("KDD_DATA_DIR")
    assert data.locate("fashion-mnist") == cache
    for f in cache.iterdir():
        f.unlink()
    assert data.locate("fashion-mnist") == system


def test_offline_error_names_places_and_fix(tmp_path):
    with pytest.raises(data.DataUnavailableError) as err:
        data.resolve("mnist", tmp_path / "nowhere")
    text = str(err.value)
    assert str(tmp_path / "nowhere") in text and str(data.cache_dir()) in text
    assert "Network is unreachable" in text and "KDD_DATA_DIR" in text
    assert "\n" not in text


def test_validation_split_is_deterministic_stratified_and_disjoint(fake_fashion):
    a = data.load("fashion-mnist", fake_fashion, val_size=100)
    b = data.load("fashion-mnist", fake_fashion, val_size=100)
    assert torch.equal(a.val.images, b.val.images)
    assert len(a.val) == 100 and len(a.train) == 1100
    assert torch.bincount(a.val.labels, minlength=10).tolist() == [10] * 10
    train_rows = {tuple(r) for r in a.train.images.flatten(1)[:, :50].tolist()}
    assert not any(tuple(r) in train_rows for r in a.val.images.flatten(1)[:, :50].tolist())


def test_class_indices_and_sampling(fake_fashion):
    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    for c, idx in enumerate(real.class_indices):
        assert (real.train.labels[idx] == c).all()
    subset = real.random_subset(3, torch.Generator().manual_seed(0))
    assert subset.images.shape == (30, 1, 28, 28)
    assert subset.labels.tolist() == [c for c in range(10) for _ in range(3)]


def test_normalisation_round_trip(fake_fashion):
    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    pixels = data.denormalise(real.test.images, real.info)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_train_limit_keeps_classes_balanced(fake_fashion):
    real = data.load("fashion-mnist", fake_fashion, val_size=100, train_limit=200)
    assert torch.bincount(real.train.labels, minlength=10).tolist() == [20] * 10


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        data.info("nope")


def test_every_split_of_a_one_channel_dataset_is_row_major(fake_fashion):
    # numpy's fancy indexing gives an (N, 1, H, W) array a channel stride of 1: contiguous, yet read as channels-last by
    # the convolutions, which then run the ConvNet's instance norm on channels-last activations (about 20x slower)
    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    subset = real.random_subset(3, torch.Generator().manual_seed(0))
    for images in (real.train.images, real.val.images, real.test.images, subset.images):
        assert images.stride() == torch.empty(images.shape).stride()
