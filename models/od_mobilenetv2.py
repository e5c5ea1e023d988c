""" OD-MobileNetV2: MobileNetV2 whose inverted-residual and head convolutions are ODConvs

Paper: `Omni-Dimensional Dynamic Convolution` - https://openreview.net/forum?id=DmpCfq6Mg39 (ICLR 2022)
Original release: https://github.com/OSVAI/ODConv (`models/od_mobilenetv2.py`, torchvision-style MobileNetV2)

Every convolution except the stem is an `ODConv2d` (depth-wise ones without filter attention). The module tree is
the release's (`features.<i>`, `classifier.1`), so its state_dicts load with strict=True; the class follows timm's
model contract. Entrypoint kwargs: `kernel_num` (default 1), `reduction` (0.0625), `attention_norm` ('batch' as
released; 'layer' or 'none' train at batch 1), `temp_init`, `temp_epochs`. `timm.utils.reparameterize_model` folds
every BatchNorm into the conv before it.
"""
import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import make_divisible
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .layers.fusion import fuse_sequential
from .layers.odconv import ODConv2d, ODConvTrainingHooks

__all__ = ['ODMobileNetV2']

# (expansion t, channels c, repeats n, first stride s) of MobileNetV2's inverted-residual stages.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class ConvBnAct(nn.Sequential):
    """conv -> BN -> ReLU6 as an indexed Sequential (release keys `<i>.0`, `<i>.1`); conv is ODConv2d if `od`."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 od: bool = True, **od_kwargs):
        padding = (kernel_size - 1) // 2
        if od:
            conv = ODConv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False, **od_kwargs)
        else:
            conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        super().__init__(conv, nn.BatchNorm2d(out_chs), nn.ReLU6(inplace=True))

    def reparameterize(self) -> None:
        """Folds the BatchNorm into the conv (timm's `reparameterize_model` hook; eval mode)."""
        fuse_sequential(self)


class ODInvertedResidual(nn.Module):
    """Inverted residual: [1x1 expand] -> 3x3 depth-wise -> 1x1 project (no act), all ODConv, in `conv`."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int, **od_kwargs):
        super().__init__()
        hidden_chs = int(round(in_chs * expand_ratio))
        self.use_res_connect = stride == 1 and in_chs == out_chs
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBnAct(in_chs, hidden_chs, kernel_size=1, **od_kwargs))
        layers += [
            ConvBnAct(hidden_chs, hidden_chs, stride=stride, groups=hidden_chs, **od_kwargs),
            ODConv2d(hidden_chs, out_chs, 1, bias=False, **od_kwargs),
            nn.BatchNorm2d(out_chs),
        ]
        self.conv = nn.Sequential(*layers)

    def reparameterize(self) -> None:
        """Folds the projection's BatchNorm into it (timm's `reparameterize_model` hook; eval mode); the ConvBnAct
        blocks fold their own."""
        fuse_sequential(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class ODMobileNetV2(ODConvTrainingHooks, nn.Module):
    """MobileNetV2 with ODConv, in the release's module layout and timm's model contract."""

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            width_mult: float = 1.0,
            depth_mult: float = 1.0,
            round_nearest: int = 8,
            num_features: int = 1280,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            kernel_num: int = 1,
            reduction: float = 0.0625,
            attention_norm: str = 'batch',
            temp_init: float = 30.,
            temp_epochs: float = 10.,
    ):
        """
        Args:
            num_classes: Classifier outputs (0: no classifier).
            in_chans: Input image channels.
            width_mult: Channel multiplier of every stage (the head keeps >= `num_features` channels).
            depth_mult: Block multiplier of every stage (ceil(repeats * depth_mult) blocks, as timm's
                `depth_multiplier`); the release has 1.0, smaller values make quick variants for tests.
            round_nearest: Channel counts are rounded to multiples of this.
            num_features: Head conv channels at width 1.0.
            global_pool: 'avg' or '' (no pooling in forward_head).
            drop_rate: Dropout before the classifier (the release's `dropout`).
            kernel_num: ODConv candidate kernels.
            reduction: ODConv attention reduction ratio.
            attention_norm: ODConv attention norm: 'batch' (released), 'layer' or 'none' (any training batch size).
            temp_init: Attention temperature at the start of training.
            temp_epochs: Epochs over which the temperature anneals linearly to 1.
        """
        super().__init__()
        if global_pool not in ('avg', ''):
            raise ValueError(f"ODMobileNetV2 supports global_pool 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self.temp_init = temp_init
        self.temp_epochs = temp_epochs
        self.grad_checkpointing = False
        od_kwargs = dict(reduction=reduction, kernel_num=kernel_num, attention_norm=attention_norm)

        in_chs = make_divisible(32 * width_mult, round_nearest)
        features = [ConvBnAct(in_chans, in_chs, stride=2, od=False)]
        self.feature_info = []
        self.stage_ends = []  # index in `features` of each feature_info entry's module
        reduction_now = 2
        for t, c, n, s in _STAGES:
            out_chs = make_divisible(c * width_mult, round_nearest)
            if s > 1:
                self.stage_ends.append(len(features) - 1)
                self.feature_info.append(
                    dict(num_chs=in_chs, reduction=reduction_now, module=f'features.{len(features) - 1}'))
                reduction_now *= s
            for i in range(math.ceil(n * depth_mult)):
                features.append(ODInvertedResidual(in_chs, out_chs, s if i == 0 else 1, t, **od_kwargs))
                in_chs = out_chs
        self.num_features = self.head_hidden_size = make_divisible(num_features * max(1.0, width_mult), round_nearest)
        features.append(ConvBnAct(in_chs, self.num_features, kernel_size=1, **od_kwargs))
        self.stage_ends.append(len(features) - 1)
        self.feature_info.append(
            dict(num_chs=self.num_features, reduction=reduction_now, module=f'features.{len(features) - 1}'))
        self.features = nn.Sequential(*features)
        self.classifier = self._make_classifier(num_classes)
        self._init_weights()

    def _make_classifier(self, num_classes: int) -> nn.Sequential:
        # The release's Sequential(Dropout, Linear): its Linear is `classifier.1`.
        return nn.Sequential(
            nn.Dropout(self.drop_rate),
            nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity(),
        )

    def _init_weights(self) -> None:
        # As released: Kaiming fan-out (gain for ReLU's default `leaky_relu` a=0) on every nn.Conv2d, zero biases,
        # N(0, 0.01) classifier. ODConv2d's own kernels keep their init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^features\.0\.', blocks=r'^features\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier[1]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"ODMobileNetV2 supports global_pool 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.features[0][0].weight.device
        self.classifier = self._make_classifier(num_classes).to(device)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the outputs of the `feature_info` modules (the last block at each reduction).

        Args:
            x: Input images (B, C, H, W).
            indices: Take the last n feature levels if int, all if None, the given levels if a sequence.
            norm: Unused (no final norm).
            stop_early: Stop after the last level needed.
            output_fmt: 'NCHW' only.
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or (forward_features output, intermediates).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_blocks = [self.stage_ends[i] for i in take_indices]
        stop = self.stage_ends[max_index] + 1 if stop_early or intermediates_only else len(self.features)
        intermediates = []
        for i, block in enumerate(self.features[:stop]):
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
            if i in take_blocks:
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
        """Drop the blocks (and the head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        if max_index < len(self.stage_ends) - 1:
            self.features = self.features[:self.stage_ends[max_index] + 1]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean((2, 3))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_od_mobilenetv2(variant: str, pretrained: bool = False, **kwargs) -> ODMobileNetV2:
    return build_model_with_cfg(
        ODMobileNetV2, variant, pretrained,
        feature_cfg=dict(flatten_sequential=True), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    # Released weights (Google Drive, one file per kernel_num) load from a local file:
    # models._helpers.load_weights(model, path), train.py --pretrained-path, validate.py --checkpoint.
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'features.0.0', 'classifier': 'classifier.1',
        'license': 'mit', 'paper_ids': 'arXiv:2209.07947', 'origin_url': 'https://github.com/OSVAI/ODConv',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'od_mobilenetv2_050.in1k': _cfg(),
    'od_mobilenetv2_075.in1k': _cfg(),
    'od_mobilenetv2_100.in1k': _cfg(),
})


@register_model
def od_mobilenetv2_050(pretrained: bool = False, **kwargs) -> ODMobileNetV2:
    """OD-MobileNetV2 0.5x (2.43M params with kernel_num=1, 4.44M with 4)."""
    model_args = dict(width_mult=0.5)
    return _create_od_mobilenetv2('od_mobilenetv2_050', pretrained, **dict(model_args, **kwargs))


@register_model
def od_mobilenetv2_075(pretrained: bool = False, **kwargs) -> ODMobileNetV2:
    """OD-MobileNetV2 0.75x (3.51M params with kernel_num=1, 7.50M with 4)."""
    model_args = dict(width_mult=0.75)
    return _create_od_mobilenetv2('od_mobilenetv2_075', pretrained, **dict(model_args, **kwargs))


@register_model
def od_mobilenetv2_100(pretrained: bool = False, **kwargs) -> ODMobileNetV2:
    """OD-MobileNetV2 1.0x (4.94M params with kernel_num=1, 11.51M with 4)."""
    model_args = dict(width_mult=1.0)
    return _create_od_mobilenetv2('od_mobilenetv2_100', pretrained, **dict(model_args, **kwargs))
