"""DDF layers (FilterNorm, DDFPack, DDFUpPack) and the DDF-ResNet models: release semantics, shapes, gradients."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the models)
from models.ddf_resnet import DDFBottleneck
from models.layers.ddf import DDFPack, DDFUpPack, FilterNorm
from ops import HAS_EXT, ddf_reference

REFERENCE_DIR = Path(__file__).resolve().parents[1] / 'reference' / 'state_dicts'
DDF_MODELS = [f'ddf_{c}_resnet{d}' for c in ('mul', 'add') for d in (50, 101, 152)]
TINY = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16)
IMPLS = ['reference', pytest.param('ext', marks=pytest.mark.skipif(not HAS_EXT, reason='ops._C is not built'))]
needs_ext = pytest.mark.skipif(not HAS_EXT, reason='ops._C is not built')


def _grads(module, *inputs):
    return [p.grad.clone() for p in module.parameters()] + [x.grad.clone() for x in inputs]


# FilterNorm

def test_filter_norm_spatial_standardises_each_pixel_filter():
    torch.manual_seed(0)
    norm = FilterNorm(1, 3, 'spatial', 'relu')
    x = torch.randn(2, 9, 5, 6, dtype=torch.float64)
    expected = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-10) * (2 ** 0.5 / 3)
    torch.testing.assert_close(norm(x), expected)
    assert [n for n, _ in norm.named_parameters()] == []


def test_filter_norm_spatial_heads_are_normalised_separately():
    norm = FilterNorm(2, 3, 'spatial')
    x = torch.randn(2, 18, 4, 4, dtype=torch.float64)
    out = norm(x)
    for taps in (slice(0, 9), slice(9, 18)):
        head = x[:, taps]
        expected = (head - head.mean(1, keepdim=True)) / (head.std(1, keepdim=True) + 1e-10) / 3  # linear gain 1
        torch.testing.assert_close(out[:, taps], expected)


def test_filter_norm_channel_learned_std():
    torch.manual_seed(0)
    norm = FilterNorm(4, 3, 'channel', 'relu', running_std=True).double()
    assert norm.std.shape == (36,)
    x = torch.randn(2, 36, 1, 1, dtype=torch.float64)
    v = x.view(2, 4, 9)
    expected = ((v - v.mean(2, keepdim=True)) / (v.std(2, keepdim=True) + 1e-10)).view(2, 36) * norm.std
    torch.testing.assert_close(norm(x), expected)
    norm(x).square().sum().backward()
    assert norm.std.grad is not None and norm.std.grad.abs().sum() > 0


def _standardized(v, dim):
    return (v - v.mean(dim, keepdim=True)) / (v.std(dim, keepdim=True) + 1e-10)


def test_filter_norm_spatial_learned_std_and_mean_per_head_and_tap():
    torch.manual_seed(0)
    norm = FilterNorm(2, 3, 'spatial', running_std=True, running_mean=True).double()
    with torch.no_grad():  # every (head, tap) its own value, so a misplaced one shows
        norm.std.copy_(torch.arange(1., 19.))
        norm.mean.copy_(torch.arange(18.) / 7)
    x = torch.randn(3, 18, 4, 5, dtype=torch.float64)
    v = x.view(3, 2, 9, 4, 5)
    expected = _standardized(v, 2) * norm.std.view(1, 2, 9, 1, 1) + norm.mean.view(1, 2, 9, 1, 1)
    torch.testing.assert_close(norm(x), expected.view(3, 18, 4, 5))


def test_filter_norm_channel_fixed_gain_and_learned_mean():
    torch.manual_seed(0)
    norm = FilterNorm(4, 3, 'channel', 'relu', running_mean=True).double()
    assert norm.std is None and norm.mean.shape == (36,)
    x = torch.randn(2, 36, dtype=torch.float64)
    expected = _standardized(x.view(2, 4, 9), 2).view(2, 36) * (2 ** 0.5 / 3) + norm.mean
    torch.testing.assert_close(norm(x), expected)


def test_filter_norm_rejects_bad_type():
    with pytest.raises(ValueError, match="'spatial' or 'channel'"):
        FilterNorm(1, 3, 'pixel')


# DDFPack

@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('stride,head,combine', [(1, 1, 'mul'), (2, 1, 'add'), (1, 2, 'mul'), (2, 4, 'add')])
def test_ddf_pack_shape_and_gradients(impl, stride, head, combine):
    torch.manual_seed(0)
    pack = DDFPack(16, stride=stride, head=head, se_ratio=0.5, kernel_combine=combine, impl=impl)
    x = torch.randn(2, 16, 6, 8, requires_grad=True)
    out = pack(x)
    assert out.shape == (2, 16, 6 // stride, 8 // stride)
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in pack.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('gen_kernel_size', [1, 5])
def test_ddf_pack_branches_follow_the_arguments(gen_kernel_size):
    """dtype, stride, the generator's padding, SE width and the FilterNorm gain of the non-linearity all reach the
    two filter branches."""
    pack = DDFPack(10, kernel_size=3, stride=2, se_ratio=0.2, nonlinearity='relu', gen_kernel_size=gen_kernel_size,
                   impl='reference', dtype=torch.float64)
    assert {p.dtype for p in pack.parameters()} == {torch.float64}
    assert pack.channel_branch[1].out_channels == 2  # int(10 x 0.2)
    assert pack.spatial_branch[-1].gain == pack.channel_branch[-1].gain == pytest.approx(2 ** 0.5 / 3)
    x = torch.randn(2, 10, 8, 12, dtype=torch.float64)
    assert pack.spatial_branch(x).shape == (2, 9, 4, 6)
    assert pack(x).shape == (2, 10, 4, 6)


def test_ddf_pack_generator_kernel_names():
    pack = DDFPack(8, gen_kernel_size=3, impl='reference')
    assert pack.spatial_branch[0].groups == 8
    assert [n for n, _ in pack.named_parameters()] == [
        'spatial_branch.0.weight', 'spatial_branch.0.bias', 'spatial_branch.1.weight', 'spatial_branch.1.bias',
        'channel_branch.1.weight', 'channel_branch.1.bias', 'channel_branch.3.weight', 'channel_branch.3.bias',
        'channel_branch.4.std']


@needs_ext
@pytest.mark.parametrize('stride,combine', [(1, 'mul'), (2, 'add')])
def test_ddf_pack_ext_matches_reference(stride, combine):
    torch.manual_seed(0)
    ref = DDFPack(16, stride=stride, kernel_combine=combine, impl='reference')
    ext = DDFPack(16, stride=stride, kernel_combine=combine, impl='ext')
    ext.load_state_dict(ref.state_dict())
    x_ref = torch.randn(2, 16, 10, 12, requires_grad=True)
    x_ext = x_ref.detach().clone().requires_grad_()
    out_ref, out_ext = ref(x_ref), ext(x_ext)
    torch.testing.assert_close(out_ext, out_ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_ext.backward(grad)
    for g_ext, g_ref in zip(_grads(ext, x_ext), _grads(ref, x_ref)):
        torch.testing.assert_close(g_ext, g_ref, rtol=1e-4, atol=1e-4)


def test_ddf_pack_odd_size_with_stride_is_a_clear_error():
    pack = DDFPack(8, stride=2, impl='reference')
    with pytest.raises(ValueError, match='divisible'):
        pack(torch.randn(1, 8, 7, 8))


@pytest.mark.parametrize('kwargs,match', [
    (dict(kernel_size=4), 'odd'),
    (dict(head=3), 'head'),
    (dict(kernel_combine='max'), 'kernel_combine'),
    (dict(impl='cuda'), 'impl'),
    (dict(se_ratio=0.05), 'se_ratio'),
])
def test_ddf_pack_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDFPack(8, **kwargs)


# DDFUpPack

@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('scale', [2, 3])
def test_ddf_up_pack_places_branch_outputs_by_pixel_shuffle(impl, scale):
    torch.manual_seed(0)
    up = DDFUpPack(8, scale_factor=scale, se_ratio=0.5, impl=impl).double()
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64, requires_grad=True)
    out = up(x)
    assert out.shape == (2, 8, 5 * scale, 4 * scale)
    with torch.no_grad():
        for i in range(scale):
            for j in range(scale):
                branch = i * scale + j
                cf = up.channel_branch[branch](x).view(2, 8, 3, 3)
                sf = up.spatial_branch[branch](x)
                torch.testing.assert_close(out[:, :, i::scale, j::scale], ddf_reference(x, cf, sf))
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in up.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ddf_up_pack_joint_guidance():
    torch.manual_seed(0)
    up = DDFUpPack(8, joint_channels=4, kernel_combine='add', impl='reference')
    # A guidance map forces a depth-wise 3x3 conv in front of each spatial branch (as the release).
    assert up.spatial_branch[0][0].weight.shape == (4, 1, 3, 3)
    joint = torch.randn(2, 4, 6, 6, requires_grad=True)
    out = up(torch.randn(2, 8, 6, 6), joint)
    assert out.shape == (2, 8, 12, 12)
    out.sum().backward()
    assert joint.grad.abs().sum() > 0


@needs_ext
def test_ddf_up_pack_ext_matches_reference():
    torch.manual_seed(0)
    ref = DDFUpPack(8, impl='reference')
    ext = DDFUpPack(8, impl='ext')
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 6, 7)
    torch.testing.assert_close(ext(x), ref(x), rtol=1e-4, atol=1e-5)


# Models

@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('name', ['ddf_mul_resnet50', 'ddf_add_resnet101'])
def test_tiny_model_forward_backward(name, impl):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, impl=impl, **TINY)
    assert isinstance(model.layer2[0], DDFBottleneck)
    assert model.layer2[0].conv2.stride == 2 and model.layer2[0].conv2.impl == impl
    assert model.layer1[0].conv2.kernel_combine == name.split('_')[1]
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 5)
    out.logsumexp(1).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    features = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in features] == [64, 64, 128, 256, 512]  # timm: stem_width only sizes deep stems


def test_block_kwargs_reach_every_bottleneck():
    model = timm.create_model('ddf_mul_resnet50', se_ratio=0.5, gen_kernel_size=3, impl='reference', **TINY)
    pack = model.layer3[0].conv2
    assert pack.channel_branch[1].out_channels == 32  # int(64 * 0.5)
    assert pack.spatial_branch[0].kernel_size == (3, 3)
    assert all(b.conv2.impl == 'reference' for stage in (model.layer1, model.layer4) for b in stage)


def test_reduce_first_is_rejected():
    with pytest.raises(ValueError, match='reduce_first'):
        timm.create_model('ddf_mul_resnet50', block_reduce_first=2, **TINY)


@pytest.mark.parametrize('name', DDF_MODELS)
def test_state_dict_equals_release_in_order(name):
    table = json.loads((REFERENCE_DIR / f'{name}.json').read_text())
    with torch.device('meta'):
        model = timm.create_model(name)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(table['state_dict'].items())
    assert sum(p.numel() for p in model.parameters()) == table['params']


@pytest.mark.parametrize('name,millions', [
    ('ddf_mul_resnet50', 16.84), ('ddf_add_resnet50', 16.84), ('ddf_mul_resnet101', 28.15),
    ('ddf_add_resnet101', 28.15)])
def test_parameter_counts(name, millions):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_default_cfg_is_the_papers_eval_protocol():
    with torch.device('meta'):
        model = timm.create_model('ddf_add_resnet50')
    cfg = model.pretrained_cfg
    assert (cfg['interpolation'], cfg['crop_pct'], cfg['input_size']) == ('bicubic', 0.875, (3, 224, 224))


def test_release_formula_end_to_end_in_float64():
    """A tiny model's first DDFPack reproduces the release's filter generation written out longhand."""
    torch.manual_seed(0)
    model = timm.create_model('ddf_mul_resnet50', impl='reference', **TINY).double().eval()
    pack = model.layer1[0].conv2
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    sf = F.conv2d(x, pack.spatial_branch[0].weight, pack.spatial_branch[0].bias)
    sf = (sf - sf.mean(1, keepdim=True)) / (sf.std(1, keepdim=True) + 1e-10) * (2 ** 0.5 / 3)
    hidden = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), pack.channel_branch[1].weight, pack.channel_branch[1].bias))
    cf = F.conv2d(hidden, pack.channel_branch[3].weight, pack.channel_branch[3].bias).view(1, 16, 9)
    cf = (cf - cf.mean(2, keepdim=True)) / (cf.std(2, keepdim=True) + 1e-10)
    cf = (cf.view(1, -1) * pack.channel_branch[4].std).view(1, 16, 3, 3)
    torch.testing.assert_close(pack(x), ddf_reference(x, cf, sf))


@needs_ext
def test_ddf_pack_compiles_fullgraph():
    torch.manual_seed(0)
    pack = DDFPack(16, stride=2)
    compiled = torch.compile(pack, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    torch.testing.assert_close(compiled(x), pack(x))
    compiled(x).sum().backward()
    assert x.grad is not None and pack.channel_branch[4].std.grad is not None
