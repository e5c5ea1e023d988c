"""Omni-dimensional dynamic convolution (ODConv): the attention branch and the layer.

Paper: `Omni-Dimensional Dynamic Convolution` - https://openreview.net/forum?id=DmpCfq6Mg39 (ICLR 2022)
Original code: https://github.com/OSVAI/ODConv (modules/odconv.py); parameter names follow that release.

A squeeze-and-excitation style branch predicts four attentions per sample: over the input channels (channel),
the output channels (filter), the k*k kernel positions (spatial) and the `kernel_num` candidate kernels (kernel).
The sample's kernel is `sum_n kernel[n] * spatial * channel * filter * weight[n]` (paper eq. 2); `ops.odconv`
computes it, by the path `impl` names ('auto': the table in ops/odconv.py; 'released': the release's formulation,
the oracle of the tests and benchmarks).
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops.odconv import check_impl, odconv

from . import untraceable
from .fusion import bn_scale_shift, fuse_pairs

__all__ = ['ATTENTION_NORMS', 'ODAttention', 'ODConv2d', 'ODConvTrainingHooks', 'odconv_temperature']

# Norm of the attention's hidden layer: 'batch' (the release's BatchNorm over the batch's pooled features: a training
# batch needs >= 2 samples per device), 'layer' (each sample's hidden vector normalised on its own: GroupNorm with one
# group) or 'none' (no norm; the first fc gets a bias instead). 'layer' and 'none' train at any batch size.
ATTENTION_NORMS = ('batch', 'layer', 'none')
_PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')


def odconv_temperature(epochs: float, temp_init: float = 30., temp_epochs: float = 10.) -> float:
    """Attention temperature after `epochs` (fractional) epochs of training.

    Linear from `temp_init` at epoch 0 to 1 at `temp_epochs`, then 1: the original utils/misc.py `get_temperature`
    with `epochs = epoch + (step + 1) / steps_per_epoch` (the release counts the step being run; so does train.py's
    `TrainingSchedule.progress`).
    """
    if temp_epochs <= 0:
        return 1.
    return 1. + max(0., (temp_init - 1.) * (1. - epochs / temp_epochs))


class ODAttention(nn.Module):
    """Attention branch of ODConv: GAP -> 1x1 fc -> norm -> ReLU -> one 1x1 fc per attention.

    The filter attention is absent for depth-wise convolutions, the spatial one for point-wise convolutions and the
    kernel one when there is a single kernel (as released). The temperature divides every attention's logits while
    training; it is a non-persistent buffer (official checkpoints have none) and is ignored in eval mode. The norm
    (`ATTENTION_NORMS`) keeps the release's name `bn` whatever its kind.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            groups: int = 1,
            reduction: float = 0.0625,
            kernel_num: int = 4,
            min_chs: int = 16,
            norm: str = 'batch',
            device=None,
            dtype=None,
    ):
        super().__init__()
        if norm not in ATTENTION_NORMS:
            raise ValueError(f'ODConv attention_norm must be one of {ATTENTION_NORMS}, got {norm!r}')
        dd = {'device': device, 'dtype': dtype}
        attn_chs = max(int(in_chs * reduction), min_chs)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.fc = nn.Conv2d(in_chs, attn_chs, 1, bias=norm == 'none', **dd)
        if norm == 'batch':
            self.bn = nn.BatchNorm2d(attn_chs, **dd)
        elif norm == 'layer':
            self.bn = nn.GroupNorm(1, attn_chs, **dd)
        else:
            self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(attn_chs, in_chs, 1, **dd)
        is_depthwise = in_chs == groups and in_chs == out_chs
        self.filter_fc = None if is_depthwise else nn.Conv2d(attn_chs, out_chs, 1, **dd)
        self.spatial_fc = None if kernel_size == 1 else nn.Conv2d(attn_chs, kernel_size * kernel_size, 1, **dd)
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(attn_chs, kernel_num, 1, **dd)
        self.register_buffer('temperature', torch.ones((), device=device, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.temperature.fill_(1.)

    def _head(self, fc: Optional[nn.Conv2d], hidden: torch.Tensor) -> Optional[torch.Tensor]:
        if fc is None:
            return None
        logits = F.linear(hidden, fc.weight.flatten(1), fc.bias)
        return logits / self.temperature if self.training else logits

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                                                  Optional[torch.Tensor]]:
        """Returns (channel (B, in), filter (B, out), spatial (B, k*k), kernel (B, kernel_num)); absent ones None."""
        if self.training and x.shape[0] == 1 and isinstance(self.bn, nn.BatchNorm2d):
            raise ValueError(
                'ODConv attention got a training batch of 1: its BatchNorm needs >= 2 samples per device. '
                'Drop the last incomplete batch (drop_last=True), use a larger batch, call model.eval(), or build '
                "the layers with attention_norm='layer' (or 'none'), which train at any batch size.")
        # 1x1 convs on a pooled vector are linear layers; F.linear skips the conv dispatch and is counted the same.
        pooled = x.mean((2, 3))
        hidden = F.linear(pooled, self.fc.weight.flatten(1), self.fc.bias)
        hidden = self.act(self.bn(hidden[:, :, None, None])).flatten(1)
        channel = torch.sigmoid(self._head(self.channel_fc, hidden))
        filter_ = self._head(self.filter_fc, hidden)
        spatial = self._head(self.spatial_fc, hidden)
        kernel = self._head(self.kernel_fc, hidden)
        return (
            channel,
            None if filter_ is None else torch.sigmoid(filter_),
            None if spatial is None else torch.sigmoid(spatial),
            None if kernel is None else torch.softmax(kernel, dim=1),
        )


def _square(value, name: str) -> int:
    """One int from an int or a tuple of equal ints, as nn.Conv2d takes them (ODConv2d is square only)."""
    if isinstance(value, (tuple, list)):
        if len(value) not in (1, 2) or len(set(value)) != 1:
            raise ValueError(f'ODConv2d: {name} must be an int or a tuple of equal ints (square convolutions only), '
                             f'got {tuple(value)}')
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f'ODConv2d: {name} must be an int, got {value!r}')
    return value


def _pad_sides(padding, kernel_size: int, stride: int, dilation: int) -> Tuple[int, int, int, int]:
    """nn.Conv2d's padding argument as F.pad's (left, right, top, bottom): an int, a pair (height, width), 'valid'
    or 'same' (stride 1; an odd total puts the extra row and column at the end, as nn.Conv2d does)."""
    if padding == 'valid':
        return 0, 0, 0, 0
    if padding == 'same':
        if stride != 1:
            raise ValueError(f"ODConv2d: padding='same' needs stride 1 (as in nn.Conv2d), got stride {stride}: "
                             f"give the padding as an int")
        total = dilation * (kernel_size - 1)
        return total // 2, total - total // 2, total // 2, total - total // 2
    pair = tuple(padding) if isinstance(padding, (tuple, list)) else (padding, padding)
    if len(pair) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pair):
        raise ValueError(f"ODConv2d: padding must be an int >= 0, a pair of them, 'valid' or 'same', got {padding!r}")
    return pair[1], pair[1], pair[0], pair[0]


def _named_once(what: str, **names) -> int:
    """The one value given under any of the names of an argument (nn.Conv2d's, this project's, the release's)."""
    given = {name: value for name, value in names.items() if value is not None}
    if len(given) != 1:
        raise TypeError(f'ODConv2d needs {what} exactly once, as one of {", ".join(names)}; got '
                        f'{", ".join(f"{k}={v}" for k, v in given.items()) or "none"}')
    return next(iter(given.values()))


@untraceable
class ODConv2d(nn.Module):
    """Omni-dimensional dynamic 2d convolution, a drop-in for `nn.Conv2d` (its arguments, names and defaults).

    The release's argument names `in_planes`/`out_planes` and this project's `in_chs`/`out_chs` are accepted too.
    Convolutions are square (kernel_size, stride and dilation an int or a tuple of equal ints); padding may differ
    per side. The models of this project build it with bias=False, as released.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size (an int, or a tuple of equal ints).
        stride: Convolution stride (an int, or a tuple of equal ints).
        padding: An int, a pair (height, width), 'valid' or 'same' (stride 1), as nn.Conv2d.
        dilation: Kernel dilation (an int, or a tuple of equal ints).
        groups: Convolution groups (groups == in_channels == out_channels is depth-wise: no filter attention).
        bias: Add a learned bias per output channel.
        padding_mode: 'zeros', 'reflect', 'replicate' or 'circular', as nn.Conv2d. Other than 'zeros', and for
            unequal sides, the input is padded by F.pad (one copy of it) and convolved without padding.
        reduction: Attention hidden width = max(int(in_channels * reduction), 16).
        kernel_num: Number of candidate kernels (1 keeps the leading dimension of `weight`).
        attention_norm: Norm of the attention's hidden layer (`ATTENTION_NORMS`): 'batch' (released; a training
            batch needs >= 2 samples per device), 'layer' or 'none' (batch-independent: any batch size trains).
        impl: 'auto' (the exact path ops/odconv.py's table picks per call), 'released' (the release's
            formulation, the oracle of tests/test_odconv.py and scripts/benchmark_odconv.py) or a path name of
            `ops.odconv.PATHS`, run on every call.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_channels: Optional[int] = None,
            out_channels: Optional[int] = None,
            kernel_size: Union[int, Tuple[int, int], None] = None,
            stride: Union[int, Tuple[int, int]] = 1,
            padding: Union[int, Tuple[int, int], str] = 0,
            dilation: Union[int, Tuple[int, int]] = 1,
            groups: int = 1,
            bias: bool = True,
            padding_mode: str = 'zeros',
            reduction: float = 0.0625,
            kernel_num: int = 4,
            attention_norm: str = 'batch',
            impl: str = 'auto',
            device=None,
            dtype=None,
            *,
            in_chs: Optional[int] = None,
            out_chs: Optional[int] = None,
            in_planes: Optional[int] = None,
            out_planes: Optional[int] = None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        in_channels = _named_once('in_channels', in_channels=in_channels, in_chs=in_chs, in_planes=in_planes)
        out_channels = _named_once('out_channels', out_channels=out_channels, out_chs=out_chs, out_planes=out_planes)
        kernel_size = _named_once('kernel_size', kernel_size=kernel_size)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'ODConv2d: in_channels ({in_channels}) and out_channels ({out_channels}) must be '
                             f'divisible by groups ({groups})')
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f'ODConv2d: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _square(kernel_size, 'kernel_size')
        self.stride = _square(stride, 'stride')
        self.dilation = _square(dilation, 'dilation')
        sides = _pad_sides(padding, self.kernel_size, self.stride, self.dilation)
        self.padding_mode = padding_mode
        if not any(sides) or (padding_mode == 'zeros' and len(set(sides)) == 1):
            self.padding, self._pad = sides[0], None  # the op pads
        else:
            self.padding, self._pad = 0, sides
        self.groups = groups
        self.kernel_num = kernel_num
        try:
            check_impl(impl, self.kernel_size, groups, self.padding, kernel_num)
        except ValueError as e:
            raise ValueError(f'ODConv2d: {e}') from None
        self.impl = impl
        self.attention = ODAttention(
            in_channels, out_channels, self.kernel_size, groups=groups, reduction=reduction, kernel_num=kernel_num,
            norm=attention_norm, **dd)
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_channels, in_channels // groups, self.kernel_size, self.kernel_size, **dd))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **dd))
        else:
            self.register_parameter('bias', None)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=torch.channels_last) converts 4-D and 5-D tensors to that 4-D format, which fails
        # on the 5-D kernel bank: `fn` gets the bank as one 4-D stack, and the bank stays contiguous.
        def fn_kernel_bank(t):
            return fn(t.flatten(0, 1)).contiguous().view(t.shape) if t.dim() == 5 else fn(t)
        return super()._apply(fn_kernel_bank, recurse)

    def reset_parameters(self) -> None:
        for w in self.weight.data:
            nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')
        if self.bias is not None:  # nn.Conv2d's bias init
            bound = self.weight[0, 0].numel() ** -0.5
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        padding = self.padding if self._pad is None else self._pad
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={padding}, dilation={self.dilation}, groups={self.groups}, kernel_num={self.kernel_num}'
                + (', bias=False' if self.bias is None else '')
                + (f', padding_mode={self.padding_mode}' if self.padding_mode != 'zeros' else '')
                + (f', impl={self.impl}' if self.impl != 'auto' else ''))

    def count_macs(self, input_shape: torch.Size, output_shape: torch.Size) -> int:
        """Multiply-adds of one forward as the paper counts them, whatever path runs (tools/info.py).

        The convolution with one kernel, the attention fcs, and the kernel aggregation of eq. 2: each attention that
        varies over a kernel's elements (channel; filter unless depth-wise; spatial unless 1x1) multiplies every
        element of every candidate kernel once, and the kernel attention and the sum over the candidates ride on the
        last of those multiply-adds. This reproduces the published OD-ResNet-50 overheads over ResNet-50 (+0.058G
        1x, +0.222G 4x) to within 4%; benchmarks/odconv.md compares every published row.
        """
        attn = self.attention
        kernel_numel = self.weight[0].numel()
        fcs = sum(fc.weight.numel() for fc in (attn.fc, attn.channel_fc, attn.filter_fc, attn.spatial_fc,
                                               attn.kernel_fc) if fc is not None)
        attentions_on_kernel = 1 + (attn.filter_fc is not None) + (attn.spatial_fc is not None)
        aggregation = self.kernel_num * kernel_numel * attentions_on_kernel
        convolution = kernel_numel * output_shape[2] * output_shape[3]
        return input_shape[0] * (convolution + fcs + aggregation)

    @torch.no_grad()
    def fuse(self, bn: Optional[nn.BatchNorm2d] = None) -> 'ODConv2d':
        """This layer in its inference form (in place), followed by `bn` if given: a 'batch' attention norm folded
        into the attention's first fc, and `bn` into the kernel bank and the bias (the attentions scale a sample's
        kernel or its output per channel, so they commute with bn's per-output-channel scale). Exact in eval mode;
        timm's `reparameterize_model` calls it without `bn`, the blocks of the model files with theirs."""
        if isinstance(self.attention.bn, nn.BatchNorm2d):
            fuse_pairs(self.attention, ('fc', 'bn'))
        if bn is not None:
            scale, shift = bn_scale_shift(bn)
            bias = shift if self.bias is None else self.bias * scale + shift
            self.weight = nn.Parameter(self.weight * scale.view(1, -1, 1, 1, 1))
            self.bias = nn.Parameter(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'ODConv2d with in_channels={self.in_channels} expects input (batch, {self.in_channels}, '
                             f'height, width), got shape {tuple(x.shape)}')
        attentions = self.attention(x)  # of the unpadded input, as with the op's own zero padding
        if self._pad is not None:
            x = F.pad(x, self._pad, mode='constant' if self.padding_mode == 'zeros' else self.padding_mode)
        out = odconv(x, self.weight, *attentions, self.stride, self.padding, self.dilation, self.groups, self.impl)
        return out if self.bias is None else out + self.bias.to(out.dtype).view(1, -1, 1, 1)


class ODConvTrainingHooks:
    """Model mixin: the framework's generic training hooks, driving every ODConv temperature in the model.

    The model sets `temp_init` and `temp_epochs` (model kwargs). train.py calls `set_training_progress` before every
    step; checkpoints keep `training_hook_state`. A model never given progress trains at temperature 1.
    """
    temp_init: float = 30.
    temp_epochs: float = 10.

    def _od_attentions(self):
        return [m for m in self.modules() if isinstance(m, ODAttention)]

    def set_temperature(self, temperature: float) -> None:
        """Sets the training-mode temperature of every ODConv attention (eval mode always uses 1)."""
        for m in self._od_attentions():
            m.temperature.fill_(temperature)

    def scheduled_values(self, epochs: float) -> dict:
        """The temperature after `epochs` (fractional) epochs (linear temp_init -> 1 over temp_epochs)."""
        return {'temperature': odconv_temperature(epochs, self.temp_init, self.temp_epochs)}

    def set_training_progress(self, epochs: float) -> None:
        self.set_temperature(self.scheduled_values(epochs)['temperature'])

    def auxiliary_loss(self) -> None:
        """ODConv adds nothing to the loss."""
        return None

    def auxiliary_loss_terms(self) -> list:
        return []

    def training_hook_log(self) -> dict:
        attentions = self._od_attentions()
        return {'temperature': float(attentions[0].temperature) if attentions else 1.}

    def training_hook_state(self) -> dict:
        return self.training_hook_log()

    def load_training_hook_state(self, state: dict) -> None:
        self.set_temperature(float(state.get('temperature', 1.)))
