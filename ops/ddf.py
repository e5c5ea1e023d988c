""" The decoupled dynamic filter (DDF) operation as the compiled custom op `dynconv::ddf_forward`.

Paper: Decoupled Dynamic Filter Networks - https://arxiv.org/abs/2104.14107 (original code: theFoxofSky/ddfnet).

Schemas and the C++/CUDA kernels live in ops/csrc; this module holds the Python side of the registration: fake
(meta) kernels, autograd, and the FLOP formulas for torch.utils.flop_counter. The extension registers autocast in C++
(the kernels handle fp16/bf16 natively, so autocast runs them in the autocast dtype).
"""
import math
from typing import Optional

import torch
from torch._decomp import register_decomposition
from torch.utils.flop_counter import register_flop_formula

from .reference import check_ddf_args, conv_windows, filter_windows

__all__ = ['ddf', 'HAS_EXT']

try:
    from . import _C  # noqa: F401  (import registers the dynconv::ddf_* kernels with the dispatcher)
    HAS_EXT = True
    _IMPORT_ERROR = ''
except ImportError as e:
    HAS_EXT = False
    _IMPORT_ERROR = str(e)

_NOT_BUILT = 'ops._C is not built: run `pip install --no-build-isolation -e .` in the repository root'


def ddf(
        x: torch.Tensor,
        channel_filter: Optional[torch.Tensor],
        spatial_filter: Optional[torch.Tensor],
        kernel_size: int = 3,
        dilation: int = 1,
        stride: int = 1,
        head: int = 1,
        kernel_combine: str = 'mul',
) -> torch.Tensor:
    """Decoupled dynamic filter with the compiled kernels (CPU or CUDA, picked by the dispatcher).

    out[b, c, i, j] = sum_{u, v} x[b, c, i * s + (u - r) * d, j * s + (v - r) * d] * F[b, c, u, v, i, j] with zero
    padding, r = (k - 1) // 2, and F = sf[b, g, u * k + v, i, j] * cf[b, c, u, v] ('mul') or the sum ('add'), where
    g = c // (C // head). A filter given as None is the identity of the combination and is not read. Inputs of any
    memory format are accepted; the output is contiguous (NCHW). Differentiable once (no double backward). Any odd k
    on CPU and CUDA.

    Args:
        x: Input features (B, C, H, W), float32/float64/float16/bfloat16.
        channel_filter: Per-sample, per-channel filter (B, C, k, k) or None.
        spatial_filter: Per-pixel, per-head filter (B, head * k * k, H // stride, W // stride) or None.
        kernel_size: Odd filter size k.
        dilation: Spacing d between filter taps.
        stride: Output stride s.
        head: Number of spatial filter groups.
        kernel_combine: 'mul' or 'add'.

    Returns:
        Output (B, C, H // stride, W // stride) in the dtype of x.
    """
    if not HAS_EXT:
        raise RuntimeError(f'{_NOT_BUILT} ({_IMPORT_ERROR})')
    return torch.ops.dynconv.ddf_forward.default(
        x, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine)


def _ddf_forward_fake(features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine):
    shape = check_ddf_args(
        features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine)
    return features.new_empty(shape)


def _ddf_backward_fake(
        grad_output, features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine,
        output_mask):
    shape = check_ddf_args(
        features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine)
    torch._check(
        list(grad_output.shape) == list(shape),
        lambda: f'ddf: grad_output must have shape (B, C, H // stride, W // stride) = {list(shape)}, '
                f'got {list(grad_output.shape)}')
    grad_x = features.new_empty(features.shape) if output_mask[0] else features.new_empty(0)
    grad_cf = features.new_empty(channel_filter.shape) if output_mask[1] and channel_filter is not None \
        else features.new_empty(0)
    grad_sf = features.new_empty(spatial_filter.shape) if output_mask[2] and spatial_filter is not None \
        else features.new_empty(0)
    return grad_x, grad_cf, grad_sf


def _ddf_setup_context(ctx, inputs, output):
    features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine = inputs
    ctx.args = (kernel_size, dilation, stride, head, kernel_combine)
    ctx.has_filters = (channel_filter is not None, spatial_filter is not None)
    ctx.save_for_backward(features, channel_filter, spatial_filter)


def _ddf_backward(ctx, grad_output):
    features, channel_filter, spatial_filter = ctx.saved_tensors
    has_cf, has_sf = ctx.has_filters
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and has_cf, ctx.needs_input_grad[2] and has_sf]
    grad_x, grad_cf, grad_sf = torch.ops.dynconv.ddf_backward.default(
        grad_output, features, channel_filter, spatial_filter, *ctx.args, mask)
    return (
        grad_x if mask[0] else None,
        grad_cf if mask[1] else None,
        grad_sf if mask[2] else None,
        None, None, None, None, None,
    )


def _ddf_forward_flop(x_shape, cf_shape, sf_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    # one multiply-add per tap and output element, counted as 2 FLOPs like convolutions
    return 2 * math.prod(out_shape) * kernel_size ** 2


def _ddf_backward_flop(go_shape, x_shape, cf_shape, sf_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    # each computed gradient (non-empty output) costs one multiply-add per tap and output element
    grads = sum(1 for shape in out_shape if math.prod(shape) > 0)
    return 2 * grads * math.prod(go_shape) * kernel_size ** 2


def _ddf_forward_decomposition(
        features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine):
    """`dynconv::ddf_forward` in ATen ops, for torch.onnx.export(dynamo=True) (it replaces every op it cannot
    translate by its entry in torch._decomp's table): `ddf_reference` with the windows of `conv_windows`."""
    b, c, oh, ow = check_ddf_args(
        features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine)
    windows = conv_windows(features, kernel_size, stride, (kernel_size - 1) // 2 * dilation, dilation, oh, ow)
    return filter_windows(windows, channel_filter, spatial_filter, kernel_size, head, kernel_combine)


if HAS_EXT:
    torch.library.register_fake('dynconv::ddf_forward')(_ddf_forward_fake)
    torch.library.register_fake('dynconv::ddf_backward')(_ddf_backward_fake)
    torch.library.register_autograd('dynconv::ddf_forward', _ddf_backward, setup_context=_ddf_setup_context)
    register_flop_formula(torch.ops.dynconv.ddf_forward)(_ddf_forward_flop)
    register_flop_formula(torch.ops.dynconv.ddf_backward)(_ddf_backward_flop)
    register_decomposition(torch.ops.dynconv.ddf_forward.default)(_ddf_forward_decomposition)
