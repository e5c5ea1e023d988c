""" G-ResNeXt: ResNeXt with learned channel grouping (DGConv)

Paper: `Differentiable Learning-to-Group Channels via Groupable Convolutional Neural Networks`
    - https://arxiv.org/abs/1908.05867 (ICCV 2019)
Reimplementation followed: https://github.com/d-li14/dgconv.pytorch (`g_resnext.py`, torchvision's ResNet)

Each bottleneck's grouped 3x3 conv becomes a dense `DGConv2d`; the ResNeXt cardinality and base width only set the
bottleneck width (32x4d: 128..1024, 32x8d: 256..2048), as in the release. Built on timm's ResNet, whose names are
torchvision's, so the release's checkpoints ({'state_dict': {'module.' + key}}) load with strict=True once unwrapped.

Unlike the release, `forward` returns logits only: the group regularizer reaches the loss through the generic
training hook `auxiliary_loss()`, weighted by `reg_weight` (0 disables it) in the form `reg_form`:
    'raw': sum over layers of 2^(K + sum of binarised gates), the kept mask entries (release; paper Eq. 9);
    'normalized': mean over layers of that count divided by C^2, the kept fraction of dense connections in [0, 1].

`timm.utils.reparameterize_model` (eval mode) turns each DGConv into the grouped conv its gates learned, with the
block's BatchNorms folded in; the channel order that makes its groups contiguous is taken by the neighbouring 1x1
convs, so the fused bottleneck is a plain ResNeXt one (inference only: without DGConvs there is no regularizer).
"""
from typing import Any, Dict, List, Optional, Type

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from .layers.dgconv import ChannelPermutedConv2d, DGConv2d
from .layers.fusion import FusibleResNetBlock

__all__ = ['GBottleneck', 'GResNet']

REG_FORMS = ('raw', 'normalized')


class GBottleneck(FusibleResNetBlock, Bottleneck):
    """timm ResNet bottleneck whose 3x3 conv (`conv2`) is a dense DGConv2d of the bottleneck width."""

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
            device=None,
            dtype=None,
    ):
        """
        Args:
            inplanes .. drop_path: As timm's `Bottleneck`; cardinality and base_width only set the width.
        """
        if reduce_first != 1:
            raise ValueError(f'GBottleneck needs reduce_first=1 (DGConv keeps the channel count), got {reduce_first}')
        super().__init__(
            inplanes, planes, stride=stride, downsample=downsample, cardinality=cardinality, base_width=base_width,
            reduce_first=reduce_first, dilation=dilation, first_dilation=first_dilation, act_layer=act_layer,
            norm_layer=norm_layer, attn_layer=attn_layer, aa_layer=aa_layer, drop_block=drop_block,
            drop_path=drop_path, device=device, dtype=dtype)
        width = self.conv2.out_channels
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)
        self.conv2 = DGConv2d(
            width, width, 3, stride=1 if use_aa else stride, padding=first_dilation, dilation=first_dilation,
            bias=False, device=device, dtype=dtype)

    def reparameterize(self) -> None:
        """timm's `reparameterize_model` hook (eval mode): BatchNorms folded, the DGConv a grouped conv whose channel
        order conv1 emits and conv3 takes (between them only channel-wise ops: activations, anti-aliasing)."""
        super().reparameterize()
        if isinstance(self.conv2, ChannelPermutedConv2d):
            self.conv2 = self.conv2.absorb_into(self.conv1, self.conv3)


class GResNet(ResNet):
    """timm ResNet with DGConv bottlenecks and the group regularizer as an auxiliary loss.

    Implements the training-hook protocol of train.py (`training.hooks.TrainingHooks`): the regularizer is its
    auxiliary loss, the learned group counts its log; it has no progress schedule and no state beyond the weights.
    """

    def __init__(self, *args, reg_weight: float = 0., reg_form: str = 'raw', **kwargs):
        """
        Args:
            *args, **kwargs: As timm's `ResNet`.
            reg_weight: Weight of the group regularizer in the loss (0 disables it).
            reg_form: 'raw' (release) or 'normalized' (see the module docstring).
        """
        if reg_form not in REG_FORMS:
            raise ValueError(f"reg_form must be one of {REG_FORMS}, got '{reg_form}'")
        if reg_weight < 0:
            raise ValueError(f'reg_weight must be >= 0, got {reg_weight}')
        super().__init__(*args, **kwargs)
        self.reg_weight = reg_weight
        self.reg_form = reg_form

    def dgconv_layers(self) -> Dict[str, DGConv2d]:
        """Every DGConv2d by module name."""
        return {name: m for name, m in self.named_modules() if isinstance(m, DGConv2d)}

    def group_regularizer(self) -> torch.Tensor:
        """The unweighted regularizer in the configured form; differentiable w.r.t. the gates (STE)."""
        layers = self.dgconv_layers().values()
        if not layers:
            raise RuntimeError('this G-ResNeXt was reparameterized for inference (its DGConvs are plain grouped '
                               'convs): train the model before timm.utils.reparameterize_model')
        if self.reg_form == 'raw':
            return torch.stack([m.regularizer() for m in layers]).sum()
        return torch.stack([m.regularizer() / m.in_channels ** 2 for m in layers]).mean()

    def set_training_progress(self, epochs: float) -> None:
        """The regularizer weight is constant: nothing follows the progress."""

    def scheduled_values(self, epochs: float) -> Dict[str, float]:
        return {}

    def auxiliary_loss_terms(self) -> List[Dict[str, Any]]:
        return [{'name': f'group_regularizer_{self.reg_form}', 'weight': self.reg_weight}] if self.reg_weight else []

    def auxiliary_loss(self) -> Optional[torch.Tensor]:
        """Weighted group regularizer for the training loss, None when reg_weight is 0."""
        if not self.reg_weight:
            return None
        return self.reg_weight * self.group_regularizer()

    def training_hook_state(self) -> Dict[str, Any]:
        """The gates are weights: nothing to keep beyond the state_dict."""
        return {}

    def load_training_hook_state(self, state: Dict[str, Any]) -> None:
        """Nothing to restore (see `training_hook_state`)."""

    def training_hook_log(self) -> Dict[str, float]:
        """Learned number of channel groups of each DGConv layer."""
        return {f'groups/{name}': float(m.num_groups()) for name, m in self.dgconv_layers().items()}


def _create_g_resnext(variant: str, pretrained: bool = False, **kwargs) -> GResNet:
    return build_model_with_cfg(GResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:1908.05867', 'origin_url': 'https://github.com/d-li14/dgconv.pytorch',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'g_resnext50.in1k': _cfg(),
    'g_resnext101.in1k': _cfg(),
})


@register_model
def g_resnext50(pretrained: bool = False, **kwargs) -> GResNet:
    """G-ResNeXt-50 (32x4d widths, dense DGConv 3x3; 68.88M stored params)."""
    model_args = dict(block=GBottleneck, layers=(3, 4, 6, 3), cardinality=32, base_width=4, zero_init_last=False)
    return _create_g_resnext('g_resnext50', pretrained, **dict(model_args, **kwargs))


@register_model
def g_resnext101(pretrained: bool = False, **kwargs) -> GResNet:
    """G-ResNeXt-101 (32x8d widths, dense DGConv 3x3; 419.63M stored params)."""
    model_args = dict(block=GBottleneck, layers=(3, 4, 23, 3), cardinality=32, base_width=8, zero_init_last=False)
    return _create_g_resnext('g_resnext101', pretrained, **dict(model_args, **kwargs))
