"""Omni-dimensional dynamic convolution (ODConv).

Paper: `Omni-Dimensional Dynamic Convolution` - https://openreview.net/forum?id=DmpCfq6Mg39 (ICLR 2022)
Original code: https://github.com/OSVAI/ODConv (modules/odconv.py); parameter names follow that release.

A squeeze-and-excitation style branch predicts four attentions per sample: over the input channels (channel),
the output channels (filter), the k*k kernel positions (spatial) and the `kernel_num` candidate kernels (kernel).
The sample's kernel is `sum_n kernel[n] * spatial * channel * filter * weight[n]` (paper eq. 2).

The release builds that kernel for every sample and runs one convolution with groups = batch; that formulation is
kept as `ODConv2d(impl='released')`, the oracle of the tests and benchmarks. By default (`impl='auto'`) every call
takes one exact rewrite, chosen by `ODConv2d._select_path` (its docstring tables the conditions and the measured
reasons; scripts/benchmark_odconv.py measures, benchmarks/odconv.md records). Under torch.compile and torch.export
one traceable formulation runs: per-sample kernels and one convolution with groups = batch (a registered op), with
no branch on sizes and no reused buffer; CPU inference of dense convs with several kernels runs the eager
per-sample path as a registered op. Eager CPU keeps the faster paths: per-sample oneDNN convolutions on kernels with
every attention folded in (inference), im2col + GEMM on small maps, a blockwise bmm for point-wise convs on small
maps, and one convolution per sample for large dense convs in training.
"""
import contextlib
import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

__all__ = ['ODAttention', 'ODConv2d', 'ODConvTrainingHooks', 'odconv_temperature']

_IMPLS = ('auto', 'released')

# Output maps up to this many pixels take the im2col path: a per-sample kernel element is then used by so few output
# pixels that writing B per-sample kernels costs more than the convolution (measured: benchmarks/odconv.md).
_UNFOLD_MAX_PIXELS = 64
# With one kernel and no autograd, CPU inputs of at least this many pixels take the per-sample path: there it beats a
# static convolution plus the attention passes over the activations; on smaller maps it loses (benchmarks/odconv.md).
_PER_SAMPLE_MIN_PIXELS = 1024
# On CPU, per-sample kernels are written into one reused buffer of at most this many elements: a fresh B x |W|
# tensor costs more in page faults than the aggregation itself (stage 4 of od_resnet50: benchmarks/odconv.md). Other
# devices (caching allocators, launch overhead per block) aggregate all output channels at once. `_AggregatedBmm`
# uses smaller blocks (about L2-sized: each block is multiplied, and in the backward reduced twice, while cached);
# `_forward_per_sample` larger ones (every block costs one convolution call per sample).
_BMM_BLOCK_NUMEL = 1 << 19
_BLOCK_NUMEL = 1 << 21
# `dynconv::odconv_conv_forward` convolves sample by sample (CPU, dense) from this many multiply-adds per sample; below,
# the call overhead of B small convolutions exceeds what it saves over groups = batch (benchmarks/odconv.md).
_PER_SAMPLE_CONV_MIN_MACS = 1 << 24
# `_forward_per_sample` splits the batch so that its blocks hold at least this many output channels: one convolution
# per sample and block, so thin blocks multiply the calls (a batch of 256 would otherwise get one channel per block).
_MIN_BLOCK_ROWS = 64


def odconv_temperature(epochs: float, temp_init: float = 30., temp_epochs: float = 10.) -> float:
    """Attention temperature after `epochs` (fractional) epochs of training.

    Linear from `temp_init` at epoch 0 to 1 at `temp_epochs`, then 1: the original utils/misc.py `get_temperature`
    with `epochs = epoch + (step + 1) / steps_per_epoch` (the release counts the step being run; so does train.py's
    `TrainingSchedule.progress`).
    """
    if temp_epochs <= 0:
        return 1.
    return 1. + max(0., (temp_init - 1.) * (1. - epochs / temp_epochs))


def _autocast_off(device_type: str):
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
        else contextlib.nullcontext()


def _aggregated_blocks(kernel: torch.Tensor, weight: torch.Tensor, block_numel: int):
    """Yields (output-channel slice, per-sample kernels (B, rows, fan_in) of those channels), reusing one buffer."""
    batch_size, (kernel_num, out_chs, fan_in) = kernel.shape[0], weight.shape
    rows = out_chs
    if weight.device.type == 'cpu':
        rows = max(1, min(out_chs, block_numel // (batch_size * fan_in)))
    flat = weight.view(kernel_num, -1)
    buf = torch.empty(batch_size * rows * fan_in, dtype=torch.result_type(kernel, weight), device=weight.device)
    for start in range(0, out_chs, rows):
        stop = min(start + rows, out_chs)
        block = buf[:batch_size * (stop - start) * fan_in].view(batch_size, -1)
        with _autocast_off(weight.device.type):  # computes in the buffer's dtype
            torch.mm(kernel, flat[:, start * fan_in:stop * fan_in], out=block)
        yield slice(start, stop), block.view(batch_size, stop - start, fan_in)


class _AggregatedBmm(torch.autograd.Function):
    """out[b] = (sum_n kernel[b, n] * weight[n]) @ cols[b], one block of output channels at a time (both passes).

    kernel: (B, kernel_num); weight: (kernel_num, out, fan_in), contiguous; cols: (B, fan_in, L). Computes in
    cols' dtype with autocast off (the buffer's dtype must be known; autocast leaves `cols` in its compute dtype).
    """

    @staticmethod
    def forward(ctx, kernel, weight, cols):
        ctx.dtypes = kernel.dtype, weight.dtype
        with _autocast_off(cols.device.type):
            kernel, weight = kernel.to(cols.dtype), weight.to(cols.dtype)
            ctx.save_for_backward(kernel, weight, cols)
            blocks = _aggregated_blocks(kernel, weight, _BMM_BLOCK_NUMEL)
            return torch.cat([torch.bmm(w, cols) for _, w in blocks], 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        kernel, weight, cols = ctx.saved_tensors
        grad_out = grad_out.to(cols.dtype)
        kernel_num, _, fan_in = weight.shape
        flat = weight.view(kernel_num, -1)
        grad_kernel = torch.zeros_like(kernel)
        grad_weight = torch.empty_like(weight)
        grad_cols = torch.zeros_like(cols) if ctx.needs_input_grad[2] else None
        for rows, w in _aggregated_blocks(kernel, weight, _BMM_BLOCK_NUMEL):
            grad = grad_out[:, rows]
            if grad_cols is not None:
                grad_cols.baddbmm_(w.transpose(1, 2), grad)
            grad_w = torch.bmm(grad, cols.transpose(1, 2)).flatten(1)
            grad_weight[:, rows] = (kernel.t() @ grad_w).view(kernel_num, -1, fan_in)
            grad_kernel += grad_w @ flat[:, rows.start * fan_in:rows.stop * fan_in].t()
        return grad_kernel.to(ctx.dtypes[0]), grad_weight.to(ctx.dtypes[1]), grad_cols


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.conv2d computes x in here: autocast's where it is on (autocast leaves float64 alone)."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.amp.is_autocast_available(device_type) and \
            torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _scale_output(out: torch.Tensor, filter_: Optional[torch.Tensor]) -> torch.Tensor:
    """The filter attention (absent for depth-wise convs) on the output; in place without autograd, where the
    output is ours to overwrite (saves allocating another activation)."""
    if filter_ is None:
        return out
    filter_ = filter_[:, :, None, None]
    return out * filter_ if torch.is_grad_enabled() else out.mul_(filter_)


def _conv_output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def _conv_per_sample_loops(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int,
                           groups: int) -> bool:
    """Per-sample kernels (B, out, in/groups, k, k) are convolved one sample at a time (CPU, dense, large convs)
    rather than in one conv with groups = batch: oneDNN's grouped convolution loses to B plain ones on CPU, the more
    so for larger batches; small convolutions lose to the call overhead (benchmarks/odconv.md)."""
    out_h, out_w = (_conv_output_size(size, weight.shape[-1], stride, padding, dilation) for size in x.shape[2:])
    return groups == 1 and x.device.type == 'cpu' and weight[0].numel() * out_h * out_w >= _PER_SAMPLE_CONV_MIN_MACS


def _grouped_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int,
                  groups: int) -> torch.Tensor:
    """The release's convolution of each sample with its own kernels (B, out, in/groups, k, k): the batch folded into
    the channels, groups = batch x groups. Keeps x's memory format."""
    batch_size, in_chs, height, width = x.shape
    out_chs = weight.shape[1]
    out = F.conv2d(x.reshape(1, batch_size * in_chs, height, width),
                   weight.reshape(batch_size * out_chs, *weight.shape[2:]), None, stride, padding, dilation,
                   groups * batch_size)
    return out.view(batch_size, out_chs, out.shape[2], out.shape[3]).contiguous(memory_format=_memory_format(x))


def _looped_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """One plain convolution per sample (dense per-sample kernels, no autograd). Keeps x's memory format."""
    outs = [F.conv2d(x[i:i + 1], weight[i], None, stride, padding, dilation) for i in range(x.shape[0])]
    return torch.cat(outs).contiguous(memory_format=_memory_format(x))


def _conv_per_sample_backward(grad_out, x, weight, stride, padding, dilation, groups, mask):
    """Gradients (x's or None, weight's or None, by `mask`) of the per-sample convolution, all in x's dtype:
    `aten.convolution_backward` per sample (written into preallocated gradients) where the forward loops, else once
    with groups = batch."""
    conv_args = [stride] * 2, [padding] * 2, [dilation] * 2
    mask = [mask[0], mask[1], False]
    if not _conv_per_sample_loops(x, weight, stride, padding, dilation, groups):
        batch_size, in_chs, height, width = x.shape
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_out.reshape(1, -1, *grad_out.shape[2:]), x.reshape(1, batch_size * in_chs, height, width),
            weight.reshape(-1, *weight.shape[2:]), None, *conv_args, False, [0, 0], groups * batch_size, mask)
        return (grad_x.view(x.shape).contiguous(memory_format=_memory_format(x)) if mask[0] else None,
                grad_weight.view(weight.shape) if mask[1] else None)
    grad_x = torch.empty_like(x) if mask[0] else None
    grad_weight = torch.empty_like(weight) if mask[1] else None
    for i in range(x.shape[0]):
        grad_xi, grad_wi, _ = torch.ops.aten.convolution_backward(
            grad_out[i:i + 1], x[i:i + 1], weight[i], None, *conv_args, False, [0, 0], 1, mask)
        if mask[0]:
            grad_x[i] = grad_xi[0]
        if mask[1]:
            grad_weight[i] = grad_wi
    return grad_x, grad_weight


class _PerSampleConv(torch.autograd.Function):
    """Eager autograd of `_looped_conv`: one convolution per sample in both passes. On CPU this beats oneDNN's
    convolution with groups = batch for large dense convs, and autograd through per-sample slices by far (each
    slice's backward writes an input-sized gradient): benchmarks/odconv.md. Computes in one dtype (autocast's where
    it is on) with autocast off.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.dtypes = x.dtype, weight.dtype
        ctx.conv_args = stride, padding, dilation
        dtype = _conv_dtype(x)
        with _autocast_off(x.device.type):
            x, weight = x.to(dtype), weight.to(dtype)
            ctx.save_for_backward(x, weight)
            return _looped_conv(x, weight, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        with _autocast_off(x.device.type):
            grad_x, grad_weight = _conv_per_sample_backward(
                grad_out.to(x.dtype), x, weight, *ctx.conv_args, 1, ctx.needs_input_grad[:2])
        return (grad_x if grad_x is None else grad_x.to(ctx.dtypes[0]),
                grad_weight if grad_weight is None else grad_weight.to(ctx.dtypes[1]), None, None, None)


@torch.library.custom_op('dynconv::odconv_conv_forward', mutates_args=())
def _odconv_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int,
                 groups: int) -> torch.Tensor:
    """The per-sample convolution as a registered op, for torch.compile and torch.export (eager ODConv2d calls
    `_grouped_conv` and `_PerSampleConv` directly: the op's dispatch costs ~0.15 ms more per call). Traced code with
    groups = batch would make inductor specialize the batch size (it lowers `groups` as a constant); the op keeps
    one graph for every batch size.

    out[b] = conv2d(x[b], weight[b], groups=groups) for per-sample kernels `weight` (B, out, in/groups, k, k), in
    x's dtype (the caller casts x to the conv dtype) with autocast off; keeps x's memory format.
    """
    with _autocast_off(x.device.type):
        weight = weight.to(x.dtype)
        if _conv_per_sample_loops(x, weight, stride, padding, dilation, groups):
            return _looped_conv(x, weight, stride, padding, dilation)
        return _grouped_conv(x, weight, stride, padding, dilation, groups)


@_odconv_conv.register_fake
def _odconv_conv_fake(x, weight, stride, padding, dilation, groups):
    torch._check(weight.shape[0] == x.shape[0] and weight.shape[2] * groups == x.shape[1],
                 lambda: f'odconv_conv_forward: kernels {tuple(weight.shape)} do not fit input {tuple(x.shape)}')
    out_h, out_w = (_conv_output_size(size, weight.shape[-1], stride, padding, dilation) for size in x.shape[2:])
    return torch.empty((x.shape[0], weight.shape[1], out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(x))


@torch.library.custom_op('dynconv::odconv_conv_backward', mutates_args=())
def _odconv_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                          dilation: int, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `dynconv::odconv_conv_forward` for x (x's memory format) and weight (weight's dtype)."""
    with _autocast_off(x.device.type):
        grad_x, grad_weight = _conv_per_sample_backward(
            grad_out.to(x.dtype), x, weight.to(x.dtype), stride, padding, dilation, groups, (True, True))
        return grad_x, grad_weight.to(weight.dtype)


@_odconv_conv_backward.register_fake
def _odconv_conv_backward_fake(grad_out, x, weight, stride, padding, dilation, groups):
    return torch.empty_like(x), weight.new_empty(weight.shape)


def _odconv_conv_setup_context(ctx, inputs, output):
    x, weight, *ctx.conv_args = inputs
    ctx.save_for_backward(x, weight)


def _odconv_conv_grad(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.dynconv.odconv_conv_backward(grad_out, x, weight, *ctx.conv_args)
    return grad_x, grad_weight, None, None, None, None


def _odconv_conv_flop(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # As a convolution: one multiply-add per kernel element (in/groups x k x k) and output element, 2 FLOPs each.
    return 2 * math.prod(out_shape) * math.prod(weight_shape[2:])


def _odconv_conv_backward_flop(grad_out_shape, x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # Two convolutions' worth: the input gradient and the kernel gradient.
    return 2 * 2 * math.prod(grad_out_shape) * math.prod(weight_shape[2:])


torch.library.register_autograd(
    'dynconv::odconv_conv_forward', _odconv_conv_grad, setup_context=_odconv_conv_setup_context)
register_flop_formula(torch.ops.dynconv.odconv_conv_forward)(_odconv_conv_flop)
register_flop_formula(torch.ops.dynconv.odconv_conv_backward)(_odconv_conv_backward_flop)


def _per_sample_conv(x: torch.Tensor, weight: torch.Tensor, channel: torch.Tensor, filter_: Optional[torch.Tensor],
                     spatial: Optional[torch.Tensor], kernel: Optional[torch.Tensor], stride: int, padding: int,
                     dilation: int) -> torch.Tensor:
    """ODConv2d's output for a dense conv without autograd, from its kernel bank `weight` (kernel_num, out, in, k, k)
    and attentions: per-sample kernels with the attentions folded in, built one chunk of samples and one block of
    output channels at a time (`_aggregated_blocks`, one reused buffer), then one convolution per sample and block.
    Only the filter attention may touch the activations (on the output, when that is smaller than the kernels)."""
    batch_size = x.shape[0]
    kernel_num, out_chs, in_chs, kernel_size = weight.shape[:4]
    out_h, out_w = (_conv_output_size(size, kernel_size, stride, padding, dilation) for size in x.shape[2:])
    fan_in = in_chs * kernel_size * kernel_size
    in_scale = channel[:, :, None] if spatial is None else channel[:, :, None] * spatial[:, None, :]
    in_scale = in_scale.reshape(batch_size, 1, fan_in)
    filter_on_weight = filter_ is not None and fan_in <= out_h * out_w
    # The kernels are built in the weight's dtype (autocast leaves the attentions in its lower one).
    kernel = weight.new_ones(batch_size, 1) if kernel is None else kernel.to(weight.dtype)
    out = torch.empty((batch_size, out_chs, out_h, out_w), dtype=_conv_dtype(x), device=x.device,
                      memory_format=_memory_format(x))
    bank = weight.view(kernel_num, out_chs, fan_in)
    # Large batches go in chunks of samples, so that a block keeps enough output channels per convolution.
    chunk = max(1, _BLOCK_NUMEL // (min(out_chs, _MIN_BLOCK_ROWS) * fan_in))
    for first in range(0, batch_size, chunk):
        samples = slice(first, first + chunk)
        for rows, block in _aggregated_blocks(kernel[samples], bank, _BLOCK_NUMEL):
            block.mul_(in_scale[samples])
            if filter_on_weight:
                block.mul_(filter_[samples, rows, None])
            block = block.view(block.shape[0], -1, in_chs, kernel_size, kernel_size)
            for i, sample_weight in enumerate(block, first):
                out[i, rows] = F.conv2d(x[i:i + 1], sample_weight, None, stride, padding, dilation)[0]
    return out if filter_on_weight else _scale_output(out, filter_)


@torch.library.custom_op('dynconv::odconv_per_sample_forward', mutates_args=())
def _odconv_per_sample(x: torch.Tensor, weight: torch.Tensor, channel: torch.Tensor, filter_: Optional[torch.Tensor],
                       spatial: Optional[torch.Tensor], kernel: Optional[torch.Tensor], stride: int, padding: int,
                       dilation: int) -> torch.Tensor:
    """`_per_sample_conv` as a registered op, so that compiled and exported CPU inference of dense ODConvs with
    several kernels runs it (its reused buffer and per-sample loop stay inside the op). Inference only (no autograd
    formula); every tensor in x's dtype, computed with autocast off; keeps x's memory format."""
    with _autocast_off(x.device.type):
        return _per_sample_conv(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation)


@_odconv_per_sample.register_fake
def _odconv_per_sample_fake(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation):
    torch._check(weight.shape[2] == x.shape[1],
                 lambda: f'odconv_per_sample_forward: kernel bank {tuple(weight.shape)} does not fit input '
                         f'{tuple(x.shape)}')
    out_h, out_w = (_conv_output_size(size, weight.shape[-1], stride, padding, dilation) for size in x.shape[2:])
    return torch.empty((x.shape[0], weight.shape[1], out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(x))


# As a convolution with one kernel, like `dynconv::odconv_conv_forward` (ODConv2d.count_macs adds the aggregation).
register_flop_formula(torch.ops.dynconv.odconv_per_sample_forward)(_odconv_conv_flop)


class ODAttention(nn.Module):
    """Attention branch of ODConv: GAP -> 1x1 fc -> BN -> ReLU -> one 1x1 fc per attention.

    The filter attention is absent for depth-wise convolutions, the spatial one for point-wise convolutions and the
    kernel one when there is a single kernel (as released). The temperature divides every attention's logits while
    training; it is a non-persistent buffer (official checkpoints have none) and is ignored in eval mode.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            groups: int = 1,
            reduction: float = 0.0625,
            kernel_num: int = 4,
            min_chs: int = 16,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        attn_chs = max(int(in_chs * reduction), min_chs)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.fc = nn.Conv2d(in_chs, attn_chs, 1, bias=False, **dd)
        self.bn = nn.BatchNorm2d(attn_chs, **dd)
        self.act = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(attn_chs, in_chs, 1, **dd)
        is_depthwise = in_chs == groups and in_chs == out_chs
        self.filter_fc = None if is_depthwise else nn.Conv2d(attn_chs, out_chs, 1, **dd)
        self.spatial_fc = None if kernel_size == 1 else nn.Conv2d(attn_chs, kernel_size * kernel_size, 1, **dd)
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(attn_chs, kernel_num, 1, **dd)
        self.register_buffer('temperature', torch.ones((), device=device, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.temperature.fill_(1.)

    def _head(self, fc: Optional[nn.Conv2d], hidden: torch.Tensor) -> Optional[torch.Tensor]:
        if fc is None:
            return None
        logits = F.linear(hidden, fc.weight.flatten(1), fc.bias)
        return logits / self.temperature if self.training else logits

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                                                  Optional[torch.Tensor]]:
        """Returns (channel (B, in), filter (B, out), spatial (B, k*k), kernel (B, kernel_num)); absent ones None."""
        if self.training and x.shape[0] == 1:
            raise ValueError(
                'ODConv attention got a training batch of 1: its BatchNorm needs >= 2 samples per device. '
                'Drop the last incomplete batch (drop_last=True), use a larger batch, or call model.eval().')
        # 1x1 convs on a pooled vector are linear layers; F.linear skips the conv dispatch and is counted the same.
        pooled = x.mean((2, 3))
        hidden = F.linear(pooled, self.fc.weight.flatten(1))
        hidden = self.act(self.bn(hidden[:, :, None, None])).flatten(1)
        channel = torch.sigmoid(self._head(self.channel_fc, hidden))
        filter_ = self._head(self.filter_fc, hidden)
        spatial = self._head(self.spatial_fc, hidden)
        kernel = self._head(self.kernel_fc, hidden)
        return (
            channel,
            None if filter_ is None else torch.sigmoid(filter_),
            None if spatial is None else torch.sigmoid(spatial),
            None if kernel is None else torch.softmax(kernel, dim=1),
        )


def _square(value, name: str) -> int:
    """One int from an int or a tuple of equal ints, as nn.Conv2d takes them (ODConv2d is square only)."""
    if isinstance(value, (tuple, list)):
        if len(value) not in (1, 2) or len(set(value)) != 1:
            raise ValueError(f'ODConv2d: {name} must be an int or a tuple of equal ints (square convolutions only), '
                             f'got {tuple(value)}')
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f'ODConv2d: {name} must be an int, got {value!r}')
    return value


def _symmetric_padding(padding, kernel_size: int, stride: int, dilation: int) -> int:
    """nn.Conv2d's padding argument as one symmetric amount: an int, equal ints, 'valid' or 'same'."""
    if padding == 'valid':
        return 0
    if padding != 'same':
        return _square(padding, 'padding')
    if stride != 1:
        raise ValueError(f"ODConv2d: padding='same' needs stride 1 (as in nn.Conv2d), got stride {stride}: "
                         f"give the padding as an int")
    if dilation * (kernel_size - 1) % 2:
        raise ValueError(f"ODConv2d: padding='same' with kernel_size {kernel_size} and dilation {dilation} is "
                         f"asymmetric, which ODConv2d does not support: use an odd kernel_size")
    return dilation * (kernel_size - 1) // 2


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic 2d convolution (no bias), drop-in for `nn.Conv2d(..., bias=False)`.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        kernel_size: Kernel size (an int, or a tuple of equal ints).
        stride: Convolution stride (an int, or a tuple of equal ints).
        padding: Zero padding: an int, a tuple of equal ints, 'valid' or 'same' (stride 1, symmetric only).
        dilation: Kernel dilation (an int, or a tuple of equal ints).
        groups: Convolution groups (groups == in_chs == out_chs is depth-wise: no filter attention).
        reduction: Attention hidden width = max(int(in_chs * reduction), 16).
        kernel_num: Number of candidate kernels (1 keeps the leading dimension of `weight`).
        impl: 'auto' (the exact rewrite `_select_path` picks per call) or 'released' (the release's formulation,
            the oracle of tests/test_odconv.py and scripts/benchmark_odconv.py).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: Union[int, Tuple[int, int]],
            stride: Union[int, Tuple[int, int]] = 1,
            padding: Union[int, Tuple[int, int], str] = 0,
            dilation: Union[int, Tuple[int, int]] = 1,
            groups: int = 1,
            reduction: float = 0.0625,
            kernel_num: int = 4,
            impl: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if in_chs % groups or out_chs % groups:
            raise ValueError(f'ODConv2d: in_chs ({in_chs}) and out_chs ({out_chs}) must be divisible by groups '
                             f'({groups})')
        if impl not in _IMPLS:
            raise ValueError(f'ODConv2d: impl must be one of {_IMPLS}, got {impl!r}')
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.kernel_size = _square(kernel_size, 'kernel_size')
        self.stride = _square(stride, 'stride')
        self.dilation = _square(dilation, 'dilation')
        self.padding = _symmetric_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.groups = groups
        self.kernel_num = kernel_num
        self.impl = impl
        self.attention = ODAttention(
            in_chs, out_chs, self.kernel_size, groups=groups, reduction=reduction, kernel_num=kernel_num, **dd)
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_chs, in_chs // groups, self.kernel_size, self.kernel_size, **dd))
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=torch.channels_last) converts 4-D and 5-D tensors to that 4-D format, which fails
        # on the 5-D kernel bank: `fn` gets the bank as one 4-D stack, and the bank stays contiguous.
        def fn_kernel_bank(t):
            return fn(t.flatten(0, 1)).contiguous().view(t.shape) if t.dim() == 5 else fn(t)
        return super()._apply(fn_kernel_bank, recurse)

    def reset_parameters(self) -> None:
        for w in self.weight.data:
            nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')

    def extra_repr(self) -> str:
        return (f'{self.in_chs}, {self.out_chs}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, dilation={self.dilation}, groups={self.groups}, '
                f'kernel_num={self.kernel_num}' + (f', impl={self.impl}' if self.impl != 'auto' else ''))

    def count_macs(self, input_shape: torch.Size, output_shape: torch.Size) -> int:
        """Multiply-adds of one forward as the paper counts them, whatever formulation runs (scripts/model_info.py).

        The convolution with one kernel, the attention fcs, and the kernel aggregation of eq. 2: each attention that
        varies over a kernel's elements (channel; filter unless depth-wise; spatial unless 1x1) multiplies every
        element of every candidate kernel once, and the kernel attention and the sum over the candidates ride on the
        last of those multiply-adds. This reproduces the published OD-ResNet-50 overheads over ResNet-50 (+0.058G
        1x, +0.222G 4x) to within 4%; benchmarks/odconv.md compares every published row.
        """
        attn = self.attention
        kernel_numel = self.weight[0].numel()
        fcs = sum(fc.weight.numel() for fc in (attn.fc, attn.channel_fc, attn.filter_fc, attn.spatial_fc,
                                               attn.kernel_fc) if fc is not None)
        attentions_on_kernel = 1 + (attn.filter_fc is not None) + (attn.spatial_fc is not None)
        aggregation = self.kernel_num * kernel_numel * attentions_on_kernel
        convolution = kernel_numel * output_shape[2] * output_shape[3]
        return input_shape[0] * (convolution + fcs + aggregation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._select_path(x)(x, *self.attention(x))

    def _select_path(self, x: torch.Tensor) -> Callable[..., torch.Tensor]:
        """The formulation for this call; each is exact (tests/test_odconv.py compares every one with the release's).

        First match wins. "dense": groups == 1; "traced": under torch.compile (dynamo) or torch.export, where the
        eager choices (branches on sizes, writes into reused buffers) would break graphs and multiply recompilations;
        there only grad mode (one guard) and the module's own constants choose. Times: CPU, 2 threads, batch 8
        (benchmarks/odconv.md).

        | condition                        | path                   | measured reason
        | -------------------------------- | ---------------------- | --------------------------------------------------
        | impl='released'                  | _forward_released      | the oracle
        | empty batch                      | _forward_static        | same empty output; the other paths fold the batch
        |                                  |                        | into conv groups (0 fails)
        | 1x1 with one kernel, traced      | _forward_static        | all attentions act on activations
        | traced, CPU, no autograd, dense, | _forward_per_sample_op | _forward_per_sample as a registered op;
        | kernel_num > 1                   |                        | compiled 4x inference, batch 8 x 224, vs
        |                                  |                        | _forward_traced: od_resnet18 223 -> 169 ms,
        |                                  |                        | od_resnet50 500 -> 466, od_mobilenetv2 195 -> 166
        |                                  |                        | (at 160 px: 62 -> 70, its smallest maps)
        | traced                           | _forward_traced        | one graph for every batch size (the eager paths:
        |                                  |                        | 26 graph breaks in od_resnet18 4x)
        | CPU, no autograd, dense, and     | _forward_per_sample    | od_resnet50 inference vs resnet50: 4x 0.52 ->
        | kernel_num > 1 or input map >=   |                        | 0.61, 1x 0.74 -> 0.82
        | 32x32                            |                        |
        | 1x1 with one kernel              | _forward_static        | all attentions act on activations
        | dense 1x1, no padding, <= 64     | _forward_pointwise_bmm | few pixels per kernel element: the bmm beats
        | pixels after the stride          |                        | per-sample kernels
        | dense 1x1, no padding            | _forward_pointwise     | oneDNN convs beat MKL's bmm (64->256 at 56x56: 3.6
        |                                  |                        | vs 4.9 ms)
        | dense, output map <= 64 pixels   | _forward_unfold        | 512->512 3x3 at 7x7, one kernel: 3.6x a static
        |                                  |                        | conv instead of 11x
        | otherwise (larger maps,          | _forward_grouped       | per-sample kernels cost 1.1-2x a static conv on
        | depth-wise, grouped)             |                        | maps >= 14x14
        """
        if self.impl == 'released':
            return self._forward_released
        batch_size, _, height, width = x.shape
        if batch_size == 0:
            return self._forward_static
        pointwise_one_kernel = self.kernel_size == 1 and self.kernel_num == 1
        dense = self.groups == 1
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            if pointwise_one_kernel:
                return self._forward_static
            if dense and self.kernel_num > 1 and x.device.type == 'cpu' and not torch.is_grad_enabled():
                return self._forward_per_sample_op
            return self._forward_traced
        if dense and x.device.type == 'cpu' and not torch.is_grad_enabled() and (
                self.kernel_num > 1 or height * width >= _PER_SAMPLE_MIN_PIXELS):
            return self._forward_per_sample
        if pointwise_one_kernel:
            return self._forward_static
        if dense and self.kernel_size == 1 and self.padding == 0:
            strided_pixels = -(-height // self.stride) * -(-width // self.stride)
            return self._forward_pointwise_bmm if strided_pixels <= _UNFOLD_MAX_PIXELS else self._forward_pointwise
        if dense and self._output_size(height) * self._output_size(width) <= _UNFOLD_MAX_PIXELS:
            return self._forward_unfold
        return self._forward_grouped

    def _output_size(self, size: int) -> int:
        return _conv_output_size(size, self.kernel_size, self.stride, self.padding, self.dilation)

    def _sample_weights(
            self,
            spatial: Optional[torch.Tensor],
            kernel: Optional[torch.Tensor],
            batch_size: int,
    ) -> torch.Tensor:
        """Per-sample kernels (B, out, in/groups, k, k) from the kernel and spatial attentions."""
        weight = self.weight
        if kernel is None:
            weight = weight.expand(batch_size, -1, -1, -1, -1)
        else:
            # A matmul over kernel_num, not the released broadcast-and-sum (which materializes B x kernel_num kernels).
            weight = (kernel @ weight.flatten(1)).view(batch_size, *weight.shape[1:])
        if spatial is not None:
            weight = weight * spatial.view(batch_size, 1, 1, self.kernel_size, self.kernel_size)
        return weight

    def _conv_sample_weights(self, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
        """Eager convolution of each sample with its own kernels (B, out, in/groups, k, k): `_PerSampleConv` where
        convolving sample by sample pays (`_conv_per_sample_loops`), else the release's conv with groups = batch.
        Keeps x's memory format."""
        if _conv_per_sample_loops(x, weight, stride, self.padding, self.dilation, self.groups):
            return _PerSampleConv.apply(x, weight, stride, self.padding, self.dilation)
        return _grouped_conv(x, weight, stride, self.padding, self.dilation, self.groups)

    def _forward_released(self, x, channel, filter_, spatial, kernel):
        """The release's formulation (modules/odconv.py `_forward_impl_common`, `_forward_impl_pw1x`): the channel
        attention on the input, per-sample kernels as the broadcast product of the spatial and kernel attentions with
        all kernel_num candidates summed over the candidates, one convolution with groups = batch, the filter
        attention on the output; a point-wise conv with one kernel is a static convolution."""
        batch_size, _, height, width = x.shape
        k = self.kernel_size
        x = x * channel[:, :, None, None]
        if k == 1 and self.kernel_num == 1:
            out = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        else:
            spatial = 1. if spatial is None else spatial.view(batch_size, 1, 1, 1, k, k)
            kernel = 1. if kernel is None else kernel.view(batch_size, self.kernel_num, 1, 1, 1, 1)
            weight = (spatial * kernel * self.weight.unsqueeze(0)).sum(1)
            out = F.conv2d(x.reshape(1, batch_size * self.in_chs, height, width),
                           weight.reshape(batch_size * self.out_chs, self.in_chs // self.groups, k, k), None,
                           self.stride, self.padding, self.dilation, self.groups * batch_size)
            out = out.view(batch_size, self.out_chs, out.shape[2], out.shape[3])
        return out if filter_ is None else out * filter_[:, :, None, None]

    def _forward_static(self, x, channel, filter_, spatial, kernel):
        """1x1 with one kernel: the channel attention on the input, the static kernel, the filter attention on the
        output (no spatial or kernel attention exists)."""
        out = F.conv2d(x * channel[:, :, None, None], self.weight[0], None, self.stride, self.padding, self.dilation,
                       self.groups)
        return _scale_output(out, filter_)

    def _forward_traced(self, x, channel, filter_, spatial, kernel):
        """Under torch.compile / torch.export: per-sample kernels (kernel attention as a matmul over the candidates,
        spatial attention on them), the channel attention on the input, the per-sample convolution as the registered
        op `dynconv::odconv_conv_forward`, the filter attention on the output. No branch on sizes or grad mode and
        no buffer: one graph serves every batch size."""
        if kernel is None:
            # One candidate as a matmul too: its weight gradient is then a GEMM over the batch. Inductor's CPU code
            # for the sum over the batch of an expanded weight runs one parallel region per weight element (2x the
            # eager training step of od_resnet50 1x).
            kernel = x.new_ones((x.shape[0], 1), dtype=self.weight.dtype)
        weight = self._sample_weights(spatial, kernel, x.shape[0])
        x = (x * channel[:, :, None, None]).to(_conv_dtype(x))
        out = torch.ops.dynconv.odconv_conv_forward(x, weight, self.stride, self.padding, self.dilation, self.groups)
        return out if filter_ is None else out * filter_[:, :, None, None]

    def _forward_per_sample(self, x, channel, filter_, spatial, kernel):
        """Dense convs on CPU without autograd: `_per_sample_conv` (every attention folded into per-sample kernels,
        one oneDNN convolution per sample and block of output channels)."""
        return _per_sample_conv(x, self.weight, channel, filter_, spatial, kernel, self.stride, self.padding,
                                self.dilation)

    def _forward_per_sample_op(self, x, channel, filter_, spatial, kernel):
        """`_forward_per_sample` under torch.compile / torch.export: the registered op
        `dynconv::odconv_per_sample_forward`, in the conv dtype with autocast off."""
        dtype = _conv_dtype(x)
        return torch.ops.dynconv.odconv_per_sample_forward(
            x.to(dtype), self.weight.to(dtype), channel.to(dtype), None if filter_ is None else filter_.to(dtype),
            None if spatial is None else spatial.to(dtype), None if kernel is None else kernel.to(dtype),
            self.stride, self.padding, self.dilation)

    def _forward_pointwise_bmm(self, x, channel, filter_, spatial, kernel):
        """Dense 1x1 with several kernels on small maps: the channel attention on the (strided) input pixels, a bmm
        with the kernel-aggregated weights built block by block (`_AggregatedBmm`), the filter attention on the
        output."""
        memory_format = _memory_format(x)
        x = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        batch_size, _, height, width = x.shape
        cols = x.reshape(batch_size, self.in_chs, height * width) * channel[:, :, None]
        out = _AggregatedBmm.apply(kernel, self.weight.view(self.kernel_num, self.out_chs, self.in_chs), cols)
        out = _scale_output(out.view(batch_size, self.out_chs, height, width), filter_)
        return out.contiguous(memory_format=memory_format)

    def _forward_pointwise(self, x, channel, filter_, spatial, kernel):
        """Dense 1x1 with several kernels on larger maps: per-sample weights convolved with the (strided) input
        (`_conv_sample_weights`), the channel attention on whichever of the two is smaller, the filter attention on
        the output."""
        batch_size = x.shape[0]
        memory_format = _memory_format(x)
        x = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        weight = self._sample_weights(None, kernel, batch_size)
        if x.shape[2] * x.shape[3] < self.out_chs:
            x = x * channel[:, :, None, None]
        else:
            weight = weight * channel[:, None, :, None, None]
        out = _scale_output(self._conv_sample_weights(x, weight, stride=1), filter_)
        return out.contiguous(memory_format=memory_format)

    def _forward_unfold(self, x, channel, filter_, spatial, kernel):
        """Dense k x k on small output maps: im2col columns scaled by the channel and spatial attentions, then one
        GEMM with the static weight (kernel_num 1) or a bmm with kernel-aggregated weights (`_AggregatedBmm`;
        per-sample kernels never see the spatial attention, so they are written once); the filter attention on the
        output."""
        batch_size, _, height, width = x.shape
        out_h, out_w = self._output_size(height), self._output_size(width)
        kk = self.kernel_size * self.kernel_size
        fan_in = self.in_chs * kk
        in_scale = channel[:, :, None] if spatial is None else channel[:, :, None] * spatial[:, None, :]
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        cols = (cols.view(batch_size, self.in_chs, kk, out_h * out_w) * in_scale[..., None]).view(
            batch_size, fan_in, out_h * out_w)
        if kernel is None:
            cols = cols.transpose(0, 1).reshape(fan_in, batch_size * out_h * out_w)
            out = (self.weight.view(self.out_chs, fan_in) @ cols).view(self.out_chs, batch_size, -1).transpose(0, 1)
        else:
            out = _AggregatedBmm.apply(kernel, self.weight.view(self.kernel_num, self.out_chs, fan_in), cols)
        out = _scale_output(out.reshape(batch_size, self.out_chs, out_h, out_w), filter_)
        return out.contiguous(memory_format=_memory_format(x))

    def _forward_grouped(self, x, channel, filter_, spatial, kernel):
        """Per-sample kernels (the release's scheme, kernel_num aggregated by a matmul) and `_conv_sample_weights`
        (groups = batch, or sample by sample for large dense convs on CPU). The channel and filter attentions scale
        the kernels of dense convs when those are smaller than the activations; depth-wise convs (no filter
        attention) always take the channel attention on their k x k kernels."""
        batch_size = x.shape[0]
        weight = self._sample_weights(spatial, kernel, batch_size)
        if filter_ is None:
            return self._conv_sample_weights(x, weight * channel[:, :, None, None, None], self.stride)
        out_pixels = self._output_size(x.shape[2]) * self._output_size(x.shape[3])
        if self.groups == 1 and weight[0].numel() < self.in_chs * x.shape[2] * x.shape[3] + self.out_chs * out_pixels:
            weight = weight * (filter_[:, :, None] * channel[:, None, :])[..., None, None]
            return self._conv_sample_weights(x, weight, self.stride)
        return _scale_output(self._conv_sample_weights(x * channel[:, :, None, None], weight, self.stride), filter_)


class ODConvTrainingHooks:
    """Model mixin: the framework's generic training hooks, driving every ODConv temperature in the model.

    The model sets `temp_init` and `temp_epochs` (model kwargs). train.py calls `set_training_progress` before every
    step; checkpoints keep `training_hook_state`. A model never given progress trains at temperature 1.
    """
    temp_init: float = 30.
    temp_epochs: float = 10.

    def _od_attentions(self):
        return [m for m in self.modules() if isinstance(m, ODAttention)]

    def set_temperature(self, temperature: float) -> None:
        """Sets the training-mode temperature of every ODConv attention (eval mode always uses 1)."""
        for m in self._od_attentions():
            m.temperature.fill_(temperature)

    def scheduled_values(self, epochs: float) -> dict:
        """The temperature after `epochs` (fractional) epochs (linear temp_init -> 1 over temp_epochs)."""
        return {'temperature': odconv_temperature(epochs, self.temp_init, self.temp_epochs)}

    def set_training_progress(self, epochs: float) -> None:
        self.set_temperature(self.scheduled_values(epochs)['temperature'])

    def auxiliary_loss(self) -> None:
        """ODConv adds nothing to the loss."""
        return None

    def auxiliary_loss_terms(self) -> list:
        return []

    def training_hook_log(self) -> dict:
        attentions = self._od_attentions()
        return {'temperature': float(attentions[0].temperature) if attentions else 1.}

    def training_hook_state(self) -> dict:
        return self.training_hook_log()

    def load_training_hook_state(self, state: dict) -> None:
        self.set_temperature(float(state.get('temperature', 1.)))
