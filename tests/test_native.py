"""The fused norm-ReLU-pool kernels (kdd_mlflow/cpu_kernels.cpp, built by kdd_mlflow/native.py): values and
first and second derivatives against PyTorch's own functions, the ConvNet's use of them, and the build."""

import logging

import pytest
import torch
import torch.nn.functional as F

from kdd_mlflow import layers, models, native
from kdd_mlflow.layers import norm_relu_pool

built = pytest.mark.skipif(native.library() is None, reason="the kernels did not build here (no C++ compiler)")


def reference(z, weight, bias):
    return F.avg_pool2d(F.relu(F.group_norm(z, z.shape[1], weight, bias, 1e-5)), 2)


def inputs(shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 0.5
    weight = torch.rand(shape[1], generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(shape[1], generator=gen, dtype=dtype) * 0.5
    return tuple(t.requires_grad_(True) for t in (z, weight, bias))


@built
@pytest.mark.parametrize("shape", [(3, 4, 6, 6), (2, 3, 7, 5), (1, 2, 2, 3)])
def test_gradcheck_and_gradgradcheck(shape):
    args = inputs(shape)
    assert torch.autograd.gradcheck(norm_relu_pool, args)
    assert torch.autograd.gradgradcheck(norm_relu_pool, args)


@built
@pytest.mark.parametrize("shape", [(4, 5, 8, 8), (3, 2, 9, 7)])
@pytest.mark.parametrize("uses", ["all", "dz", "dweight", "dbias", "dweight+dbias"])
def test_values_and_both_derivatives_equal_torchs(shape, uses):
    """Every part of the backward (dz, dweight, dbias, alone or together) differentiated again, with respect to z,
    the weight and the upstream gradient (the unrolled loop's path), as PyTorch's own functions give them."""
    results = []
    for fn in (norm_relu_pool, reference):
        z, weight, bias = inputs(shape, seed=1)
        out = fn(z, weight, bias)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        upstream.requires_grad_(True)
        dz, dweight, dbias = torch.autograd.grad((out * upstream).sum(), (z, weight, bias), create_graph=True)
        parts = {"dz": (dz.sin() * z.detach()).sum(), "dweight": (dweight ** 2).sum(), "dbias": (dbias ** 3).sum()}
        chosen = parts.values() if uses == "all" else [parts[p] for p in uses.split("+")]
        second = torch.autograd.grad(sum(chosen), (z, weight, bias, upstream), allow_unused=True,
                                     materialize_grads=True)
        results.append([*(t.detach() for t in (out, dz, dweight, dbias)), *second])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@built
def test_float32_is_float64_to_rounding():
    z, weight, bias = inputs((8, 16, 32, 32))
    want = torch.autograd.grad(reference(z, weight, bias).square().sum(), (z, weight))
    z32, weight32, bias32 = (t.detach().float().requires_grad_(True) for t in (z, weight, bias))
    out = norm_relu_pool(z32, weight32, bias32)
    torch.testing.assert_close(out.double(), reference(z, weight, bias), rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out.square().sum(), (z32, weight32))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


def unfused(convnet, x):
    return convnet.classifier(convnet.features(x).flatten(1))


@built
def test_the_convnet_fuses_its_blocks_with_the_same_values_and_gradients(monkeypatch):
    calls = []
    monkeypatch.setattr(models, "norm_relu_pool", lambda *a: (calls.append(1), norm_relu_pool(*a))[1])
    torch.manual_seed(0)
    convnet = models.create("convnet-w8-d3", 1, 10, 28).double()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    grads = []
    for forward in (convnet, lambda xx: unfused(convnet, xx)):
        out = forward(x)
        first = torch.autograd.grad(out.logsumexp(1).sum(), [x, *convnet.parameters()], create_graph=True)
        second = torch.autograd.grad(sum((g ** 2).sum() for g in first[1:]), x)
        grads.append([out, *first, *second])
    assert len(calls) == 3  # the first pass only, one call per block
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@built
def test_a_hooked_layer_runs_as_itself():
    """Feature hints catch a layer's output with a forward hook: then the blocks are not fused, and the hook fires."""
    convnet = models.create("convnet-w8-d2", 1, 10, 28)
    caught = []
    handle = convnet.features[2].register_forward_hook(lambda m, i, o: caught.append(o.shape))
    x = torch.randn(2, 1, 28, 28)
    out = convnet(x)
    handle.remove()
    assert caught == [torch.Size([2, 8, 32, 32])]
    torch.testing.assert_close(out, unfused(convnet, x))


def test_without_the_kernels_the_layers_run_and_agree(monkeypatch):
    """KDD_NATIVE=0 (as where no compiler is found): the separate PyTorch layers, the same values."""
    torch.manual_seed(0)
    convnet = models.create("convnet-w8-d2", 1, 10, 28)
    x = torch.randn(3, 1, 28, 28)
    fused = convnet(x)
    monkeypatch.setenv("KDD_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and not layers.fusable(torch.randn(1, 2, 4, 4), torch.ones(2))
        torch.testing.assert_close(convnet(x), fused)
    finally:
        native.library.cache_clear()


@pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler")
def test_the_build_is_cached_and_a_failing_compiler_is_reported(tmp_path, monkeypatch, caplog):
    first = native.build(native._compiler(), tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(native._compiler(), tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch left behind

    monkeypatch.setenv("KDD_NATIVE_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CXX", "false")
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kdd_mlflow.native"):
            assert native.library() is None
        assert "could not be built" in caplog.text and "false failed" in caplog.text
    finally:
        native.library.cache_clear()


@built
@pytest.mark.parametrize("dtype,padding,side", [(torch.float32, 3, 28), (torch.float32, 1, 32), (torch.float64, 0, 9)])
def test_the_one_channel_convolution_kernels_equal_torchs(dtype, padding, side):
    """The first layer's forward and weight and bias gradients on one input channel (MNIST, Fashion-MNIST), float32
    as the engine runs them, against F.conv2d and convolution_backward."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1, side, side, generator=gen, dtype=dtype)
    weight = torch.randn(8, 1, 3, 3, generator=gen, dtype=dtype)
    bias = torch.randn(8, generator=gen, dtype=dtype)
    geometry = ((1, 1), (padding, padding), (1, 1), 1)
    assert layers._one_channel_3x3(x, weight, geometry)
    want = F.conv2d(x, weight, bias, 1, padding)
    # float32 sums of a few thousand products differ in the fifth digit by their order
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(layers._conv(x, weight, bias, geometry), want, **tol)
    dy = torch.randn(want.shape, generator=gen, dtype=dtype)
    got = layers._conv_backward(dy, x, weight, geometry, [True, True, True], True)
    ref = torch.ops.aten.convolution_backward(dy, x, weight, [8], (1, 1), (padding, padding), (1, 1), False, [0, 0], 1,
                                              [True, True, True])
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, **tol)
