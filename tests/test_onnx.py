"""ONNX export with a dynamic batch (issue 19): one small model per family, default settings, exported by
`torch.onnx.export(dynamo=True)` at batch 2 and run by onnxruntime (CPU) at batches 1 and 3, which must give the eager
float32 outputs (max |diff| <= 1e-4 x max |eager|, the bound of tests/test_modes.py); a user's model built from the
layers; scripts/export_onnx.py; and torch.jit.trace, which works at any batch or is refused in one line.

Time: each export takes 3-40 s on the 2-core CPU machine (torch.export, then the exporter's decompositions and
onnxscript's optimizer; OD-MobileNetV2 the longest), 2.5-3.5 minutes for the file.
"""
import warnings

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from torch import nn

import models  # noqa: F401  (registers the models)
from models.layers.ddf import DDFPack
from models.layers.dynamic_dw import DynamicDWConv
from models.layers.odconv import ODConv2d
from ops import HAS_EXT
from scripts import export_onnx as export_script
from tools.onnx_export import check_onnx, export_onnx
from training import cli

DDF_IMPL = {} if HAS_EXT else {'impl': 'reference'}  # default settings where the extension is built
TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16)
TINY_DWNET = dict(embed_dim=16, depths=(1, 1))
# family -> (entrypoint, reduced-size kwargs)
FAMILIES = {
    'ddf_mul_resnet': ('ddf_mul_resnet50', dict(TINY_RESNET, **DDF_IMPL)),
    'ddf_add_resnet': ('ddf_add_resnet50', dict(TINY_RESNET, **DDF_IMPL)),
    'od_resnet_1x': ('od_resnet18', dict(TINY_RESNET, kernel_num=1)),
    'od_resnet_4x': ('od_resnet18', dict(TINY_RESNET, kernel_num=4)),
    'od_mobilenetv2_4x': ('od_mobilenetv2_050', dict(kernel_num=4, depth_mult=0.25, num_features=64)),
    'g_resnext': ('g_resnext50', dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), cardinality=1, base_width=64)),
    'dwnet': ('dwnet_tiny_patch4_window7_224', TINY_DWNET),
    'dynamic_dwnet': ('dynamic_dwnet_tiny_patch4_window7_224', dict(TINY_DWNET, **DDF_IMPL)),
    'i_dynamic_dwnet': ('i_dynamic_dwnet_tiny_patch4_window7_224',
                        dict(TINY_DWNET, group_channels=(4, 8), **DDF_IMPL)),
    'rednet': ('rednet26', dict(layers=(1, 1, 1, 1), stem_channels=32, base_channels=16, **DDF_IMPL)),
}
INPUT_SIZE = (3, 64, 96)  # non-square; DDF-ResNet needs multiples of 32
TOL = 1e-4


def _model(family: str) -> nn.Module:
    """The family's small model in eval mode, its BatchNorms calibrated: random affine parameters, statistics of 32
    random images with random per-image channel offsets. Freshly initialized, the residual blocks end in zero
    BatchNorms (timm's zero_init_last) and OD-MobileNetV2's attentions shrink every layer's output until the logits
    no longer depend on the input, which would hide the dynamic layers from the comparison; statistics of fewer or
    more alike images leave near-constant channels whose normalization amplifies float32 rounding (8 plain noise
    images: OD-ResNet's float32 logits 1e-4 from float64, OD-MobileNetV2's 50%; here all within 1e-5, and the logits
    of different images differ by 25-100% of their largest)."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: one batch sets the statistics
        nn.init.uniform_(bn.weight, 0.5, 2.)
        nn.init.normal_(bn.bias, 0, 0.1)
    with torch.no_grad():
        model.train()(torch.randn(32, *INPUT_SIZE) + torch.randn(32, INPUT_SIZE[0], 1, 1))
    return model.eval()


def _assert_onnx_matches_eager(model: nn.Module, path: str, input_size=INPUT_SIZE):
    for row in check_onnx(model, path, input_size, batch_sizes=(1, 3), repeats=1):
        assert row['max_rel'] <= TOL, f'batch {row["batch_size"]}: onnxruntime differs from eager by {row}'


@pytest.mark.parametrize('family', FAMILIES)
def test_family_exports_with_a_dynamic_batch(family, tmp_path):
    model = _model(family)
    path = str(tmp_path / f'{family}.onnx')
    export_onnx(model, path, INPUT_SIZE, batch_size=2)
    assert ort.InferenceSession(path).get_inputs()[0].shape[0] == 'batch'
    _assert_onnx_matches_eager(model, path)


class UserNet(nn.Module):
    """A user's model from the layers: dense and depth-wise ODConv2d (4 kernels; with bias, reflect padding, a
    LayerNorm in the attention), DDFPack ('add', stride 2), DynamicDWConv, and a point-wise ODConv2d with one kernel."""

    def __init__(self):
        super().__init__()
        self.stem = ODConv2d(3, 16, 3, 2, 1, kernel_num=4)
        self.dw = ODConv2d(16, 16, 3, 1, 1, groups=16, padding_mode='reflect', kernel_num=4, attention_norm='layer')
        self.ddf = DDFPack(16, kernel_size=3, stride=2, kernel_combine='add', **DDF_IMPL)
        self.dynamic_dw = DynamicDWConv(16, kernel_size=5, **DDF_IMPL)
        self.pw = ODConv2d(16, 8, 1, kernel_num=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.dw(self.stem(x)))
        x = self.pw(self.dynamic_dw(self.ddf(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize('grad', [True, False], ids=['grad', 'no-grad'])
def test_user_model_from_the_layers_exports_with_plain_torch_onnx_export(grad, tmp_path):
    """A plain `torch.onnx.export(..., dynamo=True)`, nothing of ours around it. Without autograd, ODConvs with
    several kernels trace to another op (`dynconv::odconv_per_sample_forward`), so both grad modes are exported."""
    torch.manual_seed(0)
    model = UserNet().eval()
    x = torch.randn(2, *INPUT_SIZE)
    path = str(tmp_path / 'user.onnx')
    with torch.set_grad_enabled(grad):
        torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},),
                          verbose=False)
    _assert_onnx_matches_eager(model, path)


def test_export_script_command_line(tmp_path, monkeypatch, capsys, caplog):
    """scripts/export_onnx.py as `python scripts/export_onnx.py ARGS` runs it (`cli.exit_status(main)`): a checkpoint
    loaded, the model fused, the file written, the table of both batch sizes, exit status 0."""
    kwargs = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), cardinality=1, base_width=64, num_classes=5)
    torch.save(timm.create_model('g_resnext50', **kwargs).state_dict(), tmp_path / 'g.pth')
    monkeypatch.chdir(tmp_path)
    argv = ['g_resnext50', '--model-kwargs', *(f'{k}={v}'.replace(' ', '') for k, v in kwargs.items()),
            '--checkpoint', 'g.pth', '--reparameterize', '--img-size', '32', '--output', 'g.onnx', '--batch-sizes',
            '1', '3', '--repeats', '1']
    with caplog.at_level('INFO', logger='models'):
        assert cli.exit_status(lambda: export_script.main(argv)) == 0
    assert 'Loaded g.pth (plain state_dict).' in caplog.messages
    # fused: DGConv's masked kernels are plain weights, their BatchNorms folded (the exporter folds only the others)
    assert 'BatchNormalization' not in {node.op_type for node in onnx.load(tmp_path / 'g.onnx').graph.node}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('g.onnx: g_resnext50 (reparameterized) at 3x32x32, exported at batch 2')
    assert lines[1].split() == ['batch', 'max', 'abs', 'diff', 'max', 'rel', 'diff', 'eager', 'ms/img', 'ORT', 'ms/img']
    assert [line.split()[0] for line in lines[2:]] == ['1', '3']
    assert all(float(line.split()[2]) <= TOL for line in lines[2:])


@pytest.mark.parametrize('argv,message', [
    (['g_resnxt50'], "unknown model 'g_resnxt50'; did you mean g_resnext50"),
    (['g_resnext50', '--checkpoint', 'missing.pth'], 'checkpoint missing.pth does not exist'),
    (['g_resnext50', '--batch-sizes', '0'], '--batch-sizes must be at least 1'),
    (['g_resnext50', '--output', 'no/g.onnx'], '--output no/g.onnx: folder no does not exist'),
    (['ddf_mul_resnet50', '--model-kwargs', *(f'{k}={v}'.replace(' ', '') for k, v in TINY_RESNET.items()),
      '--img-size', '48'], 'ddf_mul_resnet50 does not take a 48x48 input: DDFPack with stride 2 needs'),
])
def test_export_script_bad_input_is_one_line_and_exit_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.exit_status(lambda: export_script.main(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith('export_onnx.py: error: ') and message in err and err.count('\n') == 1
    assert not list(tmp_path.iterdir())


# One family per layer of ours: ODConv2d, DDFPack, DynamicDWConv, IDynamicDWConv, Involution2d.
@pytest.mark.parametrize('family', ['od_resnet_4x', 'ddf_mul_resnet', 'dynamic_dwnet', 'i_dynamic_dwnet', 'rednet'])
def test_jit_trace_serves_any_batch_or_is_refused_in_one_line(family):
    """torch.jit.trace (deprecated) of a model at batch 2: ODConv refuses it (its eager paths branch on the batch
    size and loop over it, so the trace would keep it); the ddf-based layers' traces run at batches 1 and 3."""
    model = _model(family)
    x = torch.randn(2, *INPUT_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.trace is deprecated
        if family.startswith('od_'):
            with pytest.raises(RuntimeError, match='cannot be traced by torch.jit.trace') as info:
                torch.jit.trace(model, x)
            assert '\n' not in str(info.value)
            return
        traced = torch.jit.trace(model, x)
    for batch_size in (1, 3):
        x = torch.randn(batch_size, *INPUT_SIZE)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(traced(x), expected, rtol=0, atol=TOL * expected.abs().max().item())
