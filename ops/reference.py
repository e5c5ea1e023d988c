""" Pure-PyTorch reference of the decoupled dynamic filter (DDF) operation.

Same signature and semantics as `ops.ddf` (the compiled op); plain autograd, any device and dtype. It is the oracle of
the tests and the `impl='reference'` choice of the layers, never a silent fallback for the extension.

Semantics follow the original release (theFoxofSky/ddfnet, ddf/ddf.py and its CUDA kernels): output size
(H // stride, W // stride), output pixel (i, j) centred on input pixel (i * stride, j * stride), zero padding
(k - 1) // 2 * dilation, spatial filter channel g * k * k + u * k + v for group g and tap (u, v).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['ddf_reference', 'check_ddf_args']

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_tensor(features: torch.Tensor, t: torch.Tensor, name: str, expected: list, layout: str):
    torch._check(
        t.device == features.device,
        lambda: f'ddf: {name} is on {t.device} but features is on {features.device}')
    torch._check(
        t.dtype == features.dtype,
        lambda: f'ddf: {name} has dtype {t.dtype} but features has dtype {features.dtype}')
    torch._check(
        list(t.shape) == expected,
        lambda: f'ddf: {name} must have shape {layout} = {list(expected)}, got {list(t.shape)}')


def check_ddf_args(
        features: torch.Tensor,
        channel_filter: Optional[torch.Tensor],
        spatial_filter: Optional[torch.Tensor],
        kernel_size: int,
        dilation: int,
        stride: int,
        head: int,
        kernel_combine: str,
) -> Tuple[int, int, int, int]:
    """Checks the arguments of a ddf call (same rules and messages as the C++ checks in ops/csrc/ddf.h).

    Returns:
        The output shape (B, C, H // stride, W // stride).
    """
    torch._check(features.dim() == 4, lambda: f'ddf: features must have shape (B, C, H, W), got {list(features.shape)}')
    torch._check(
        features.dtype in _FLOAT_DTYPES,
        lambda: f'ddf: features must be float32, float64, float16 or bfloat16, got {features.dtype}')
    torch._check(
        kernel_size >= 1 and kernel_size % 2 == 1,
        lambda: f'ddf: kernel_size must be odd and >= 1, got {kernel_size}')
    torch._check(dilation >= 1, lambda: f'ddf: dilation must be >= 1, got {dilation}')
    torch._check(stride >= 1, lambda: f'ddf: stride must be >= 1, got {stride}')
    torch._check(head >= 1, lambda: f'ddf: head must be >= 1, got {head}')
    torch._check(
        kernel_combine in ('mul', 'add'),
        lambda: f"ddf: kernel_combine must be 'mul' or 'add', got '{kernel_combine}'")
    b, c, h, w = features.shape
    torch._check(c % head == 0, lambda: f'ddf: channels ({c}) must be divisible by head ({head})')
    oh, ow = h // stride, w // stride
    if channel_filter is not None:
        _check_tensor(features, channel_filter, 'channel_filter', [b, c, kernel_size, kernel_size], '(B, C, k, k)')
    if spatial_filter is not None:
        _check_tensor(
            features, spatial_filter, 'spatial_filter', [b, head * kernel_size ** 2, oh, ow],
            '(B, head * k * k, H // stride, W // stride)')
    return b, c, oh, ow


def ddf_reference(
        x: torch.Tensor,
        channel_filter: Optional[torch.Tensor],
        spatial_filter: Optional[torch.Tensor],
        kernel_size: int = 3,
        dilation: int = 1,
        stride: int = 1,
        head: int = 1,
        kernel_combine: str = 'mul',
) -> torch.Tensor:
    """Decoupled dynamic filter, unfold formulation.

    out[b, c, i, j] = sum_{u, v} x[b, c, i * s + (u - r) * d, j * s + (v - r) * d] * F[b, c, u, v, i, j] with zero
    padding, r = (k - 1) // 2, and F = sf[b, g, u * k + v, i, j] * cf[b, c, u, v] ('mul') or the sum ('add'), where
    g = c // (C // head). A filter given as None is the identity of the combination (1 for 'mul', 0 for 'add').

    Args:
        x: Input features (B, C, H, W).
        channel_filter: Per-sample, per-channel filter (B, C, k, k) or None.
        spatial_filter: Per-pixel, per-head filter (B, head * k * k, H // stride, W // stride) or None.
        kernel_size: Odd filter size k.
        dilation: Spacing d between filter taps.
        stride: Output stride s.
        head: Number of spatial filter groups; channel c uses group c // (C // head).
        kernel_combine: 'mul' or 'add'.

    Returns:
        Output (B, C, H // stride, W // stride).
    """
    b, c, oh, ow = check_ddf_args(
        x, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine)
    kk = kernel_size * kernel_size
    pad = (kernel_size - 1) // 2 * dilation
    # unfold gives ceil(H / s) positions starting at 0; the op keeps the first H // s (floor, as the original)
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=pad, stride=stride)
    uh = (x.shape[2] - 1) // stride + 1
    uw = (x.shape[3] - 1) // stride + 1
    cols = cols.view(b, head, c // head, kk, uh, uw)[..., :oh, :ow]
    mul = kernel_combine == 'mul'
    if channel_filter is not None:
        cf = channel_filter.reshape(b, head, c // head, kk, 1, 1)
    if spatial_filter is not None:
        sf = spatial_filter.view(b, head, 1, kk, oh, ow)
    if channel_filter is not None and spatial_filter is not None:
        filt = sf * cf if mul else sf + cf
    elif channel_filter is not None:
        filt = cf
    elif spatial_filter is not None:
        filt = sf
    else:
        return cols.sum(3).view(b, c, oh, ow) if mul else x.new_zeros(b, c, oh, ow)
    return (cols * filt).sum(3).view(b, c, oh, ow)
