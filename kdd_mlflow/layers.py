"""The ConvNet's convolution, instance norm, ReLU and average pooling, written for trajectory matching on a CPU.

The modules use these forms on the CPU only. On a GPU they run torch's own kernels: there the small sets of trajectory
matching are bound by kernel launches, and the extra launches of the written-out forms made an MTT iteration slower
(on an H200, CIFAR-10 ipc 10: 0.74x the speed with torch's kernels for the width-128 ConvNet at 20 unrolled steps, 0.82x
for convnet-w32 at 10; ``benchmarks/compare_ref.py``). The functions themselves are correct on any device (the tests
check them on CUDA where there is one).

**Instance norm.** Trajectory matching differentiates the inner step's gradient again (the unrolled loop's backward,
the adjoint's Hessian-vector product), so every layer's backward is itself differentiated. PyTorch's ``group_norm``
switches to a composite formula once a backward must carry a graph, and differentiating that composite costs dozens
of full-size element-wise passes per layer and step. Here the first backward is the native fused kernel, and its
derivative is written out. Per (sample, channel) group of M values, with x^ = (x - mean) r,
r = 1 / sqrt(var + eps), a = gamma dy, and P(t) = t - mean(t) - x^ mean(t x^) (the symmetric map every instance-norm
derivative goes through):

    backward:  dx = r P(a),  dgamma = sum dy x^,  dbeta = sum dy

and, given the upstream gradients u, v, w of (dx, dgamma, dbeta):

    d/d dy    = gamma r P(u) + v x^ + w
    d/d gamma = sum dy r P(u)
    d/d x     = -r^2 (mean(u P(a)) x^ + mean(a x^) P(u) + mean(u x^) P(a)) + v r P(dy)

Both are linear combinations of u, dy, x^ and a constant with per-group coefficients, so each is a few fused passes
after five per-group reductions. The values equal ``F.group_norm``'s with one group per channel (the tests check the
first and second derivatives against it, and gradgradcheck, in float64).

**Convolution.** The backward of y = conv(x, W) + b is dx = conv^T(dy, W), dW = conv_w(x, dy), db = sum dy, each
linear in dy. Its derivative, given upstream u, v, w for (dx, dW, db), is three passes of the same kinds:

    d/d dy = conv(u, W) + conv(x, v) + w,   d/d W = conv_w(u, dy),   d/d x = conv^T(dy, v)

written here with ``convolution_backward`` for the last two. PyTorch's own double backward forms them as convolutions
over transposed tensors (batch and channels swapped): at batch 100 on a 2-core CPU it took 1.08-1.75x as long on the
ConvNet's layers, most on the first (``benchmarks/conv_derivatives.py``). With one input channel (MNIST,
Fashion-MNIST), the weight gradient is a batched product over the input's windows (``_conv_backward``).

**2x2 average pooling.** On a CPU, ``avg_pool2d`` and its backward over contiguous (NCHW) activations run 2.5-3x
slower than adding the four strided quarter-images and spreading a gradient with a depthwise transposed
convolution. The pool P and its adjoint P^T (each value spread over its block, times 1/4) are each other's backward,
so every derivative order uses the fast pair. The values equal ``avg_pool2d``'s up to rounding: the four values
are added in another order (in bfloat16, with three roundings where ``avg_pool2d`` accumulates in float32).

**ReLU.** Differentiated twice, ``threshold_backward`` gives its activation input a gradient that is zero by
definition, which autograd materialises as a full-size tensor of zeros and adds in every inner step. Here the
backward's own backward gives that input nothing.

**Norm, ReLU and pool, fused** (``norm_relu_pool``, what the ConvNet runs on a CPU where the kernels build). The
three layers above as one function whose forward, backward and double backward are each one C++ kernel
(``cpu_kernels.cpp``, built by ``native``): a (sample, channel) group fits in the first-level cache, so each kernel
reads it from memory once, where the separate layers make a dozen full-size passes per block and order. Its double
backward is the instance norm's above with dy the ReLU-masked, spread pool gradient. The separate layers remain what
runs elsewhere (GPU, autocast, torch.compile and torch.func transforms, no compiler, a forward hook on a layer).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdd_mlflow import native

aten = torch.ops.aten


def _signature_once(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Give the function's ``forward`` its signature once. Each ``apply`` of a function with ``setup_context`` binds
    its arguments by ``inspect.signature(forward)``, which otherwise builds the signature anew every call: 57 us,
    about 600 calls per trajectory-matching iteration of a three-block ConvNet at 10 steps."""
    function.forward.__signature__ = inspect.signature(function.forward)
    return function


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` with row-major (N, C, H, W) strides, copied only where it has others.

    A one-channel batch is contiguous whatever stride its channel axis carries, so ``contiguous()`` keeps a
    (784, 1, 28, 1) layout (what numpy's fancy indexing gives an (N, 1, H, W) array). Convolutions read that as
    channels-last and answer in channels-last, where the ConvNet's instance norm runs about 20x slower on a CPU
    (forward and backward) than on the same values row-major.
    """
    if x.stride() == _row_major_strides(x.shape):
        return x
    return x.clone(memory_format=torch.contiguous_format)


@_signature_once
class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, geometry):
        return _conv(x, weight, bias, geometry)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, geometry = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.with_bias = geometry, bias is not None

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        input_grad = ctx.needs_input_grad[0] and _engine_uses(x)
        dx, dweight, dbias = _Conv2dBackward.apply(dy, x, weight, ctx.geometry, input_grad, ctx.with_bias)
        return dx, dweight, dbias, None


def _engine_uses(x: torch.Tensor) -> bool:
    """Whether the backward pass running now goes on from ``x`` (a non-leaf input). ``needs_input_grad`` says only that
    x requires grad: the inner step's ``autograd.grad(loss, theta)`` also reaches the first convolution, whose input
    (augmented images) requires grad for the outer pass, and would compute a gradient for it that nothing reads. Where
    the engine cannot say (a leaf, or outside a backward pass), True."""
    try:
        return torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(x).node)
    except (RuntimeError, AttributeError):
        return True


def _kernels_take(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C++ kernels (``cpu_kernels.cpp``) can compute on ``x``: a 4-d float32/float64 CPU tensor in the
    weight's precision, outside torch.func transforms (whose wrapped tensors have no data to hand over), kernels
    built."""
    return (x.dim() == 4 and x.is_cpu and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and not torch._C._are_functorch_transforms_active() and native.library() is not None)


def _one_channel_3x3(x: torch.Tensor, weight: torch.Tensor, geometry) -> bool:
    """Whether the one-channel kernels run this convolution: one input channel, 3 x 3, stride and dilation 1."""
    stride, _, dilation, groups = geometry
    return (x.dim() == 4 and x.shape[1] == 1 and weight.shape[2:] == (3, 3) and groups == 1
            and stride == dilation == (1, 1) and _kernels_take(x, weight))


def _padded(x: torch.Tensor, padding) -> torch.Tensor:
    return F.pad(x, (padding[1], padding[1], padding[0], padding[0])).contiguous()


def _conv(x, weight, bias, geometry):
    """``F.conv2d`` with this geometry; one input channel through its kernel (0.88 against 1.18 ms at
    100 x 1 x 28 x 28 -> 32 channels)."""
    stride, padding, dilation, groups = geometry
    if not _one_channel_3x3(x, weight, geometry):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    xp = _padded(x, padding)
    n, _, hp, wp = xp.shape
    y = x.new_empty(n, weight.shape[0], hp - 2, wp - 2)
    _kernel("conv1_forward", x.dtype)(xp.data_ptr(), weight.contiguous().data_ptr(),
                                      _ptr(None if bias is None else bias.contiguous()), y.data_ptr(),
                                      n, weight.shape[0], hp, wp)
    return y


def _conv_backward(dy, x, weight, geometry, mask, with_bias: bool = False):
    stride, padding, dilation, groups = geometry
    if mask[1] and x.shape[1] == 1 and stride == dilation == (1, 1) and groups == 1:
        # One input channel: oneDNN's weight gradient runs at a fraction of its speed on more channels (3.7 ms
        # against 1.5 ms for the batched product below at 100 x 1 x 28 x 28 -> 32 channels, 1.06 ms for the 3 x 3
        # kernel); the input gradient stays oneDNN's.
        dx = aten.convolution_backward(dy, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                                       [True, False, False])[0] if mask[0] else None
        padded = _padded(x, padding)
        if _one_channel_3x3(x, weight, geometry):  # the weight gradient and the bias's by the kernel
            dy = dy.contiguous()
            dweight, dbias = torch.empty_like(weight), dy.new_empty(weight.shape[0]) if mask[2] else None
            _kernel("conv1_weight_grad", dy.dtype)(dy.data_ptr(), padded.data_ptr(), dweight.data_ptr(), _ptr(dbias),
                                                   dy.shape[0], weight.shape[0], *padded.shape[2:])
            return dx, dweight, dbias
        # one batched product of dy with the input's k x k windows, gathered by one strided copy
        (n, _, kh, kw), (h, w), (ph, pw) = (x.shape[0], *weight.shape[1:]), dy.shape[2:], padded.shape[2:]
        windows = padded.as_strided((n, kh, kw, h, w), (ph * pw, pw, 1, pw, 1)).reshape(n, kh * kw, h * w)
        dweight = torch.bmm(dy.reshape(n, -1, h * w), windows.transpose(1, 2)).sum(0).view(weight.shape)
        return dx, dweight, dy.sum((0, 2, 3)) if mask[2] else None
    return aten.convolution_backward(dy, x, weight, [weight.shape[0]] if with_bias else None, stride, padding,
                                     dilation, False, [0, 0], groups, mask)


@_signature_once
class _Conv2dBackward(torch.autograd.Function):
    @staticmethod
    def forward(dy, x, weight, geometry, input_grad, with_bias):
        return _conv_backward(dy.contiguous(), x, weight, geometry, [input_grad, True, with_bias], with_bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, x, weight, geometry, _, _ = inputs
        ctx.save_for_backward(dy, x, weight)
        ctx.geometry = geometry
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros

    @staticmethod
    def backward(ctx, u, v, w):
        dy, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = geometry = ctx.geometry
        need_dy, need_x, need_weight = ctx.needs_input_grad[:3]
        g_dy = g_x = g_weight = None
        if need_dy and (u is not None or v is not None or w is not None):
            # dx = conv^T(dy, weight), dweight = conv_w(x, dy), dbias = sum dy: each is linear in dy
            if v is not None or w is not None:
                g_dy = _conv(x, weight.new_zeros(weight.shape) if v is None else v, w, geometry)
            if u is not None:
                from_u = _conv(u, weight, None, geometry)
                g_dy = from_u if g_dy is None else g_dy + from_u
        if need_x and v is not None:  # through dweight = conv_w(x, dy): the transposed convolution of dy with v
            g_x = _conv_backward(dy, x, v, geometry, [True, False, False])[0]
        if need_weight and u is not None:  # through dx = conv^T(dy, weight): the weight gradient of conv(u, .) at dy
            g_weight = _conv_backward(dy, u, weight, geometry, [False, True, False])[1]
        return g_dy, g_x, g_weight, None, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=(1, 1), padding=(0, 0),
           dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` (numeric padding) whose backward, differentiated again, is three native convolution passes."""
    pair = torch.nn.modules.utils._pair
    return _Conv2d.apply(x, weight, bias, (pair(stride), pair(padding), pair(dilation), groups))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d``, the same parameters and state dict, computed by ``conv2d`` on the CPU (zero padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Torch's own where no graph is built (its call costs less), and off the CPU as the other layers
        if (not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad)
                or torch.compiler.is_compiling() or not x.is_cpu or torch.is_autocast_enabled("cpu")
                or isinstance(self.padding, str) or self.padding_mode != "zeros" or x.dtype != self.weight.dtype):
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _groups(x: torch.Tensor) -> tuple[int, int, int]:
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


@_signature_once
class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, eps):
        n, c, m = _groups(x)
        return aten.native_group_norm(x, weight, bias, n, c, m, c, eps)  # (y, mean, rstd)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, dy, _mean, _rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _InstanceNormBackward.apply(dy, x, weight, mean, rstd)
        return dx, dweight, dbias, None


@_signature_once
class _InstanceNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(dy, x, weight, mean, rstd):
        n, c, m = _groups(x)
        return aten.native_group_norm_backward(dy.contiguous(), x, mean, rstd, weight, n, c, m, c, [True, True, True])

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, x, weight, mean, rstd = inputs
        ctx.save_for_backward(dy, x, weight, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros

    @staticmethod
    def backward(ctx, u, v, w):
        dy, x, weight, mean, rstd = ctx.saved_tensors
        n, c, m = _groups(x)
        xhat = (x.reshape(n, c, m) - mean.view(n, c, 1)) * rstd.view(n, c, 1)
        dyf = dy.reshape(n, c, m)
        uf = None if u is None else u.reshape(n, c, m)
        v = x.new_zeros(1, c) if v is None else v.view(1, c)
        w = x.new_zeros(1, c) if w is None else w.view(1, c)
        zero = x.new_zeros(n, c)
        # per-group means: of u, u x^, u dy (0 without u), dy and dy x^
        u_mean = zero if uf is None else uf.sum(2) / m
        ux_mean = zero if uf is None else torch.linalg.vecdot(uf, xhat) / m
        ud_mean = zero if uf is None else torch.linalg.vecdot(uf, dyf) / m
        d_mean, dx_mean = dyf.sum(2) / m, torch.linalg.vecdot(dyf, xhat) / m
        r, gamma = rstd.view(n, c), weight.view(1, c)
        a_mean, ax_mean = gamma * d_mean, gamma * dx_mean  # mean(a), mean(a x^)
        ua_mean = gamma * ud_mean
        upa_mean = ua_mean - u_mean * a_mean - ux_mean * ax_mean  # mean(u P(a))
        r2, gr, vr = r * r, gamma * r, v * r

        def combine(c_u, c_dy, c_x, c_1):
            out = xhat * c_x.unsqueeze(2)
            out += c_1.unsqueeze(2)
            if c_dy is not None:
                out.addcmul_(dyf, c_dy.unsqueeze(2))
            if uf is not None:
                out.addcmul_(uf, c_u.unsqueeze(2))
            return out.view_as(x)

        g_dy = combine(gr, None, v - gr * ux_mean, w - gr * u_mean)
        g_x = combine(-r2 * ax_mean, vr - r2 * ux_mean * gamma,
                      -r2 * upa_mean + 2 * r2 * ax_mean * ux_mean - vr * dx_mean,
                      r2 * (ax_mean * u_mean + ux_mean * a_mean) - vr * d_mean)
        g_weight = (r * (ud_mean - u_mean * d_mean - ux_mean * dx_mean)).sum(0) * m
        return g_dy, g_x, g_weight, None, None


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm(x, channels, weight, bias, eps)`` (one group per channel) with the cheap second derivative."""
    return _InstanceNorm.apply(x, weight, bias, eps)[0]


@_signature_once
class _Pool2(torch.autograd.Function):
    @staticmethod
    def forward(x):
        rows = x.unflatten(2, (x.shape[2] // 2, 2))
        rows = rows.select(3, 0) + rows.select(3, 1)
        cols = rows.unflatten(3, (x.shape[3] // 2, 2))
        return (cols.select(4, 0) + cols.select(4, 1)) * 0.25

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, dy):
        return _Spread2.apply(dy)


@_signature_once
class _Spread2(torch.autograd.Function):
    @staticmethod
    def forward(dy):
        c = dy.shape[1]
        quarter = torch.full((c, 1, 2, 2), 0.25, dtype=dy.dtype, device=dy.device)
        return F.conv_transpose2d(dy, quarter, stride=2, groups=c)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, u):
        return _Pool2.apply(u)


def avg_pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2)`` for even heights and widths, with the fast pool and spread as each other's backward."""
    if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"avg_pool2 needs (N, C, H, W) with even H and W, got {tuple(x.shape)}; use F.avg_pool2d")
    return _Pool2.apply(x)


class AvgPool2(nn.AvgPool2d):
    """``nn.AvgPool2d(2)``, computed by ``avg_pool2`` where the feature map's sides are even."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or not x.is_cpu or x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            return super().forward(x)
        return avg_pool2(x)


@_signature_once
class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return _ReLUBackward.apply(dy, y)


@_signature_once
class _ReLUBackward(torch.autograd.Function):
    @staticmethod
    def forward(dy, y):
        return aten.threshold_backward(dy, y, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, u):
        (y,) = ctx.saved_tensors
        return aten.threshold_backward(u, y, 0), None  # piecewise linear: nothing flows to y


def relu(x: torch.Tensor) -> torch.Tensor:
    """``F.relu`` whose backward, differentiated again, gives no (zero) gradient to the activation."""
    return _ReLU.apply(x)


class ReLU(nn.ReLU):
    """``nn.ReLU()``, computed by ``relu`` (never in place: trajectory matching differentiates through it twice)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if torch.compiler.is_compiling() or not x.is_cpu else relu(x)


class InstanceNorm(nn.GroupNorm):
    """``nn.GroupNorm(channels, channels)``, the same parameters and state dict, computed by ``instance_norm``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Off the CPU, torch's kernel (module docstring). Under torch.compile the compiler derives and fuses the
        # composite itself (and does not trace a custom function's backward inside torch.func transforms correctly).
        # Under autocast, or with an activation in another precision than the parameters (bf16 training), group_norm's
        # own casting rules apply: the written-out second derivative is float arithmetic for trajectory matching,
        # which runs in the parameters' precision.
        if (torch.compiler.is_compiling() or not x.is_cpu or torch.is_autocast_enabled(x.device.type)
                or x.dtype != self.weight.dtype):
            return super().forward(x)
        return instance_norm(x, self.weight, self.bias, self.eps)


def _kernel(name: str, dtype: torch.dtype):
    return getattr(native.library(), f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@_signature_once
class _NormReluPool(torch.autograd.Function):
    @staticmethod
    def forward(z, weight, bias, eps):
        n, c, h, w = z.shape
        p, stats = z.new_empty(n, c, h // 2, w // 2), z.new_empty(2, n, c)
        _kernel("nrp_forward", z.dtype)(z.data_ptr(), weight.data_ptr(), bias.data_ptr(), p.data_ptr(),
                                        stats[0].data_ptr(), stats[1].data_ptr(), n, c, h, w, eps)
        return p, stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, weight, bias, _ = inputs
        ctx.save_for_backward(z, weight, bias, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dp, _stats):
        z, weight, bias, stats = ctx.saved_tensors
        dz, dweight, dbias, _ = _NormReluPoolBackward.apply(dp, z, weight, bias, stats)
        return dz, dweight, dbias, None


@_signature_once
class _NormReluPoolBackward(torch.autograd.Function):
    @staticmethod
    def forward(dp, z, weight, bias, stats):
        n, c, h, w = z.shape
        dz, sums = torch.empty_like(z), z.new_empty(2, n, c)  # per group: sum dr, sum dr x^
        _kernel("nrp_backward", z.dtype)(dp.contiguous().data_ptr(), z.data_ptr(), weight.data_ptr(),
                                         bias.data_ptr(), stats[0].data_ptr(), stats[1].data_ptr(), dz.data_ptr(),
                                         sums[0].data_ptr(), sums[1].data_ptr(), n, c, h, w)
        return dz, sums[1].sum(0), sums[0].sum(0), sums

    @staticmethod
    def setup_context(ctx, inputs, output):
        dp, z, weight, bias, stats = inputs
        ctx.save_for_backward(dp, z, weight, bias, stats, output[3])
        ctx.mark_non_differentiable(output[3])
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros

    @staticmethod
    def backward(ctx, u, v, w, _sums):
        dp, z, weight, bias, stats, sums = ctx.saved_tensors
        need_dp, need_z, need_weight = ctx.needs_input_grad[:3]
        if u is None and v is None and w is None or not (need_dp or need_z or need_weight):
            return None, None, None, None, None
        n, c, h, wd = z.shape
        g_dp = z.new_empty(n, c, h // 2, wd // 2) if need_dp else None
        g_z = torch.empty_like(z) if need_z else None
        g_weight = z.new_empty(n, c) if need_weight else None
        u = None if u is None else u.contiguous()
        _kernel("nrp_double_backward", z.dtype)(
            _ptr(u), _ptr(None if v is None else v.contiguous()), _ptr(None if w is None else w.contiguous()),
            dp.contiguous().data_ptr(), z.data_ptr(), weight.data_ptr(), bias.data_ptr(), stats[0].data_ptr(),
            stats[1].data_ptr(), sums[0].data_ptr(), sums[1].data_ptr(), _ptr(g_dp), _ptr(g_z), _ptr(g_weight),
            n, c, h, wd)
        return g_dp, g_z, None if g_weight is None else g_weight.sum(0), None, None


def norm_relu_pool(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``F.avg_pool2d(F.relu(F.group_norm(z, C, weight, bias, eps)), 2)`` in one pass of fused kernels per order of
    derivative (``cpu_kernels.cpp``); needs ``fusable(z, weight)``."""
    return _NormReluPool.apply(z.contiguous(), weight, bias, eps)[0]


def fusable(z: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``norm_relu_pool`` can run on ``z``: the kernels built, a float32/float64 CPU tensor in the
    parameters' precision, at least 2 x 2, outside torch.compile, torch.func transforms and autocast."""
    return (_kernels_take(z, weight) and z.shape[2] >= 2 and z.shape[3] >= 2 and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu"))
