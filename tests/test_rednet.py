"""Involution and RedNet: the layer against the release's formulation, the models' sizes, initialisation, features,
and the release's mmcls checkpoints through the project's loaders (timm, validate.py, train.py).

Full-size models are built on the meta device (parameter counts); forward/backward runs use a narrow RedNet (one
bottleneck per stage, 16-channel stem involution, bottleneck widths 16/32/64/128) on small inputs.
"""
import argparse
import collections
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

import models  # noqa: F401  (registers the models)
import validate
from models._helpers import load_weights
from models.layers.involution import Involution2d
from models.rednet import InvolutionBottleneck, RedNet, checkpoint_filter_fn
from ops import HAS_EXT
from tests.conftest import TINY_NUM_CLASSES, TINY_VAL_PER_CLASS
from tools.info import count_params_and_macs, create_counting_model

IMPLS = ['reference', pytest.param('ext', marks=pytest.mark.skipif(not HAS_EXT, reason='ops._C is not built'))]
IMPL = 'ext' if HAS_EXT else 'reference'
# entrypoint -> (stage depths, published params (M), published GFLOPs, published top-1); release README
PUBLISHED = {
    'rednet26': ((1, 2, 4, 1), 9.23, 1.73, 75.96),
    'rednet38': ((2, 3, 5, 2), 12.39, 2.22, 77.48),
    'rednet50': ((3, 4, 6, 3), 15.54, 2.71, 78.35),
    'rednet101': ((3, 4, 23, 3), 25.65, 4.74, 78.92),
    'rednet152': ((3, 8, 36, 3), 33.99, 6.79, 79.12),
}
REFERENCE = Path(__file__).resolve().parents[1] / 'reference' / 'paper_tables.yaml'
NARROW = dict(layers=(1, 1, 1, 1), stem_channels=32, base_channels=16)


def _narrow(name='rednet26', **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(NARROW, **dict(dict(impl=IMPL), **kwargs)))


def _release_involution(layer, x):
    """The release's involution (involution_naive.py) from its definition, as a sum over taps: the kernel generator
    sees x average-pooled by the stride, its output channel g*k*k + u*k + v is tap (u, v) of group g, channel c uses
    group c // group_channels, and tap (u, v) of output (i, j) reads x[i*s + u - r, j*s + v - r] (zero outside)."""
    k, s, r = layer.kernel_size, layer.stride, (layer.kernel_size - 1) // 2
    pooled = x if s == 1 else F.avg_pool2d(x, s, s)
    weight = layer.conv2.conv(layer.conv1.activate(layer.conv1.bn(layer.conv1.conv(pooled))))
    b, c = x.shape[:2]
    oh, ow = weight.shape[-2:]
    weight = weight.view(b, layer.groups, k, k, oh, ow).repeat_interleave(layer.group_channels, dim=1)
    padded = F.pad(x, [r] * 4)
    out = x.new_zeros(b, c, oh, ow)
    for u in range(k):
        for v in range(k):
            out += padded[:, :, u:u + s * (oh - 1) + 1:s, v:v + s * (ow - 1) + 1:s] * weight[:, :, u, v]
    return out


def _grads(module, x):
    return [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('channels,k,stride,size', [
    (16, 3, 1, (9, 11)), (32, 7, 1, (8, 10)), (64, 7, 2, (12, 14)), (128, 3, 2, (8, 6)), (256, 7, 1, (5, 7)),
    (48, 7, 3, (12, 9)),
])
def test_involution_equals_release_formulation(impl, channels, k, stride, size):
    torch.manual_seed(0)
    layer = Involution2d(channels, k, stride, impl=impl).double().train()
    x = torch.randn(2, channels, *size, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, channels, size[0] // stride, size[1] // stride)
    out.square().sum().backward()
    ours = _grads(layer, x)
    layer.zero_grad()
    x.grad = None
    expected = _release_involution(layer, x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(ours, _grads(layer, x)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('impl', IMPLS)
def test_involution_sides_not_divisible_by_the_stride(impl):
    """Where the release fails (odd sides at stride 2), the output has the conv formula's ceil(H / s) positions: the
    aggregation of a zero-padded input, the generator on a ceil-mode average pool (partial windows averaged over the
    pixels they cover)."""
    torch.manual_seed(0)
    layer = Involution2d(32, 7, 2, impl=impl).double().eval()
    x = torch.randn(2, 32, 13, 10, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (2, 32, 7, 5)
    # the same result from an input padded to even sides whose pooled last row equals the partial window's mean
    padded = F.pad(x, (0, 0, 0, 1))
    padded[:, :, 13] = x[:, :, 12]
    weight = layer.conv2(layer.conv1(F.avg_pool2d(padded, 2, 2)))
    zero_padded = F.pad(x, (0, 0, 0, 1))
    expected = layer._ddf(zero_padded, None, weight, kernel_size=7, stride=2, head=2)
    torch.testing.assert_close(out, expected)
    # rows whose windows lie inside the first 12 input rows equal the release's result on those rows
    torch.testing.assert_close(out[:, :, :5], _release_involution(layer, x[:, :, :12])[:, :, :5])


def test_involution_argument_errors():
    with pytest.raises(ValueError, match='multiple of group_channels'):
        Involution2d(24, 7)
    with pytest.raises(ValueError, match='odd'):
        Involution2d(16, 4)
    with pytest.raises(ValueError, match='impl'):
        Involution2d(16, 7, impl='cupy')


def test_involution_state_dict_names():
    assert {k: list(v.shape) for k, v in Involution2d(64, 7, 2).state_dict().items()} == {
        'conv1.conv.weight': [16, 64, 1, 1], 'conv1.bn.weight': [16], 'conv1.bn.bias': [16],
        'conv1.bn.running_mean': [16], 'conv1.bn.running_var': [16], 'conv1.bn.num_batches_tracked': [],
        'conv2.conv.weight': [196, 16, 1, 1], 'conv2.conv.bias': [196]}


def _macs_our_count(name):
    """The release model's multiply-adds as the reference facts count them (convs + fc, involution aggregation)."""
    tables = yaml.safe_load(REFERENCE.read_text())
    return next(r for r in tables['involution']['macs_our_count']['rows'] if r['name'] == name)


@pytest.mark.parametrize('name', PUBLISHED)
def test_params_equal_published_and_macs_counted(name):
    depths, params_m, _, _ = PUBLISHED[name]
    model = create_counting_model(name)
    assert tuple(len(getattr(model.backbone, f'layer{i}')) for i in range(1, 5)) == depths
    params, macs = count_params_and_macs(model, (3, 224, 224))
    assert abs(params / 1e6 - params_m) < 0.01
    # the aggregation's k*k multiply-adds per output element: the stem's (k=3, 32 channels at 112x112) and each
    # bottleneck's (k=7, stage i: 64 * 2**i channels at (56 / 2**i)**2 outputs)
    involution = 32 * 9 * 112 ** 2 + sum(d * 64 * 2 ** i * 49 * (56 // 2 ** i) ** 2 for i, d in enumerate(depths))
    row = _macs_our_count(name)
    assert round(involution / 1e9, 3) == row['involution']
    assert round(macs / 1e9, 3) == row['total']
    assert round((macs - involution) / 1e9, 3) == row['conv_fc']


def test_init_follows_the_release():
    model = timm.create_model('rednet26', **NARROW)
    for m in model.modules():
        if isinstance(m, InvolutionBottleneck):
            assert torch.count_nonzero(m.bn3.weight) == 0  # zero_init_residual
            assert torch.all(m.bn2.weight == 1) and torch.all(m.bn2.bias == 0)
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
    conv = model.backbone.layer4[0].conv1
    fan_out = conv.out_channels
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    assert model.head.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.count_nonzero(model.head.fc.bias) == 0


@pytest.mark.parametrize('impl', IMPLS)
def test_narrow_model_forward_backward_and_features(impl):
    model = _narrow(num_classes=7, impl=impl)
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    final, inter = model.forward_intermediates(x)
    assert [tuple(t.shape[1:]) for t in inter] == [(32, 32, 48), (64, 16, 24), (128, 8, 12), (256, 4, 6), (512, 2, 3)]
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(model.forward_head(final), model(x))
    assert model.forward_head(final, pre_logits=True).shape == (2, 512)
    # odd input sides work (the release's naive involution raises there)
    assert model(torch.randn(1, 3, 65, 97)).shape == (1, 7)


def test_features_only_and_classifier_reset():
    features = _narrow(features_only=True, out_indices=(1, 2, 3, 4))
    assert features.feature_info.channels() == [64, 128, 256, 512]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    outs = features(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    model = _narrow()
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 512)


def _mmcls_checkpoint(model):
    """A file as mmcls's train + publish_model.py leaves it: mmcv save_checkpoint's {'meta', 'state_dict'} with the
    optimizer removed (mmcv runner/checkpoint.py; mmcls tools/publish_model.py)."""
    meta = {'mmcv_version': '1.2.7', 'time': 'Sat Feb 13 12:00:00 2021', 'env_info': 'sys.platform: linux',
            'config': "model = dict(type='ImageClassifier', backbone=dict(type='RedNet', depth=26))", 'seed': None,
            'CLASSES': [f'n{i:08d}' for i in range(model.num_classes)], 'epoch': 130, 'iter': 81380,
            'hook_msgs': {}}
    state_dict = collections.OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    return {'meta': meta, 'state_dict': state_dict}


@pytest.fixture
def release_file(tmp_path):
    """A trained-looking narrow RedNet-26 (random BN statistics, non-zero last BNs) saved in the release's format."""
    torch.manual_seed(1)
    model = _narrow(num_classes=TINY_NUM_CLASSES)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    # the head ignores the image: logits = bias, so validate.py's loss and top-1 are known exactly
    model.head.fc.weight.data.zero_()
    model.head.fc.bias.data.copy_(torch.arange(TINY_NUM_CLASSES, dtype=torch.float32))
    path = tmp_path / 'rednet26_release.pth'
    torch.save(_mmcls_checkpoint(model), path)
    return path, model.state_dict()


def test_release_checkpoint_loads_unchanged(release_file):
    path, expected = release_file
    model = _narrow(num_classes=TINY_NUM_CLASSES)
    load_weights(model, str(path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    # timm's pretrained path (a pretrained cfg `file`) takes the same file
    torch.manual_seed(0)
    via_timm = timm.create_model(
        'rednet26', pretrained=True, num_classes=TINY_NUM_CLASSES, pretrained_cfg_overlay=dict(file=str(path), num_classes=TINY_NUM_CLASSES),
        **dict(NARROW, impl=IMPL))
    assert all(torch.equal(via_timm.state_dict()[k], v) for k, v in expected.items())


def test_checkpoint_filter_fn_restores_the_backbone_prefix(release_file):
    _, expected = release_file
    backbone_only = {k[len('backbone.'):]: v for k, v in expected.items() if k.startswith('backbone.')}
    filtered = checkpoint_filter_fn(backbone_only, RedNet(**NARROW))
    assert filtered.keys() == {k for k in expected if k.startswith('backbone.')}
    assert checkpoint_filter_fn(dict(expected), RedNet(**NARROW)).keys() == expected.keys()


def test_release_checkpoint_through_validate(release_file, tiny_imagefolder):
    path, expected = release_file
    args = [tiny_imagefolder, '--model', 'rednet26', '--checkpoint', str(path), '--num-classes',
            str(TINY_NUM_CLASSES), '--img-size', '32', '-b', '20', '-j', '0', '--device', 'cpu',
            '--model-kwargs', *[f'{k}={v}' for k, v in NARROW.items()]]
    results = validate.validate_one(validate.parse_args(args))
    logits = expected['head.fc.bias'].expand(TINY_NUM_CLASSES, -1)
    assert results['samples'] == TINY_NUM_CLASSES * TINY_VAL_PER_CLASS
    assert results['loss'] == pytest.approx(F.cross_entropy(logits, torch.arange(TINY_NUM_CLASSES)).item(), abs=1e-4)
    assert results['top1'] == pytest.approx(100 / TINY_NUM_CLASSES)


def test_release_checkpoint_through_train_pretrained_path(release_file, tiny_imagefolder, tmp_path, in_process):
    """--pretrained-path starts from the release's file: the 1000-class head of an ImageNet file would be left out;
    here the classes agree, so every weight is taken (the run's LR is 0, the weights stay as loaded)."""
    path, expected = release_file
    in_process([
        '--data-dir', tiny_imagefolder, '--model', 'rednet26', '--model-kwargs',
        *[f'{k}={v}' for k, v in NARROW.items()], '--img-size', '32', '-b', '16', '-j', '0', '--warmup-epochs', '0',
        '--lr-base', '0', '--smoothing', '0', '--device', 'cpu', '--seed', '0', '--epochs', '1', '--val-split', '',
        '--log-interval', '100', '--output', str(tmp_path / 'out'), '--experiment', 'x', '--pretrained-path',
        str(path)])
    with torch.serialization.safe_globals([argparse.Namespace]):  # train.py's checkpoints carry its options
        saved = torch.load(tmp_path / 'out' / 'x' / 'last.pth.tar', weights_only=True)['state_dict']
    params = {n for n, _ in _narrow(num_classes=TINY_NUM_CLASSES).named_parameters()}
    assert all(torch.equal(saved[k], expected[k]) for k in params)
