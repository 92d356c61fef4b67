import pytest
import torch

from kdd_mlflow import models
from kdd_mlflow.augment import DSA, GROUPS

NAMES = ["convnet", "convnet-d4", "convnet-w32", "convnet-w64-d2", "resnet18", "mlp", "mlp-h64"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_output_shapes(name, shape):
    model = models.create(name, channels=shape[0], num_classes=10, image_size=shape[1])
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    assert models.count_parameters(model) > 0


def test_convnet_names_parse_to_width_and_depth():
    model = models.create("convnet-w32-d4", 1, 10, 28)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.out_channels == 32 for c in convs)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(n.num_groups == n.num_channels == 32 and n.affine for n in norms)


def test_convnet_28px_follows_the_32px_path():
    # 28x28 with first-conv padding 3 ends on the same feature map as 32x32 (4x4 at depth 3).
    assert models.create("convnet", 1, 10, 28).classifier.in_features == 128 * 4 * 4
    assert models.create("convnet", 3, 10, 32).classifier.in_features == 128 * 4 * 4


def test_default_convnet_parameter_count():
    # conv(1->128) + 2 conv(128->128) + 3 groupnorms + linear(2048 -> 10)
    expected = (128 * 9 + 128) + 2 * (128 * 128 * 9 + 128) + 3 * 256 + (2048 * 10 + 10)
    assert models.count_parameters(models.create("convnet", 1, 10, 28)) == expected


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg99'"):
        models.create("vgg99", 1, 10, 28)


@pytest.mark.parametrize("group", GROUPS)
def test_augmentation_is_differentiable_and_keeps_shape(group):
    x = torch.randn(6, 3, 32, 32, requires_grad=True)
    y = DSA(group)(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    (y ** 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("group", GROUPS)
def test_augmentation_keeps_the_contiguous_layout(group, channels):
    # A channels-last batch (strides of an NHWC tensor; with one channel, the only sign is a channel stride of 1)
    # sends a whole inner step down the channels-last kernels, where the instance norm's backward is up to 20x slower.
    x = torch.randn(6, channels, 28, 28)
    y = DSA(group)(x, torch.Generator().manual_seed(0))
    assert y.stride() == torch.empty(y.shape).stride()


def test_augmentation_draw_replays_exactly():
    aug = DSA()
    x = torch.randn(8, 1, 28, 28)
    for seed in range(12):  # covers every group
        draw = aug.sample(x.shape, torch.Generator().manual_seed(seed))
        assert torch.equal(aug.apply(x, draw), aug.apply(x, draw))
        assert torch.equal(aug.apply(x, draw), aug(x, torch.Generator().manual_seed(seed)))


def test_augmentation_parameters_are_per_sample():
    aug = DSA("rotate")
    x = torch.randn(1, 1, 28, 28).expand(4, -1, -1, -1).contiguous()
    y = aug(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(y[0], y[1])


def test_crop_is_a_whole_pixel_shift():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    from kdd_mlflow.augment import _translate

    y = _translate(x, torch.tensor([1]), torch.tensor([0]))
    assert torch.equal(y[0, 0, 1:], x[0, 0, :3]) and torch.equal(y[0, 0, 0], torch.zeros(4))


def test_unknown_augmentation_group():
    with pytest.raises(ValueError, match="unknown augmentation"):
        DSA("color_blur")


def test_mlflow_run_environment_lists_the_package_dependencies():
    """python_env.yaml (what `mlflow run` installs) must carry every runtime dependency of pyproject.toml."""
    from pathlib import Path

    import tomllib
    import yaml

    root = Path(__file__).resolve().parents[1]
    wanted = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])
    listed = set(yaml.safe_load((root / "python_env.yaml").read_text())["dependencies"])
    assert wanted - {"virtualenv>=20"} == listed


@pytest.mark.parametrize("dataset, flips", [("mnist", False), ("fashion-mnist", True), ("cifar10", True),
                                            ("cifar100", True)])
def test_digits_are_never_mirrored_and_clothes_and_natural_images_are(dataset, flips):
    """A mirrored digit is not that digit; a mirrored shirt or car still is (README, Augmentation)."""
    dsa = DSA.for_dataset(dataset)
    assert ("flip" in dsa.groups) is flips
    assert set(dsa.groups) | {"flip"} == set(GROUPS)  # the other five groups everywhere
    generator = torch.Generator().manual_seed(0)
    drawn = {dsa.sample((4, 1, 28, 28), generator).group for _ in range(300)}
    assert ("flip" in drawn) is flips and len(drawn) == len(dsa.groups)
