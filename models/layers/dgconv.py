""" Dynamic Grouping Convolution (DGConv)

Paper: `Differentiable Learning-to-Group Channels via Groupable Convolutional Neural Networks`
    - https://arxiv.org/abs/1908.05867 (ICCV 2019)
Reimplementation followed: https://github.com/d-li14/dgconv.pytorch (`dgconv.py`); parameter and buffer names follow
it (`gate`, `D`, `I`, `conv.weight`), so its checkpoints load unchanged.

A dense k x k conv over C = 2^K channels is masked by U = U_1 (x) ... (x) U_K (Kronecker product), with
U_i = (1 - b_i) * eye(2) + b_i * ones(2, 2) and b_i = (sign(g_i) + 1) / 2 the binarised gate i. Gates at 0 give the
block-diagonal mask of 2^K groups (depth-wise), gates at 1 the dense conv; K - sum(b) zeros leave 2^(K - sum(b))
groups. The gates learn through a straight-through estimator.

Inference form (`DGConv2d.fuse`, called by timm's `reparameterize_model`): channel c's bit K - 1 - i is the index of
U_i's factor, so the mask connects two channels exactly when they agree on the bits of the gates below 0. Ordering
the channels by those bits first makes it block-diagonal: a grouped conv with 2^(gates below 0) groups, on the
input channels gathered in that order, its outputs put back.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import unscriptable
from .fusion import bn_scale_shift

__all__ = ['ChannelPermutedConv2d', 'DGConv2d', 'binarize_ste']

GATE_INIT_EPS = 1e-8


class _BinarizeSTE(torch.autograd.Function):
    """(sign(g) + 1) / 2 forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(gate: torch.Tensor) -> torch.Tensor:
        return (torch.sign(gate) + 1) / 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output


def binarize_ste(gate: torch.Tensor) -> torch.Tensor:
    """Binarises gates to {0, 1} (exactly 0 gives 0.5, as in the release) with a straight-through gradient."""
    return _BinarizeSTE.apply(gate)


@unscriptable
class DGConv2d(nn.Module):
    """Conv2d whose channel grouping is learned through log2(C) binary gates (paper Sec. 3).

    Needs in_channels == out_channels == a power of two (the Kronecker mask is square with 2x2 factors).
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            stride: int = 1,
            padding: int = 0,
            dilation: int = 1,
            bias: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_channels: Input channels, a power of two.
            out_channels: Output channels, equal to in_channels.
            kernel_size: Size of the dense conv that the mask groups.
            stride: Conv stride.
            padding: Conv padding.
            dilation: Conv dilation.
            bias: Give the conv a bias.
        """
        super().__init__()
        if in_channels != out_channels:
            raise ValueError(
                f'DGConv2d needs in_channels == out_channels, got {in_channels} and {out_channels}: '
                f'use a plain nn.Conv2d for a layer that changes the width')
        if in_channels < 1 or in_channels & (in_channels - 1):
            raise ValueError(
                f'DGConv2d needs a power-of-two channel count (Kronecker mask of 2x2 factors), got {in_channels}')
        dd = {'device': device, 'dtype': dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.K = int(math.log2(in_channels))
        # Release names: `D` is the identity factor and `I` the all-ones factor.
        self.register_buffer('D', torch.eye(2, **dd))
        self.register_buffer('I', torch.ones(2, 2, **dd))
        self.gate = nn.Parameter(torch.empty(self.K, **dd))
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias,
            **dd)
        self.reset_gates()

    @torch.no_grad()
    def reset_gates(self):
        """Gates at +-1e-8 with random signs (the release's init), drawn from torch's generator."""
        signs = torch.randint(0, 2, self.gate.shape, device=self.gate.device).to(self.gate.dtype) * 2 - 1
        self.gate.copy_(signs * GATE_INIT_EPS)

    def binary_gates(self) -> torch.Tensor:
        """Binarised gates (K,), differentiable w.r.t. `gate` through the straight-through estimator."""
        return binarize_ste(self.gate)

    def mask(self) -> torch.Tensor:
        """The (C, C) Kronecker-product mask of the current gates."""
        b = self.binary_gates()
        mask = self.D.new_ones(1, 1)
        for i in range(self.K):
            mask = torch.kron(mask, (1 - b[i]) * self.D + b[i] * self.I)
        return mask

    def regularizer(self) -> torch.Tensor:
        """Connections kept by the mask, 2^(K + sum of binarised gates) (the release's `U_regularizer`)."""
        return 2 ** (self.K + self.binary_gates().sum())

    def num_groups(self) -> int:
        """Groups of the current mask: 2^(gates below 0) (a gate at exactly 0 connects its two halves)."""
        return 2 ** int((self.gate < 0).sum())

    def group_permutation(self) -> torch.Tensor:
        """Channel order (C,) that makes the mask block-diagonal with `num_groups()` blocks: channels sorted by their
        bits of the gates below 0 (equal bits: one group), then by the others."""
        positions = torch.arange(self.K - 1, -1, -1, device=self.gate.device)  # gate i <-> channel bit K - 1 - i
        bits = (torch.arange(self.in_channels, device=self.gate.device)[:, None] >> positions) & 1
        apart = self.gate < 0
        key = torch.cat([bits[:, apart], bits[:, ~apart]], 1) @ (1 << positions)
        return torch.argsort(key)

    @torch.no_grad()
    def fuse(self, bn: Optional[nn.BatchNorm2d] = None) -> nn.Conv2d:
        """The layer with its current mask, followed by `bn` if given, as a grouped conv: an nn.Conv2d when the
        groups are contiguous channel ranges, else a `ChannelPermutedConv2d`. Exact in eval mode (the gates do not
        depend on the mode; `bn` is folded with its running statistics)."""
        conv = self.conv
        weight = conv.weight * self.mask()[:, :, None, None]
        bias = conv.bias
        if bn is not None:
            scale, shift = bn_scale_shift(bn)
            weight = weight * scale[:, None, None, None]
            bias = shift if bias is None else bias * scale + shift
        groups = self.num_groups()
        size = self.in_channels // groups
        perm = self.group_permutation()
        diagonal = torch.arange(groups, device=perm.device)
        weight = weight[perm][:, perm].view(groups, size, groups, size, *weight.shape[2:])[diagonal, :, diagonal]
        args = (self.in_channels, self.out_channels, conv.kernel_size)
        kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=groups,
                      bias=bias is not None, device=weight.device, dtype=weight.dtype)
        if torch.equal(perm, torch.arange(self.in_channels, device=perm.device)):
            fused = nn.Conv2d(*args, **kwargs)
        else:
            fused = ChannelPermutedConv2d(perm, *args, **kwargs)
        fused.weight.copy_(weight.reshape(fused.weight.shape))
        if bias is not None:
            fused.bias.copy_(bias[perm])
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight * self.mask()[:, :, None, None]
        return F.conv2d(x, weight, self.conv.bias, self.conv.stride, self.conv.padding, self.conv.dilation)

    def extra_repr(self) -> str:
        return f'in_channels={self.in_channels}, out_channels={self.out_channels}, K={self.K}'


class ChannelPermutedConv2d(nn.Conv2d):
    """nn.Conv2d on the input channels gathered in the order `perm`, its outputs put back in the original order: a
    grouped conv whose groups are not contiguous channel ranges (DGConv2d's inference form). `perm` orders the input
    and the output channels alike; a block that owns the neighbouring convs can gather their channels instead
    (`absorb_into`) and leave a plain grouped conv."""

    def __init__(self, perm: torch.Tensor, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer('perm', perm)
        self.register_buffer('inverse', torch.argsort(perm))

    @torch.no_grad()
    def absorb_into(self, before: nn.Conv2d, after: nn.Conv2d) -> nn.Conv2d:
        """The plain grouped conv that replaces this one once `before` (the conv whose output this one reads, through
        channel-wise ops only) emits its channels in `perm` order and `after` (the conv reading this one's output,
        likewise) takes them in that order; changes `before` and `after` in place."""
        before.weight = nn.Parameter(before.weight[self.perm])
        if before.bias is not None:
            before.bias = nn.Parameter(before.bias[self.perm])
        after.weight = nn.Parameter(after.weight[:, self.perm])
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, device=self.weight.device,
                         dtype=self.weight.dtype)
        conv.weight.copy_(self.weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, self.perm])[:, self.inverse]
