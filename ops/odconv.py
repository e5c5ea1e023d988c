"""Omni-dimensional dynamic convolution (ODConv) as functions and the registered ops `dynconv::odconv_*`.

Paper: `Omni-Dimensional Dynamic Convolution` - https://openreview.net/forum?id=DmpCfq6Mg39 (ICLR 2022)
Original code: https://github.com/OSVAI/ODConv (modules/odconv.py).

`odconv` convolves each sample with `sum_n kernel[n] * spatial * channel * filter * weight[n]` (paper eq. 2), given
the kernel bank `weight` (kernel_num, out, in/groups, k, k) and the four attentions of `models.layers.ODAttention`.
Every path computes that exactly; `impl` names one, or 'auto' takes the first row of this table whose condition
holds (tests/test_odconv.py compares every path with 'released'; scripts/benchmark_odconv.py measures them,
benchmarks/odconv.md records). "dense": groups == 1; "traced": under torch.compile (dynamo) or torch.export, where
the eager choices (branches on sizes, writes into reused buffers) would break graphs and multiply recompilations,
so there only grad mode (one guard) and the conv's own constants choose; "looped": CPU, dense, >= 16M multiply-adds
per sample, where one convolution per sample beats oneDNN's conv with groups = batch (B plain convs; below, their
call overhead loses). Times: CPU, 2 threads, batch 8.

| path             | condition ('auto')                   | measured reason
| ---------------- | ------------------------------------ | ---------------------------------------------------------
| released         | never (the oracle)                   | the release's formulation: per-sample kernels as the
|                  |                                      | broadcast product of the attentions, one conv with
|                  |                                      | groups = batch
| static           | empty batch                          | same empty output; the other paths fold the batch into
|                  |                                      | conv groups (0 fails)
| static           | 1x1 with one kernel, traced          | all attentions act on activations
| per_sample_op    | traced, CPU, no autograd, dense,     | per_sample as a registered op; compiled 4x inference,
|                  | kernel_num > 1                       | batch 8 x 224, vs traced: od_resnet18 223 -> 169 ms,
|                  |                                      | od_resnet50 500 -> 466, od_mobilenetv2 195 -> 166 (at
|                  |                                      | 160 px: 62 -> 70, its smallest maps)
| traced           | traced                               | one graph for every batch size (the eager paths: 26 graph
|                  |                                      | breaks in od_resnet18 4x)
| per_sample       | CPU, no autograd, dense, and         | od_resnet50 inference vs resnet50: 4x 0.52 -> 0.61,
|                  | kernel_num > 1 or input map >= 32x32 | 1x 0.74 -> 0.82
| static           | 1x1 with one kernel                  | all attentions act on activations
| pointwise_bmm    | dense 1x1, no padding, <= 64 pixels  | few pixels per kernel element: the bmm beats per-sample
|                  | after the stride                     | kernels
| pointwise_looped | dense 1x1, no padding, looped        | oneDNN convs beat MKL's bmm (64->256 at 56x56: 3.6 vs
| pointwise        | dense 1x1, no padding                | 4.9 ms)
| unfold           | dense, output map <= 64 pixels       | 512->512 3x3 at 7x7, one kernel: 3.6x a static conv
|                  |                                      | instead of 11x
| looped           | looped                               | per-sample kernels cost 1.1-2x a static conv on maps >=
| grouped          | otherwise (larger maps, depth-wise,  | 14x14
|                  | grouped)                             |

A path named by `impl` runs on every call, whatever its sizes; `check_impl` refuses a path the conv's shape cannot
take (`PATHS` gives what each needs), and per_sample and per_sample_op have no autograd (inference only). Under
torch.compile and torch.export 'auto' runs one traceable formulation whose per-sample convolution is the op
`dynconv::odconv_conv_forward` (the op, like the C++ kernels, picks its own loop); CPU inference of dense convs with
several kernels runs the eager per-sample path as the op `dynconv::odconv_per_sample_forward`. torch.onnx.export
(dynamo=True) replaces both ops by their decompositions in torch._decomp's table: 'traced' with the per-sample
convolution as im2col and a batched matmul. torch.jit.trace is refused: its trace would keep the batch size of the
example (the eager paths branch on it and loop over it).
"""
import contextlib
import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch._decomp import register_decomposition
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

from .reference import conv_windows

__all__ = ['odconv', 'choose_path', 'check_impl', 'PATHS']

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
# `_per_sample_conv` larger ones (every block costs one convolution call per sample).
_BMM_BLOCK_NUMEL = 1 << 19
_BLOCK_NUMEL = 1 << 21
# Dense convs on CPU are convolved sample by sample ("looped") from this many multiply-adds per sample; below, the
# call overhead of B small convolutions exceeds what it saves over groups = batch (benchmarks/odconv.md).
_PER_SAMPLE_CONV_MIN_MACS = 1 << 24
# `_per_sample_conv` splits the batch so that its blocks hold at least this many output channels: one convolution
# per sample and block, so thin blocks multiply the calls (a batch of 256 would otherwise get one channel per block).
_MIN_BLOCK_ROWS = 64


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
    """Per-sample kernels are convolved one sample at a time (CPU, dense, large convs) rather than in one conv with
    groups = batch ("looped"; `weight`: the per-sample kernels or the kernel bank, `weight[0]` one kernel): oneDNN's
    grouped convolution loses to B plain ones on CPU, the more so for larger batches; small convolutions lose to the
    call overhead (benchmarks/odconv.md)."""
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


def _conv_per_sample_backward(grad_out, x, weight, stride, padding, dilation, groups, mask, looped):
    """Gradients (x's or None, weight's or None, by `mask`) of the per-sample convolution, all in x's dtype:
    `aten.convolution_backward` per sample (written into preallocated gradients) where the forward `looped`, else
    once with groups = batch."""
    conv_args = [stride] * 2, [padding] * 2, [dilation] * 2
    mask = [mask[0], mask[1], False]
    if not looped:
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
                grad_out.to(x.dtype), x, weight, *ctx.conv_args, 1, ctx.needs_input_grad[:2], True)
        return (grad_x if grad_x is None else grad_x.to(ctx.dtypes[0]),
                grad_weight if grad_weight is None else grad_weight.to(ctx.dtypes[1]), None, None, None)


@torch.library.custom_op('dynconv::odconv_conv_forward', mutates_args=())
def _odconv_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int,
                 groups: int) -> torch.Tensor:
    """The per-sample convolution as a registered op, for torch.compile and torch.export (the eager paths call
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
    weight_dtype = weight.dtype
    with _autocast_off(x.device.type):
        weight = weight.to(x.dtype)
        looped = _conv_per_sample_loops(x, weight, stride, padding, dilation, groups)
        grad_x, grad_weight = _conv_per_sample_backward(
            grad_out.to(x.dtype), x, weight, stride, padding, dilation, groups, (True, True), looped)
        return grad_x, grad_weight.to(weight_dtype)


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


@register_decomposition(torch.ops.dynconv.odconv_conv_forward.default)
def _odconv_conv_decomposition(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int,
                               groups: int) -> torch.Tensor:
    """`dynconv::odconv_conv_forward` in ATen ops for torch.onnx.export(dynamo=True), which decomposes the ops it
    cannot translate by torch._decomp's global table: im2col columns (`conv_windows`) times the per-sample kernels,
    a batched matmul. ONNX's Conv takes the group count as a constant, so groups = batch cannot follow a dynamic
    batch."""
    batch_size, in_chs = x.shape[:2]
    out_chs, k = weight.shape[1], weight.shape[-1]
    out_h, out_w = (_conv_output_size(size, k, stride, padding, dilation) for size in x.shape[2:])
    cols = conv_windows(x, k, stride, padding, dilation, out_h, out_w)
    cols = cols.reshape(batch_size, groups, in_chs // groups * k * k, out_h * out_w)
    out = weight.to(x.dtype).reshape(batch_size, groups, out_chs // groups, -1) @ cols
    return out.view(batch_size, out_chs, out_h, out_w).contiguous(memory_format=_memory_format(x))


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


@register_decomposition(torch.ops.dynconv.odconv_per_sample_forward.default)
def _odconv_per_sample_decomposition(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation):
    """`dynconv::odconv_per_sample_forward` in ATen ops (ONNX export, as `_odconv_conv_decomposition`): the traced
    path, whose `dynconv::odconv_conv_forward` decomposes in turn."""
    return _traced(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, 1)


def _sample_weights(weight: torch.Tensor, spatial: Optional[torch.Tensor], kernel: Optional[torch.Tensor],
                    batch_size: int) -> torch.Tensor:
    """Per-sample kernels (B, out, in/groups, k, k) from the kernel bank and the kernel and spatial attentions."""
    if kernel is None:
        sample_weight = weight.expand(batch_size, -1, -1, -1, -1)
    else:
        # A matmul over kernel_num, not the released broadcast-and-sum (which materializes B x kernel_num kernels).
        sample_weight = (kernel @ weight.flatten(1)).view(batch_size, *weight.shape[1:])
    if spatial is not None:
        k = weight.shape[-1]
        sample_weight = sample_weight * spatial.view(batch_size, 1, 1, k, k)
    return sample_weight


def _conv_samples(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int, groups: int,
                  looped: bool) -> torch.Tensor:
    """Eager convolution of each sample with its own kernels (B, out, in/groups, k, k): `_PerSampleConv` if
    `looped`, else the release's conv with groups = batch. Keeps x's memory format."""
    if looped:
        return _PerSampleConv.apply(x, weight, stride, padding, dilation)
    return _grouped_conv(x, weight, stride, padding, dilation, groups)


def _released(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, groups):
    """The release's formulation (modules/odconv.py `_forward_impl_common`, `_forward_impl_pw1x`): the channel
    attention on the input, per-sample kernels as the broadcast product of the spatial and kernel attentions with
    all kernel_num candidates summed over the candidates, one convolution with groups = batch, the filter
    attention on the output; a point-wise conv with one kernel is a static convolution."""
    batch_size, in_chs, height, width = x.shape
    kernel_num, out_chs, _, k, _ = weight.shape
    x = x * channel[:, :, None, None]
    if k == 1 and kernel_num == 1:
        out = F.conv2d(x, weight[0], None, stride, padding, dilation, groups)
    else:
        spatial = 1. if spatial is None else spatial.view(batch_size, 1, 1, 1, k, k)
        kernel = 1. if kernel is None else kernel.view(batch_size, kernel_num, 1, 1, 1, 1)
        sample_weight = (spatial * kernel * weight.unsqueeze(0)).sum(1)
        out = F.conv2d(x.reshape(1, batch_size * in_chs, height, width),
                       sample_weight.reshape(batch_size * out_chs, in_chs // groups, k, k), None,
                       stride, padding, dilation, groups * batch_size)
        out = out.view(batch_size, out_chs, out.shape[2], out.shape[3])
    return out if filter_ is None else out * filter_[:, :, None, None]


def _static(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, groups):
    """1x1 with one kernel: the channel attention on the input, the static kernel, the filter attention on the
    output (no spatial or kernel attention exists)."""
    out = F.conv2d(x * channel[:, :, None, None], weight[0], None, stride, padding, dilation, groups)
    return _scale_output(out, filter_)


def _traced(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, groups):
    """Per-sample kernels (kernel attention as a matmul over the candidates, spatial attention on them), the
    channel attention on the input, the per-sample convolution as the registered op `dynconv::odconv_conv_forward`,
    the filter attention on the output. No branch on sizes or grad mode and no buffer: one graph serves every batch
    size."""
    if kernel is None:
        # One candidate as a matmul too: its weight gradient is then a GEMM over the batch. Inductor's CPU code
        # for the sum over the batch of an expanded weight runs one parallel region per weight element (2x the
        # eager training step of od_resnet50 1x).
        kernel = x.new_ones((x.shape[0], 1), dtype=weight.dtype)
    sample_weight = _sample_weights(weight, spatial, kernel, x.shape[0])
    x = (x * channel[:, :, None, None]).to(_conv_dtype(x))
    out = torch.ops.dynconv.odconv_conv_forward(x, sample_weight, stride, padding, dilation, groups)
    return out if filter_ is None else out * filter_[:, :, None, None]


def _per_sample(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, groups):
    """Dense convs without autograd: `_per_sample_conv` (every attention folded into per-sample kernels, one
    convolution per sample and block of output channels)."""
    return _per_sample_conv(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation)


def _per_sample_op(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, groups):
    """`_per_sample` as the registered op `dynconv::odconv_per_sample_forward`, in the conv dtype with autocast off."""
    dtype = _conv_dtype(x)
    return torch.ops.dynconv.odconv_per_sample_forward(
        x.to(dtype), weight.to(dtype), channel.to(dtype), None if filter_ is None else filter_.to(dtype),
        None if spatial is None else spatial.to(dtype), None if kernel is None else kernel.to(dtype),
        stride, padding, dilation)


def _pointwise_bmm(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, groups):
    """Dense 1x1 with several kernels on small maps: the channel attention on the (strided) input pixels, a bmm
    with the kernel-aggregated weights built block by block (`_AggregatedBmm`), the filter attention on the
    output."""
    kernel_num, out_chs, in_chs = weight.shape[:3]
    memory_format = _memory_format(x)
    x = x[:, :, ::stride, ::stride] if stride > 1 else x
    batch_size, _, height, width = x.shape
    cols = x.reshape(batch_size, in_chs, height * width) * channel[:, :, None]
    out = _AggregatedBmm.apply(kernel, weight.view(kernel_num, out_chs, in_chs), cols)
    out = _scale_output(out.view(batch_size, out_chs, height, width), filter_)
    return out.contiguous(memory_format=memory_format)


def _pointwise(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, groups, looped):
    """Dense 1x1 on larger maps: per-sample weights convolved with the (strided) input (`_conv_samples`), the
    channel attention on whichever of the two is smaller, the filter attention on the output."""
    memory_format = _memory_format(x)
    x = x[:, :, ::stride, ::stride] if stride > 1 else x
    sample_weight = _sample_weights(weight, None, kernel, x.shape[0])
    if x.shape[2] * x.shape[3] < weight.shape[1]:
        x = x * channel[:, :, None, None]
    else:
        sample_weight = sample_weight * channel[:, None, :, None, None]
    out = _scale_output(_conv_samples(x, sample_weight, 1, padding, dilation, groups, looped), filter_)
    return out.contiguous(memory_format=memory_format)


def _unfold(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, groups):
    """Dense k x k on small output maps: im2col columns scaled by the channel and spatial attentions, then one
    GEMM with the static weight (kernel_num 1) or a bmm with kernel-aggregated weights (`_AggregatedBmm`;
    per-sample kernels never see the spatial attention, so they are written once); the filter attention on the
    output."""
    batch_size, in_chs, height, width = x.shape
    kernel_num, out_chs, _, k, _ = weight.shape
    out_h, out_w = (_conv_output_size(size, k, stride, padding, dilation) for size in (height, width))
    kk = k * k
    fan_in = in_chs * kk
    in_scale = channel[:, :, None] if spatial is None else channel[:, :, None] * spatial[:, None, :]
    cols = F.unfold(x, k, dilation, padding, stride)
    cols = (cols.view(batch_size, in_chs, kk, out_h * out_w) * in_scale[..., None]).view(
        batch_size, fan_in, out_h * out_w)
    if kernel is None:
        cols = cols.transpose(0, 1).reshape(fan_in, batch_size * out_h * out_w)
        out = (weight.view(out_chs, fan_in) @ cols).view(out_chs, batch_size, -1).transpose(0, 1)
    else:
        out = _AggregatedBmm.apply(kernel, weight.view(kernel_num, out_chs, fan_in), cols)
    out = _scale_output(out.reshape(batch_size, out_chs, out_h, out_w), filter_)
    return out.contiguous(memory_format=_memory_format(x))


def _grouped(x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, groups, looped):
    """Per-sample kernels (the release's scheme, kernel_num aggregated by a matmul) and `_conv_samples`. The
    channel and filter attentions scale the kernels of dense convs when those are smaller than the activations;
    depth-wise convs (no filter attention) always take the channel attention on their k x k kernels."""
    sample_weight = _sample_weights(weight, spatial, kernel, x.shape[0])
    if filter_ is None:
        return _conv_samples(x, sample_weight * channel[:, :, None, None, None], stride, padding, dilation, groups,
                             looped)
    out_chs, k = weight.shape[1], weight.shape[-1]
    out_pixels = math.prod(_conv_output_size(size, k, stride, padding, dilation) for size in x.shape[2:])
    if groups == 1 and sample_weight[0].numel() < x.shape[1] * x.shape[2] * x.shape[3] + out_chs * out_pixels:
        sample_weight = sample_weight * (filter_[:, :, None] * channel[:, None, :])[..., None, None]
        return _conv_samples(x, sample_weight, stride, padding, dilation, groups, looped)
    return _scale_output(
        _conv_samples(x * channel[:, :, None, None], sample_weight, stride, padding, dilation, groups, looped),
        filter_)


# path name -> (function, what the conv must be for the path to be exact: checked by `check_impl`).
PATHS = {
    'released': (_released, ()),
    'static': (_static, ('1x1', 'one kernel')),
    'per_sample_op': (_per_sample_op, ('dense',)),
    'traced': (_traced, ()),
    'per_sample': (_per_sample, ('dense',)),
    'pointwise_bmm': (_pointwise_bmm, ('dense', '1x1', 'no padding', 'several kernels')),
    'pointwise_looped': (functools.partial(_pointwise, looped=True), ('dense', '1x1', 'no padding')),
    'pointwise': (functools.partial(_pointwise, looped=False), ('dense', '1x1', 'no padding')),
    'unfold': (_unfold, ('dense',)),
    'looped': (functools.partial(_grouped, looped=True), ('dense',)),
    'grouped': (functools.partial(_grouped, looped=False), ()),
}
_NEEDS = {
    'dense': lambda k, groups, padding, kernel_num: groups == 1,
    '1x1': lambda k, groups, padding, kernel_num: k == 1,
    'no padding': lambda k, groups, padding, kernel_num: padding == 0,
    'one kernel': lambda k, groups, padding, kernel_num: kernel_num == 1,
    'several kernels': lambda k, groups, padding, kernel_num: kernel_num > 1,
}


def check_impl(impl: str, kernel_size: int, groups: int, padding: int, kernel_num: int) -> None:
    """Raises ValueError unless `impl` is 'auto' or a path of `PATHS` that this conv's shape can take."""
    if impl != 'auto' and impl not in PATHS:
        raise ValueError(f"impl must be one of {('auto', *PATHS)}, got {impl!r}")
    unmet = [need for need in PATHS[impl][1] if not _NEEDS[need](kernel_size, groups, padding, kernel_num)] \
        if impl != 'auto' else []
    if unmet:
        raise ValueError(f"impl={impl!r} needs a conv that is {', '.join(PATHS[impl][1])}; this one is not "
                         f"{', '.join(unmet)}")


def choose_path(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int, groups: int,
                traced: bool) -> str:
    """The path 'auto' takes for this call (the module docstring's table, first match wins); `traced`: under
    torch.compile or torch.export."""
    batch_size, _, height, width = x.shape
    kernel_num, _, _, k, _ = weight.shape
    if batch_size == 0:
        return 'static'
    pointwise_one_kernel = k == 1 and kernel_num == 1
    dense = groups == 1
    cpu_inference = x.device.type == 'cpu' and not torch.is_grad_enabled()
    if traced:
        if pointwise_one_kernel:
            return 'static'
        return 'per_sample_op' if dense and kernel_num > 1 and cpu_inference else 'traced'
    if dense and cpu_inference and (kernel_num > 1 or height * width >= _PER_SAMPLE_MIN_PIXELS):
        return 'per_sample'
    if pointwise_one_kernel:
        return 'static'
    looped = _conv_per_sample_loops(x, weight, stride, padding, dilation, groups)
    if dense and k == 1 and padding == 0:
        strided_pixels = -(-height // stride) * -(-width // stride)
        if strided_pixels <= _UNFOLD_MAX_PIXELS:
            return 'pointwise_bmm'
        return 'pointwise_looped' if looped else 'pointwise'
    out_pixels = math.prod(_conv_output_size(size, k, stride, padding, dilation) for size in (height, width))
    if dense and out_pixels <= _UNFOLD_MAX_PIXELS:
        return 'unfold'
    return 'looped' if looped else 'grouped'


def odconv(
        x: torch.Tensor,
        weight: torch.Tensor,
        channel: torch.Tensor,
        filter_: Optional[torch.Tensor],
        spatial: Optional[torch.Tensor],
        kernel: Optional[torch.Tensor],
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        impl: str = 'auto',
) -> torch.Tensor:
    """Omni-dimensional dynamic convolution of x (B, in, H, W) with the kernel bank `weight`
    (kernel_num, out, in/groups, k, k) under the attentions channel (B, in), filter (B, out; None for depth-wise),
    spatial (B, k*k; None for 1x1) and kernel (B, kernel_num; None for one kernel). Keeps x's memory format.

    `impl`: 'auto' (the module docstring's table) or a path name of `PATHS`, run as named.
    """
    if torch.jit.is_tracing():
        raise RuntimeError('ODConv cannot be traced by torch.jit.trace (the trace would keep the batch size of its '
                           'example input): use torch.export.export, or torch.onnx.export(..., dynamo=True) for ONNX')
    if impl == 'auto':
        traced = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        impl = choose_path(x, weight, stride, padding, dilation, groups, traced)
    return PATHS[impl][0](x, weight, channel, filter_, spatial, kernel, stride, padding, dilation, groups)
