""" RedNet: ResNet with involution in place of every bottleneck's 3x3 conv and in the stem

Paper: `Involution: Inverting the Inherence of Convolution for Visual Recognition` - https://arxiv.org/abs/2103.06255
(CVPR 2021). Original release: https://github.com/d-li14/involution (`cls/mmcls/models/backbones/rednet.py` and the
configs `cls/configs/rednet/rednet{26,38,50,101,152}_b32x64_warmup_coslr_imagenet.py`, on mmcls 0.7/0.8).

The model is the release's whole mmcls classifier (RedNet backbone, global average pooling, linear head) with its
state_dict keys: `backbone.stem.*`, `backbone.layer{1-4}.*` and `head.fc.*`, so the release's checkpoints (mmcv's
`{'meta', 'state_dict'}` files) load unchanged with strict=True. Around it, timm's model contract:
`forward_features`/`forward_head`/`forward_intermediates`, `features_only` (the stem and the four stages),
`reset_classifier`, gradient checkpointing.

Structure (rednet.py): stem = 3x3 conv s2 (3 -> 32) + BN + ReLU, involution(32, k=3), BN, ReLU, 3x3 conv (32 -> 64)
+ BN + ReLU, then a 3x3 max pool s2; four stages of bottlenecks (1x1 conv, involution k=7 carrying the stage's
stride, 1x1 conv, expansion 4) with a 1x1 conv + BN shortcut where the shape changes; stage depths 1-2-4-1 (26),
2-3-5-2 (38), 3-4-6-3 (50), 3-4-23-3 (101), 3-8-36-3 (152). Initialisation as the release's `init_weights`: Kaiming
normal (fan_out, ReLU) on every conv with zero biases, BN weight 1 and bias 0, each bottleneck's last BN zeroed
(zero_init_residual), the head N(0, 0.01) with a zero bias (mmcls LinearClsHead).

`timm.utils.reparameterize_model` (eval mode) folds every BatchNorm that follows a conv: in the stem, the bottlenecks,
the shortcuts and the involutions' kernel generators; those after an involution stay (its kernel is shared by
`group_channels` channels, which their BatchNorm scales differently).
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import Bottleneck

from .layers.fusion import FusibleResNetBlock, fuse_pairs
from .layers.involution import ConvModule, Involution2d

__all__ = ['RedNet', 'InvolutionBottleneck']

_EXPANSION = 4


class InvolutionBottleneck(FusibleResNetBlock, Bottleneck):
    """timm ResNet bottleneck whose 3x3 conv (`conv2`) is a k=7 involution carrying the block's stride (the release's
    style 'pytorch'); names conv1/bn1/conv2/bn2/conv3/bn3/downsample as the release's Bottleneck."""

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            drop_path: Optional[nn.Module] = None,
            kernel_size: int = 7,
            group_channels: int = 16,
            reduction_ratio: int = 4,
            impl: str = 'ext',
            device=None,
            dtype=None,
    ):
        super().__init__(
            inplanes, planes, stride=stride, downsample=downsample, drop_path=drop_path, device=device, dtype=dtype)
        self.conv2 = Involution2d(
            planes, kernel_size, stride, group_channels=group_channels, reduction_ratio=reduction_ratio, impl=impl,
            device=device, dtype=dtype)


class RedNetBackbone(nn.Module):
    """The release's `RedNet` backbone (mmcls `BACKBONES`): `stem`, `maxpool`, `layer1`..`layer4`."""

    def __init__(
            self,
            layers: Tuple[int, ...],
            in_chans: int = 3,
            stem_channels: int = 64,
            base_channels: int = 64,
            drop_path_rate: float = 0.,
            impl: str = 'ext',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        half = stem_channels // 2
        self.stem = nn.Sequential(
            ConvModule(in_chans, half, 3, stride=2, padding=1, **dd),
            Involution2d(half, 3, 1, impl=impl, **dd),
            nn.BatchNorm2d(half, **dd),
            nn.ReLU(inplace=True),
            ConvModule(half, stem_channels, 3, stride=1, padding=1, **dd),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        dpr = calculate_drop_path_rates(drop_path_rate, sum(layers))
        inplanes, planes, block_idx = stem_channels, base_channels, 0
        for i, depth in enumerate(layers):
            stride = 1 if i == 0 else 2
            outplanes = planes * _EXPANSION
            blocks = []
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != outplanes):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False, **dd),
                        nn.BatchNorm2d(outplanes, **dd),
                    )
                blocks.append(InvolutionBottleneck(
                    inplanes, planes, stride=stride if j == 0 else 1, downsample=downsample,
                    drop_path=DropPath(dpr[block_idx]) if dpr[block_idx] > 0 else None, impl=impl, **dd))
                inplanes, block_idx = outplanes, block_idx + 1
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            planes *= 2
        self.num_features = inplanes

    def reparameterize(self) -> None:
        """Folds the BatchNorm of every ConvModule (stem convs, involution kernel generators) into its conv (timm's
        `reparameterize_model` hook; eval mode); the bottlenecks fold their own."""
        for m in self.modules():
            if isinstance(m, ConvModule) and isinstance(m.bn, nn.BatchNorm2d):
                fuse_pairs(m, ('conv', 'bn'))


class RedNet(nn.Module):
    """RedNet classifier: `backbone` (RedNetBackbone), `head` (global pool, dropout, `fc`)."""

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            num_classes: int = 1000,
            in_chans: int = 3,
            stem_channels: int = 64,
            base_channels: int = 64,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            impl: str = 'ext',
            device=None,
            dtype=None,
    ):
        """
        Args:
            layers: Bottlenecks per stage (the release's `arch_settings[depth]`).
            num_classes: Classifier outputs (0: no classifier).
            in_chans: Input image channels.
            stem_channels: Stem output channels (the stem's first conv and involution use half).
            base_channels: Bottleneck width of the first stage (doubled per stage; outputs are 4x wider).
            global_pool: timm pool type of the head ('avg' as the release's GlobalAveragePooling).
            drop_rate: Dropout before the classifier (0 in the release).
            drop_path_rate: Stochastic depth, linear over the blocks (0 in the release).
            zero_init_last: Zero each bottleneck's last BN weight (the release's zero_init_residual=True).
            impl: ddf implementation of the involutions: 'ext' (compiled ops) or 'reference' (pure PyTorch).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.backbone = RedNetBackbone(
            tuple(layers), in_chans, stem_channels, base_channels, drop_path_rate=drop_path_rate, impl=impl, **dd)
        self.num_features = self.head_hidden_size = self.backbone.num_features
        widths = [stem_channels] + [base_channels * _EXPANSION * 2 ** i for i in range(len(layers))]
        self.feature_info = [dict(num_chs=widths[0], reduction=2, module='backbone.stem')] + [
            dict(num_chs=widths[i + 1], reduction=4 * 2 ** i, module=f'backbone.layer{i + 1}')
            for i in range(len(layers))]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.init_weights(zero_init_last=zero_init_last)

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = True) -> None:
        """The release's init_weights (rednet.py RedNet.init_weights) and mmcls LinearClsHead.init_weights."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, InvolutionBottleneck):
                    m.zero_init_last()
        if isinstance(self.head.fc, nn.Linear):
            nn.init.normal_(self.head.fc.weight, std=0.01)
            nn.init.zeros_(self.head.fc.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^backbone\.stem',
            blocks=r'^backbone\.layer(\d+)' if coarse else r'^backbone\.layer(\d+)\.(\d+)',
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def _stages(self) -> List[nn.Module]:
        return [getattr(self.backbone, f'layer{i + 1}') for i in range(len(self.feature_info) - 1)]

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the stem output (index 0) and the stage outputs (1-4), as timm's ResNet.

        Args:
            x: Input images (B, C, H, W).
            indices: Take the last n if int, all if None, the given indices if a sequence.
            norm: Unused (RedNet has no final norm); kept for timm's interface.
            stop_early: Stop after the last stage needed.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or (final features, intermediates).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        stages = self._stages()
        take_indices, max_index = feature_take_indices(len(stages) + 1, indices)
        intermediates = []
        x = self.backbone.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.backbone.maxpool(x)
        for i, stage in enumerate(stages[:max_index] if stop_early else stages, start=1):
            x = self._run_stage(stage, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and the head) not needed for the given intermediates."""
        stages = self._stages()
        take_indices, max_index = feature_take_indices(len(stages) + 1, indices)
        for i in range(max_index + 1, len(stages) + 1):
            setattr(self.backbone, f'layer{i}', nn.Sequential())  # empty: checkpoint_seq can still iterate it
        if max_index == 0:
            self.backbone.maxpool = nn.Identity()
        prune_end = max_index < len(stages)
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> last-stage map (B, num_features, H/32, W/32)."""
        x = self.backbone.maxpool(self.backbone.stem(x))
        for stage in self._stages():
            x = self._run_stage(stage, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: RedNet) -> Dict[str, torch.Tensor]:
    """A release checkpoint's weights are already ours (`backbone.*`, `head.fc.*`); `models._helpers.load_weights`
    has taken them out of mmcv's `{'meta', 'state_dict'}` file. A backbone-only state_dict (keys without the
    `backbone.` prefix, as a detector's pretrained-backbone file) gets the prefix back."""
    state_dict = state_dict.get('state_dict', state_dict)
    if state_dict and not any(k.startswith(('backbone.', 'head.')) for k in state_dict):
        state_dict = {f'backbone.{k}': v for k, v in state_dict.items()}
    return state_dict


def _create_rednet(variant: str, pretrained: bool = False, **kwargs) -> RedNet:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3, 4))
    return build_model_with_cfg(
        RedNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    # mmcls imagenet_bs32.py test pipeline: Resize short side 256 (bilinear), CenterCrop 224, ImageNet mean/std
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'backbone.stem.0.conv', 'classifier': 'head.fc',
        'license': 'mit', 'paper_ids': 'arXiv:2103.06255',
        'paper_name': 'Involution: Inverting the Inherence of Convolution for Visual Recognition',
        'origin_url': 'https://github.com/d-li14/involution',
        **kwargs,
    }


# The release's weights are on OneDrive/SharePoint links (README), not fetchable by timm's hub code.
default_cfgs = generate_default_cfgs({
    'rednet26.in1k': _cfg(),
    'rednet38.in1k': _cfg(),
    'rednet50.in1k': _cfg(),
    'rednet101.in1k': _cfg(),
    'rednet152.in1k': _cfg(),
})


@register_model
def rednet26(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-26: 9.23M params, 1.73G FLOPs, 75.96% top-1 (release README)."""
    return _create_rednet('rednet26', pretrained, **dict(dict(layers=(1, 2, 4, 1)), **kwargs))


@register_model
def rednet38(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-38: 12.39M params, 2.22G FLOPs, 77.48% top-1 (release README)."""
    return _create_rednet('rednet38', pretrained, **dict(dict(layers=(2, 3, 5, 2)), **kwargs))


@register_model
def rednet50(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-50: 15.54M params, 2.71G FLOPs, 78.35% top-1 (release README)."""
    return _create_rednet('rednet50', pretrained, **dict(dict(layers=(3, 4, 6, 3)), **kwargs))


@register_model
def rednet101(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-101: 25.65M params, 4.74G FLOPs, 78.92% top-1 (release README)."""
    return _create_rednet('rednet101', pretrained, **dict(dict(layers=(3, 4, 23, 3)), **kwargs))


@register_model
def rednet152(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-152: 33.99M params (33.98M counted), 6.79G FLOPs, 79.12% top-1 (release README)."""
    return _create_rednet('rednet152', pretrained, **dict(dict(layers=(3, 8, 36, 3)), **kwargs))
