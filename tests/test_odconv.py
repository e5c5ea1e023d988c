"""ODConv family: the layer against the release's formulation, the temperature hooks, the models and the configs."""
import json
import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

import models  # noqa: F401  (registers the od_* models)
from models._helpers import load_weights
from models.layers.odconv import ODAttention, ODConv2d, odconv_temperature
from ops import odconv
from tools.info import count_params_and_macs
from tools.zoo import published_overhead

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / 'reference'
OD_MODELS = sorted(timm.list_models(module=('od_resnet', 'od_mobilenetv2')))
# (in, out, kernel_size, stride, groups): every combination of kernel 1/3, dense/depth-wise and stride 1/2, and a
# grouped 3x3.
LAYER_CASES = [(8, 8 if depthwise else 12, k, stride, 8 if depthwise else 1)
               for k in (1, 3) for depthwise in (False, True) for stride in (1, 2)] + [(8, 12, 3, 1, 4)]
# Published parameter counts (README table), millions.
PUBLISHED_PARAMS = {
    ('od_resnet18', 1): 11.94, ('od_resnet18', 4): 44.90, ('od_resnet50', 1): 28.64, ('od_resnet50', 4): 90.67,
    ('od_resnet101', 1): 50.82, ('od_resnet101', 2): 90.44,
    ('od_mobilenetv2_100', 1): 4.94, ('od_mobilenetv2_100', 4): 11.51, ('od_mobilenetv2_075', 1): 3.51,
    ('od_mobilenetv2_075', 4): 7.50, ('od_mobilenetv2_050', 1): 2.43, ('od_mobilenetv2_050', 4): 4.44,
}


def _released(layer: ODConv2d, x: torch.Tensor) -> torch.Tensor:
    """Oracle: the same module (same parameters) with the release's formulation, `impl='released'`."""
    impl, layer.impl = layer.impl, 'released'
    try:
        return layer(x)
    finally:
        layer.impl = impl


def _released_attentions(attn: ODAttention, x: torch.Tensor):
    """The release's attention branch (modules/odconv.py `Attention`): pooling, 1x1 convs, BN, ReLU, and sigmoid or
    softmax heads whose logits are divided by the temperature (in training; evaluation runs at temperature 1)."""
    hidden = attn.act(attn.bn(attn.fc(F.adaptive_avg_pool2d(x, 1))))
    temperature = attn.temperature if attn.training else 1.

    def head(fc, act):
        return None if fc is None else act(fc(hidden).flatten(1) / temperature)
    return (head(attn.channel_fc, torch.sigmoid), head(attn.filter_fc, torch.sigmoid),
            head(attn.spatial_fc, torch.sigmoid), head(attn.kernel_fc, lambda t: torch.softmax(t, dim=1)))


def _layer(in_chs, out_chs, k, stride, groups, kernel_num, dtype=torch.float64):
    torch.manual_seed(0)
    layer = ODConv2d(in_chs, out_chs, k, stride, k // 2, groups=groups, bias=False, kernel_num=kernel_num).to(dtype)
    # Non-zero biases so that every attention really varies with the input.
    for name, p in layer.attention.named_parameters():
        if name.endswith('_fc.bias'):
            torch.nn.init.normal_(p)
    return layer


def _assert_matches_released(layer: ODConv2d, x: torch.Tensor, *params: torch.Tensor) -> None:
    """Outputs and gradients (input, kernel bank, `params`) equal the release's, in train and eval mode."""
    for train in (True, False):
        layer.train(train)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ours, ref = layer(xs[0]), _released(layer, xs[1])
        torch.testing.assert_close(ours, ref)
        assert ours.is_contiguous(memory_format=odconv._memory_format(x)), 'the output left the memory format'
        grad = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(ours, [xs[0], layer.weight, *params], grad),
                        torch.autograd.grad(ref, [xs[1], layer.weight, *params], grad)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize('kernel_num', [1, 2, 4])
@pytest.mark.parametrize('in_chs,out_chs,k,stride,groups', LAYER_CASES)
def test_layer_shapes_attentions_and_gradients(in_chs, out_chs, k, stride, groups, kernel_num):
    layer = _layer(in_chs, out_chs, k, stride, groups, kernel_num, torch.float32)
    attn = layer.attention
    assert (attn.filter_fc is None) == (groups == in_chs == out_chs)
    assert (attn.spatial_fc is None) == (k == 1)
    assert (attn.kernel_fc is None) == (kernel_num == 1)
    assert attn.fc.out_channels == 16  # max(int(8 * 0.0625), 16)
    assert layer.weight.shape == (kernel_num, out_chs, in_chs // groups, k, k)
    x = torch.randn(3, in_chs, 9, 9, requires_grad=True)
    out = layer(x)
    assert out.shape == (3, out_chs, (9 - 1) // stride + 1, (9 - 1) // stride + 1)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f'no gradient reaches {name}'


@pytest.mark.parametrize('per_sample_conv', [False, True], ids=['grouped-conv', 'per-sample-conv'])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('kernel_num', [1, 2, 4])
@pytest.mark.parametrize('in_chs,out_chs,k,stride,groups', LAYER_CASES)
def test_layer_matches_released_formulation(
        monkeypatch, in_chs, out_chs, k, stride, groups, kernel_num, channels_last, per_sample_conv):
    if per_sample_conv:  # one conv per sample in training, normally only for dense convs of >= 16M MACs per sample
        monkeypatch.setattr(odconv, '_PER_SAMPLE_CONV_MIN_MACS', 0)
    layer = _layer(in_chs, out_chs, k, stride, groups, kernel_num)
    layer.attention.temperature.fill_(7.)
    x = torch.randn(3, in_chs, 9, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _assert_matches_released(layer, x)


@pytest.mark.parametrize('size', [9, 33], ids=['small-map', 'large-map'])  # 33x33: one kernel per-sample too
@pytest.mark.parametrize('kernel_num', [1, 4])
@pytest.mark.parametrize('in_chs,out_chs,k,stride,groups', LAYER_CASES)
def test_layer_matches_released_formulation_without_autograd(
        monkeypatch, in_chs, out_chs, k, stride, groups, kernel_num, size):
    """The no-grad paths (per-sample convs on kernels built per chunk of samples and block of output channels with
    the attentions folded in, in-place scaling) stay exact, in both memory formats."""
    # Chunks of 2 samples, then blocks of 5 output channels (5 is the fewest rows a block may hold).
    monkeypatch.setattr(odconv, '_BLOCK_NUMEL', 2 * 5 * in_chs * k * k)
    monkeypatch.setattr(odconv, '_MIN_BLOCK_ROWS', 5)
    layer = _layer(in_chs, out_chs, k, stride, groups, kernel_num).eval()
    x = torch.randn(3, in_chs, size, size, dtype=torch.float64)
    with torch.no_grad():
        ref = _released(layer, x)
        torch.testing.assert_close(layer(x), ref)
        out = layer(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('kernel_num', [1, 4])
@pytest.mark.parametrize('in_chs,out_chs,k,stride,groups', LAYER_CASES)
def test_attentions_match_release(in_chs, out_chs, k, stride, groups, kernel_num):
    layer = _layer(in_chs, out_chs, k, stride, groups, kernel_num)
    layer.attention.temperature.fill_(7.)
    x = torch.randn(3, in_chs, 9, 9, dtype=torch.float64)
    for train in (True, False):
        layer.train(train)
        for ours, ref in zip(layer.attention(x), _released_attentions(layer.attention, x)):
            assert (ours is None) == (ref is None)
            if ours is not None:
                torch.testing.assert_close(ours, ref)


# (in, out, k, stride, groups), kernel_num, input size, autograd -> the path ops/odconv.py's table gives it.
PATH_CASES = [
    ((8, 12, 1, 1, 1), 1, 9, True, 'static'),
    ((8, 8, 1, 1, 8), 1, 9, True, 'static'),  # depth-wise 1x1 (was a TypeError)
    ((8, 12, 3, 1, 1), 4, 9, False, 'per_sample'),
    ((8, 12, 1, 1, 1), 1, 33, False, 'per_sample'),
    ((8, 12, 1, 1, 1), 4, 8, True, 'pointwise_bmm'),
    ((8, 12, 1, 2, 1), 4, 16, True, 'pointwise_bmm'),  # 8x8 pixels after the stride
    ((8, 12, 1, 1, 1), 4, 9, True, 'pointwise'),
    ((64, 64, 1, 1, 1), 4, 64, True, 'pointwise_looped'),  # 64 * 64 * 64 * 64 = 16M MACs per sample
    ((8, 12, 3, 1, 1), 1, 8, True, 'unfold'),
    ((8, 12, 3, 2, 1), 4, 16, True, 'unfold'),
    ((8, 12, 3, 1, 1), 4, 9, True, 'grouped'),
    ((8, 8, 3, 1, 8), 4, 9, False, 'grouped'),  # depth-wise, no autograd
    ((8, 12, 3, 1, 4), 1, 9, True, 'grouped'),
    ((32, 32, 3, 1, 1), 1, 64, True, 'looped'),  # 32 * 32 * 9 * 64 * 64 = 37.7M MACs per sample
]


def _choose_path(layer: ODConv2d, x: torch.Tensor, traced: bool) -> str:
    return odconv.choose_path(x, layer.weight, layer.stride, layer.padding, layer.dilation, layer.groups, traced)


@pytest.mark.parametrize('conv,kernel_num,size,grad,path', PATH_CASES, ids=[c[-1] + f'-{i}' for i, c in
                                                                            enumerate(PATH_CASES)])
def test_select_path_follows_its_table(conv, kernel_num, size, grad, path):
    layer = _layer(*conv, kernel_num).eval()
    x = torch.randn(2, conv[0], size, size, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        assert _choose_path(layer, x, traced=False) == path


@pytest.mark.parametrize('path', sorted(odconv.PATHS))
@pytest.mark.parametrize('in_chs,out_chs,k,stride,groups', LAYER_CASES)
def test_every_path_named_by_impl_matches_released_formulation(in_chs, out_chs, k, stride, groups, path):
    """`impl=<path>` runs that path on every call: outputs (and gradients, where the path has autograd) equal the
    release's, for every conv the path can take; the others are refused when the layer is built."""
    for kernel_num in (1, 4):
        try:
            odconv.check_impl(path, k, groups, k // 2, kernel_num)
        except ValueError as e:
            with pytest.raises(ValueError, match=f"impl='{path}' needs a conv that is"):
                ODConv2d(in_chs, out_chs, k, stride, k // 2, groups=groups, kernel_num=kernel_num, impl=path)
            assert '\n' not in str(e)
            continue
        layer = _layer(in_chs, out_chs, k, stride, groups, kernel_num)
        layer.impl = path
        x = torch.randn(3, in_chs, 9, 9, dtype=torch.float64)
        if path.startswith('per_sample'):  # inference only
            with torch.no_grad():
                torch.testing.assert_close(layer.eval()(x), _released(layer, x))
        else:
            _assert_matches_released(layer, x)


@pytest.mark.parametrize('kernel_num', [1, 4])
@pytest.mark.parametrize('in_chs,out_chs,k,stride,groups', LAYER_CASES)
def test_traced_path_matches_released_formulation(in_chs, out_chs, k, stride, groups, kernel_num):
    """What torch.compile and torch.export trace ('traced', or 'static'), run eagerly: outputs and gradients equal
    the release's, in both memory formats."""
    layer = _layer(in_chs, out_chs, k, stride, groups, kernel_num)
    layer.attention.temperature.fill_(7.)
    x = torch.randn(3, in_chs, 9, 9, dtype=torch.float64)
    expected = 'static' if k == 1 and kernel_num == 1 else 'traced'
    assert _choose_path(layer, x, traced=True) == expected
    layer.impl = expected
    _assert_matches_released(layer, x)
    _assert_matches_released(layer, x.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize('kernel_num', [1, 4])
@pytest.mark.parametrize('in_chs,out_chs,k,stride,groups', LAYER_CASES)
def test_traced_inference_path_matches_released_formulation(in_chs, out_chs, k, stride, groups, kernel_num):
    """What torch.compile and torch.export trace without autograd: dense convs with several kernels call the
    per-sample path as the op `dynconv::odconv_per_sample_forward` (opcheck: schema, fake tensors), the others the
    training formulation; outputs equal the release's in both memory formats, and under bfloat16 autocast the op
    computes in bfloat16."""
    layer = _layer(in_chs, out_chs, k, stride, groups, kernel_num).eval()
    x = torch.randn(3, in_chs, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        path = layer.impl = _choose_path(layer, x, traced=True)
        if groups == 1 and kernel_num > 1:
            assert path == 'per_sample_op'
            attentions = layer.attention(x)
            torch.library.opcheck(torch.ops.dynconv.odconv_per_sample_forward.default,
                                  (x, layer.weight, *attentions, stride, layer.padding, 1))
        else:
            assert path in ('traced', 'static')
        ref = _released(layer, x)
        torch.testing.assert_close(layer(x), ref)
        out = layer(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last)
        layer.float()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(x.float())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref.float(), atol=0.05 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize('traced', [False, True])
@pytest.mark.parametrize('kernel_num', [1, 4])
@pytest.mark.parametrize('in_chs,out_chs,k,stride,groups', LAYER_CASES)
def test_empty_batch_in_eval(monkeypatch, in_chs, out_chs, k, stride, groups, kernel_num, traced):
    if traced:
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    layer = _layer(in_chs, out_chs, k, stride, groups, kernel_num, torch.float32).eval()
    size = (9 - 1) // stride + 1
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert layer(torch.randn(0, in_chs, 9, 9)).shape == (0, out_chs, size, size)


# nn.Conv2d arguments (positional, keywords) -> the same layer as ODConv2d; every case runs on a 9x10 input.
CONV2D_CASES = [
    ((8, 12, 3), {}),
    ((8, 12, (3, 3)), dict(stride=(2, 2), padding=(1, 1), bias=False)),
    ((8, 12, 3, 1, (1, 0), 2), {}),  # unequal padding, dilation
    ((), dict(in_channels=8, out_channels=12, kernel_size=3, padding='same', dilation=2)),
    ((), dict(in_channels=8, out_channels=12, kernel_size=2, padding='same')),  # odd total: the extra at the end
    ((), dict(in_channels=8, out_channels=12, kernel_size=4, padding='same', bias=False)),
    ((8, 12, 1, 2, 'valid'), {}),
    ((8, 12, 3, 1, 1, 1, 4), {}),  # groups
    ((8, 8, 3), dict(padding=2, dilation=2, groups=8, bias=False)),  # depth-wise
    ((8, 12, 3, 1, 1, 1, 1, True, 'reflect'), {}),
    ((8, 12, 3), dict(stride=2, padding=(2, 1), padding_mode='replicate')),
    ((8, 12, 3), dict(padding=1, padding_mode='circular', bias=False)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize('args,kwargs', CONV2D_CASES, ids=[str(i) for i in range(len(CONV2D_CASES))])
def test_built_from_conv2d_arguments_it_computes_that_conv(args, kwargs):
    """Built from the same arguments as an nn.Conv2d, with one kernel and attentions fixed to 1 (zero weights,
    large biases: sigmoid(40) is 1 in float64), ODConv2d computes that nn.Conv2d: same parameter shapes, padding
    sides and modes, bias."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(*args, **kwargs).double()
    layer = ODConv2d(*args, **kwargs, kernel_num=1).double().eval()
    assert layer.weight[0].shape == conv.weight.shape
    assert (layer.bias is None) == (conv.bias is None)
    with torch.no_grad():
        for name, p in layer.attention.named_parameters():
            if name.endswith('_fc.weight'):
                p.zero_()
            elif name.endswith('_fc.bias'):
                p.fill_(40.)
        layer.weight[0].copy_(conv.weight)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
        x = torch.randn(2, 8, 9, 10, dtype=torch.float64)
        torch.testing.assert_close(layer(x), conv(x))


def test_padded_by_f_pad_the_attentions_still_see_the_unpadded_input():
    """padding (1, 0) goes through F.pad, padding 1 through the op: same attentions (of the input as given), so the
    first output is the second without its border columns."""
    torch.manual_seed(0)
    f_pad = ODConv2d(8, 12, 3, padding=(1, 0), bias=False, kernel_num=4).double().eval()
    op_pad = ODConv2d(8, 12, 3, padding=1, bias=False, kernel_num=4).double().eval()
    op_pad.load_state_dict(f_pad.state_dict())
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(f_pad(x), op_pad(x)[..., 1:-1])


def test_release_and_project_argument_names():
    """The release's (in_planes, out_planes) and this project's (in_chs, out_chs) names build the same layer, with the
    release's parameter names."""
    keys = set(ODConv2d(in_planes=8, out_planes=12, kernel_size=3, bias=False, reduction=0.25, kernel_num=2)
               .state_dict())
    assert keys == set(ODConv2d(in_chs=8, out_chs=12, kernel_size=3, bias=False, kernel_num=2).state_dict())
    assert keys == {'weight', 'attention.fc.weight', 'attention.bn.weight', 'attention.bn.bias',
                    'attention.bn.running_mean', 'attention.bn.running_var', 'attention.bn.num_batches_tracked',
                    'attention.channel_fc.weight', 'attention.channel_fc.bias', 'attention.filter_fc.weight',
                    'attention.filter_fc.bias', 'attention.spatial_fc.weight', 'attention.spatial_fc.bias',
                    'attention.kernel_fc.weight', 'attention.kernel_fc.bias'}
    assert 'bias' in ODConv2d(8, 12, 3).state_dict()  # nn.Conv2d's default


def test_conv2d_style_arguments():
    """kernel_size, stride and dilation as nn.Conv2d takes them, for square convolutions; one clear error
    otherwise."""
    layer = ODConv2d(8, 12, (3, 3), stride=(2, 2), padding=(1, 1), dilation=[1, 1])
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == (3, 2, 1, 1)
    assert ODConv2d(8, 12, 3, padding='valid').padding == 0
    bad = [
        (dict(kernel_size=(3, 5)), r'kernel_size must be an int or a tuple of equal ints .*got \(3, 5\)'),
        (dict(kernel_size=3, stride=(1, 2)), 'stride must be an int or a tuple of equal ints'),
        (dict(kernel_size=3, padding='same', stride=2), "padding='same' needs stride 1"),
        (dict(kernel_size=3, padding='full'), "padding must be an int >= 0, a pair of them, 'valid' or 'same', got "
                                              "'full'"),
        (dict(kernel_size=3, padding=(1, 2, 3)), 'padding must be an int >= 0, a pair of them'),
        (dict(kernel_size=3, padding_mode='mirror'), "padding_mode must be one of .*, got 'mirror'"),
        (dict(kernel_size=3, attention_norm='instance'), "attention_norm must be one of .*, got 'instance'"),
        (dict(kernel_size=3, impl='fast'), "impl must be one of \\('auto', 'released', 'static', .*\\), got 'fast'"),
        (dict(kernel_size=3, impl='pointwise'), "impl='pointwise' needs a conv that is dense, 1x1, no padding; this "
                                                "one is not 1x1"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match) as info:
            ODConv2d(8, 12, **kwargs)
        assert '\n' not in str(info.value)
    for args, kwargs, match in [((8, 12, 3), dict(in_chs=8), 'needs in_channels exactly once, as one of '
                                                              'in_channels, in_chs, in_planes; got in_channels=8, '
                                                              'in_chs=8'),
                                ((), dict(out_channels=12, kernel_size=3), 'needs in_channels exactly once.*got none'),
                                ((8, 12), {}, 'needs kernel_size exactly once')]:
        with pytest.raises(TypeError, match=match):
            ODConv2d(*args, **kwargs)


def test_wrong_input_channels_is_one_line():
    layer = ODConv2d(8, 12, 3)
    for x in (torch.randn(2, 5, 9, 9), torch.randn(8, 9, 9)):
        with pytest.raises(ValueError, match=r'ODConv2d with in_channels=8 expects input \(batch, 8, height, width\), '
                                             r'got shape \(') as info:
            layer(x)
        assert '\n' not in str(info.value)


@pytest.mark.parametrize('attention_norm', ['batch', 'layer', 'none'])
@pytest.mark.parametrize('kernel_num,groups,bias', [(1, 1, False), (4, 1, True), (4, 8, False)])
def test_fuse_folds_batchnorms(kernel_num, groups, bias, attention_norm):
    """fuse(bn): the attention's BatchNorm folded into its fc, `bn` into the kernel bank and the bias: the same
    outputs in eval mode, no BatchNorm left; refused in training mode."""
    torch.manual_seed(0)
    layer = ODConv2d(8, 8, 3, padding=1, groups=groups, bias=bias, kernel_num=kernel_num,
                     attention_norm=attention_norm).double()
    bn = torch.nn.BatchNorm2d(8).double()
    with pytest.raises(RuntimeError, match=r'call model.eval\(\)'):
        layer.fuse(bn)
    layer.eval(), bn.eval()
    with torch.no_grad():
        for norm in (bn, layer.attention.bn):
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2.), norm.weight.normal_()
                norm.bias.normal_()
        x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
        expected = bn(layer(x))
        fused = layer.fuse(bn)
        torch.testing.assert_close(fused(x), expected)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert fused.bias is not None and fused.weight.is_contiguous()


def _train_steps(model, x, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    return [name for (name, p), p0 in zip(model.named_parameters(), before) if torch.equal(p, p0)]


@pytest.mark.parametrize('attention_norm', ['layer', 'none'])
def test_batch_independent_attention_norm_trains_at_batch_one(attention_norm):
    torch.manual_seed(0)
    layer = ODConv2d(8, 12, 3, padding=1, kernel_num=4, attention_norm=attention_norm)
    assert _train_steps(layer.train(), torch.randn(1, 8, 9, 9)) == []
    model = _tiny('od_resnet18', kernel_num=2, attention_norm=attention_norm).train()
    assert _train_steps(model, torch.randn(1, 3, 64, 64)) == []
    assert not any(isinstance(m.attention.bn, torch.nn.BatchNorm2d) for m in model.modules()
                   if isinstance(m, ODConv2d))
    # a training batch gives every sample the outputs it gets alone (no statistics across the batch)
    x = torch.randn(3, 8, 9, 9)
    torch.testing.assert_close(layer(x)[1:2], layer(x[1:2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
@pytest.mark.parametrize('size', [5, 9], ids=['bmm', 'grouped-conv'])
@pytest.mark.parametrize('kernel_num', [1, 4])
@pytest.mark.parametrize('in_chs,out_chs,k,stride,groups', LAYER_CASES)
def test_cuda_layer_matches_released_formulation(in_chs, out_chs, k, stride, groups, kernel_num, size):
    """On a GPU (one block of per-sample kernels, cuBLAS/cuDNN): outputs and gradients, fp64; then fp16 autocast."""
    layer = _layer(in_chs, out_chs, k, stride, groups, kernel_num).cuda()
    x = torch.randn(3, in_chs, size, size, dtype=torch.float64, device='cuda')
    _assert_matches_released(layer, x)
    layer = layer.float().train()
    with torch.autocast('cuda', dtype=torch.float16):
        out = layer(x.float())
    out.float().square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize('kernel_num', [1, 4])
def test_per_sample_path_under_bfloat16_autocast(kernel_num):
    layer = _layer(8, 12, 3, 1, 1, kernel_num, torch.float32).eval()
    x = torch.randn(3, 8, 33, 33)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)


def test_channels_last_model_conversion_keeps_the_kernel_bank():
    """model.to(memory_format=torch.channels_last) (train.py --channels-last) converts the 4-D tensors; the 5-D
    kernel banks stay contiguous instead of failing."""
    model = _tiny('od_resnet18', kernel_num=2).to(memory_format=torch.channels_last)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.layer1[0].conv1.weight.dim() == 5 and model.layer1[0].conv1.weight.is_contiguous()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    model.to(torch.float64, memory_format=torch.channels_last)  # with gradients present
    assert model.layer1[0].conv1.weight.grad.dtype == torch.float64


@pytest.mark.parametrize('in_chs,out_chs,k,stride,groups', [c for c in LAYER_CASES if c[-1] == 1])
def test_blockwise_kernel_aggregation_matches_released_formulation(monkeypatch, in_chs, out_chs, k, stride, groups):
    """Per-sample kernels aggregated a few output channels at a time give the same outputs and gradients."""
    monkeypatch.setattr(odconv, '_BMM_BLOCK_NUMEL', 7)
    layer = _layer(in_chs, out_chs, k, stride, groups, kernel_num=4)
    x = torch.randn(3, in_chs, 5, 5, dtype=torch.float64)  # <= 64 output pixels: the blockwise bmm paths
    _assert_matches_released(layer, x, layer.attention.kernel_fc.weight)


def test_batch_of_one_in_training_gives_clear_error():
    layer = _layer(8, 12, 3, 1, 1, 4, torch.float32)
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="training batch of 1.*drop_last.*attention_norm='layer'"):
        layer(x)
    layer.eval()
    assert layer(x).shape == (1, 12, 5, 5)


@pytest.mark.parametrize('size', [10, 6], ids=['grouped-conv', 'im2col'])
def test_flop_counter_sees_attention_and_kernel_aggregation(size):
    batch, hidden = 2, 16
    layer = ODConv2d(64, 32, 3, padding=1, kernel_num=4).eval()
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(batch, 64, size, size))
    macs = batch * (
        64 * hidden + hidden * (64 + 32 + 9 + 4)  # attention fcs
        + 4 * 32 * 64 * 9  # kernel aggregation (matmul over kernel_num)
        + 32 * 64 * 9 * size * size  # the convolution
    )
    assert counter.get_total_flops() == 2 * macs


def test_count_macs_follows_the_papers_convention(caplog):
    """model_info counts an ODConv by ODConv2d.count_macs, whatever formulation runs; the static stem conv of a
    model stays counted by FlopCounterMode."""
    hidden = 16
    layer = ODConv2d(64, 32, 3, padding=1, kernel_num=4)
    expected = (32 * 64 * 9 * 10 * 10  # the convolution
                + 64 * hidden + hidden * (64 + 32 + 9 + 4)  # attention fcs
                + 4 * 32 * 64 * 9 * 3)  # channel, filter and spatial attentions on each of the 4 kernels
    assert layer.count_macs((1, 64, 10, 10), (1, 32, 10, 10)) == expected
    assert count_params_and_macs(layer, (64, 10, 10))[1] == expected
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1, bias=False), layer)
    assert count_params_and_macs(model, (3, 10, 10))[1] == expected + 3 * 64 * 10 * 10
    with caplog.at_level(logging.INFO, logger='tools.info'):  # the per-module table agrees
        count_params_and_macs(model, (3, 10, 10), depth=2)
    rows = {line.split()[0]: float(line.split()[1]) for line in caplog.text.splitlines()[-4:]}
    assert rows == {'Global': pytest.approx((expected + 3 * 64 * 100) / 1e9, abs=1e-4),
                    'Sequential': pytest.approx((expected + 3 * 64 * 100) / 1e9, abs=1e-4),
                    'Sequential.0': pytest.approx(3 * 64 * 100 / 1e9, abs=1e-4),
                    'Sequential.1': pytest.approx(expected / 1e9, abs=1e-4)}
    depthwise = ODConv2d(16, 16, 3, groups=16, kernel_num=1)  # channel and spatial attentions only
    assert depthwise.count_macs((2, 16, 7, 7), (2, 16, 5, 5)) == 2 * (
        16 * 9 * 25 + 16 * hidden + hidden * (16 + 9) + 16 * 9 * 2)


@pytest.mark.parametrize('kernel_num,published', [(1, 0.058), (4, 0.222)])
def test_resnet50_overhead_matches_published_madds(kernel_num, published):
    """The issue's check: OD-ResNet-50's MACs over ResNet-50, both counted by model_info, within 10% of the README's
    Madds difference (3.916 - 3.858 and 4.080 - 3.858)."""
    row = published_overhead('od_resnet50', {'kernel_num': kernel_num}, REFERENCE / 'paper_tables.yaml')
    assert row['baseline'] == 'resnet50' and row['pub_overhead_gmacs'] == pytest.approx(published)
    assert row['overhead_gmacs'] == pytest.approx(published, rel=0.1)


def test_temperature_schedule_values():
    assert odconv_temperature(0.) == 30.
    assert odconv_temperature(5.) == pytest.approx(15.5)
    assert odconv_temperature(10.) == 1.
    assert odconv_temperature(42.) == 1.
    assert odconv_temperature(2., temp_init=5., temp_epochs=4.) == pytest.approx(3.)
    assert odconv_temperature(0., temp_epochs=0) == 1.
    # The release's get_temperature(iteration, epoch, iters_per_epoch): same line, per iteration.
    iters = 100
    for epoch, it in ((0, 1), (3, 50), (9, 99), (10, 5)):
        released = 1. + max(0., 29. * (iters * 10 - (it + epoch * iters)) / (iters * 10))
        assert odconv_temperature(epoch + it / iters) == pytest.approx(released)


def _tiny(name, **kwargs):
    if 'resnet' in name:
        kwargs = dict(layers=(1, 1, 1, 1), **kwargs)
    return timm.create_model(name, num_classes=5, **kwargs)


def test_temperature_hooks_save_restore_and_eval():
    model = _tiny('od_resnet18', kernel_num=2, temp_init=20., temp_epochs=4.)
    model.set_training_progress(1.)
    temps = {float(m.attention.temperature) for m in model.modules() if isinstance(m, ODConv2d)}
    assert temps == {15.25}  # 1 + 19 * (1 - 1/4), exact in float32
    assert model.training_hook_log() == {'temperature': pytest.approx(15.25)}
    assert not any('temperature' in k for k in model.state_dict())

    fresh = _tiny('od_resnet18', kernel_num=2)
    fresh.load_state_dict(model.state_dict())
    assert fresh.training_hook_log()['temperature'] == 1.
    fresh.load_training_hook_state(model.training_hook_state())
    assert fresh.training_hook_log()['temperature'] == pytest.approx(15.25)

    x = torch.randn(2, 3, 32, 32)
    model.eval()
    hot = model(x)
    model.set_temperature(1.)
    torch.testing.assert_close(model(x), hot)  # evaluation always runs at temperature 1
    model.train()
    cold = model(x)
    model.set_training_progress(0.)
    assert not torch.allclose(model(x), cold)  # training uses the annealed temperature


MODEL_CASES = [(n, 2) for n in OD_MODELS] + [('od_resnet18', 1), ('od_mobilenetv2_050', 1)]


@pytest.mark.parametrize('name,kernel_num', MODEL_CASES)
def test_models_forward_backward(name, kernel_num):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, kernel_num=kernel_num, drop_rate=0.1)
    cfg = model.pretrained_cfg
    assert (cfg['crop_pct'], cfg['interpolation'], cfg['input_size']) == (0.875, 'bilinear', (3, 224, 224))
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.forward_head(model.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True).shape == (
        2, model.num_features)
    model.reset_classifier(3)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize('name', ['od_resnet18', 'od_mobilenetv2_050'])
def test_features_only(name):
    model = timm.create_model(name, features_only=True, kernel_num=2)
    feats = model(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [64 // f.shape[-1] for f in feats] == model.feature_info.reduction()


def _reference_tables():
    for path in sorted((REFERENCE / 'state_dicts').glob('od_*.json')):
        name, kernels = path.stem.rsplit('_', 1)
        yield pytest.param(name, int(kernels.rstrip('x')), path, id=path.stem)


@pytest.mark.parametrize('name,kernel_num,path', list(_reference_tables()))
def test_keys_shapes_and_params_match_release(name, kernel_num, path):
    table = json.loads(path.read_text())
    with torch.device('meta'):
        model = timm.create_model(name, kernel_num=kernel_num)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == table['state_dict']
    params = sum(p.numel() for p in model.parameters())
    assert params == table['params']
    if (name, kernel_num) in PUBLISHED_PARAMS:
        assert round(params / 1e6, 2) == PUBLISHED_PARAMS[(name, kernel_num)]


def test_release_checkpoint_format_loads(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model('od_mobilenetv2_050', kernel_num=2)
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-3, momentum=0.9)
    trained(torch.randn(2, 3, 32, 32)).logsumexp(1).mean().backward()
    optimizer.step()
    path = tmp_path / 'model_best.pth.tar'
    # main.py: DDP-wrapped state_dict, accuracies as tensors, the optimizer state.
    torch.save({'epoch': 150, 'state_dict': {'module.' + k: v for k, v in trained.state_dict().items()},
                'acc': torch.tensor(68.0), 'best_acc': torch.tensor(68.06), 'optimizer': optimizer.state_dict()}, path)
    model = timm.create_model('od_mobilenetv2_050', kernel_num=2)
    meta = load_weights(model, str(path))
    assert meta['epoch'] == 150
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), trained.eval()(x))


CONFIGS = sorted((ROOT / 'configs' / 'odconv').glob('*.yaml'))


def test_one_config_per_published_row():
    rows = {f'{n}_{k}x' for n, k in PUBLISHED_PARAMS}
    assert {p.stem for p in CONFIGS} == rows


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_names_its_model_and_recipe(path):
    cfg = yaml.safe_load(path.read_text())
    name, kernels = path.stem.rsplit('_', 1)
    assert cfg['model'] == name and timm.is_model(name)
    assert cfg['model_kwargs'] == {'kernel_num': int(kernels.rstrip('x')), 'reduction': 0.0625, 'temp_init': 30.0,
                                   'temp_epochs': 10}
    mobilenet = 'mobilenet' in name
    recipe = (150, 0.05, 4e-5) if mobilenet else (100, 0.1, 1e-4)
    assert (cfg['epochs'], cfg['lr_base'], cfg['weight_decay']) == recipe
    assert cfg['sched'] == ('cosine' if mobilenet else 'multistep')
    assert (cfg['crop_pct'], cfg['interpolation']) == (0.875, 'bilinear')
    assert 'drop' in cfg


def test_attention_init_is_kaiming_fan_out():
    """The release's init: kaiming normal over each conv's fan-out (std sqrt(2 / out_channels) for 1x1 convs)."""
    torch.manual_seed(0)
    att = ODAttention(1024, 1024, 3, kernel_num=4)  # fc: 1024 -> 64 channels, fan-in 16x the fan-out
    assert att.fc.weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.02)
    assert att.channel_fc.weight.std().item() == pytest.approx((2 / 1024) ** 0.5, rel=0.02)
