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

__all__ = ['ddf_reference', 'check_ddf_args', 'filter_windows', 'conv_windows']

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
    pad = (kernel_size - 1) // 2 * dilation
    # unfold gives ceil(H / s) positions starting at 0; the op keeps the first H // s (floor, as the original)
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=pad, stride=stride)
    uh = (x.shape[2] - 1) // stride + 1
    uw = (x.shape[3] - 1) // stride + 1
    cols = cols.view(b, c, kernel_size * kernel_size, uh, uw)[..., :oh, :ow]
    return filter_windows(cols, channel_filter, spatial_filter, kernel_size, head, kernel_combine)


def filter_windows(
        windows: torch.Tensor,
        channel_filter: Optional[torch.Tensor],
        spatial_filter: Optional[torch.Tensor],
        kernel_size: int,
        head: int,
        kernel_combine: str,
) -> torch.Tensor:
    """ddf from the input windows it reads (B, C, k * k, H // stride, W // stride) and its checked arguments: the sum
    over the taps of each window times the per-pixel filter F. Returns (B, C, H // stride, W // stride)."""
    b, c, kk, oh, ow = windows.shape
    windows = windows.reshape(b, head, c // head, kk, oh, ow)
    cf = None if channel_filter is None else channel_filter.reshape(b, head, c // head, kk, 1, 1)
    sf = None if spatial_filter is None else spatial_filter.view(b, head, 1, kk, oh, ow)
    if cf is not None and sf is not None:
        filt = sf * cf if kernel_combine == 'mul' else sf + cf
    else:
        filt = cf if sf is None else sf
    if filt is None:
        return windows.sum(3).view(b, c, oh, ow) if kernel_combine == 'mul' else windows.new_zeros(b, c, oh, ow)
    return (windows * filt).sum(3).view(b, c, oh, ow)


def conv_windows(x: torch.Tensor, kernel_size: int, stride: int, padding: int, dilation: int, out_h: int,
                 out_w: int) -> torch.Tensor:
    """im2col without unfold's gather: (B, C, k * k, out_h, out_w), element [b, c, u * k + v, i, j] =
    x[b, c, i * stride + u * dilation - padding, j * stride + v * dilation - padding], zero outside x. Built from 2k
    strided slices (k row windows, then k column windows of those): ONNX exports them as slices, where unfold
    becomes a gather that onnxruntime ran 2-3x slower (the ops' ATen decompositions use this)."""
    if padding:
        x = F.pad(x, (padding,) * 4)
    k, s, d = kernel_size, stride, dilation
    rows = torch.stack([x[:, :, u * d:u * d + (out_h - 1) * s + 1:s] for u in range(k)], 2)
    return torch.stack([rows[..., v * d:v * d + (out_w - 1) * s + 1:s] for v in range(k)], 3).flatten(2, 3)
