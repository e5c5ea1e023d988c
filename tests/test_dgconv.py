"""DGConv2d (straight-through gates, Kronecker mask, regularizer) and the G-ResNeXt models."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the models)
from models._helpers import load_weights
from models.g_resnext import GResNet
from models.layers.dgconv import ChannelPermutedConv2d, DGConv2d, binarize_ste

REFERENCE_DIR = Path(__file__).resolve().parents[1] / 'reference' / 'state_dicts'
# Narrow G-ResNeXt: bottleneck widths 8..64 (powers of two).
TINY = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), cardinality=1, base_width=64)


def _dgconv(channels, gates, **kwargs):
    conv = DGConv2d(channels, channels, 3, padding=1, **kwargs).double()
    with torch.no_grad():
        conv.gate.copy_(torch.tensor(gates, dtype=torch.float64))
    return conv


# Straight-through estimator

def test_ste_forward_values():
    gate = torch.tensor([-3., -1e-8, 0., 1e-8, 2.])
    assert binarize_ste(gate).tolist() == [0., 0., 0.5, 1., 1.]


def test_ste_gradient_is_identity():
    gate = torch.tensor([-3., -1e-8, 0., 1e-8, 2.], requires_grad=True)
    upstream = torch.tensor([1., -2., 3., -4., 5.])
    (binarize_ste(gate) * upstream).sum().backward()
    assert gate.grad.tolist() == upstream.tolist()


# Mask

def test_mask_all_gates_off_is_identity_groups():
    conv = _dgconv(8, [-1., -1., -1.])
    assert torch.equal(conv.mask(), torch.eye(8, dtype=torch.float64))
    assert conv.num_groups() == 8


def test_mask_all_gates_on_is_dense():
    conv = _dgconv(8, [1., 1., 1.])
    assert torch.equal(conv.mask(), torch.ones(8, 8, dtype=torch.float64))
    assert conv.num_groups() == 1


def test_mask_is_kronecker_product_of_gate_factors():
    conv = _dgconv(8, [1., -1., 0.])
    half = torch.tensor([[1., .5], [.5, 1.]], dtype=torch.float64)  # a gate at exactly 0 binarises to 0.5
    expected = torch.kron(torch.kron(torch.ones(2, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)), half)
    assert torch.equal(conv.mask(), expected)
    assert conv.num_groups() == 2


def test_block_diagonal_mask_equals_grouped_conv():
    torch.manual_seed(0)
    conv = _dgconv(8, [-1., 1., 1.], bias=True)  # first factor eye: two groups of 4 consecutive channels
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    w = conv.conv.weight
    grouped_weight = torch.cat([w[:4, :4], w[4:, 4:]])
    torch.testing.assert_close(conv(x), F.conv2d(x, grouped_weight, conv.conv.bias, padding=1, groups=2))
    assert conv.num_groups() == 2


def test_identity_mask_equals_depthwise_conv():
    torch.manual_seed(0)
    conv = _dgconv(4, [-1., -1.], bias=False)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    diagonal = torch.stack([conv.conv.weight[c, c] for c in range(4)])[:, None]
    torch.testing.assert_close(conv(x), F.conv2d(x, diagonal, padding=1, groups=4))


# Inference form: DGConv2d.fuse

# gates -> (groups, whether the groups are contiguous channel ranges). Channel bit K - 1 - i belongs to gate i.
FUSE_CASES = [
    ([-1., -1., -1., -1.], 16, True),  # depth-wise
    ([1., 1., 1., 1.], 1, True),  # dense
    ([-1., -1., 1., 1.], 4, True),  # the two high bits apart: 4 blocks of 4 consecutive channels
    ([1., -1., 1., -1.], 4, False),  # bits 2 and 0 apart: channels {0, 2, 8, 10} form a group
    ([1., 1., 1., -1.], 2, False),  # even and odd channels
    ([0., -1., 1., 0.], 2, False),  # gates at exactly 0 connect (with weight 0.5), as in the mask
]


@pytest.mark.parametrize('with_bn', [False, True])
@pytest.mark.parametrize('gates,groups,contiguous', FUSE_CASES)
def test_fuse_is_the_masked_conv_as_a_grouped_one(gates, groups, contiguous, with_bn):
    """fuse() gives a conv with the mask's groups, gathering the channels when the groups are not contiguous; the
    same outputs (and with a following BatchNorm folded in) in both memory formats."""
    torch.manual_seed(0)
    conv = _dgconv(16, gates, bias=not with_bn, stride=2).eval()
    bn = torch.nn.BatchNorm2d(16).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.), bn.weight.normal_(), bn.bias.normal_()
    fused = conv.fuse(bn) if with_bn else conv.fuse()
    assert type(fused) is (torch.nn.Conv2d if contiguous else ChannelPermutedConv2d)
    assert fused.groups == groups == conv.num_groups()
    assert fused.weight.shape == (16, 16 // groups, 3, 3)
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(conv(x)) if with_bn else conv(x)
        torch.testing.assert_close(fused(x), expected)
        torch.testing.assert_close(fused(x.contiguous(memory_format=torch.channels_last)), expected)


def test_permuted_conv_absorbed_by_its_neighbours():
    """absorb_into: conv1 emits the permuted channel order, conv3 takes it, a plain grouped conv in between."""
    torch.manual_seed(0)
    before, after = torch.nn.Conv2d(4, 16, 1).double(), torch.nn.Conv2d(16, 6, 1, bias=False).double()
    permuted = _dgconv(16, [1., -1., 1., -1.]).eval().fuse()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = after(torch.relu(permuted(before(x))))
        plain = permuted.absorb_into(before, after)
        assert type(plain) is torch.nn.Conv2d and plain.groups == 4
        torch.testing.assert_close(after(torch.relu(plain(before(x)))), expected)


def test_permuted_conv_exports_with_a_dynamic_batch():
    conv = _dgconv(8, [1., -1., 1.]).float().eval().fuse()
    exported = torch.export.export(conv, (torch.randn(2, 8, 5, 5),),
                                   dynamic_shapes=({0: torch.export.Dim('batch')},))
    x = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(exported.module()(x), conv(x))


def test_gate_and_weight_gradients():
    torch.manual_seed(0)
    conv = _dgconv(4, [-1e-8, 1e-8])
    conv(torch.randn(2, 4, 5, 5, dtype=torch.float64)).square().sum().backward()
    assert conv.gate.grad.abs().min() > 0
    assert conv.conv.weight.grad.abs().sum() > 0


# Regularizer and construction

def test_regularizer_value_and_gradient():
    conv = _dgconv(16, [1., -1., 1., -2.])
    reg = conv.regularizer()
    assert reg.item() == 2 ** (4 + 2)
    reg.backward()
    torch.testing.assert_close(conv.gate.grad, torch.full((4,), math.log(2) * 64, dtype=torch.float64))


def test_gate_init_is_seeded_by_torch():
    torch.manual_seed(3)
    first = DGConv2d(64, 64, 3).gate.detach().clone()
    torch.manual_seed(3)
    second = DGConv2d(64, 64, 3).gate.detach().clone()
    assert torch.equal(first, second)
    assert first.abs().eq(1e-8).all()


@pytest.mark.parametrize('in_channels,out_channels,match', [(8, 16, 'in_channels == out_channels'), (12, 12, 'power')])
def test_construction_errors(in_channels, out_channels, match):
    with pytest.raises(ValueError, match=match):
        DGConv2d(in_channels, out_channels, 3)


def test_model_with_non_power_of_two_width_is_rejected():
    with pytest.raises(ValueError, match='power-of-two'):
        timm.create_model('g_resnext50', **dict(TINY, channels=(12, 16, 32, 64)))


# Models

def test_tiny_model_forward_backward_returns_logits_only():
    torch.manual_seed(0)
    model = timm.create_model('g_resnext50', num_classes=5, **TINY)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    out.logsumexp(1).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.layer2[0].conv2.conv.stride == (2, 2)


@pytest.mark.parametrize('form', ['raw', 'normalized'])
def test_auxiliary_loss_forms(form):
    torch.manual_seed(0)
    model = timm.create_model('g_resnext50', reg_weight=0.5, reg_form=form, **TINY)
    layers = list(model.dgconv_layers().values())
    assert len(layers) == 4
    counts = [2 ** (m.K + int((m.gate > 0).sum())) for m in layers]
    if form == 'raw':
        expected = 0.5 * sum(counts)
    else:
        expected = 0.5 * sum(n / m.in_channels ** 2 for n, m in zip(counts, layers)) / len(layers)
    loss = model.auxiliary_loss()
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    for m in layers:
        assert (m.gate.grad > 0).all()  # more connections cost more: every gate is pushed down


def test_auxiliary_loss_disabled_by_zero_weight():
    model = timm.create_model('g_resnext50', **TINY)
    assert model.reg_weight == 0 and model.auxiliary_loss() is None


def test_bad_regularizer_config():
    with pytest.raises(ValueError, match='reg_form'):
        timm.create_model('g_resnext50', reg_form='l2', **TINY)
    with pytest.raises(ValueError, match='reg_weight'):
        timm.create_model('g_resnext50', reg_weight=-1., **TINY)


def test_training_hook_log_reports_groups_per_layer():
    model = timm.create_model('g_resnext50', **TINY)
    with torch.no_grad():
        model.layer1[0].conv2.gate.fill_(-1.)
        model.layer4[0].conv2.gate.fill_(1.)
    log = model.training_hook_log()
    assert sorted(log) == [f'groups/layer{i}.0.conv2' for i in range(1, 5)]
    assert log['groups/layer1.0.conv2'] == 8.0 and log['groups/layer4.0.conv2'] == 1.0


@pytest.mark.parametrize('name', ['g_resnext50', 'g_resnext101'])
def test_state_dict_equals_release_in_order(name):
    table = json.loads((REFERENCE_DIR / f'{name}.json').read_text())
    with torch.device('meta'):
        model = timm.create_model(name)
    assert isinstance(model, GResNet)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(table['state_dict'].items())
    assert sum(p.numel() for p in model.parameters()) == table['params']


@pytest.mark.parametrize('name,millions', [('g_resnext50', 68.88), ('g_resnext101', 419.63)])
def test_parameter_counts(name, millions):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_torchvision_format_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model('g_resnext50', num_classes=5, **TINY).eval()
    with torch.no_grad():
        trained.layer3[0].conv2.gate.copy_(torch.tensor([1., -1., 1., -1., 1.]))
    path = tmp_path / 'checkpoint.pth.tar'
    state = {'module.' + k: v for k, v in trained.state_dict().items()}
    torch.save({'arch': 'g_resnext50', 'epoch': 120, 'state_dict': state, 'best_acc1': 78.6}, path)
    fresh = timm.create_model('g_resnext50', num_classes=5, **TINY).eval()
    meta = load_weights(fresh, str(path))  # validate.py's loader
    assert meta['weights_key'] == 'state_dict' and meta['arch'] == 'g_resnext50'
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fresh(x), trained(x))
    assert fresh.training_hook_log()['groups/layer3.0.conv2'] == 4.0


def test_dgconv_compiles_fullgraph():
    torch.manual_seed(0)
    conv = DGConv2d(8, 8, 3, padding=1)
    compiled = torch.compile(conv, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(compiled(x), conv(x))
    compiled(x).sum().backward()
    assert conv.gate.grad is not None


@pytest.mark.slow
def test_two_epoch_demo_training_with_regularizer_learns_groups(tiny_imagefolder, tmp_path):
    """train.py adds the weighted regularizer to the loss: from dense gates (one group per layer) it splits groups."""
    import subprocess
    import sys
    kwargs = dict(TINY, num_classes=10)
    model = timm.create_model('g_resnext50', **kwargs)
    with torch.no_grad():
        for m in model.dgconv_layers().values():
            m.gate.fill_(1e-8)
    assert set(model.training_hook_log().values()) == {1.0}
    initial = tmp_path / 'dense_gates.pth'
    torch.save(model.state_dict(), initial)
    model_kwargs = [f'{k}={v!r}'.replace(' ', '') for k, v in TINY.items()] + ['reg_weight=0.01', 'reg_form=raw']
    cmd = [
        sys.executable, 'train.py', '--data-dir', tiny_imagefolder, '--model', 'g_resnext50',
        '--model-kwargs', *model_kwargs, '--initial-checkpoint', str(initial), '--img-size', '32', '-b', '16',
        '--epochs', '2', '--warmup-epochs', '0', '--lr', '0.1', '--device', 'cpu', '-j', '0',
        '--output', str(tmp_path), '--experiment', 'reg']
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    trained = timm.create_model('g_resnext50', **kwargs)
    load_weights(trained, str(tmp_path / 'reg' / 'last.pth.tar'))
    for name, m in trained.dgconv_layers().items():
        assert m.gate.sum() < 0, name  # the regularizer's gradient is positive for every gate
    groups = trained.training_hook_log()
    assert all(g > 1 for g in groups.values()), groups
    summary = (tmp_path / 'reg' / 'summary.csv').read_text().splitlines()
    assert all(f'train_{key}' in summary[0] for key in groups)
    assert len(summary) == 3
