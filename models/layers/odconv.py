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

__all__ = ['ODAttention', 'ODConv2d', 'ODConvTrainingHooks', 'odconv_temperature']


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
    """Attention branch of ODConv: GAP -> 1x1 fc -> BN -> ReLU -> one 1x1 fc per attention.

    The filter attention is absent for depth-wise convolutions, the spatial one for point-wise convolutions and the
    kernel one when there is a single kernel (as released). The temperature divides every attention's logits while
    training; it is a non-persistent buffer (official checkpoints have none) and is ignored in eval mode.
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
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        attn_chs = max(int(in_chs * reduction), min_chs)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.fc = nn.Conv2d(in_chs, attn_chs, 1, bias=False, **dd)
        self.bn = nn.BatchNorm2d(attn_chs, **dd)
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
            elif isinstance(m, nn.BatchNorm2d):
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
        if self.training and x.shape[0] == 1:
            raise ValueError(
                'ODConv attention got a training batch of 1: its BatchNorm needs >= 2 samples per device. '
                'Drop the last incomplete batch (drop_last=True), use a larger batch, or call model.eval().')
        # 1x1 convs on a pooled vector are linear layers; F.linear skips the conv dispatch and is counted the same.
        pooled = x.mean((2, 3))
        hidden = F.linear(pooled, self.fc.weight.flatten(1))
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


def _symmetric_padding(padding, kernel_size: int, stride: int, dilation: int) -> int:
    """nn.Conv2d's padding argument as one symmetric amount: an int, equal ints, 'valid' or 'same'."""
    if padding == 'valid':
        return 0
    if padding != 'same':
        return _square(padding, 'padding')
    if stride != 1:
        raise ValueError(f"ODConv2d: padding='same' needs stride 1 (as in nn.Conv2d), got stride {stride}: "
                         f"give the padding as an int")
    if dilation * (kernel_size - 1) % 2:
        raise ValueError(f"ODConv2d: padding='same' with kernel_size {kernel_size} and dilation {dilation} is "
                         f"asymmetric, which ODConv2d does not support: use an odd kernel_size")
    return dilation * (kernel_size - 1) // 2


@untraceable
class ODConv2d(nn.Module):
    """Omni-dimensional dynamic 2d convolution (no bias), drop-in for `nn.Conv2d(..., bias=False)`.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        kernel_size: Kernel size (an int, or a tuple of equal ints).
        stride: Convolution stride (an int, or a tuple of equal ints).
        padding: Zero padding: an int, a tuple of equal ints, 'valid' or 'same' (stride 1, symmetric only).
        dilation: Kernel dilation (an int, or a tuple of equal ints).
        groups: Convolution groups (groups == in_chs == out_chs is depth-wise: no filter attention).
        reduction: Attention hidden width = max(int(in_chs * reduction), 16).
        kernel_num: Number of candidate kernels (1 keeps the leading dimension of `weight`).
        impl: 'auto' (the exact path ops/odconv.py's table picks per call), 'released' (the release's
            formulation, the oracle of tests/test_odconv.py and scripts/benchmark_odconv.py) or a path name of
            `ops.odconv.PATHS`, run on every call.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: Union[int, Tuple[int, int]],
            stride: Union[int, Tuple[int, int]] = 1,
            padding: Union[int, Tuple[int, int], str] = 0,
            dilation: Union[int, Tuple[int, int]] = 1,
            groups: int = 1,
            reduction: float = 0.0625,
            kernel_num: int = 4,
            impl: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if in_chs % groups or out_chs % groups:
            raise ValueError(f'ODConv2d: in_chs ({in_chs}) and out_chs ({out_chs}) must be divisible by groups '
                             f'({groups})')
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.kernel_size = _square(kernel_size, 'kernel_size')
        self.stride = _square(stride, 'stride')
        self.dilation = _square(dilation, 'dilation')
        self.padding = _symmetric_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.groups = groups
        self.kernel_num = kernel_num
        try:
            check_impl(impl, self.kernel_size, groups, self.padding, kernel_num)
        except ValueError as e:
            raise ValueError(f'ODConv2d: {e}') from None
        self.impl = impl
        self.attention = ODAttention(
            in_chs, out_chs, self.kernel_size, groups=groups, reduction=reduction, kernel_num=kernel_num, **dd)
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_chs, in_chs // groups, self.kernel_size, self.kernel_size, **dd))
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

    def extra_repr(self) -> str:
        return (f'{self.in_chs}, {self.out_chs}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, dilation={self.dilation}, groups={self.groups}, '
                f'kernel_num={self.kernel_num}' + (f', impl={self.impl}' if self.impl != 'auto' else ''))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return odconv(x, self.weight, *self.attention(x), self.stride, self.padding, self.dilation, self.groups,
                      self.impl)


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
