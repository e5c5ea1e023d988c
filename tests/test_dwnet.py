"""DWNet family: dynamic depth-wise layers vs the original formulations, blocks, models, checkpoints, features.

Forward/backward runs use narrow variants (embed_dim 16, one block per stage) on small inputs; full-size models are
only built on the meta device (state_dict tables, parameter counts, which conv each block holds).
"""
import json
import sys
import types
from functools import lru_cache
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import models  # noqa: F401  (registers the models)
from models._helpers import SAFE_GLOBALS, CheckpointError, load_weights
from models.dwnet import DWBlock, DWNetBlock, PatchMerging, checkpoint_filter_fn
from models.layers.dynamic_dw import DynamicDWConv, IDynamicDWConv
from ops import HAS_EXT

REFERENCE_DIR = Path(__file__).resolve().parents[1] / 'reference' / 'state_dicts'
# (entrypoint, reference table, parameter count, number of blocks, dw conv type)
MODELS = [
    ('dwnet_tiny_patch4_window7_224', 'dwnet_tiny', 24_172_744, 12, 'static'),
    ('dwnet_base_patch4_window7_224', 'dwnet_base', 74_347_112, 24, 'static'),
    ('dynamic_dwnet_tiny_patch4_window7_224', 'dynamic_dwnet_tiny', 51_131_752, 12, 'dynamic'),
    ('dynamic_dwnet_base_patch4_window7_224', 'dynamic_dwnet_base', 161_597_928, 24, 'dynamic'),
    ('i_dynamic_dwnet_tiny_patch4_window7_224', 'i_dynamic_dwnet_tiny', 26_244_280, 12, 'inhomogeneous'),
    ('i_dynamic_dwnet_base_patch4_window7_224', 'i_dynamic_dwnet_base', 80_253_608, 24, 'inhomogeneous'),
]
MODEL_NAMES = [m[0] for m in MODELS]
IMPLS = ['reference', pytest.param('ext', marks=pytest.mark.skipif(not HAS_EXT, reason='ops._C is not built'))]
# The implementation the model-level tests run on: the compiled op when it is built.
IMPL = 'ext' if HAS_EXT else 'reference'


def _narrow_kwargs(name):
    """Architecture overrides for a fast variant of `name` (16 channels, one block per stage, 4 kernel groups)."""
    kwargs = dict(embed_dim=16, depths=(1, 1, 1, 1), impl=IMPL)
    if name.startswith('i_dynamic'):
        kwargs['group_channels'] = (4, 8, 16, 32)
    return kwargs


def _narrow(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(_narrow_kwargs(name), **kwargs))


@lru_cache(maxsize=None)
def _meta_model(name):
    with torch.device('meta'):
        return timm.create_model(name)


def _original_dynamic_dw(layer, x):
    """The original DynamicDWConv.forward: one grouped conv over the batch folded into channels."""
    B, C, H, W = x.shape
    k = layer.kernel_size
    weight = layer.conv2(layer.relu(layer.bn(layer.conv1(F.adaptive_avg_pool2d(x, 1)))))
    out = F.conv2d(
        x.reshape(1, B * C, H, W), weight.view(B * C, 1, k, k), layer.bias.repeat(B), padding=k // 2, groups=B * C)
    return out.view(B, C, H, W)


def _original_idynamic_dw(layer, x):
    """The original idynamic CUDA kernel, written as loops over taps: weight viewed as (B, groups, k, k, H, W)."""
    B, C, H, W = x.shape
    k, groups = layer.kernel_size, layer.groups
    weight = layer.conv2(layer.conv1(x)).view(B, groups, k, k, H, W)
    padded = F.pad(x, [k // 2] * 4)
    out = torch.zeros_like(x)
    for u in range(k):
        for v in range(k):
            out += padded[:, :, u:u + H, v:v + W] * weight[:, :, u, v].repeat_interleave(C // groups, dim=1)
    return out


def _grads_of(module, *inputs):
    return [t.grad.clone() for t in inputs] + [p.grad.clone() for p in module.parameters()]


def _zero_grads(module, *inputs):
    for t in list(inputs) + list(module.parameters()):
        t.grad = None


@pytest.mark.parametrize('impl', IMPLS)
def test_dynamic_dw_conv_matches_original_formulation(impl):
    torch.manual_seed(0)
    layer = DynamicDWConv(16, kernel_size=7, impl=impl).double().train()
    nn.init.normal_(layer.bias)  # zero at init: make the bias term visible
    x = torch.randn(3, 16, 9, 11, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    ours = _grads_of(layer, x)
    _zero_grads(layer, x)
    expected = _original_dynamic_dw(layer, x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(ours, _grads_of(layer, x)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('impl', IMPLS)
def test_inhomogeneous_dw_conv_matches_original_kernel(impl):
    torch.manual_seed(0)
    layer = IDynamicDWConv(16, kernel_size=7, group_channels=4, impl=impl).double().train()
    assert layer.groups == 4
    # float64: some gradients (conv1's bias, cancelled by the BN after it) are pure rounding noise in float32
    x = torch.randn(2, 16, 8, 10, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    ours = _grads_of(layer, x)
    _zero_grads(layer, x)
    expected = _original_idynamic_dw(layer, x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(ours, _grads_of(layer, x)):
        torch.testing.assert_close(got, want)


def test_dynamic_layers_reject_bad_arguments():
    with pytest.raises(ValueError, match='impl'):
        DynamicDWConv(16, impl='cupy')
    with pytest.raises(ValueError, match='divisible'):
        IDynamicDWConv(16, group_channels=3)
    with pytest.raises(ValueError, match='odd'):
        DynamicDWConv(16, kernel_size=4)
    with pytest.raises(ValueError, match='dw_type'):
        DWBlock(16, dw_type='dynamc')


@pytest.mark.parametrize('dw_type', ['static', 'dynamic', 'inhomogeneous'])
def test_blocks_shapes_and_gradients(dw_type):
    torch.manual_seed(0)
    block = DWNetBlock(16, dw_type=dw_type, group_channels=4, drop_path=0.1, impl=IMPL).train()
    x = torch.randn(2, 6, 7, 16, requires_grad=True)  # NHWC, odd sizes
    out = block(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in block.parameters())
    assert isinstance(block.attn2conv.conv, {
        'static': nn.Conv2d, 'dynamic': DynamicDWConv, 'inhomogeneous': IDynamicDWConv}[dw_type])


def test_patch_merging_matches_original_concatenation_and_pads_odd_sizes():
    torch.manual_seed(0)
    merge = PatchMerging(8)
    x = torch.randn(2, 6, 4, 8)
    concat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(concat)))
    odd = torch.randn(2, 5, 3, 8)
    torch.testing.assert_close(merge(odd), merge(F.pad(odd, (0, 0, 0, 1, 0, 1))))
    assert merge(odd).shape == (2, 3, 2, 16)


@pytest.mark.parametrize('name,table,params,blocks,dw_type', MODELS)
def test_full_size_state_dict_and_param_count(name, table, params, blocks, dw_type):
    reference = json.loads((REFERENCE_DIR / f'{table}.json').read_text())
    model = _meta_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference['state_dict']
    assert sum(p.numel() for p in model.parameters()) == params == reference['params']


@pytest.mark.parametrize('name,table,params,blocks,dw_type', MODELS)
def test_every_block_has_its_variants_conv(name, table, params, blocks, dw_type):
    # Regression test for the original's if/if/else slip, which built static convs in dynamic_* models.
    convs = [m.attn2conv.conv for m in _meta_model(name).modules() if isinstance(m, DWNetBlock)]
    assert len(convs) == blocks
    expected = {'static': nn.Conv2d, 'dynamic': DynamicDWConv, 'inhomogeneous': IDynamicDWConv}[dw_type]
    assert all(type(conv) is expected for conv in convs)
    if dw_type == 'static':
        assert all(conv.groups == conv.in_channels == conv.out_channels for conv in convs)


@pytest.mark.skipif(not HAS_EXT, reason='ops._C is not built (FlopCounterMode counts ddf through the extension)')
@pytest.mark.parametrize('name,published', [
    ('dwnet_tiny_patch4_window7_224', 3.8),
    ('dwnet_base_patch4_window7_224', 12.9),
    ('dynamic_dwnet_tiny_patch4_window7_224', 3.8),
    ('dynamic_dwnet_base_patch4_window7_224', 13.0),
])
def test_macs_match_published_flops(name, published):
    # The README's "FLOPs" are multiply-adds (Swin-style flops() methods); FlopCounterMode counts 2 per multiply-add.
    with torch.device('meta'):
        model = timm.create_model(name).eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() / 2e9 == pytest.approx(published, rel=0.03)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_narrow_model_forward_backward(name):
    model = _narrow(name, num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 5)
    out.logsumexp(1).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize('name', MODEL_NAMES)
@pytest.mark.parametrize('size', [96, 128, 100])
def test_non_224_inputs(name, size):
    model = _narrow(name, num_classes=3).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, size, size))
        assert features.shape == (2, -(-(size // 4) // 8), -(-(size // 4) // 8), 128)
        assert model.forward_head(features).shape == (2, 3)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_features_only_gives_the_four_stage_outputs(name):
    model = _narrow(name, features_only=True).eval()
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(2, 3, 128, 160))
    assert [tuple(f.shape) for f in features] == [(2, 16, 32, 40), (2, 32, 16, 20), (2, 64, 8, 10), (2, 128, 4, 5)]
    some = _narrow(name, features_only=True, out_indices=(1, 2)).eval()
    with torch.no_grad():
        assert [f.shape[1] for f in some(torch.randn(2, 3, 64, 64))] == [32, 64]


def test_stage_features_are_taken_before_patch_merging():
    model = _narrow('dynamic_dwnet_tiny_patch4_window7_224').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        stage0 = model.layers[0].blocks(model.patch_embed(x))
        torch.testing.assert_close(intermediates[0], stage0.permute(0, 3, 1, 2))
        torch.testing.assert_close(final, model.forward_features(x))


def test_timm_model_contract():
    model = _narrow('dynamic_dwnet_tiny_patch4_window7_224', num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.num_features == model.head_hidden_size == 128
    assert model.get_classifier() is model.head and model.head.out_features == 4
    assert model.no_weight_decay() == set()
    cfg = model.pretrained_cfg
    assert (cfg['crop_pct'], cfg['interpolation'], cfg['input_size']) == (0.875, 'bicubic', (3, 224, 224))
    assert [info['module'] for info in model.feature_info] == ['layers.0', 'layers.1', 'layers.2', 'layers.3']
    with torch.no_grad():
        logits = model(x)
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre_logits.shape == (2, 128)
        torch.testing.assert_close(model.head(pre_logits), logits)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), logits)
        model.reset_classifier(0)
        assert model(x).shape == (2, 128)
        model.reset_classifier(7, global_pool='')
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 2, 2, 128)


def test_drop_path_rate_is_honoured():
    model = _narrow('dwnet_tiny_patch4_window7_224', depths=(1, 1, 2, 1), drop_path_rate=0.4)
    rates = [block.drop_path.drop_prob if hasattr(block.drop_path, 'drop_prob') else 0.
             for block in model.modules() if isinstance(block, DWNetBlock)]
    assert rates == pytest.approx([0., 0.1, 0.2, 0.3, 0.4])
    model.train()
    x = torch.randn(4, 3, 64, 64)
    assert not torch.equal(model(x), model(x))  # stochastic depth draws new paths each step


@pytest.mark.skipif(not HAS_EXT, reason='ops._C is not built')
@pytest.mark.parametrize('name', ['dynamic_dwnet_tiny_patch4_window7_224', 'i_dynamic_dwnet_tiny_patch4_window7_224'])
def test_ext_and_reference_models_agree(name):
    ext = _narrow(name, impl='ext').eval()
    ref = _narrow(name, impl='reference').eval()
    ref.load_state_dict(ext.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ext(x), ref(x), rtol=1e-4, atol=1e-4)


class _CfgNode(dict):
    """Stand-in for yacs.config.CfgNode, pickled under that name: a dict subclass with flags in __dict__."""

    __module__, __qualname__ = 'yacs.config', 'CfgNode'

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__.update({'__immutable__': True, '__deprecated_keys__': set(), '__new_allowed__': False})


@pytest.fixture
def original_checkpoint(tmp_path, monkeypatch):
    """A checkpoint as the original main.py saves it, for a narrow dynamic_dwnet_tiny."""
    yacs_config = types.ModuleType('yacs.config')
    yacs_config.CfgNode = _CfgNode
    monkeypatch.setitem(sys.modules, 'yacs', types.ModuleType('yacs'))
    monkeypatch.setitem(sys.modules, 'yacs.config', yacs_config)
    model = _narrow('dynamic_dwnet_tiny_patch4_window7_224')
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    config = _CfgNode(MODEL=_CfgNode(TYPE='ddwnet', NAME='ddwnet_tiny_patch4_window7_224'), AMP_OPT_LEVEL='O1')
    path = tmp_path / 'ckpt_epoch_299.pth'
    torch.save({
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': {'t_initial': 300, 'base_values': [1e-3]},
        'max_accuracy': 81.8,
        'epoch': 299,
        'config': config,
        'amp': {'loss_scaler0': {'loss_scale': 65536.0, 'unskipped': 0}},
    }, path)
    return path, model.eval()


def test_original_checkpoint_loads_strictly(original_checkpoint):
    path, trained = original_checkpoint
    model = _narrow('dynamic_dwnet_tiny_patch4_window7_224').eval()
    meta = load_weights(model, str(path))
    assert (meta['weights_key'], meta['epoch'], meta['max_accuracy']) == ('model', 299, 81.8)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))
    # The same file through timm's pretrained path (checkpoint_filter_fn unwraps 'model').
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        via_timm = _narrow(
            'dynamic_dwnet_tiny_patch4_window7_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        torch.testing.assert_close(via_timm.eval()(x), trained(x))


def test_original_checkpoint_does_not_fit_other_variants(original_checkpoint):
    path, _ = original_checkpoint
    with pytest.raises(CheckpointError, match='does not fit'):
        load_weights(_narrow('i_dynamic_dwnet_tiny_patch4_window7_224'), str(path))


def test_static_checkpoint_into_dynamic_model_is_refused_in_one_line():
    # What the original's later revisions trained for a dynamic config: a static DWNet.
    static = _narrow('dwnet_tiny_patch4_window7_224').state_dict()
    dynamic = _narrow('dynamic_dwnet_tiny_patch4_window7_224')
    with pytest.raises(ValueError, match='static depth-wise convs .* load it into the matching dwnet_'):
        checkpoint_filter_fn({'model': static}, dynamic)
    assert checkpoint_filter_fn({'model': static}, _narrow('dwnet_tiny_patch4_window7_224')) is static
