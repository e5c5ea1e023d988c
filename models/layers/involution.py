"""Involution: a per-pixel k x k kernel shared by each group of channels, generated from the input at that pixel.

Paper: `Involution: Inverting the Inherence of Convolution for Visual Recognition` - https://arxiv.org/abs/2103.06255
(CVPR 2021). Original release: https://github.com/d-li14/involution (`cls/mmcls/models/utils/involution_naive.py`
and `involution_cuda.py`, read at 21c3158); module and parameter names follow it (`conv1`, `conv2` as mmcv
`ConvModule`s holding `conv`/`bn`), so its mmcls checkpoints load unchanged.

The aggregation is the spatial-filter-only form of the project's `ops.ddf` with one head per channel group: the
release views the generator's output as (B, groups, k, k, H', W'), the channel order of ddf's spatial filter
(B, head * k * k, H', W'), and channel c uses group c // group_channels in both. The release's unfold version needs
every input side divisible by the stride (its generator is floor-sized, its unfold ceil-sized) and its CuPy kernel
reads out of bounds there; here such inputs work: the generator pools with `ceil_mode=True` (a partial last window
averages the pixels it covers) and the aggregation sees the input zero-padded to a multiple of the stride, which
leaves the conv-formula output (ceil(H / s) positions, zero padding) unchanged. Sides divisible by the stride give
exactly the release's result.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ops import ddf_impl

from . import untraceable

__all__ = ['Involution2d', 'ConvModule']


class ConvModule(nn.Module):
    """Conv -> optional BatchNorm -> optional ReLU, with the child names of mmcv's `ConvModule` (`conv`, `bn`,
    `activate`); the conv has a bias exactly when there is no norm (mmcv's `bias='auto'`)."""

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int = 1,
            stride: int = 1,
            padding: int = 0,
            norm: bool = True,
            act: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=not norm, **dd)
        self.bn = nn.BatchNorm2d(out_channels, **dd) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


@untraceable
class Involution2d(nn.Module):
    """Involution with the release's kernel generator: [AvgPool(s, s)] -> 1x1 conv + BN + ReLU -> 1x1 conv (bias).

    out[b, c, i, j] = sum_{u, v} x[b, c, i * s + u - r, j * s + v - r] * W[b, g * k * k + u * k + v, i, j], with
    g = c // group_channels, r = (k - 1) // 2, zero padding, W the generator's output. Output
    (B, C, ceil(H / s), ceil(W / s)).
    """

    def __init__(
            self,
            channels: int,
            kernel_size: int = 7,
            stride: int = 1,
            group_channels: int = 16,
            reduction_ratio: int = 4,
            impl: str = 'ext',
            device=None,
            dtype=None,
    ):
        """
        Args:
            channels: Input and output channels.
            kernel_size: Odd kernel size k.
            stride: Output stride s (the generator sees the input average-pooled by s).
            group_channels: Channels sharing one generated kernel; groups = channels // group_channels.
            reduction_ratio: Channel reduction of the generator's hidden layer.
            impl: 'ext' runs the compiled `ops.ddf`, 'reference' its pure-PyTorch oracle `ops.ddf_reference`.
        """
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be odd and >= 1, got {kernel_size}')
        if stride < 1:
            raise ValueError(f'stride must be >= 1, got {stride}')
        if group_channels < 1 or channels % group_channels:
            raise ValueError(f'channels ({channels}) must be a multiple of group_channels ({group_channels})')
        if channels // reduction_ratio < 1:
            raise ValueError(f'reduction_ratio {reduction_ratio} leaves no hidden channel for {channels} channels')
        dd = {'device': device, 'dtype': dtype}
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.group_channels = group_channels
        self.groups = channels // group_channels
        self.impl = impl
        self._ddf = ddf_impl(impl)
        self.conv1 = ConvModule(channels, channels // reduction_ratio, **dd)
        self.conv2 = ConvModule(
            channels // reduction_ratio, kernel_size ** 2 * self.groups, norm=False, act=False, **dd)
        self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        weight = self.conv2(self.conv1(x if self.avgpool is None else self.avgpool(x)))
        if s > 1:
            pad_h, pad_w = -x.shape[2] % s, -x.shape[3] % s
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h))
        return self._ddf(x, None, weight, kernel_size=self.kernel_size, stride=s, head=self.groups)

    def extra_repr(self) -> str:
        return (f'channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'groups={self.groups}, impl={self.impl}')
