"""Omni-dimensional dynamic convolution (ODConv).

Paper: `Omni-Dimensional Dynamic Convolution` - https://openreview.net/forum?id=DmpCfq6Mg39 (ICLR 2022)
Original code: https://github.com/OSVAI/ODConv (modules/odconv.py); parameter names follow that release.

A squeeze-and-excitation style branch predicts four attentions per sample: over the input channels (channel),
the output channels (filter), the k*k kernel positions (spatial) and the `kernel_num` candidate kernels (kernel).
The sample's kernel is `sum_n kernel[n] * spatial * channel * filter * weight[n]` (paper eq. 2).

The released code always builds that per-sample kernel and runs one grouped convolution with groups = batch.
`ODConv2d.forward` computes the same result with cheaper exact rewrites (measured in scripts/benchmark_odconv.py,
results in benchmarks/odconv.md):

* CPU inference (no autograd), dense convs with several kernels, or with one kernel on maps of >= 32x32: per-sample
  kernels with every attention folded in, built block by block of output channels into one reused buffer, and one
  oneDNN convolution per sample (`_forward_per_sample`);
* otherwise a point-wise ODConv is a plain convolution with the static weight (one kernel), or the grouped
  convolution on larger maps and a batched matmul on small ones (several kernels); a k x k ODConv on a small output
  map is im2col + GEMM with the spatial and channel attentions on the columns (one kernel: the static weight;
  several: `_AggregatedBmm`, which aggregates the per-sample kernels block by block in both passes); larger maps keep
  the per-sample kernels, cheap there relative to the convolution, convolved one sample at a time on CPU
  (`_PerSampleConv`) and with groups = batch elsewhere. The channel and filter attentions scale whichever is
  smaller, activations or kernels.
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ['ODAttention', 'ODConv2d', 'ODConvTrainingHooks', 'odconv_temperature']

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
# `_PerSampleConv` (CPU, autograd) takes convolutions of at least this many multiply-adds per sample; below, the call
# overhead of B small convolutions exceeds what it saves over groups = batch (benchmarks/odconv.md).
_PER_SAMPLE_CONV_MIN_MACS = 1 << 24
# `_forward_per_sample` splits the batch so that its blocks hold at least this many output channels: one convolution
# per sample and block, so thin blocks multiply the calls (a batch of 256 would otherwise get one channel per block).
_MIN_BLOCK_ROWS = 64


def odconv_temperature(epochs: float, temp_init: float = 30., temp_epochs: float = 10.) -> float:
    """Attention temperature after `epochs` (fractional) epochs of training.

    Linear from `temp_init` at epoch 0 to 1 at `temp_epochs`, then 1: the original utils/misc.py `get_temperature`
    with `epochs = epoch + step / steps_per_epoch` (train.py passes the progress before each step; the original
    counts the step itself, so ours runs one step behind, a difference of (temp_init - 1) / (temp_epochs * steps)).
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


class _PerSampleConv(torch.autograd.Function):
    """out[b] = conv2d(x[b], weight[b]) for dense per-sample kernels (B, out, in, k, k): one convolution per sample in
    both passes (`aten.convolution_backward` per sample), written into preallocated outputs and gradients. On CPU this
    beats oneDNN's convolution with groups = batch, the more so for larger batches, and autograd through per-sample
    slices by far (each slice's backward writes an input-sized gradient): benchmarks/odconv.md. Computes in one
    dtype (autocast's where it is on) with autocast off.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.dtypes = x.dtype, weight.dtype
        ctx.conv_args = stride, padding, dilation
        dtype = _conv_dtype(x)
        with _autocast_off(x.device.type):
            x, weight = x.to(dtype), weight.to(dtype)
            ctx.save_for_backward(x, weight)
            outs = [F.conv2d(x[i:i + 1], weight[i], None, stride, padding, dilation) for i in range(x.shape[0])]
            return torch.cat(outs).contiguous(memory_format=_memory_format(x))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ([a, a] for a in ctx.conv_args)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        grad_x = torch.empty_like(x) if mask[0] else None
        grad_weight = torch.empty_like(weight) if mask[1] else None
        grad_out = grad_out.to(x.dtype)
        with _autocast_off(x.device.type):
            for i in range(x.shape[0]):
                grad_xi, grad_wi, _ = torch.ops.aten.convolution_backward(
                    grad_out[i:i + 1], x[i:i + 1], weight[i], None, stride, padding, dilation, False, [0, 0], 1, mask)
                if mask[0]:
                    grad_x[i] = grad_xi[0]
                if mask[1]:
                    grad_weight[i] = grad_wi
        return (grad_x if grad_x is None else grad_x.to(ctx.dtypes[0]),
                grad_weight if grad_weight is None else grad_weight.to(ctx.dtypes[1]), None, None, None)


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


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic 2d convolution (no bias), drop-in for `nn.Conv2d(..., bias=False)`.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        kernel_size: Square kernel size.
        stride: Convolution stride.
        padding: Zero padding.
        dilation: Kernel dilation.
        groups: Convolution groups (groups == in_chs == out_chs is depth-wise: no filter attention).
        reduction: Attention hidden width = max(int(in_chs * reduction), 16).
        kernel_num: Number of candidate kernels (1 keeps the leading dimension of `weight`).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int = 1,
            padding: int = 0,
            dilation: int = 1,
            groups: int = 1,
            reduction: float = 0.0625,
            kernel_num: int = 4,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if in_chs % groups or out_chs % groups:
            raise ValueError(f'ODConv2d: in_chs ({in_chs}) and out_chs ({out_chs}) must be divisible by groups '
                             f'({groups})')
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.kernel_num = kernel_num
        self.attention = ODAttention(
            in_chs, out_chs, kernel_size, groups=groups, reduction=reduction, kernel_num=kernel_num, **dd)
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_chs, in_chs // groups, kernel_size, kernel_size, **dd))
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
                f'kernel_num={self.kernel_num}')

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
        """Convolution of each sample with its own kernels (B, out, in/groups, k, k): `_PerSampleConv` for dense
        convs on CPU that are large enough, else the release's convolution with groups = batch."""
        out_pixels = self._output_size(x.shape[2], stride) * self._output_size(x.shape[3], stride)
        if self.groups == 1 and x.device.type == 'cpu' and weight[0].numel() * out_pixels >= _PER_SAMPLE_CONV_MIN_MACS:
            return _PerSampleConv.apply(x, weight, stride, self.padding, self.dilation)
        batch_size = x.shape[0]
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]), None, stride,
                       self.padding, self.dilation, self.groups * batch_size)
        return out.view(batch_size, self.out_chs, *out.shape[2:])

    def _output_size(self, size: int, stride: Optional[int] = None) -> int:
        stride = self.stride if stride is None else stride
        return (size + 2 * self.padding - self.dilation * (self.kernel_size - 1) - 1) // stride + 1

    def _forward_pointwise(self, x, channel, filter_, kernel):
        """1x1, several kernels, filter attention included. Maps <= _UNFOLD_MAX_PIXELS: `_AggregatedBmm`; larger
        ones: per-sample weights and `_conv_sample_weights` (oneDNN's convolutions beat MKL's bmm there:
        benchmarks/odconv.md)."""
        batch_size = x.shape[0]
        x = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        height, width = x.shape[-2:]
        if height * width <= _UNFOLD_MAX_PIXELS:
            cols = x.reshape(batch_size, self.in_chs, -1) * channel[:, :, None]
            out = _AggregatedBmm.apply(kernel, self.weight.view(self.kernel_num, self.out_chs, -1), cols)
            out = out.view(batch_size, self.out_chs, height, width) * filter_[:, :, None, None]
            return out.contiguous(memory_format=_memory_format(x))
        weight = self._sample_weights(None, kernel, batch_size)
        # The channel attention goes on whichever operand is smaller.
        if height * width < self.out_chs:
            x = x * channel[:, :, None, None]
        else:
            weight = weight * channel[:, None, :, None, None]
        return self._conv_sample_weights(x, weight, stride=1) * filter_[:, :, None, None]

    def _forward_per_sample(self, x, channel, filter_, spatial, kernel):
        """Dense convs on CPU without autograd: per-sample kernels with the attentions folded in, built one chunk of
        samples and one block of output channels at a time (`_aggregated_blocks`), then one oneDNN convolution per
        sample and block. Only the filter attention may touch the activations (on the output, when that is smaller
        than the kernels)."""
        batch_size = x.shape[0]
        out_h, out_w = self._output_size(x.shape[2]), self._output_size(x.shape[3])
        fan_in = self.in_chs * self.kernel_size * self.kernel_size
        in_scale = channel[:, :, None] if spatial is None else channel[:, :, None] * spatial[:, None, :]
        in_scale = in_scale.reshape(batch_size, 1, fan_in)
        filter_on_weight = fan_in <= out_h * out_w
        # The kernels are built in the weight's dtype (autocast leaves the attentions in its lower one).
        kernel = self.weight.new_ones(batch_size, 1) if kernel is None else kernel.to(self.weight.dtype)
        out = torch.empty((batch_size, self.out_chs, out_h, out_w), dtype=_conv_dtype(x), device=x.device,
                          memory_format=_memory_format(x))
        bank = self.weight.view(self.kernel_num, self.out_chs, fan_in)
        # Large batches go in chunks of samples, so that a block keeps enough output channels per convolution.
        chunk = max(1, _BLOCK_NUMEL // (min(self.out_chs, _MIN_BLOCK_ROWS) * fan_in))
        for first in range(0, batch_size, chunk):
            samples = slice(first, first + chunk)
            for rows, weight in _aggregated_blocks(kernel[samples], bank, _BLOCK_NUMEL):
                weight.mul_(in_scale[samples])
                if filter_on_weight:
                    weight.mul_(filter_[samples, rows, None])
                weight = weight.view(weight.shape[0], -1, self.in_chs, self.kernel_size, self.kernel_size)
                for i, sample_weight in enumerate(weight, first):
                    out[i, rows] = F.conv2d(x[i:i + 1], sample_weight, None, self.stride, self.padding,
                                            self.dilation)[0]
        return out if filter_on_weight else out.mul_(filter_[:, :, None, None])

    def _forward_unfold(self, x, channel, spatial, kernel):
        """k x k on small maps: im2col columns scaled by the channel and spatial attentions, then one GEMM with the
        static weight (kernel_num 1) or a bmm with kernel-aggregated weights; per-sample kernels never see the
        spatial attention, so they are written once."""
        batch_size, _, height, width = x.shape
        out_h, out_w = self._output_size(height), self._output_size(width)
        kk = self.kernel_size * self.kernel_size
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        cols = cols.view(batch_size, self.in_chs, kk, -1) * (channel[:, :, None, None] * spatial[:, None, :, None])
        cols = cols.view(batch_size, self.in_chs * kk, -1)
        if kernel is None:
            cols = cols.transpose(0, 1).reshape(self.in_chs * kk, -1)
            out = (self.weight.view(self.out_chs, -1) @ cols).view(self.out_chs, batch_size, -1).transpose(0, 1)
        else:
            out = _AggregatedBmm.apply(kernel, self.weight.view(self.kernel_num, self.out_chs, -1), cols)
        return out.reshape(batch_size, self.out_chs, out_h, out_w).contiguous(memory_format=_memory_format(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel, filter_, spatial, kernel = self.attention(x)
        batch_size = x.shape[0]
        if self.groups == 1 and x.device.type == 'cpu' and not torch.is_grad_enabled() and (
                self.kernel_num > 1 or x.shape[2] * x.shape[3] >= _PER_SAMPLE_MIN_PIXELS):
            return self._forward_per_sample(x, channel, filter_, spatial, kernel)
        if self.kernel_size == 1 and self.kernel_num == 1:
            # All attentions act on activations: a plain convolution with the static weight.
            out = F.conv2d(x * channel[:, :, None, None], self.weight[0], None, self.stride, self.padding,
                           self.dilation, self.groups)
        elif self.kernel_size == 1 and self.groups == 1 and self.padding == 0:
            return self._forward_pointwise(x, channel, filter_, kernel)
        elif filter_ is None:
            # Depth-wise: the channel attention scales the per-sample kernels (k*k per channel, cheaper than HxW).
            weight = self._sample_weights(spatial, kernel, batch_size) * channel[:, :, None, None, None]
            return self._conv_sample_weights(x, weight, self.stride)
        elif self.groups == 1 and self._output_size(x.shape[2]) * self._output_size(x.shape[3]) <= _UNFOLD_MAX_PIXELS:
            out = self._forward_unfold(x, channel, spatial, kernel)
        else:
            # Per-sample kernels (the release's scheme). The channel and filter attentions scale the kernels (dense
            # convs) when those are smaller than the activations.
            weight = self._sample_weights(spatial, kernel, batch_size)
            out_pixels = self._output_size(x.shape[2]) * self._output_size(x.shape[3])
            scale_weight = self.groups == 1 and \
                weight[0].numel() < self.in_chs * x.shape[2] * x.shape[3] + self.out_chs * out_pixels
            if scale_weight:
                weight = weight * (filter_[:, :, None] * channel[:, None, :])[..., None, None]
            else:
                x = x * channel[:, :, None, None]
            out = self._conv_sample_weights(x, weight, self.stride)
            if scale_weight:
                return out
        filter_ = filter_[:, :, None, None]
        # Without autograd the output is ours to scale in place (saves allocating another activation).
        return out * filter_ if torch.is_grad_enabled() else out.mul_(filter_)


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

    def set_training_progress(self, epochs: float) -> None:
        """Anneals the temperature for `epochs` (fractional) epochs done (linear temp_init -> 1 over temp_epochs)."""
        self.set_temperature(odconv_temperature(epochs, self.temp_init, self.temp_epochs))

    def auxiliary_loss(self) -> None:
        """ODConv adds nothing to the loss."""
        return None

    def training_hook_log(self) -> dict:
        attentions = self._od_attentions()
        return {'temperature': float(attentions[0].temperature) if attentions else 1.}

    def training_hook_state(self) -> dict:
        return self.training_hook_log()

    def load_training_hook_state(self, state: dict) -> None:
        self.set_temperature(float(state.get('temperature', 1.)))
