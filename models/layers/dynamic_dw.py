"""Dynamic depth-wise convolutions of DWNet, on the `ops` ddf family.

Paper: "On the Connection between Local Attention and Dynamic Depth-wise Convolution" (ICLR 2022),
https://arxiv.org/abs/2106.04263. Original code: https://github.com/Atten4Vis/DemystifyLocalViT
(`models/dwnet.py` at 4aa8326 for `DynamicDWConv`, `models/idynamic.py` for `IDynamicDWConv`); parameter names here
are that release's, so its checkpoints load with `strict=True`.

* `DynamicDWConv` (homogeneous): one k x k kernel per sample and channel, predicted from the globally pooled input
  (GAP -> 1x1 -> BN -> ReLU -> 1x1) plus a static per-channel bias; the channel-only form of ddf.
* `IDynamicDWConv` (inhomogeneous, involution-like): one k x k kernel per pixel and channel group, predicted by
  1x1 -> BN -> ReLU -> 1x1 at every position, no bias; the spatial-only form of ddf with `head = groups`.

The original computes `DynamicDWConv` as one conv over the batch folded into B*C groups; on CPU (2 threads, whole
dynamic_dwnet_tiny, alternating runs) ddf measured slightly faster for both inference and training, so it is used.
"""
import torch
from torch import nn

from ops import ddf_impl

from . import untraceable

__all__ = ['DynamicDWConv', 'IDynamicDWConv']


@untraceable
class DynamicDWConv(nn.Module):
    """Per-sample dynamic depth-wise convolution (stride 1, zero 'same' padding).

    `out[b, c] = x[b, c] * W[b, c] + bias[c]`, with `W = conv2(relu(bn(conv1(GAP(x)))))` viewed as (B, C, k, k):
    conv2's output channel `c*k*k + u*k + v` is tap (u, v) of channel c, exactly ddf's channel-filter layout.
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int = 7,
            reduction: int = 4,
            bias: bool = True,
            impl: str = 'ext',
    ):
        """
        Args:
            dim: Input and output channels.
            kernel_size: Odd spatial size k of the predicted kernels.
            reduction: Channel reduction of the kernel generator's hidden layer.
            bias: Add a learned per-channel bias (static, shared by all samples) after the convolution.
            impl: 'ext' runs the compiled `ops.ddf`, 'reference' its pure-PyTorch oracle `ops.ddf_reference`.
        """
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd for same padding, got {kernel_size}')
        self.dim = dim
        self.kernel_size = kernel_size
        self.impl = impl
        self._ddf = ddf_impl(impl)
        self.conv1 = nn.Conv2d(dim, dim // reduction, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim // reduction)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(dim // reduction, dim * kernel_size * kernel_size, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter('bias', None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        if self.training and B == 1:
            raise ValueError(
                'DynamicDWConv got a training batch of 1: its BatchNorm over pooled features needs >= 2 samples per '
                'device. Drop the last incomplete batch (drop_last=True), use a larger batch, or call model.eval().')
        k = self.kernel_size
        weight = self.conv2(self.relu(self.bn(self.conv1(x.mean((2, 3), keepdim=True)))))
        out = self._ddf(x, weight.reshape(B, C, k, k), None, kernel_size=k)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return f'dim={self.dim}, kernel_size={self.kernel_size}, impl={self.impl}'


@untraceable
class IDynamicDWConv(nn.Module):
    """Inhomogeneous (per-pixel, per-group) dynamic depth-wise convolution (stride 1, zero 'same' padding).

    `out[b, c, i, j] = sum_{u,v} x[b, c, i+u-r, j+v-r] * W[b, g*k*k + u*k + v, i, j]` with `g = c // group_channels`
    and `W = conv2(conv1(x))`; the original kernel views W as (B, groups, k, k, H, W), the same channel order as
    ddf's spatial filter (B, head*k*k, H, W), so no permutation is needed.
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int = 7,
            group_channels: int = 16,
            reduction: int = 4,
            impl: str = 'ext',
    ):
        """
        Args:
            dim: Input and output channels.
            kernel_size: Odd spatial size k of the predicted kernels.
            group_channels: Channels sharing one predicted kernel; groups = dim // group_channels. The original
                config calls this INHOMO_HEADS although it is channels per group, not the number of groups.
            reduction: Channel reduction of the kernel generator's hidden layer.
            impl: 'ext' runs the compiled `ops.ddf`, 'reference' its pure-PyTorch oracle `ops.ddf_reference`.
        """
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd for same padding, got {kernel_size}')
        if dim % group_channels != 0:
            raise ValueError(f'dim ({dim}) must be divisible by group_channels ({group_channels})')
        self.dim = dim
        self.kernel_size = kernel_size
        self.groups = dim // group_channels
        self.impl = impl
        self._ddf = ddf_impl(impl)
        self.conv1 = nn.Sequential(
            nn.Conv2d(dim, dim // reduction, 1),
            nn.BatchNorm2d(dim // reduction),
            nn.ReLU(),
        )
        self.conv2 = nn.Sequential(nn.Conv2d(dim // reduction, kernel_size * kernel_size * self.groups, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv2(self.conv1(x))
        return self._ddf(x, None, weight, kernel_size=self.kernel_size, head=self.groups)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, kernel_size={self.kernel_size}, groups={self.groups}, impl={self.impl}'
