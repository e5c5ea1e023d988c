""" Decoupled Dynamic Filter (DDF) layers: FilterNorm, DDFPack and DDFUpPack

Paper: `Decoupled Dynamic Filter Networks` - https://arxiv.org/abs/2104.14107 (CVPR 2021)
Original release: https://github.com/theFoxofSky/ddfnet (`ddf/ddf.py`); module and parameter names follow it, so its
checkpoints load unchanged.

Differences from the release: `DDFUpPack` works (the release never stored `scale_factor`), `head > 1` is supported
(the release asserted `head == 1`; its spatial branch then predicts one filter per head), and the filters are applied
by the project's `ops.ddf` (CPU and CUDA) or, with `impl='reference'`, by the pure-PyTorch `ops.ddf_reference`.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import calculate_gain

from ops import ddf_impl

from . import untraceable

__all__ = ['FilterNorm', 'DDFPack', 'DDFUpPack']


class FilterNorm(nn.Module):
    """Normalises predicted filters to zero mean and a fixed or learned standard deviation (paper Sec. 3.3).

    Every filter is standardised over its own k*k taps (unbiased std, as in the release), then scaled by
    `calculate_gain(nonlinearity) / kernel_size`, or by a learned per-tap std initialised to that value times N(0, 1)
    (the release's init).
    A spatial filter (B, in_channels*k*k, H, W) holds one k*k filter per pixel and head; a channel filter
    (B, in_channels*k*k, 1, 1) or (B, in_channels*k*k) one per channel. Returns (B, in_channels*k*k, H, W) for
    spatial and (B, in_channels*k*k) for channel filters.
    """

    def __init__(
            self,
            in_channels: int,
            kernel_size: int,
            filter_type: str,
            nonlinearity: str = 'linear',
            running_std: bool = False,
            running_mean: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_channels: Number of filters per position: heads for spatial filters, channels for channel filters.
            kernel_size: Filter size k.
            filter_type: 'spatial' or 'channel'.
            nonlinearity: Non-linearity after the dynamic filter; sets the target std through its gain.
            running_std: Learn a per-tap std (parameter `std`) instead of the fixed gain.
            running_mean: Learn a per-tap mean (parameter `mean`) added after scaling.
        """
        super().__init__()
        if filter_type not in ('spatial', 'channel'):
            raise ValueError(f"filter_type must be 'spatial' or 'channel', got '{filter_type}'")
        if in_channels < 1:
            raise ValueError(f'in_channels must be >= 1, got {in_channels}')
        dd = {'device': device, 'dtype': dtype}
        self.in_channels = in_channels
        self.kernel_size = kernel_size
        self.filter_type = filter_type
        self.gain = calculate_gain(nonlinearity) / kernel_size
        num_taps = in_channels * kernel_size ** 2
        self.std = nn.Parameter(torch.randn(num_taps, **dd) * self.gain) if running_std else None
        self.mean = nn.Parameter(torch.randn(num_taps, **dd)) if running_mean else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        taps = self.kernel_size ** 2
        if self.filter_type == 'spatial':
            h, w = x.shape[-2:]
            x = _standardize(x.reshape(b, self.in_channels, taps, h, w), dim=2)
            scale = self.gain if self.std is None else self.std.view(1, self.in_channels, taps, 1, 1)
            x = x * scale
            if self.mean is not None:
                x = x + self.mean.view(1, self.in_channels, taps, 1, 1)
            return x.reshape(b, self.in_channels * taps, h, w)
        x = _standardize(x.reshape(b, self.in_channels, taps), dim=2).flatten(1)
        x = x * (self.gain if self.std is None else self.std)
        if self.mean is not None:
            x = x + self.mean
        return x


def _standardize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(x - mean) / (unbiased std + 1e-10) along `dim`, as the release.

    Written out because torch's std/var reductions are far slower on CPU than these mean and sum reductions (torch
    2.14, one thread: 4.7 ms vs 0.07 ms over the taps of an (8, 9, 56, 56) spatial filter).
    """
    centered = x - x.mean(dim, keepdim=True)
    std = (centered.square().sum(dim, keepdim=True) / (x.shape[dim] - 1)).sqrt()
    return centered / (std + 1e-10)


class _PointwiseConv2d(nn.Conv2d):
    """nn.Conv2d(kernel_size=1, stride=s) computed faster on CPU, same maths (torch 2.14, one thread):

    - stride > 1 subsamples first, so the backward is a stride-1 conv plus a scatter instead of oneDNN's strided
      backward (18 ms vs 3 ms for (8, 128, 40, 40) -> 9 channels at stride 2, forward + backward);
    - a 1x1 input (the channel branch after pooling) goes through F.linear, 5x faster than conv2d there.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, device=None, dtype=None):
        super().__init__(in_channels, out_channels, 1, stride=stride, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        if sh > 1 or sw > 1:
            x = x[:, :, ::sh, ::sw]
        if x.shape[-2:] == (1, 1):
            return F.linear(x.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None]
        return F.conv2d(x, self.weight, self.bias)


class _GlobalAvgPool(nn.Module):
    """Global average pool to (B, C, 1, 1) as a sum then a scale: unlike mean's, the backward of a sum is a view
    (no full-size division), which saves a pass over the input per DDF layer in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum((2, 3), keepdim=True) * (1.0 / (x.shape[2] * x.shape[3]))


def _spatial_branch(
        in_channels: int,
        kernel_size: int,
        head: int,
        nonlinearity: str,
        stride: int,
        gen_kernel_size: int,
        dd: dict,
) -> nn.Sequential:
    """Spatial filter generator: (depth-wise gen_kernel_size conv ->) 1x1 conv -> FilterNorm, as in the release."""
    out_channels = head * kernel_size ** 2
    if gen_kernel_size > 1:
        return nn.Sequential(
            nn.Conv2d(
                in_channels, in_channels, gen_kernel_size, stride=stride, padding=gen_kernel_size // 2,
                groups=in_channels, **dd),
            _PointwiseConv2d(in_channels, out_channels, **dd),
            FilterNorm(head, kernel_size, 'spatial', nonlinearity, **dd),
        )
    return nn.Sequential(
        _PointwiseConv2d(in_channels, out_channels, stride=stride, **dd),
        FilterNorm(head, kernel_size, 'spatial', nonlinearity, **dd),
    )


def _channel_branch(
        in_channels: int,
        kernel_size: int,
        nonlinearity: str,
        se_ratio: float,
        dd: dict,
) -> nn.Sequential:
    """Channel filter generator: GAP -> 1x1 -> ReLU -> 1x1 -> FilterNorm with learned std (SE-like)."""
    mid_channels = int(in_channels * se_ratio)
    if mid_channels < 1:
        raise ValueError(
            f'se_ratio {se_ratio} leaves no hidden channel for {in_channels} input channels: '
            f'use se_ratio >= {1 / in_channels:.3g}')
    return nn.Sequential(
        _GlobalAvgPool(),
        _PointwiseConv2d(in_channels, mid_channels, **dd),
        nn.ReLU(inplace=True),
        _PointwiseConv2d(mid_channels, in_channels * kernel_size ** 2, **dd),
        FilterNorm(in_channels, kernel_size, 'channel', nonlinearity, running_std=True, **dd),
    )


def _check_ddf_args(in_channels: int, kernel_size: int, head: int, kernel_combine: str):
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be odd and >= 1, got {kernel_size}')
    if head < 1 or in_channels % head:
        raise ValueError(f'head must be >= 1 and divide in_channels ({in_channels}), got {head}')
    if kernel_combine not in ('mul', 'add'):
        raise ValueError(f"kernel_combine must be 'mul' or 'add', got '{kernel_combine}'")


@untraceable
class DDFPack(nn.Module):
    """DDF module: predicts a per-pixel spatial filter and a per-sample channel filter from the input and applies
    their combination as a k x k depth-wise filter (paper Fig. 2). Output (B, C, H // stride, W // stride).
    """

    def __init__(
            self,
            in_channels: int,
            kernel_size: int = 3,
            stride: int = 1,
            dilation: int = 1,
            head: int = 1,
            se_ratio: float = 0.2,
            nonlinearity: str = 'relu',
            gen_kernel_size: int = 1,
            kernel_combine: str = 'mul',
            impl: str = 'ext',
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_channels: Channels of input and output.
            kernel_size: Size k of the dynamic filter (odd).
            stride: Output stride; the spatial filter is predicted at the output resolution.
            dilation: Dilation of the dynamic filter.
            head: Number of spatial filters per pixel, each shared by in_channels // head consecutive channels.
            se_ratio: Hidden width of the channel branch relative to in_channels.
            nonlinearity: Non-linearity that follows the module (sets the FilterNorm target std).
            gen_kernel_size: Kernel of an extra depth-wise conv in the spatial branch (1: none).
            kernel_combine: How the two filters combine: 'mul' or 'add'.
            impl: 'ext' (compiled `ops.ddf`) or 'reference' (pure PyTorch `ops.ddf_reference`).
        """
        super().__init__()
        _check_ddf_args(in_channels, kernel_size, head, kernel_combine)
        dd = {'device': device, 'dtype': dtype}
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.head = head
        self.kernel_combine = kernel_combine
        self.impl = impl
        self._ddf = ddf_impl(impl)
        self.spatial_branch = _spatial_branch(
            in_channels, kernel_size, head, nonlinearity, stride, gen_kernel_size, dd)
        self.channel_branch = _channel_branch(in_channels, kernel_size, nonlinearity, se_ratio, dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h % self.stride or w % self.stride:
            # The strided 1x1 conv predicts ceil(H / s) rows, the release's op wants floor(H / s).
            raise ValueError(
                f'DDFPack with stride {self.stride} needs input height and width divisible by it, got {h}x{w}: '
                f'resize the input (for DDF-ResNets, to a multiple of 32)')
        channel_filter = self.channel_branch(x).view(b, c, self.kernel_size, self.kernel_size)
        spatial_filter = self.spatial_branch(x)
        return self._ddf(
            x, channel_filter, spatial_filter, self.kernel_size, self.dilation, self.stride, self.head,
            self.kernel_combine)

    def extra_repr(self) -> str:
        return (f'kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, head={self.head}, '
                f'kernel_combine={self.kernel_combine}, impl={self.impl}')


@untraceable
class DDFUpPack(nn.Module):
    """DDF upsampler (paper Sec. 4.3): scale_factor**2 DDF branches, one per sub-pixel position, interleaved by a
    pixel shuffle. Output (B, C, H * scale_factor, W * scale_factor).

    The spatial filters may be predicted from a guidance map `joint_x` of the same height and width
    (`joint_channels > 0`), e.g. a higher-level feature in an FPN.
    """

    def __init__(
            self,
            in_channels: int,
            kernel_size: int = 3,
            scale_factor: int = 2,
            dilation: int = 1,
            head: int = 1,
            se_ratio: float = 0.2,
            nonlinearity: str = 'linear',
            gen_kernel_size: int = 1,
            joint_channels: int = -1,
            kernel_combine: str = 'mul',
            impl: str = 'ext',
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_channels: Channels of input and output.
            kernel_size: Size k of the dynamic filters (odd).
            scale_factor: Integer upsampling factor.
            dilation: Dilation of the dynamic filters.
            head: Number of spatial filters per pixel and branch.
            se_ratio: Hidden width of the channel branches relative to in_channels.
            nonlinearity: Non-linearity that follows the module (sets the FilterNorm target std).
            gen_kernel_size: Kernel of an extra depth-wise conv in the spatial branches (1: none; at least 3 with
                joint_channels > 0, as in the release).
            joint_channels: Channels of the guidance input `joint_x` of `forward` (<= 0: the spatial filters are
                predicted from `x`).
            kernel_combine: How the two filters combine: 'mul' or 'add'.
            impl: 'ext' (compiled `ops.ddf`) or 'reference' (pure PyTorch `ops.ddf_reference`).
        """
        super().__init__()
        _check_ddf_args(in_channels, kernel_size, head, kernel_combine)
        if scale_factor < 1:
            raise ValueError(f'scale_factor must be an integer >= 1, got {scale_factor}')
        dd = {'device': device, 'dtype': dtype}
        self.kernel_size = kernel_size
        self.scale_factor = scale_factor
        self.dilation = dilation
        self.head = head
        self.kernel_combine = kernel_combine
        self.impl = impl
        self._ddf = ddf_impl(impl)
        if joint_channels > 0:
            gen_kernel_size = max(gen_kernel_size, 3)
        else:
            joint_channels = in_channels
        num_branches = scale_factor ** 2
        self.spatial_branch = nn.ModuleList([
            _spatial_branch(joint_channels, kernel_size, head, nonlinearity, 1, gen_kernel_size, dd)
            for _ in range(num_branches)])
        self.channel_branch = nn.ModuleList([
            _channel_branch(in_channels, kernel_size, nonlinearity, se_ratio, dd)
            for _ in range(num_branches)])

    def forward(self, x: torch.Tensor, joint_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        joint_x = x if joint_x is None else joint_x
        b, c, h, w = x.shape
        outs = []
        for spatial_branch, channel_branch in zip(self.spatial_branch, self.channel_branch):
            channel_filter = channel_branch(x).view(b, c, self.kernel_size, self.kernel_size)
            spatial_filter = spatial_branch(joint_x)
            outs.append(self._ddf(
                x, channel_filter, spatial_filter, self.kernel_size, self.dilation, 1, self.head,
                self.kernel_combine))
        # Branch i * s + j fills sub-pixel (i, j) of each output s x s cell.
        out = torch.stack(outs, dim=2).reshape(b, c * self.scale_factor ** 2, h, w)
        return F.pixel_shuffle(out, self.scale_factor)

    def extra_repr(self) -> str:
        return (f'kernel_size={self.kernel_size}, scale_factor={self.scale_factor}, dilation={self.dilation}, '
                f'head={self.head}, kernel_combine={self.kernel_combine}, impl={self.impl}')
