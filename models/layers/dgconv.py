""" Dynamic Grouping Convolution (DGConv)

Paper: `Differentiable Learning-to-Group Channels via Groupable Convolutional Neural Networks`
    - https://arxiv.org/abs/1908.05867 (ICCV 2019)
Reimplementation followed: https://github.com/d-li14/dgconv.pytorch (`dgconv.py`); parameter and buffer names follow
it (`gate`, `D`, `I`, `conv.weight`), so its checkpoints load unchanged.

A dense k x k conv over C = 2^K channels is masked by U = U_1 (x) ... (x) U_K (Kronecker product), with
U_i = (1 - b_i) * eye(2) + b_i * ones(2, 2) and b_i = (sign(g_i) + 1) / 2 the binarised gate i. Gates at 0 give the
block-diagonal mask of 2^K groups (depth-wise), gates at 1 the dense conv; K - sum(b) zeros leave 2^(K - sum(b))
groups. The gates learn through a straight-through estimator.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import unscriptable

__all__ = ['DGConv2d', 'binarize_ste']

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight * self.mask()[:, :, None, None]
        return F.conv2d(x, weight, self.conv.bias, self.conv.stride, self.conv.padding, self.conv.dilation)

    def extra_repr(self) -> str:
        return f'in_channels={self.in_channels}, out_channels={self.out_channels}, K={self.K}'
