"""validate.py end to end on the tiny demo ImageFolder: metrics, results files, several models, bad input."""
import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch

import validate
from models._helpers import CheckpointError, load_checkpoint_file
from tests.conftest import TINY_NUM_CLASSES, TINY_VAL_PER_CLASS

TINY_MODEL = 'test_resnet'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_VAL = TINY_NUM_CLASSES * TINY_VAL_PER_CLASS


def _bias(ranking):
    bias = torch.zeros(TINY_NUM_CLASSES)
    for rank, cls in enumerate(ranking):
        bias[cls] = 10. - rank
    return bias


def _expected_loss(ranking):
    """Mean cross-entropy of the fixed logits over the (equally frequent) val classes."""
    bias = _bias(ranking)
    return torch.nn.functional.cross_entropy(bias.expand(TINY_NUM_CLASSES, -1), torch.arange(TINY_NUM_CLASSES)).item()


def _constant_checkpoint(path, ranking, key='state_dict', ema_ranking=None):
    """A checkpoint whose model ignores the image: logits = bias, classes ranked best-first as in `ranking`.

    Every val class has the same number of images, so top-1 = 100 * 1/C and top-5 = 100 * 5/C exactly, and the loss
    is `_expected_loss(ranking)`.
    """
    def weights(order):
        torch.manual_seed(0)
        sd = timm.create_model(TINY_MODEL, num_classes=TINY_NUM_CLASSES).state_dict()
        sd['fc.weight'] = torch.zeros_like(sd['fc.weight'])
        sd['fc.bias'] = _bias(order)
        return sd

    checkpoint = {key: weights(ranking)}
    if ema_ranking is not None:
        checkpoint['state_dict_ema'] = weights(ema_ranking)
    torch.save(checkpoint, path)


def _args(data, *extra):
    return ['--num-classes', str(TINY_NUM_CLASSES), '--img-size', '32', '-b', '16', '-j', '0', '--device', 'cpu',
            data, *extra]


def test_validate_one_metrics(tiny_imagefolder, tmp_path):
    ckpt = str(tmp_path / 'c.pth')
    _constant_checkpoint(ckpt, ranking=[3, 1, 4, 5, 9])
    results = validate.validate_one(validate.parse_args(_args(tiny_imagefolder, '--model', TINY_MODEL,
                                                              '--checkpoint', ckpt)))
    assert results['samples'] == N_VAL
    assert results['top1'] == pytest.approx(100 / TINY_NUM_CLASSES)
    assert results['top5'] == pytest.approx(500 / TINY_NUM_CLASSES)
    assert results['loss'] == pytest.approx(_expected_loss([3, 1, 4, 5, 9]), abs=1e-4)
    assert results['top1_err'] == pytest.approx(100 - results['top1'])
    assert results['img_size'] == 32 and results['model'] == TINY_MODEL and results['checkpoint'] == ckpt


def test_eval_protocol_overrides(tiny_imagefolder, tmp_path):
    ckpt = str(tmp_path / 'c.pth')
    _constant_checkpoint(ckpt, ranking=[0])
    args = validate.parse_args(_args(
        tiny_imagefolder, '--model', TINY_MODEL, '--checkpoint', ckpt, '--img-size', '40', '--crop-pct', '1.0',
        '--interpolation', 'bicubic', '--mean', '0.4', '0.4', '0.4', '--std', '0.2', '0.2', '0.2'))
    results = validate.validate_one(args)
    assert (results['img_size'], results['crop_pct'], results['interpolation']) == (40, 1.0, 'bicubic')
    # Without overrides the model's pretrained cfg decides.
    cfg = timm.create_model(TINY_MODEL).pretrained_cfg
    args = validate.parse_args(['-j', '0', '--num-classes', '10', tiny_imagefolder, '--model', TINY_MODEL, '-b', '40'])
    results = validate.validate_one(args)
    assert (results['img_size'], results['crop_pct'], results['interpolation']) == (
        cfg['input_size'][-1], cfg['crop_pct'], cfg['interpolation'])


def test_use_ema_and_runtime_options(tiny_imagefolder, tmp_path):
    ckpt = str(tmp_path / 'ema.pth.tar')
    _constant_checkpoint(ckpt, ranking=[0, 1, 2, 3, 4], ema_ranking=list(range(9, -1, -1)))
    base = _args(tiny_imagefolder, '--model', TINY_MODEL, '--checkpoint', ckpt)
    plain = validate.validate_one(validate.parse_args(base))
    ema = validate.validate_one(validate.parse_args(base + ['--use-ema', '--amp', '--amp-dtype', 'bfloat16',
                                                            '--channels-last', '--no-prefetcher']))
    assert plain['top1'] == ema['top1'] == pytest.approx(10.)
    assert plain['top5'] == ema['top5'] == pytest.approx(50.)
    # The two weight sets rank different numbers of classes, so only their losses tell which one was loaded.
    assert plain['loss'] == pytest.approx(_expected_loss([0, 1, 2, 3, 4]), abs=1e-4)
    assert ema['loss'] == pytest.approx(_expected_loss(range(9, -1, -1)), rel=1e-2)  # bfloat16 logits
    assert abs(plain['loss'] - ema['loss']) > 0.1


def test_several_models_and_results_files(tiny_imagefolder, tmp_path, capsys):
    a, b = str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')
    _constant_checkpoint(a, ranking=[0])
    _constant_checkpoint(b, ranking=[1, 2], key='model')
    out_json, out_csv = str(tmp_path / 'r.json'), str(tmp_path / 'r.csv')
    validate.main(_args(tiny_imagefolder, '--model', f'{TINY_MODEL},{TINY_MODEL}', '--checkpoint', f'{a},{b}',
                        '--results-file', out_json))
    rows = json.loads(open(out_json).read())
    assert [r['checkpoint'] for r in rows] == [a, b]
    assert all(r['top1'] == pytest.approx(10.) and r['samples'] == N_VAL for r in rows)
    assert capsys.readouterr().out.count(f'| {TINY_MODEL} |') == 2

    model_list = tmp_path / 'models.txt'
    model_list.write_text(f'# model checkpoint kwargs\n{TINY_MODEL} {a}\n\n{TINY_MODEL} {b} drop_rate=0.1  # dropout\n')
    validate.main(_args(tiny_imagefolder, '--model-list', str(model_list), '--results-file', out_csv))
    with open(out_csv) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r['checkpoint'] for r in csv_rows] == [a, b]
    assert [float(r['top1']) for r in csv_rows] == [r['top1'] for r in rows]
    assert float(csv_rows[1]['loss']) == pytest.approx(rows[1]['loss'])


def test_failed_model_is_reported_and_others_still_run(tiny_imagefolder, tmp_path):
    good, bad = str(tmp_path / 'good.pth'), str(tmp_path / 'bad.pth')
    _constant_checkpoint(good, ranking=[0])
    open(bad, 'w').write('not weights')
    out = str(tmp_path / 'r.json')
    with pytest.raises(SystemExit, match='1 of 2 models failed'):
        validate.main(_args(tiny_imagefolder, '--model', f'{TINY_MODEL},{TINY_MODEL}', '--checkpoint',
                            f'{bad},{good}', '--results-file', out))
    rows = json.loads(open(out).read())
    assert 'is not a PyTorch checkpoint' in rows[0]['error']
    assert rows[1]['top1'] == pytest.approx(10.)


def test_bad_input_gives_one_line(tiny_imagefolder, tmp_path, capsys):
    def _error(argv):
        """The error line of a failed run (SystemExit message, or parser.error's last stderr line)."""
        with pytest.raises(SystemExit) as info:
            validate.main(argv)
        assert info.value.code not in (0, None)
        return info.value.code if isinstance(info.value.code, str) else capsys.readouterr().err.splitlines()[-1]

    ckpt = str(tmp_path / 'c.pth')
    _constant_checkpoint(ckpt, ranking=[0])
    model = ['--model', TINY_MODEL, '--checkpoint', ckpt]

    assert 'did you mean test_resnet' in _error(_args(tiny_imagefolder, '--model', 'test_resnt'))
    assert f'dataset folder {tmp_path / "nope"} does not exist' in _error(_args(str(tmp_path / 'nope'), *model))
    assert 'models but 1 checkpoints' in _error(_args(tiny_imagefolder, '--model', 'test_resnet,resnet10t',
                                                      '--checkpoint', ckpt))
    flat = tmp_path / 'flat'
    flat.mkdir()
    shutil.copy(sorted(glob.glob(os.path.join(tiny_imagefolder, 'val', '*', '*.jpg')))[0], flat / 'x.jpg')
    assert 'one subfolder per class' in _error(_args(str(flat), *model))
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert f'cannot read dataset {empty}' in _error(_args(str(empty), *model))
    hole = tmp_path / 'hole'
    shutil.copytree(os.path.join(tiny_imagefolder, 'val'), hole / 'val')
    first_class = sorted(os.listdir(hole / 'val'))[0]
    for image in (hole / 'val' / first_class).iterdir():
        image.unlink()
    assert f'class folders without images in {hole / "val"}: {first_class}' in _error(_args(str(hole), *model))
    assert 'pass --num-classes 10' in _error(_args(tiny_imagefolder, '--model', TINY_MODEL, '--num-classes', '5'))
    assert 'does not fit model resnet10t' in _error(_args(tiny_imagefolder, '--model', 'resnet10t',
                                                          '--checkpoint', ckpt))
    assert 'no EMA weights' in _error(_args(tiny_imagefolder, *model, '--use-ema'))
    bad_list = tmp_path / 'list.txt'
    bad_list.write_text(f'{TINY_MODEL}\n')
    assert 'list.txt:1: expected `model checkpoint' in _error(_args(tiny_imagefolder, '--model-list', str(bad_list)))
    assert 'use a .json or .csv' in _error(_args(tiny_imagefolder, *model, '--results-file', 'r.txt'))


def test_cli_errors_have_no_traceback(tiny_imagefolder, tmp_path):
    not_ckpt = tmp_path / 'weights.pth'
    not_ckpt.write_text('hello')
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, 'validate.py'), *_args(tiny_imagefolder, '--model', TINY_MODEL,
                                                                   '--checkpoint', str(not_ckpt))],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if 'error' in line]
    assert errors == [f'validate.py: error: {not_ckpt} is not a PyTorch checkpoint (not written by torch.save): '
                      'pass a .pth/.pth.tar file']


# --- a train.py run validated from its checkpoint alone ---

@pytest.fixture(scope='module')
def trained_run(tiny_imagefolder, tmp_path_factory):
    """A 1-epoch train.py run whose model and eval transforms are not the defaults: validating it needs them all."""
    out = tmp_path_factory.mktemp('runs')
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, 'train.py'), '--data-dir', tiny_imagefolder, '--model', TINY_MODEL,
         '--model-kwargs', 'stem_width=8', '--img-size', '32', '--crop-pct', '1.0', '--interpolation', 'bicubic',
         '--mean', '0.4', '0.4', '0.4', '--std', '0.3', '0.3', '0.3', '-b', '16', '-j', '0', '--epochs', '1',
         '--warmup-epochs', '0', '--lr', '0.05', '--device', 'cpu', '--output', str(out), '--experiment', 'run'],
        cwd=out, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / 'run'


def test_validate_a_run_from_its_checkpoint_alone(trained_run, tiny_imagefolder, tmp_path, caplog):
    with open(trained_run / 'summary.csv', newline='') as f:
        last = list(csv.DictReader(f))[-1]
    run_top1, run_loss = float(last['eval_top1']), float(last['eval_loss'])
    runtime = ['-b', '16', '-j', '0', '--device', 'cpu']
    best = trained_run / 'model_best.pth.tar'
    for checkpoint in (best, trained_run):  # the file, or the run folder
        results = validate.validate_one(validate.parse_args([tiny_imagefolder, '--checkpoint', str(checkpoint),
                                                             *runtime]))
        assert (results['model'], results['checkpoint']) == (TINY_MODEL, str(best))
        assert (results['img_size'], results['crop_pct'], results['interpolation']) == (32, 1.0, 'bicubic')
        assert results['top1'] == pytest.approx(run_top1, abs=1e-3)
        assert results['loss'] == pytest.approx(run_loss, rel=1e-4)  # one evaluation loop (training/evaluate.py)

    # a checkpoint without saved args: the run's args.yaml beside it gives them
    copy = tmp_path / 'run'
    shutil.copytree(trained_run, copy)
    weights_only = load_checkpoint_file(str(best))
    del weights_only['args']
    torch.save(weights_only, copy / 'model_best.pth.tar')
    results = validate.validate_one(validate.parse_args([tiny_imagefolder, '--checkpoint', str(copy), *runtime]))
    assert results['top1'] == pytest.approx(run_top1, abs=1e-3)

    # flags on the command line win; the conflicts are one warning line
    caplog.clear()
    results = validate.validate_one(validate.parse_args([tiny_imagefolder, '--checkpoint', str(best), *runtime,
                                                         '--img-size', '40', '--crop-pct', '1.0']))
    assert results['img_size'] == 40
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert warnings == [f'The command line overrides the args saved in {best}: --img-size 40 (run: 32).']
    with pytest.raises(CheckpointError, match='does not fit model test_resnet'):
        validate.validate_one(validate.parse_args([tiny_imagefolder, '--checkpoint', str(best), *runtime,
                                                   '--model-kwargs', 'stem_width=16']))
    assert 'stem_width=16 (run: 8)' in caplog.text

    # a file that names no model
    plain = tmp_path / 'plain' / 'weights.pth'
    plain.parent.mkdir()
    torch.save(weights_only['state_dict'], plain)
    with pytest.raises(SystemExit, match=f'validate.py: error: {plain} does not name its model .*pass --model'):
        validate.main([tiny_imagefolder, '--checkpoint', str(plain), *runtime])
    with pytest.raises(SystemExit, match='holds no model_best.pth.tar or last.pth.tar'):
        validate.main([tiny_imagefolder, '--checkpoint', str(plain.parent), *runtime])
