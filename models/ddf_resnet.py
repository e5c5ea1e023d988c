""" DDF-ResNet: ResNet with Decoupled Dynamic Filter bottlenecks

Paper: `Decoupled Dynamic Filter Networks` - https://arxiv.org/abs/2104.14107 (CVPR 2021)
Original release: https://github.com/theFoxofSky/ddfnet (`ddf_resnet.py`, on timm 0.4.5's ResNet)

Each bottleneck's 3x3 conv is replaced by a `DDFPack` (se_ratio 0.2); everything else is timm's ResNet, so the
state_dict keys are the release's and its checkpoints load with strict=True. Extra entrypoint kwargs `se_ratio`,
`gen_kernel_size` and `impl` ('ext' or 'reference') go to every DDF bottleneck. `timm.utils.reparameterize_model`
folds the BatchNorms after the 1x1 convs and the shortcuts (the DDF op has no bias to take the one after a DDFPack).
"""
import math
from typing import Any, Dict, Optional, Type

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from .layers.ddf import DDFPack
from .layers.fusion import FusibleResNetBlock

__all__ = ['DDFBottleneck']

_BLOCK_KWARGS = ('kernel_combine', 'se_ratio', 'gen_kernel_size', 'impl')


class DDFBottleneck(FusibleResNetBlock, Bottleneck):
    """timm ResNet bottleneck whose 3x3 conv (`conv2`) is a DDFPack."""

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            cardinality: int = 1,
            base_width: int = 64,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            attn_layer: Optional[Type[nn.Module]] = None,
            aa_layer: Optional[Type[nn.Module]] = None,
            drop_block: Optional[Type[nn.Module]] = None,
            drop_path: Optional[nn.Module] = None,
            kernel_combine: str = 'mul',
            se_ratio: float = 0.2,
            gen_kernel_size: int = 1,
            impl: str = 'ext',
            device=None,
            dtype=None,
    ):
        """
        Args:
            inplanes .. drop_path: As timm's `Bottleneck`.
            kernel_combine: 'mul' or 'add' combination of the spatial and channel filters.
            se_ratio: Hidden width of DDFPack's channel branch relative to the bottleneck width.
            gen_kernel_size: Extra depth-wise conv in DDFPack's spatial branch (1: none).
            impl: 'ext' (compiled op) or 'reference' (pure PyTorch) for the DDF operation.
        """
        if reduce_first != 1:
            raise ValueError(f'DDFBottleneck needs reduce_first=1 (DDF keeps the channel count), got {reduce_first}')
        super().__init__(
            inplanes, planes, stride=stride, downsample=downsample, cardinality=cardinality, base_width=base_width,
            reduce_first=reduce_first, dilation=dilation, first_dilation=first_dilation, act_layer=act_layer,
            norm_layer=norm_layer, attn_layer=attn_layer, aa_layer=aa_layer, drop_block=drop_block,
            drop_path=drop_path, device=device, dtype=dtype)
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)
        self.conv2 = DDFPack(
            width, kernel_size=3, stride=1 if use_aa else stride, dilation=first_dilation, se_ratio=se_ratio,
            gen_kernel_size=gen_kernel_size, kernel_combine=kernel_combine, impl=impl, device=device, dtype=dtype)


def _create_ddf_resnet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    block_args = dict(kwargs.pop('block_args', None) or {})
    for key in _BLOCK_KWARGS:
        if key in kwargs:
            block_args[key] = kwargs.pop(key)
    return build_model_with_cfg(ResNet, variant, pretrained, block_args=block_args, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'mit', 'paper_ids': 'arXiv:2104.14107', 'origin_url': 'https://github.com/theFoxofSky/ddfnet',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'ddf_mul_resnet50.in1k': _cfg(),
    'ddf_mul_resnet101.in1k': _cfg(),
    'ddf_mul_resnet152.in1k': _cfg(),
    'ddf_add_resnet50.in1k': _cfg(),
    'ddf_add_resnet101.in1k': _cfg(),
    'ddf_add_resnet152.in1k': _cfg(),
})


@register_model
def ddf_mul_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-50, multiplicative filter combination (16.84M params)."""
    model_args = dict(block=DDFBottleneck, layers=(3, 4, 6, 3), kernel_combine='mul')
    return _create_ddf_resnet('ddf_mul_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def ddf_mul_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-101, multiplicative filter combination (28.15M params)."""
    model_args = dict(block=DDFBottleneck, layers=(3, 4, 23, 3), kernel_combine='mul')
    return _create_ddf_resnet('ddf_mul_resnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def ddf_mul_resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-152, multiplicative filter combination."""
    model_args = dict(block=DDFBottleneck, layers=(3, 8, 36, 3), kernel_combine='mul')
    return _create_ddf_resnet('ddf_mul_resnet152', pretrained, **dict(model_args, **kwargs))


@register_model
def ddf_add_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-50, additive filter combination (16.84M params)."""
    model_args = dict(block=DDFBottleneck, layers=(3, 4, 6, 3), kernel_combine='add')
    return _create_ddf_resnet('ddf_add_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def ddf_add_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-101, additive filter combination (28.15M params)."""
    model_args = dict(block=DDFBottleneck, layers=(3, 4, 23, 3), kernel_combine='add')
    return _create_ddf_resnet('ddf_add_resnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def ddf_add_resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-152, additive filter combination."""
    model_args = dict(block=DDFBottleneck, layers=(3, 8, 36, 3), kernel_combine='add')
    return _create_ddf_resnet('ddf_add_resnet152', pretrained, **dict(model_args, **kwargs))
