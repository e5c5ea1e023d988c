""" OD-ResNet: ResNet whose residual-block convolutions are all ODConvs

Paper: `Omni-Dimensional Dynamic Convolution` - https://openreview.net/forum?id=DmpCfq6Mg39 (ICLR 2022)
Original release: https://github.com/OSVAI/ODConv (`models/od_resnet.py`, torchvision-style ResNet)

Every convolution inside the basic/bottleneck blocks is an `ODConv2d`; the stem and the downsample shortcuts stay
plain convolutions. Built on timm's ResNet (same key names as torchvision's), so the release's state_dicts load with
strict=True. Entrypoint kwargs: `kernel_num` (default 1), `reduction` (0.0625), `attention_norm` ('batch' as released;
'layer' or 'none' train at batch 1), `temp_init` (30) and `temp_epochs` (10) for the temperature annealing driven by
the framework's training hooks. `timm.utils.reparameterize_model` folds every block's BatchNorms into its convs.
"""
import math
from typing import Any, Dict, Optional, Tuple, Type

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from .layers.fusion import FusibleResNetBlock
from .layers.odconv import ODConv2d, ODConvTrainingHooks

__all__ = ['ODBasicBlock', 'ODBottleneck', 'ODResNet']


class ODBasicBlock(FusibleResNetBlock, BasicBlock):
    """timm ResNet basic block with both 3x3 convs as ODConv2d."""

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            aa_layer: Optional[Type[nn.Module]] = None,
            kernel_num: int = 1,
            reduction: float = 0.0625,
            attention_norm: str = 'batch',
            device=None,
            dtype=None,
            **kwargs,
    ):
        """
        Args:
            inplanes .. first_dilation, aa_layer, kwargs: As timm's `BasicBlock`.
            kernel_num: ODConv candidate kernels.
            reduction: ODConv attention reduction ratio.
            attention_norm: ODConv attention norm ('batch', 'layer' or 'none').
        """
        super().__init__(
            inplanes, planes, stride=stride, downsample=downsample, reduce_first=reduce_first, dilation=dilation,
            first_dilation=first_dilation, aa_layer=aa_layer, device=device, dtype=dtype, **kwargs)
        dd = dict(bias=False, reduction=reduction, kernel_num=kernel_num, attention_norm=attention_norm, device=device,
                  dtype=dtype)
        first_planes = planes // reduce_first
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)
        self.conv1 = ODConv2d(
            inplanes, first_planes, 3, stride=1 if use_aa else stride, padding=first_dilation,
            dilation=first_dilation, **dd)
        self.conv2 = ODConv2d(first_planes, planes * self.expansion, 3, padding=dilation, dilation=dilation, **dd)


class ODBottleneck(FusibleResNetBlock, Bottleneck):
    """timm ResNet bottleneck with its 1x1, 3x3 and 1x1 convs as ODConv2d."""

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
            aa_layer: Optional[Type[nn.Module]] = None,
            kernel_num: int = 1,
            reduction: float = 0.0625,
            attention_norm: str = 'batch',
            device=None,
            dtype=None,
            **kwargs,
    ):
        """
        Args:
            inplanes .. first_dilation, aa_layer, kwargs: As timm's `Bottleneck`.
            kernel_num: ODConv candidate kernels.
            reduction: ODConv attention reduction ratio.
            attention_norm: ODConv attention norm ('batch', 'layer' or 'none').
        """
        super().__init__(
            inplanes, planes, stride=stride, downsample=downsample, cardinality=cardinality, base_width=base_width,
            reduce_first=reduce_first, dilation=dilation, first_dilation=first_dilation, aa_layer=aa_layer,
            device=device, dtype=dtype, **kwargs)
        dd = dict(bias=False, reduction=reduction, kernel_num=kernel_num, attention_norm=attention_norm, device=device,
                  dtype=dtype)
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_planes = width // reduce_first
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)
        self.conv1 = ODConv2d(inplanes, first_planes, 1, **dd)
        self.conv2 = ODConv2d(
            first_planes, width, 3, stride=1 if use_aa else stride, padding=first_dilation, dilation=first_dilation,
            groups=cardinality, **dd)
        self.conv3 = ODConv2d(width, planes * self.expansion, 1, **dd)


class ODResNet(ODConvTrainingHooks, ResNet):
    """timm ResNet with ODConv blocks, the release's initialization and the ODConv training hooks."""

    def __init__(
            self,
            block: Type[nn.Module],
            layers: Tuple[int, ...],
            kernel_num: int = 1,
            reduction: float = 0.0625,
            attention_norm: str = 'batch',
            temp_init: float = 30.,
            temp_epochs: float = 10.,
            zero_init_last: bool = False,
            block_args: Optional[Dict[str, Any]] = None,
            **kwargs,
    ):
        """
        Args:
            block: ODBasicBlock or ODBottleneck.
            layers: Blocks per stage.
            kernel_num: ODConv candidate kernels in every block conv.
            reduction: ODConv attention reduction ratio.
            attention_norm: ODConv attention norm: 'batch' (released), 'layer' or 'none' (any training batch size).
            temp_init: Attention temperature at the start of training.
            temp_epochs: Epochs over which the temperature anneals linearly to 1.
            zero_init_last: Zero the last BN of each block (timm option; the release does not).
            block_args: Extra block kwargs.
            **kwargs: timm ResNet kwargs (num_classes, in_chans, drop_rate, drop_path_rate, ...).
        """
        self.temp_init = temp_init
        self.temp_epochs = temp_epochs
        block_args = dict(block_args or {}, kernel_num=kernel_num, reduction=reduction, attention_norm=attention_norm)
        super().__init__(block, layers, zero_init_last=zero_init_last, block_args=block_args, **kwargs)

    def init_weights(self, zero_init_last: bool = False) -> None:
        """timm's init (Kaiming fan-out for every nn.Conv2d, attention fcs included, as released) + the release's
        classifier init N(0, 0.01)."""
        super().init_weights(zero_init_last=zero_init_last)
        if isinstance(self.fc, nn.Linear):
            nn.init.normal_(self.fc.weight, 0, 0.01)
            nn.init.zeros_(self.fc.bias)


def _create_od_resnet(variant: str, pretrained: bool = False, **kwargs) -> ODResNet:
    return build_model_with_cfg(ODResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    # Released weights (Google Drive, one file per kernel_num) load from a local file:
    # models._helpers.load_weights(model, path), train.py --pretrained-path, validate.py --checkpoint.
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'mit', 'paper_ids': 'arXiv:2209.07947', 'origin_url': 'https://github.com/OSVAI/ODConv',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'od_resnet18.in1k': _cfg(),
    'od_resnet34.in1k': _cfg(),
    'od_resnet50.in1k': _cfg(),
    'od_resnet101.in1k': _cfg(),
})


@register_model
def od_resnet18(pretrained: bool = False, **kwargs) -> ODResNet:
    """OD-ResNet-18 (11.94M params with kernel_num=1, 44.90M with 4)."""
    model_args = dict(block=ODBasicBlock, layers=(2, 2, 2, 2))
    return _create_od_resnet('od_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def od_resnet34(pretrained: bool = False, **kwargs) -> ODResNet:
    """OD-ResNet-34 (no published weights)."""
    model_args = dict(block=ODBasicBlock, layers=(3, 4, 6, 3))
    return _create_od_resnet('od_resnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def od_resnet50(pretrained: bool = False, **kwargs) -> ODResNet:
    """OD-ResNet-50 (28.64M params with kernel_num=1, 90.67M with 4)."""
    model_args = dict(block=ODBottleneck, layers=(3, 4, 6, 3))
    return _create_od_resnet('od_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def od_resnet101(pretrained: bool = False, **kwargs) -> ODResNet:
    """OD-ResNet-101 (50.82M params with kernel_num=1, 90.44M with 2)."""
    model_args = dict(block=ODBottleneck, layers=(3, 4, 23, 3))
    return _create_od_resnet('od_resnet101', pretrained, **dict(model_args, **kwargs))
