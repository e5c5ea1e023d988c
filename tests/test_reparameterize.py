"""Deployment form: `timm.utils.reparameterize_model` on every family (issue 19).

One tiny model per family (tests/test_modes.py's, plus a static DWNet and an OD-ResNet bottleneck), with random
BatchNorm statistics and affine parameters (a fresh model's are the identity, which any folding preserves): the
reparameterized model gives the unfused outputs and intermediates (fp32, eval, rel 1e-5), has folded exactly the
expected BatchNorms, and `tools.info` counts its parameters (BatchNorm parameters gone, biases added) and MACs.
"""
import pytest
import timm
import torch
from timm.utils import reparameterize_model

import models  # noqa: F401  (registers the models)
from models._helpers import CheckpointError, load_weights
from scripts import benchmark_models
from tests.test_modes import FAMILIES, NUM_CLASSES, TINY_RESNET, _input
from tools.info import count_params_and_macs, model_info

FAMILIES = dict(
    FAMILIES,
    od_resnet_bottleneck_4x=('od_resnet50', dict(TINY_RESNET, kernel_num=4)),
    dwnet=('dwnet_tiny_patch4_window7_224', dict(embed_dim=16, depths=(1, 1))),
)
WIDTHS = TINY_RESNET['channels']  # the ResNets' stage widths (planes) 16, 32, 64, 128; their stem is 64 wide
STAGES = ('layer1', 'layer2', 'layer3', 'layer4')
# BatchNorms left after reparameterizing: the ResNets' stem `bn1` (timm's walk never visits the model itself), those
# after a DDFPack or an involution (their op has no bias; an involution kernel serves several channels), after an
# inhomogeneous dynamic conv (likewise).
KEPT_NORMS = {
    'ddf_resnet': {'bn1', *(f'{s}.0.bn2' for s in STAGES)},
    'od_resnet_1x': {'bn1'},
    'od_resnet_4x': {'bn1'},
    'od_resnet_bottleneck_4x': {'bn1'},
    'od_mobilenetv2_4x': set(),
    'g_resnext': {'bn1'},
    'dwnet': set(),
    'dynamic_dwnet': set(),
    'i_dynamic_dwnet': {f'layers.{i}.blocks.0.attn2conv.bn' for i in (0, 1)},
    'rednet': {'backbone.stem.2', *(f'backbone.{s}.0.bn2' for s in STAGES)},
}
# Parameters the reparameterized model has fewer of: a BatchNorm of C channels holds 2C; folded into a layer without
# a bias it leaves a C bias, into one with a bias nothing more.
DWNET_DIMS = 16 + 32
FEWER_PARAMS = {
    # bottleneck of width w: bn1 (w) and bn3 (4w) into bias-less 1x1 convs; the shortcuts of layers 2-4 (4w)
    'ddf_resnet': 5 * sum(WIDTHS) + 4 * sum(WIDTHS[1:]),
    # two ODConvs per block: their BatchNorms (w each) and their attentions' (16 each); a shortcut per stage (w)
    'od_resnet_1x': 3 * sum(WIDTHS) + 8 * 16,
    'od_resnet_4x': 3 * sum(WIDTHS) + 8 * 16,
    # w, w and 4w after the three ODConvs, three attentions (16 each), the shortcuts of layers 2-4 (4w)
    'od_resnet_bottleneck_4x': 6 * sum(WIDTHS) + 4 * sum(WIDTHS[1:]) + 12 * 16,
    # every BatchNorm folds into a bias-less conv (G-ResNeXt: see test_g_resnext_fused_is_grouped)
    'od_mobilenetv2_4x': None,
    # per block of width d: bn0 and bn2 (d each) into bias-less 1x1 convs, the depth-wise conv's (d) and the pre-MLP
    # one (d, into the MLP's first linear) into layers with biases
    'dwnet': 6 * DWNET_DIMS,
    # ... and the dynamic conv's generator BatchNorm (d / 4) into its bias-less first conv
    'dynamic_dwnet': 6.25 * DWNET_DIMS,
    # the inhomogeneous conv keeps its BatchNorm; its generator's (d / 4) folds into a conv with a bias
    'i_dynamic_dwnet': 4.5 * DWNET_DIMS,
    # stem: two ConvModules (16, 32) and the involution generator's (4); per block of width w: bn1 (w), bn3 (4w),
    # the shortcut (4w) and the generator (w / 4)
    'rednet': 16 + 32 + 4 + 9.25 * sum(WIDTHS),
}
REL_TOL = 1e-5


def _model(family: str) -> torch.nn.Module:
    """The family's tiny model in eval mode, every BatchNorm with random statistics and affine parameters."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.)
                m.weight.normal_()
                m.bias.normal_()
    return model


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    atol = REL_TOL * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f'{what}: {m}')


def _norms(model: torch.nn.Module) -> set:
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}


@pytest.mark.parametrize('family', FAMILIES)
def test_reparameterized_equals_unfused(family):
    model = _model(family)
    x = _input(2)
    norms = _norms(model)
    with torch.no_grad():
        expected = model(x)
        fused = reparameterize_model(model)
        _assert_close(fused(x), expected, 'logits')
        for ours, theirs in zip(fused.forward_intermediates(x, intermediates_only=True),
                                model.forward_intermediates(x, intermediates_only=True)):
            _assert_close(ours, theirs, 'intermediate')
        assert torch.equal(model(x), expected) and _norms(model) == norms, 'the unfused model changed'
    assert _norms(fused) == KEPT_NORMS[family]


@pytest.mark.parametrize('family', [f for f in FAMILIES if f != 'g_resnext'])
def test_parameter_count_and_macs_of_reparameterized(family):
    """model_info's counter on the fused model: the BatchNorm parameters gone, the new biases counted, the MACs of
    the unfused model (BatchNorms and biases count none)."""
    model = _model(family)
    params, macs = count_params_and_macs(model, (3, 64, 96))
    fused_params, fused_macs = count_params_and_macs(reparameterize_model(model), (3, 64, 96))
    fewer = FEWER_PARAMS[family]
    if fewer is None:
        fewer = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (fused_params, fused_macs) == (params - fewer, macs)


def test_g_resnext_fused_is_grouped():
    """Each DGConv becomes the grouped conv of its gates, its channel order absorbed by conv1 and conv3: a plain
    ResNeXt bottleneck; the 3x3 conv's parameters and MACs shrink by its group count, the gates go."""
    model = _model('g_resnext')
    layers = model.dgconv_layers()
    assert {m.num_groups() for m in layers.values()} != {1}, 'the seed gives dense layers only'
    params, macs = count_params_and_macs(model, (3, 64, 96))
    fused = reparameterize_model(model)
    fused_params, fused_macs = count_params_and_macs(fused, (3, 64, 96))
    sizes = (16 * 24, 8 * 12, 4 * 6, 2 * 3)  # the DGConvs' output maps at 64x96
    saved = [9 * m.in_channels ** 2 * (1 - 1 / m.num_groups()) for m in layers.values()]
    assert fused_macs == macs - sum(s * n for s, n in zip(saved, sizes))
    # bn1, bn2 (C each), bn3 and the shortcut's (4C each) into bias-less convs; the gates (log2 C)
    widths = [m.in_channels for m in layers.values()]
    assert fused_params == params - sum(saved) - sum(10 * c + c.bit_length() - 1 for c in widths)
    for name, layer in layers.items():
        conv = fused.get_submodule(name)
        assert type(conv) is torch.nn.Conv2d and conv.groups == layer.num_groups()


@pytest.mark.slow
def test_reparameterized_model_compiles():
    model = reparameterize_model(_model('g_resnext'))
    compiled = torch.compile(model, fullgraph=True)
    x = _input(2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-4 * model(x).abs().max().item())


def test_reparameterized_model_exports_with_a_dynamic_batch():
    model = reparameterize_model(_model('od_resnet_4x'))
    exported = torch.export.export(model, (_input(2),), dynamic_shapes=({0: torch.export.Dim('batch')},))
    with torch.no_grad():
        _assert_close(exported.module()(_input(3)), model(_input(3)), 'exported, batch 3')


def test_model_in_training_mode_is_refused_in_one_line():
    model = _model('od_resnet_1x').train()
    with pytest.raises(RuntimeError, match=r'eval mode only: call model.eval\(\) before') as info:
        reparameterize_model(model)
    assert '\n' not in str(info.value)


def test_hooks_after_reparameterizing():
    """The training hooks still run where they mean something (the ODConv temperature); G-ResNeXt's regularizer and
    loading the unfused weights say in one line what happened."""
    od = reparameterize_model(_model('od_resnet_1x'))
    od.set_training_progress(0.)
    assert od.training_hook_log()['temperature'] == 30.
    g = _model('g_resnext')
    g.reg_weight = 1.
    fused = reparameterize_model(g)
    with pytest.raises(RuntimeError, match='reparameterized for inference') as info:
        fused.auxiliary_loss()
    assert '\n' not in str(info.value) and not fused.dgconv_layers()
    with pytest.raises(CheckpointError, match='the model is reparameterized .* then call '
                                              'timm.utils.reparameterize_model'):
        load_weights(fused, g.state_dict())


def test_model_info_counts_the_reparameterized_form():
    name, kwargs = FAMILIES['od_resnet_1x']
    params = model_info(name, img_size=64, **kwargs)['params_m']
    fused = model_info(name, img_size=64, reparameterize=True, **kwargs)['params_m']
    assert round((params - fused) * 1e6) == FEWER_PARAMS['od_resnet_1x']


def test_model_info_reparameterizes_g_resnext_on_cpu():
    """A DGConv's groups come from its gate values, which the meta device lacks: the count falls back to CPU and
    still reparameterizes."""
    name, kwargs = FAMILIES['g_resnext']
    info = model_info(name, img_size=64, reparameterize=True, **kwargs)
    assert info['params_m'] < model_info(name, img_size=64, **kwargs)['params_m']


def test_benchmark_models_fused_rows(tmp_path):
    """--reparameterize: a fused row (inference only) after each dynamic model's row, with its side-by-side speed-up
    over the unfused model; the baseline gets none."""
    output = tmp_path / 'bench.md'
    assert benchmark_models.main([
        '--families', 'ddf', '--device', 'cpu', '--img-size', '32', '-b', '2', '--warmup', '0', '--iters', '1',
        '--rounds', '1', '--reparameterize', '--model-kwargs', 'layers=(1, 1, 1, 1)', 'num_classes=10',
        '--output', str(output)]) == 0
    text = output.read_text()
    header = next(line for line in text.splitlines() if line.startswith('| family |')).split('|')[1:-1]
    rows = [dict(zip([h.strip() for h in header], [c.strip() for c in line.split('|')[1:-1]]))
            for line in text.splitlines() if line.startswith('| ddf |')]
    assert [r['model'] for r in rows] == ['`resnet50` (baseline)', '`ddf_mul_resnet50`', '`ddf_mul_resnet50` fused']
    assert [r['vs unfused'] == '-' for r in rows] == [True, True, False] and float(rows[2]['vs unfused'][:-1]) > 0
    assert rows[2]['train img/s'] == '-' and float(rows[1]['train img/s']) > 0
    assert float(rows[2]['params (M)']) < float(rows[1]['params (M)'])
