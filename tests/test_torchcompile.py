"""train.py and validate.py with --torchcompile: a compiled run trains, evaluates its EMA, saves, resumes and is
validated with no graph break and no recompile-limit hit, and its checkpoints keep the plain state_dict keys.

Compiling on 2 CPU cores is slow: the non-ODConv family (a DDF-ResNet with one block per stage) uses the aot_eager
backend (dynamo and AOT autograd, without code generation); ODConv 4x uses inductor, train.py's default.
"""
import argparse
import csv
import logging

import pytest
import timm
import torch

import train
import validate

DATA_ARGS = ['--img-size', '32', '-b', '8', '-j', '0', '--warmup-epochs', '0', '--lr', '0.05', '--smoothing', '0',
             '--device', 'cpu', '--seed', '0', '--log-interval', '100']

pytestmark = pytest.mark.slow


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture
def strict_compile(monkeypatch):
    """Compiled code must trace whole: a graph break or a hit of the recompile limit is an error, not a fallback."""
    monkeypatch.setattr(train.utils, 'setup_default_logging', lambda *a, **k: None)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch._dynamo.error_on_graph_break(True):
        yield
    torch._dynamo.reset()


def _eval_top1(run_dir):
    with open(run_dir / 'summary.csv', newline='') as f:
        return [float(r['eval_top1']) for r in csv.DictReader(f)]


def test_compiled_ddf_run_with_ema_resumes_and_validates(tiny_imagefolder, tmp_path, strict_compile, caplog):
    caplog.set_level(logging.INFO)
    argv = ['--data-dir', tiny_imagefolder, '--model', 'ddf_mul_resnet50', '--model-kwargs', 'layers=(1,1,1,1)',
            *DATA_ARGS, '--torchcompile', 'aot_eager', '--model-ema', '--model-ema-decay', '0.9',
            '--output', str(tmp_path), '--experiment', 'ddf']
    train.main(argv + ['--epochs', '1'])
    train.main(argv + ['--epochs', '2', '--auto-resume'])
    run = tmp_path / 'ddf'
    assert f"Auto-resume from '{run / 'last.pth.tar'}'" in caplog.text
    ckpt = _load(run / 'last.pth.tar')
    assert ckpt['epoch'] == 1 and len(_eval_top1(run)) == 2
    plain_keys = set(timm.create_model('ddf_mul_resnet50', layers=(1, 1, 1, 1), num_classes=10).state_dict())
    assert set(ckpt['state_dict']) == set(ckpt['state_dict_ema']) == plain_keys  # no '_orig_mod.' prefix

    # validate.py compiles too, from the run's checkpoint alone; the EMA weights are what train.py evaluated last
    results = validate.validate_one(validate.parse_args([
        tiny_imagefolder, '--checkpoint', str(run / 'last.pth.tar'), '--use-ema', '--torchcompile', 'aot_eager',
        '-b', '8', '-j', '0', '--device', 'cpu']))
    assert results['top1'] == pytest.approx(_eval_top1(run)[-1], abs=1e-3)


def test_compiled_odconv_4x_trains_one_epoch(tiny_imagefolder, tmp_path, strict_compile):
    """The demo's OD-ResNet with 4 candidate kernels, through inductor with --torchcompile-mode."""
    train.main(['--data-dir', tiny_imagefolder, '--model', 'od_resnet18', '--model-kwargs', 'kernel_num=4',
                'layers=(1,1,1,1)', 'channels=(16,32,64,128)', 'stem_width=16', 'temp_epochs=2', *DATA_ARGS,
                '--torchcompile', '--torchcompile-mode', 'default', '--epochs', '1', '--output', str(tmp_path),
                '--experiment', 'od'])
    ckpt = _load(tmp_path / 'od' / 'last.pth.tar')
    assert ckpt['state_dict']['layer1.0.conv1.weight'].shape == (4, 16, 64, 3, 3)  # timm's plain stem: 64 channels
    assert ckpt['training_hooks']['temperature'] == pytest.approx(1 + 29 * (1 - 1.0 / 2))  # update 10 counted
    assert len(_eval_top1(tmp_path / 'od')) == 1
