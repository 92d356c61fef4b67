"""The ConvNet's layers (kdd_mlflow/layers.py): the torch functions' values and first and second derivatives, on the
CPU and, where there is one, on a CUDA device, and the allocator setting the stages start with."""

import pytest
import torch
import torch.nn.functional as F

from kdd_mlflow import models, native
from kdd_mlflow.layers import AvgPool2, Conv2d, InstanceNorm, avg_pool2, conv2d, instance_norm, relu
from kdd_mlflow.runtime import keep_freed_memory


def inputs(seed: int = 0, shape=(3, 4, 5, 6), device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    weight = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    bias = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    return tuple(t.to(device).requires_grad_(True) for t in (x, weight, bias))


def reference(x, weight, bias):
    return F.group_norm(x, x.shape[1], weight, bias, 1e-5)


def test_first_and_second_derivatives_pass_gradcheck(device):
    x, weight, bias = inputs(device=device)
    assert torch.autograd.gradcheck(instance_norm, (x, weight, bias))
    assert torch.autograd.gradgradcheck(instance_norm, (x, weight, bias))


@pytest.mark.parametrize("uses", ["all", "dx", "dweight", "dbias", "dweight+dbias"])
def test_second_derivatives_equal_group_norms(uses, device):
    """The double backward of every part of the backward (dx, dweight, dbias, alone or together) equals
    group_norm's, with respect to x and weight, and the gradient with respect to dy (the unrolled loop's path)."""
    results = []
    for fn in (instance_norm, reference):
        x, weight, bias = inputs(1, device=device)
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        upstream = upstream.to(device).requires_grad_(True)
        y = fn(x, weight, bias)
        torch.testing.assert_close(y, reference(x, weight, bias))
        dx, dweight, dbias = torch.autograd.grad((y * upstream).sum(), (x, weight, bias), create_graph=True)
        parts = {"dx": (dx.sin() * x.detach()).sum(), "dweight": (dweight ** 2).sum(), "dbias": (dbias ** 3).sum()}
        chosen = parts.values() if uses == "all" else [parts[p] for p in uses.split("+")]
        second = torch.autograd.grad(sum(chosen), (x, weight, upstream), allow_unused=True, materialize_grads=True)
        results.append([*[t.detach() for t in (y, dx, dweight, dbias)], *second])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_torch_func_transforms_give_group_norms_hessian_vector_products(device):
    """torch.func.vjp of torch.func.grad (the form the compiled engine uses) through the written-out derivative."""
    x, weight, bias = (t.detach() for t in inputs(3, device=device))
    probe = torch.randn(x.shape, dtype=torch.float64).to(device)
    lam = torch.randn(weight.shape, dtype=torch.float64).to(device)
    out = []
    for fn in (instance_norm, reference):
        def loss(w, xx, fn=fn):
            return (fn(xx, w, bias).tanh() * probe).sum()
        _, pullback = torch.func.vjp(torch.func.grad(loss), weight, x)
        out.append(pullback(lam))
    for got, want in zip(*out, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_the_module_is_a_groupnorm_with_one_group_per_channel():
    norm = InstanceNorm(6)
    assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == norm.num_channels == 6
    assert set(norm.state_dict()) == set(torch.nn.GroupNorm(6, 6).state_dict()) == {"weight", "bias"}
    convnet = models.create("convnet-w8-d2", 1, 10, 28)
    assert sum(isinstance(m, InstanceNorm) for m in convnet.modules()) == 2


def test_under_bf16_autocast_the_module_computes_what_group_norm_does(device):
    """--precision bf16 training: a bfloat16 activation with float32 parameters, to the second derivative."""
    results = []
    for norm in (InstanceNorm(4).to(device), torch.nn.GroupNorm(4, 4).to(device)):
        torch.manual_seed(0)
        torch.nn.init.normal_(norm.weight)
        x = torch.randn(2, 4, 6, 6).to(device, torch.bfloat16).requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16):
            y = norm(x)
        dx, dw = torch.autograd.grad(y.float().square().sum(), (x, norm.weight), create_graph=True)
        results.append([y, dx, dw, *torch.autograd.grad(dx.float().square().sum() + dw.sum(), (x, norm.weight))])
    for got, want in zip(*results, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


def test_an_empty_batch_normalises_to_an_empty_batch(device):
    x, weight, bias = inputs(4, shape=(0, 4, 5, 6), device=device)
    y = instance_norm(x, weight, bias)
    assert y.shape == x.shape
    torch.testing.assert_close(y, reference(x, weight, bias))


def test_pooling_and_its_derivatives_equal_avg_pool2d(device):
    x = torch.randn(3, 4, 6, 8, dtype=torch.float64).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(avg_pool2, (x,))
    assert torch.autograd.gradgradcheck(avg_pool2, (x,))
    results = []
    for fn in (avg_pool2, lambda t: F.avg_pool2d(t, 2)):
        y = fn(x * x)  # a non-linear input, so the second derivative reaches the pool's backward
        (dx,) = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
        results.append([y, dx, *torch.autograd.grad((dx * dx).sum(), x)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_relu_and_its_derivatives_equal_f_relu(device):
    x = torch.randn(4, 5, dtype=torch.float64).to(device).requires_grad_(True)
    assert torch.autograd.gradgradcheck(relu, (x,))
    results = []
    for fn in (relu, F.relu):
        y = fn(x * x.sum(1, keepdim=True))
        (dx,) = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
        results.append([y, dx, *torch.autograd.grad((dx * dx).sum(), x)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride,padding,groups,in_channels", [(1, 1, 1, 3), (1, 3, 1, 1), (2, 0, 1, 2), (1, 1, 2, 4)])
def test_convolution_and_its_derivatives_equal_f_conv2d(stride, padding, groups, in_channels, device):
    """Values, first and second derivatives (each part of the backward alone and all together) against F.conv2d,
    and gradcheck / gradgradcheck, in float64."""
    gen = torch.Generator().manual_seed(4)
    x, weight, bias = (t.to(device).requires_grad_(True) for t in (
        torch.randn(2, in_channels, 7, 6, generator=gen, dtype=torch.float64),
        torch.randn(4, in_channels // groups, 3, 3, generator=gen, dtype=torch.float64),
        torch.randn(4, generator=gen, dtype=torch.float64)))

    def ours(x, weight, bias):
        return conv2d(x, weight, bias, stride, padding, 1, groups)

    assert torch.autograd.gradcheck(ours, (x, weight, bias))
    assert torch.autograd.gradgradcheck(ours, (x, weight, bias))
    for uses in ("all", "dx", "dweight", "dbias"):
        results = []
        for fn in (ours, lambda x, w, b: F.conv2d(x, w, b, stride, padding, 1, groups)):
            y = fn(x * x, weight, bias)  # a non-linear input, so the second derivative reaches x through the backward
            dx, dweight, dbias = torch.autograd.grad(y.sin().sum(), (x, weight, bias), create_graph=True)
            parts = {"dx": (dx * dx).sum(), "dweight": (dweight ** 3).sum(), "dbias": (dbias.exp()).sum()}
            chosen = parts.values() if uses == "all" else [parts[uses]]
            second = torch.autograd.grad(sum(chosen), (x, weight, bias), allow_unused=True, materialize_grads=True)
            results.append([*[t.detach() for t in (y, dx, dweight, dbias)], *second])
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_the_convolution_module_is_conv2d_and_falls_back_where_it_must():
    conv = Conv2d(3, 5, kernel_size=3, padding=1)
    assert isinstance(conv, torch.nn.Conv2d) and set(conv.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    modules = {True: [conv.double(), Conv2d(3, 5, 3, bias=False, stride=2).double()],
               False: [Conv2d(3, 5, 3, padding="same").double(),
                       Conv2d(3, 5, 3, padding=1, padding_mode="reflect").double()]}
    for written_out, group in modules.items():  # string padding and other padding modes: torch's own
        for module in group:
            y = module(x)
            torch.testing.assert_close(y, torch.nn.Conv2d.forward(module, x))
            assert (type(y.grad_fn).__name__ == "_Conv2dBackward") is written_out


def test_off_the_cpu_the_modules_run_torchs_own_kernels(monkeypatch):
    """On a GPU the written-out forms cost launches (kdd_mlflow/layers.py): the modules use them on the CPU only. A
    tensor on the meta device stands in for one on a GPU."""
    from kdd_mlflow import layers

    calls = []
    for name in ("conv2d", "instance_norm", "avg_pool2", "relu"):
        original = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    monkeypatch.setenv("KDD_NATIVE", "0")  # the separate layers, not the fused blocks (tests/test_native.py)
    native.library.cache_clear()
    convnet = models.create("convnet-w8-d2", 1, 10, 28)
    convnet(torch.randn(2, 1, 28, 28))
    native.library.cache_clear()
    assert sorted(set(calls)) == ["avg_pool2", "conv2d", "instance_norm", "relu"]
    calls.clear()
    out = convnet.to("meta")(torch.randn(2, 1, 28, 28, device="meta"))
    assert out.shape == (2, 10) and calls == []


def test_the_pool_module_falls_back_on_odd_sides_and_the_function_refuses_them():
    pool = AvgPool2()
    for shape in [(2, 3, 8, 8), (2, 3, 7, 8), (2, 3, 5, 5)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(pool(x), F.avg_pool2d(x, 2))
    with pytest.raises(ValueError, match="even H and W"):
        avg_pool2(torch.randn(2, 3, 7, 8))


def test_the_allocator_setting_applies_on_glibc_and_once():
    """(It changes this test process's malloc for the tests after it, as it does each stage's process.)"""
    import platform

    applied = keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied is True
    assert keep_freed_memory() is applied


def test_row_major_copies_only_other_layouts_and_the_convnet_normalises_row_major_activations():
    from kdd_mlflow.layers import row_major

    x = torch.randn(4, 1, 28, 28)
    assert row_major(x) is x
    odd = torch.randn(4, 28, 28, 1).permute(0, 3, 1, 2)  # strides (784, 1, 28, 1): contiguous, channels-last too
    assert odd.is_contiguous() and odd.contiguous().stride() == (784, 1, 28, 1)
    fixed = row_major(odd)
    assert fixed.stride() == (784, 784, 28, 1) and torch.equal(fixed, odd)
    seen = []
    net = models.create("convnet-w8", 1, 10, 28)
    for module in net.modules():
        if isinstance(module, InstanceNorm):
            module.register_forward_hook(
                lambda m, inp, out: seen.append(inp[0].stride() == torch.empty(inp[0].shape).stride()))
    net(odd.requires_grad_(True)).sum().backward()
    assert seen == [True, True, True] and odd.grad.shape == odd.shape


def test_the_convolution_skips_the_input_gradient_that_the_running_pass_does_not_use(monkeypatch):
    """The inner step's autograd.grad(loss, parameters) reaches the first convolution, whose input (augmented images)
    requires grad: its gradient is left out there, and computed where the pass goes on to the images."""
    from kdd_mlflow import layers

    masks = []
    original = layers._conv_backward
    monkeypatch.setattr(layers, "_conv_backward",
                        lambda dy, x, *a, **k: (masks.append((x.shape[1], a[2][0])), original(dy, x, *a, **k))[1])
    convnet = models.create("convnet-w8-d2", 1, 10, 28)
    images = torch.randn(4, 1, 28, 28, dtype=torch.float32, requires_grad=True)
    params = list(convnet.parameters())
    g = torch.autograd.grad(convnet(images * 2).logsumexp(1).sum(), params, create_graph=True)
    assert masks == [(8, True), (1, False)]
    masks.clear()
    images_grad = torch.autograd.grad(sum((t ** 2).sum() for t in g), images)[0]
    assert (1, True) in masks and images_grad.abs().sum() > 0
    masks.clear()
    convnet(images * 2).sum().backward()
    assert masks == [(8, True), (1, True)] and images.grad is not None
