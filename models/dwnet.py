"""DWNet: Swin Transformer with its window attention replaced by (dynamic) depth-wise convolution.

Paper: "On the Connection between Local Attention and Dynamic Depth-wise Convolution" (ICLR 2022; arXiv v1 title
"Demystifying Local Vision Transformer"), https://arxiv.org/abs/2106.04263
Original code: https://github.com/Atten4Vis/DemystifyLocalViT

Architecture and parameter names are the released checkpoints' (`models/dwnet.py` at the first commit 4aa8326; the
inhomogeneous variant from `models/idynamic.py`), so those checkpoints load with `strict=True`. Differences from the
original code, none of which changes a parameter, nor an output for inputs the original accepts:
* the dynamic depth-wise convs run on the `ops` ddf family (`models/layers/dynamic_dw.py`) instead of a
  grouped-conv-over-batch trick or cupy kernels;
* `dynamic_*` really builds dynamic convs (later revisions overwrite them with static ones: an if/if/else slip);
* any input size works (no 224 assert; odd sizes are zero-padded before patch merging); `features_only=True` gives
  the four stage outputs before each patch merging, as the detection/segmentation backbones use them.

`timm.utils.reparameterize_model` (eval mode) folds the BatchNorms of every block: after the 1x1 and the static or
dynamic depth-wise convs (a dynamic conv's through the last layer of its kernel generator and its bias), inside the
kernel generators, and the one before the MLP into its first linear layer. The BatchNorm after an inhomogeneous conv
stays (one kernel serves `group_channels` channels, which it scales differently).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging

from ._helpers import CheckpointError
from .layers.dynamic_dw import DynamicDWConv, IDynamicDWConv
from .layers.fusion import bn_scale_shift, fuse_bn_linear, fuse_pairs, fuse_sequential

__all__ = ['DWNet']

DW_TYPES = ('static', 'dynamic', 'inhomogeneous')


class DWBlock(nn.Module):
    """Token mixer in place of window attention: 1x1 -> BN -> ReLU -> k x k depth-wise -> BN -> ReLU -> 1x1 -> BN.

    Takes and returns NCHW (any memory format).
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int = 7,
            dw_type: str = 'static',
            group_channels: Optional[int] = None,
            impl: str = 'ext',
    ):
        """
        Args:
            dim: Channels.
            kernel_size: Depth-wise kernel size (the "window size" of the original configs).
            dw_type: 'static' (learned kernel), 'dynamic' (per-sample kernel) or 'inhomogeneous' (per-pixel,
                per-group kernel).
            group_channels: Channels per kernel group of the inhomogeneous conv; required for it only.
            impl: ddf implementation of the dynamic convs ('ext' or 'reference').
        """
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.dw_type = dw_type
        self.conv0 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(dim)
        if dw_type == 'static':
            self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        elif dw_type == 'dynamic':
            self.conv = DynamicDWConv(dim, kernel_size, impl=impl)
        elif dw_type == 'inhomogeneous':
            if group_channels is None:
                raise ValueError("dw_type='inhomogeneous' needs group_channels (one value per stage)")
            self.conv = IDynamicDWConv(dim, kernel_size, group_channels, impl=impl)
        else:
            raise ValueError(f'dw_type must be one of {DW_TYPES}, got {dw_type!r}')
        self.bn = nn.BatchNorm2d(dim)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def reparameterize(self) -> None:
        """timm's `reparameterize_model` hook (eval mode): see the module docstring."""
        fuse_pairs(self, ('conv0', 'bn0'), ('conv2', 'bn2'))
        if isinstance(self.conv, nn.Conv2d):
            fuse_pairs(self, ('conv', 'bn'))
        elif isinstance(self.conv, DynamicDWConv):
            _fuse_dynamic_dw_bn(self.conv, self.bn)
            self.bn = nn.Identity()
        else:
            fuse_sequential(self.conv.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.conv0(x)))
        x = self.relu(self.bn(self.conv(x)))
        return self.bn2(self.conv2(x))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, kernel_size={self.kernel_size}, dw_type={self.dw_type}'


@torch.no_grad()
def _fuse_dynamic_dw_bn(conv: DynamicDWConv, bn: nn.BatchNorm2d) -> None:
    """Folds `bn` after a DynamicDWConv into it, in place: bn's scale into the kernels (channel c's k*k taps are rows
    of the generator's last 1x1 conv), bn's shift into the bias; and the generator's BatchNorm into its first conv."""
    fuse_pairs(conv, ('conv1', 'bn'))
    scale, shift = bn_scale_shift(bn)
    rows = scale.repeat_interleave(conv.kernel_size ** 2)
    conv.conv2.weight.mul_(rows[:, None, None, None])
    conv.conv2.bias.mul_(rows)
    conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift)


class DWNetBlock(nn.Module):
    """Swin block with attention -> DWBlock and the pre-MLP LayerNorm -> BatchNorm. Takes and returns NHWC."""

    def __init__(
            self,
            dim: int,
            kernel_size: int = 7,
            mlp_ratio: float = 4.,
            dw_type: str = 'static',
            group_channels: Optional[int] = None,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: type = nn.GELU,
            impl: str = 'ext',
    ):
        super().__init__()
        # The original names the mixer after the attention it replaces; checkpoints use these names.
        self.attn2conv = DWBlock(dim, kernel_size, dw_type=dw_type, group_channels=group_channels, impl=impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.bn = nn.BatchNorm2d(dim)

    def reparameterize(self) -> None:
        """Folds the BatchNorm before the MLP into its first linear layer (timm's `reparameterize_model` hook; eval
        mode); the token mixer folds its own."""
        fuse_bn_linear(self.bn, self.mlp.fc1)
        self.bn = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn2conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        x = x + self.drop_path(self.mlp(self.bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)))
        return x


class DWNetStage(nn.Module):
    """Blocks at one resolution, then (except in the last stage) patch merging, as in the original checkpoints."""

    def __init__(
            self,
            dim: int,
            depth: int,
            downsample: bool,
            kernel_size: int = 7,
            mlp_ratio: float = 4.,
            dw_type: str = 'static',
            group_channels: Optional[int] = None,
            proj_drop: float = 0.,
            drop_path: Sequence[float] = (),
            act_layer: type = nn.GELU,
            norm_layer: type = nn.LayerNorm,
            impl: str = 'ext',
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            DWNetBlock(
                dim,
                kernel_size=kernel_size,
                mlp_ratio=mlp_ratio,
                dw_type=dw_type,
                group_channels=group_channels,
                proj_drop=proj_drop,
                drop_path=drop_path[i],
                act_layer=act_layer,
                impl=impl,
            )
            for i in range(depth)])
        # timm's Swin PatchMerging is the original's: NHWC, same 2x2 concatenation order, norm/reduction keys.
        self.downsample = PatchMerging(dim, norm_layer=norm_layer) if downsample else nn.Identity()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's blocks only: its feature map before patch merging (NHWC)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


class DWNet(nn.Module):
    """DWNet / dynamic DWNet / inhomogeneous dynamic DWNet (tokens kept as NHWC maps between blocks)."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            patch_size: int = 4,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            kernel_size: int = 7,
            mlp_ratio: float = 4.,
            dw_type: str = 'static',
            group_channels: Optional[Sequence[int]] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: type = nn.GELU,
            norm_layer: type = nn.LayerNorm,
            impl: str = 'ext',
    ):
        """
        Args:
            in_chans: Input image channels.
            num_classes: Classifier outputs (0: no classifier).
            global_pool: 'avg' or '' (no pooling; forward_head then returns the NHWC map).
            patch_size: Stride and size of the patch embedding.
            embed_dim: Channels of the first stage; doubled at each patch merging.
            depths: Blocks per stage.
            kernel_size: Depth-wise kernel size (the original's window size).
            mlp_ratio: MLP hidden width over block width.
            dw_type: 'static', 'dynamic' or 'inhomogeneous' depth-wise convs.
            group_channels: Per stage, channels sharing one inhomogeneous kernel (the original's INHOMO_HEADS).
            drop_rate: Dropout before the classifier.
            proj_drop_rate: Dropout inside the MLPs.
            drop_path_rate: Stochastic depth rate, increased linearly over the blocks from 0.
            act_layer: MLP activation.
            norm_layer: Norm of patch embedding, patch merging and the final features.
            impl: ddf implementation of the dynamic convs: 'ext' (compiled ops) or 'reference' (pure PyTorch).
        """
        super().__init__()
        if global_pool not in ('', 'avg'):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if dw_type not in DW_TYPES:
            raise ValueError(f'dw_type must be one of {DW_TYPES}, got {dw_type!r}')
        num_stages = len(depths)
        if group_channels is None:
            group_channels = (None,) * num_stages
        elif len(group_channels) != num_stages:
            raise ValueError(f'group_channels needs one value per stage ({num_stages}), got {group_channels}')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.dw_type = dw_type
        self.grad_checkpointing = False
        self.output_fmt = 'NHWC'  # forward_features and the stage maps between blocks are NHWC (timm reads this)
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            output_fmt='NHWC',
        )
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            stages.append(DWNetStage(
                dims[i],
                depths[i],
                downsample=i < num_stages - 1,
                kernel_size=kernel_size,
                mlp_ratio=mlp_ratio,
                dw_type=dw_type,
                group_channels=group_channels[i],
                proj_drop=proj_drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                act_layer=act_layer,
                norm_layer=norm_layer,
                impl=impl,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'layers.{i}'))
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # The original initialises only Linear layers (and LayerNorm to its defaults); convs keep PyTorch's init.
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Nothing beyond timm's rule (1-D params and biases), which is what the original optimizer exempts."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+)\.blocks\.(\d+)', None),
                (r'^layers\.(\d+)\.downsample', (99999,)),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('', 'avg'):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns stage outputs (each before its patch merging).

        Args:
            x: Input images (B, C, H, W).
            indices: Take the last n stages if int, all if None, the given stages if a sequence.
            norm: Apply the final norm to the last stage's intermediate.
            stop_early: Stop after the last stage needed.
            output_fmt: 'NCHW' or 'NHWC' intermediates.
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or (final NHWC features, intermediates).
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last_index = len(self.layers) - 1
        stages = self.layers if torch.jit.is_scripting() or not stop_early else self.layers[:max_index + 1]
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm and i == last_index else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else x_inter)
            if intermediates_only and i == max_index:
                break
            x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        if i == last_index:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and the norm/head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        if max_index < len(self.layers) - 1:
            self.layers = self.layers[:max_index + 1]
            self.layers[-1].downsample = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_norm = prune_head = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised last-stage map (B, H/32, W/32, num_features)."""
        x = self.patch_embed(x)
        x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: DWNet) -> Dict[str, torch.Tensor]:
    """Unwrap an original `main.py` checkpoint; its parameter names are already ours.

    Also refuses, in one line, a checkpoint trained with the original's later revisions for a `dynamic_*` config:
    their if/if/else slip built static depth-wise convs, so such weights belong in `dwnet_*`.
    """
    state_dict = state_dict.get('model', state_dict)
    model_keys = model.state_dict().keys()
    static_dw = [k for k in state_dict if k.endswith('attn2conv.conv.weight') and k not in model_keys]
    if static_dw:
        raise CheckpointError(
            f'checkpoint has static depth-wise convs ({static_dw[0]}) but the model uses '
            f'{model.dw_type} ones: load it into the matching dwnet_* model')
    return state_dict


def _create_dwnet(variant: str, pretrained: bool = False, **kwargs) -> DWNet:
    num_stages = len(kwargs.get('depths', (2, 2, 6, 2)))
    out_indices = kwargs.pop('out_indices', tuple(range(num_stages)))
    return build_model_with_cfg(
        DWNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'mit',
        'paper_ids': 'arXiv:2106.04263',
        'paper_name': 'On the Connection between Local Attention and Dynamic Depth-wise Convolution',
        'origin_url': 'https://github.com/Atten4Vis/DemystifyLocalViT',
        **kwargs,
    }


_RELEASE = 'https://github.com/Atten4Vis/DemystifyLocalViT/releases/download/prerelease/'

default_cfgs = generate_default_cfgs({
    'dwnet_tiny_patch4_window7_224.in1k': _cfg(url=_RELEASE + 'dwnet_tiny_224.pth'),
    'dwnet_base_patch4_window7_224.in1k': _cfg(url=_RELEASE + 'dwnet_base_224.pth'),
    'dynamic_dwnet_tiny_patch4_window7_224.in1k': _cfg(url=_RELEASE + 'dynamic_dwnet_tiny_224.pth'),
    'dynamic_dwnet_base_patch4_window7_224.in1k': _cfg(url=_RELEASE + 'dynamic_dwnet_base_224.pth'),
    # No released weights for the inhomogeneous variant (an ablation of the paper).
    'i_dynamic_dwnet_tiny_patch4_window7_224': _cfg(),
    'i_dynamic_dwnet_base_patch4_window7_224': _cfg(),
})


@register_model
def dwnet_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    """DWNet-T: static 7x7 depth-wise convs; 24.17M params, 3.8G MACs, 81.2% top-1."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), kernel_size=7)
    return _create_dwnet('dwnet_tiny_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dwnet_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    """DWNet-B: static 7x7 depth-wise convs; 74.35M params, 12.9G MACs, 83.2% top-1."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), kernel_size=7)
    return _create_dwnet('dwnet_base_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dynamic_dwnet_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    """Dynamic DWNet-T: per-sample 7x7 kernels; 51.13M params, 3.8G MACs, 81.8% top-1."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), kernel_size=7, dw_type='dynamic')
    return _create_dwnet('dynamic_dwnet_tiny_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dynamic_dwnet_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    """Dynamic DWNet-B: per-sample 7x7 kernels; 161.60M params, 13.0G MACs, 83.2% top-1."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), kernel_size=7, dw_type='dynamic')
    return _create_dwnet('dynamic_dwnet_base_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def i_dynamic_dwnet_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    """Inhomogeneous dynamic DWNet-T: per-pixel 7x7 kernels shared by 3/6/12/24 channels (32 groups); 26.24M params."""
    model_args = dict(
        embed_dim=96, depths=(2, 2, 6, 2), kernel_size=7, dw_type='inhomogeneous', group_channels=(3, 6, 12, 24))
    return _create_dwnet('i_dynamic_dwnet_tiny_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def i_dynamic_dwnet_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    """Inhomogeneous dynamic DWNet-B: per-pixel 7x7 kernels shared by 4/8/16/32 channels (32 groups); 80.25M params."""
    model_args = dict(
        embed_dim=128, depths=(2, 2, 18, 2), kernel_size=7, dw_type='inhomogeneous', group_channels=(4, 8, 16, 32))
    return _create_dwnet('i_dynamic_dwnet_base_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))
