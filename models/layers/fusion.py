"""Folding BatchNorms into the layers beside them: the hooks of timm's `reparameterize_model` (deployment form).

`timm.utils.reparameterize_model(model)` deep-copies the model (unless `inplace=True`) and walks the children of every
module, the root excluded: a child with `fuse()` is replaced by what it returns, one with `reparameterize()` changes
itself in place, and the walk goes on into the child's children. The project's blocks and layers define these hooks
and fold each BatchNorm that runs right after a conv (or right before a linear layer) into it, with the BatchNorm's
running statistics: exact in eval mode only, so a BatchNorm in training mode is refused. A layer that is not an
`nn.Conv2d` folds a following BatchNorm through its own `fuse(bn)` (ODConv2d, DGConv2d).
"""
from typing import Tuple

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ['FusibleResNetBlock', 'bn_scale_shift', 'can_fuse_bn', 'check_eval', 'fuse_bn_linear', 'fuse_conv_bn',
           'fuse_pairs', 'fuse_sequential']


def check_eval(bn: nn.Module) -> None:
    """Refuses to fold a BatchNorm in training mode (its output then depends on the batch, not its statistics)."""
    if bn.training:
        raise RuntimeError('reparameterizing folds BatchNorm running statistics, which is exact in eval mode only: '
                           'call model.eval() before timm.utils.reparameterize_model(model)')


def bn_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel with bn(x) = x * scale + shift in eval mode."""
    check_eval(bn)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    return scale, shift if bn.bias is None else shift + bn.bias


def can_fuse_bn(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) or callable(getattr(conv, 'fuse', None))


@torch.no_grad()
def fuse_conv_bn(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    """`conv` followed by `bn` as one module: torch's conv-BN fusion for an nn.Conv2d, else `conv.fuse(bn)`."""
    check_eval(bn)
    if isinstance(conv, nn.Conv2d):
        return fuse_conv_bn_eval(conv.eval(), bn)
    return conv.fuse(bn)


def fuse_pairs(module: nn.Module, *pairs: Tuple[str, str]) -> None:
    """Folds each BatchNorm `module.<bn_name>` into the conv `module.<conv_name>` that runs right before it; the
    BatchNorm becomes an nn.Identity."""
    for conv_name, bn_name in pairs:
        setattr(module, conv_name, fuse_conv_bn(getattr(module, conv_name), getattr(module, bn_name)))
        setattr(module, bn_name, nn.Identity())


def fuse_sequential(seq: nn.Sequential) -> None:
    """Folds every BatchNorm of an nn.Sequential into the conv before it (where that conv can take it)."""
    names = list(seq._modules)
    for conv_name, bn_name in zip(names, names[1:]):
        if isinstance(seq._modules[bn_name], nn.BatchNorm2d) and can_fuse_bn(seq._modules[conv_name]):
            fuse_pairs(seq, (conv_name, bn_name))


@torch.no_grad()
def fuse_bn_linear(bn: nn.BatchNorm2d, linear: nn.Linear) -> None:
    """Folds a BatchNorm over the input features of `linear` into it (linear(bn(x)) = W (x * s + t) + b); the caller
    replaces the BatchNorm by an identity."""
    scale, shift = bn_scale_shift(bn)
    bias = linear.weight @ shift if linear.bias is None else linear.bias + linear.weight @ shift
    linear.weight = nn.Parameter(linear.weight * scale)
    linear.bias = nn.Parameter(bias)


class FusibleResNetBlock:
    """Mixin for timm ResNet blocks (`BasicBlock`, `Bottleneck` subclasses): `reparameterize()` folds each `bn<i>`
    into the `conv<i>` before it where that conv can take it (a DDFPack or an involution keeps its BatchNorm), and the
    shortcut's BatchNorm into its conv. timm's walk never visits the root, so a ResNet's stem (`conv1`, `bn1` on the
    model itself) keeps its BatchNorm."""

    def reparameterize(self) -> None:
        for i in (1, 2, 3):
            conv, bn = getattr(self, f'conv{i}', None), getattr(self, f'bn{i}', None)
            if isinstance(bn, nn.BatchNorm2d) and can_fuse_bn(conv):
                fuse_pairs(self, (f'conv{i}', f'bn{i}'))
        if isinstance(self.downsample, nn.Sequential):
            fuse_sequential(self.downsample)
