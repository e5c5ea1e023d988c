"""Every weight-loading flag reads every release format through the project's loader; bad files get one line.

Flags: train.py --initial-checkpoint, --pretrained-path, --pretrained (a pretrained cfg `file`), --resume; validate.py
--checkpoint, --pretrained. Formats: the original releases' (`build_release` of tests/test_checkpoints.py) and this
project's own train.py checkpoint. The source weights give constant logits (fc weight 0, fc bias ranking the classes),
so validate.py's loss tells which weights it loaded; train.py runs with lr 0, so the parameters it saves are the ones
it loaded.
"""
import argparse
import logging
import os
import subprocess
import sys

import pytest
import timm
import torch

import validate
from tests.conftest import TINY_NUM_CLASSES
from tests.test_checkpoints import FORMATS, build_release

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = 'test_resnet'
RANKING = [3, 1, 4]
FORMATS_ALL = FORMATS + ['project']
TINY = [
    '--model', MODEL, '--img-size', '32', '-b', '16', '-j', '0', '--warmup-epochs', '0', '--lr-base', '0',
    '--smoothing', '0', '--device', 'cpu', '--seed', '0', '--epochs', '1', '--val-split', '', '--log-interval', '100',
]


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _constant_model(seed=0, num_classes=TINY_NUM_CLASSES, ranking=RANKING):
    """test_resnet whose logits ignore the image: fc weight 0, fc bias ranking the classes best-first."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=num_classes)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        for rank, cls in enumerate(ranking):
            model.fc.bias[cls] = 10. - rank
    return model


def _expected_loss(ranking=RANKING):
    bias = _constant_model(ranking=ranking).fc.bias.detach()
    targets = torch.arange(TINY_NUM_CLASSES)
    return torch.nn.functional.cross_entropy(bias.expand(TINY_NUM_CLASSES, -1), targets).item()


def _param_names():
    return [k for k, _ in timm.create_model(MODEL, num_classes=TINY_NUM_CLASSES).named_parameters()]


@pytest.fixture(scope='module')
def project_checkpoint(tiny_imagefolder, tmp_path_factory):
    """A train.py run's last.pth.tar (1 epoch at lr 0 from the constant weights): this project's own format."""
    folder = tmp_path_factory.mktemp('project')
    start = folder / 'constant.pth'
    torch.save(_constant_model().state_dict(), start)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'train.py'), '--data-dir', tiny_imagefolder, *TINY,
         '--initial-checkpoint', str(start), '--output', str(folder), '--experiment', 'run'],
        cwd=folder, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / 'run' / 'last.pth.tar'


@pytest.fixture
def release_file(tmp_path, monkeypatch, project_checkpoint):
    """release_file(fmt) -> (path, weights): the constant model saved in that format (the run's file for 'project').

    Formats that carry an optimizer state took one SGD step with equal gradients to fill it: every logit moves by
    the same amount, so the loss is still `_expected_loss()`; `weights` are the ones in the file.
    """
    def make(fmt):
        if fmt == 'project':
            return project_checkpoint, _constant_model().state_dict()
        source = _constant_model()
        path = tmp_path / f'{fmt}.pth'
        torch.save(build_release(fmt, source, monkeypatch), path)
        monkeypatch.delitem(sys.modules, 'yacs', raising=False)
        monkeypatch.delitem(sys.modules, 'yacs.config', raising=False)
        return path, source.state_dict()
    return make


def _cfg_file(path):
    """--model-kwargs that point the model's pretrained cfg at a file (what --pretrained then loads)."""
    return ['--model-kwargs', f"pretrained_cfg_overlay={{'file': {str(path)!r}}}"]


def _fails(main, argv, prog, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith(f'{prog}: error: ') and '\n' not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# --- every flag, every format ---

@pytest.mark.parametrize('fmt', FORMATS_ALL)
@pytest.mark.parametrize('flag', ['--initial-checkpoint', '--pretrained-path', '--pretrained'])
def test_train_weight_flags_take_every_format(flag, fmt, tiny_imagefolder, tmp_path, release_file, in_process):
    path, expected = release_file(fmt)
    argv = ['--data-dir', tiny_imagefolder, *TINY, '--output', str(tmp_path / 'out'), '--experiment', 'x']
    argv += ['--pretrained', *_cfg_file(path)] if flag == '--pretrained' else [flag, str(path)]
    in_process(argv)
    saved = _load(tmp_path / 'out' / 'x' / 'last.pth.tar')['state_dict']
    for k in _param_names():
        assert torch.equal(saved[k], expected[k]), k


@pytest.mark.parametrize('fmt', FORMATS_ALL)
def test_validate_checkpoint_and_pretrained_take_every_format(fmt, tiny_imagefolder, release_file):
    path, _ = release_file(fmt)
    common = [tiny_imagefolder, '--model', MODEL, '--num-classes', str(TINY_NUM_CLASSES), '--img-size', '32', '-b',
              '20', '-j', '0', '--device', 'cpu']
    for extra in (['--checkpoint', str(path)], ['--pretrained', *_cfg_file(path)]):
        results = validate.validate_one(validate.parse_args(common + extra))
        assert results['loss'] == pytest.approx(_expected_loss(), abs=1e-4), extra
        assert results['top1'] == pytest.approx(100 / TINY_NUM_CLASSES)


@pytest.mark.parametrize('fmt', FORMATS_ALL)
def test_resume_takes_training_checkpoints_and_points_weight_files_elsewhere(
        fmt, tiny_imagefolder, tmp_path, release_file, in_process, caplog):
    """--resume reads every file through the safe loader; it continues timm-saver training checkpoints (this
    project's, ddfnet's) and sends weight files (no optimizer, epoch and saver version) to the weight flags."""
    caplog.set_level(logging.INFO)
    path, _ = release_file(fmt)
    argv = ['--data-dir', tiny_imagefolder, *TINY, '--output', str(tmp_path / 'out'), '--experiment', 'x',
            '--resume', str(path)]
    if fmt == 'project':
        in_process(argv + ['--epochs', '2'])
        assert "Resumed from" in caplog.text and _load(tmp_path / 'out' / 'x' / 'last.pth.tar')['epoch'] == 1
    elif fmt == 'ddfnet_timm':
        # another training script's optimizer (one parameter group) does not fit timm's two
        _fails(in_process, argv, 'train.py', 'optimizer state does not fit', '--no-resume-opt')
        in_process(argv + ['--no-resume-opt', '--epochs', '121'])
        assert "Resumed from" in caplog.text and _load(tmp_path / 'out' / 'x' / 'last.pth.tar')['epoch'] == 120
    else:
        _fails(in_process, argv, 'train.py', 'cannot resume', 'not a training checkpoint', '--initial-checkpoint')
        assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('prefix', ['_orig_mod.module.', 'module._orig_mod.'], ids=['compiled_ddp', 'ddp_compiled'])
def test_nested_wrapper_prefixes_through_every_weight_flag(prefix, tiny_imagefolder, tmp_path, project_checkpoint,
                                                          in_process):
    """A training checkpoint of a compiled DDP model: torch.compile(DDP(m)) saves '_orig_mod.module.' keys,
    DDP(torch.compile(m)) 'module._orig_mod.'; every flag strips both wrappers and loads strictly."""
    checkpoint = _load(project_checkpoint)
    ema = _constant_model(seed=1, ranking=[1])
    checkpoint['state_dict'] = {prefix + k: v for k, v in checkpoint['state_dict'].items()}
    checkpoint['state_dict_ema'] = {prefix + k: v for k, v in ema.state_dict().items()}
    path = tmp_path / 'wrapped.pth.tar'
    torch.save(checkpoint, path)
    plain = _constant_model().state_dict()

    runs = (('initial', ['--initial-checkpoint', str(path)], plain),
            ('initial_ema', ['--initial-checkpoint', str(path), '--use-ema'], ema.state_dict()),
            ('pretrained_path', ['--pretrained-path', str(path)], plain),
            ('pretrained', ['--pretrained', *_cfg_file(path)], plain),
            ('resume', ['--resume', str(path), '--epochs', '2'], plain))
    for name, flags, expected in runs:
        in_process(['--data-dir', tiny_imagefolder, *TINY, '--output', str(tmp_path / 'out'), '--experiment', name,
                    *flags])
        saved = _load(tmp_path / 'out' / name / 'last.pth.tar')
        for k in _param_names():  # lr 0: the run saves the weights it loaded
            assert torch.equal(saved['state_dict'][k], expected[k]), (name, k)
    assert saved['epoch'] == 1  # the resumed run continued after the checkpoint's epoch 0

    common = [tiny_imagefolder, '--model', MODEL, '--num-classes', str(TINY_NUM_CLASSES), '--img-size', '32', '-b',
              '20', '-j', '0', '--device', 'cpu']
    for extra, ranking in ((['--checkpoint', str(path)], RANKING), (['--pretrained', *_cfg_file(path)], RANKING),
                           (['--checkpoint', str(path), '--use-ema'], [1])):
        results = validate.validate_one(validate.parse_args(common + extra))
        assert results['loss'] == pytest.approx(_expected_loss(ranking), abs=1e-4), extra


def test_ema_rule_and_flag(tiny_imagefolder, tmp_path, in_process, caplog):
    """The plain weights of a file unless --use-ema; a file with EMA weights only gives those, and says so."""
    caplog.set_level(logging.INFO)
    plain, ema = _constant_model(seed=0, ranking=[0]), _constant_model(seed=1, ranking=[1])
    both = tmp_path / 'both.pth.tar'
    torch.save({'state_dict': plain.state_dict(), 'state_dict_ema': ema.state_dict(), 'epoch': 3}, both)
    only_ema = tmp_path / 'ema_only.pth.tar'
    torch.save({'state_dict_ema': ema.state_dict()}, only_ema)
    no_ema = tmp_path / 'no_ema.pth.tar'
    torch.save({'state_dict': plain.state_dict()}, no_ema)
    common = ['--data-dir', tiny_imagefolder, *TINY, '--output', str(tmp_path / 'out')]
    for name, extra, expected in (('plain', [both], plain), ('ema', [both, '--use-ema'], ema),
                                  ('ema_only', [only_ema], ema)):
        in_process(common + ['--experiment', name, '--initial-checkpoint', *map(str, extra)])
        saved = _load(tmp_path / 'out' / name / 'last.pth.tar')['state_dict']
        assert torch.equal(saved['fc.bias'], expected.fc.bias), name
    assert 'Checkpoint holds only EMA weights (state_dict_ema); using them.' in caplog.text
    _fails(in_process, common + ['--experiment', 'bad', '--pretrained-path', str(no_ema), '--use-ema'], 'train.py',
           '--pretrained-path', 'no EMA weights', 'drop --use-ema')


def test_pretrained_downloads_into_timm_cache_then_loads_safely(tiny_imagefolder, tmp_path, monkeypatch, in_process):
    """--pretrained for a hub model: timm downloads the file, the project's loader reads it."""
    from safetensors.torch import save_file
    from timm.models import _hub
    weights = tmp_path / 'model.safetensors'
    save_file(_constant_model().state_dict(), str(weights))
    asked = []

    def fake_download(hub_id, filename, cache_dir=None):
        asked.append((hub_id, filename))
        return str(weights)

    monkeypatch.setattr(_hub, 'download_from_hf', fake_download)
    results = validate.validate_one(validate.parse_args([
        tiny_imagefolder, '--model', MODEL, '--num-classes', str(TINY_NUM_CLASSES), '--pretrained', '--img-size',
        '32', '-b', '20', '-j', '0', '--device', 'cpu']))
    assert asked == [('timm/test_resnet.r160_in1k', 'model.safetensors')]
    assert results['loss'] == pytest.approx(_expected_loss(), abs=1e-4)

    def offline(hub_id, filename, cache_dir=None):
        raise OSError('Network is unreachable')

    monkeypatch.setattr(_hub, 'download_from_hf', offline)
    argv = ['--data-dir', tiny_imagefolder, *TINY, '--output', str(tmp_path / 'out'), '--experiment', 'x']
    _fails(in_process, argv + ['--pretrained'], 'train.py', 'cannot download the pretrained weights of test_resnet',
           'Network is unreachable', '--pretrained-path')
    _fails(in_process, argv + ['--pretrained', '--model', 'ddf_mul_resnet50'], 'train.py',
           'names no pretrained weights', '--pretrained-path')
    assert not (tmp_path / 'out').exists()


# --- fine-tuning starts: only a differing classifier may be left out ---

def test_pretrained_path_adapts_only_the_classifier(tiny_imagefolder, tmp_path, in_process, caplog):
    caplog.set_level(logging.INFO)
    imagenet_head = _constant_model(num_classes=1000)
    path = tmp_path / 'in1k.pth'
    torch.save({'state_dict': imagenet_head.state_dict()}, path)
    argv = ['--data-dir', tiny_imagefolder, *TINY, '--output', str(tmp_path / 'out')]
    in_process(argv + ['--experiment', 'ok', '--pretrained-path', str(path)])
    assert 'classifier fc not loaded (checkpoint: 1000 classes, model: 10 classes)' in caplog.text
    saved = _load(tmp_path / 'out' / 'ok' / 'last.pth.tar')['state_dict']
    source = imagenet_head.state_dict()
    assert all(torch.equal(saved[k], source[k]) for k in _param_names() if not k.startswith('fc.'))
    # --initial-checkpoint restores a run exactly: a head of other classes is an error there
    _fails(in_process, argv + ['--experiment', 'bad', '--initial-checkpoint', str(path)], 'train.py',
           '--initial-checkpoint', 'has 1000 classes but model test_resnet has 10', '--pretrained-path')

    # What a new user tried: every key under 'backbone.'. It used to train from random weights with exit 0.
    prefixed = tmp_path / 'backbone.pth'
    torch.save({'backbone.' + k: v for k, v in source.items()}, prefixed)
    _fails(in_process, argv + ['--experiment', 'prefixed', '--pretrained-path', str(prefixed)], 'train.py',
           'does not fit model test_resnet', 'missing [conv1.0.weight', "carry the prefix 'backbone.'")
    assert sorted(os.listdir(tmp_path / 'out')) == ['ok']  # nothing written for the refused runs


# --- bad files: one line each, on every entry point, nothing written, nothing run ---

class _Payload:
    """Unpickling runs `fn(*args)`: the shape of a malicious checkpoint."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _training_layout(state_dict):
    """A timm-saver training checkpoint around these weights, so --resume reaches the weights too."""
    return {'state_dict': state_dict, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 0, 'version': 2}


@pytest.fixture
def bad_files(tmp_path):
    """name -> (path, words its one-line message must hold); and the marker a payload would create."""
    marker = tmp_path / 'pwned'
    weights = _constant_model().state_dict()
    files = {}

    def add(name, expected, content=None, obj=None, legacy=False):
        path = tmp_path / f'{name}.pth.tar'
        if obj is not None:
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        else:
            path.write_bytes(content)
        files[name] = (path, expected)

    add('unsafe_system', ['refused as unsafe', 'posix.system', 'nothing was run'],
        obj={**_training_layout(weights), 'payload': _Payload(os.system, f'touch {marker}')})
    add('unsafe_open', ['refused as unsafe', 'io.open', 'nothing was run'], legacy=True,
        obj={**_training_layout(weights), 'payload': _Payload(open, str(marker), 'w')})
    torch.save(_training_layout(weights), tmp_path / 'full.pth.tar')
    data = (tmp_path / 'full.pth.tar').read_bytes()
    add('truncated', ['truncated or corrupt', 'copy it again'], content=data[:len(data) // 2])
    add('empty', ['is empty (0 bytes)'], content=b'')
    add('not_checkpoint', ['is not a PyTorch checkpoint'], content=b'\xff\xd8\xff\xe0 a JPEG')
    torch.manual_seed(0)
    other = timm.create_model('test_convnext', num_classes=TINY_NUM_CLASSES).state_dict()
    add('wrong_model', ['does not fit model test_resnet', 'missing [', 'unexpected [stem.0.weight'],
        obj=_training_layout(other))
    add('wrong_classes', ['has 5 classes but model test_resnet has 10', '--num-classes 5'],
        obj=_training_layout(_constant_model(num_classes=5).state_dict()))
    return files, marker


def test_bad_files_one_line_on_every_entry_point(tiny_imagefolder, tmp_path, bad_files, in_process):
    files, marker = bad_files
    out = tmp_path / 'out'
    train_argv = ['--data-dir', tiny_imagefolder, *TINY, '--output', str(out), '--experiment', 'x']
    validate_argv = [tiny_imagefolder, '--model', MODEL, '--num-classes', '10', '--img-size', '32', '-j', '0',
                     '--device', 'cpu']
    for name, (path, expected) in files.items():
        for flag in ('--initial-checkpoint', '--pretrained-path', '--resume'):
            if flag == '--pretrained-path' and name == 'wrong_classes':
                continue  # a fine-tuning start: the classifier is adapted (test above)
            _fails(in_process, train_argv + [flag, str(path)], 'train.py', *expected)
        _fails(validate.main, validate_argv + ['--checkpoint', str(path)], 'validate.py', *expected)
        _fails(validate.main, validate_argv + ['--pretrained', *_cfg_file(path)], 'validate.py', *expected)
    assert not out.exists()
    assert not marker.exists()
    # the payloads were live: an unrestricted load runs them
    torch.load(files['unsafe_system'][0], weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize('script', ['train.py', 'validate.py'])
def test_unsafe_file_from_the_command_line(script, tiny_imagefolder, tmp_path, bad_files):
    """Through the real entry points: exit status 2, one stderr line that says unsafe, no traceback."""
    files, marker = bad_files
    path = files['unsafe_system'][0]
    argv = (['--data-dir', tiny_imagefolder, *TINY, '--output', str(tmp_path / 'out'), '--initial-checkpoint']
            if script == 'train.py' else [tiny_imagefolder, '--model', MODEL, '-j', '0', '--device', 'cpu',
                                          '--checkpoint'])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv, str(path)], cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if 'error' in line]
    assert len(lines) == 1 and lines[0].startswith(f'{script}: error: ') and 'refused as unsafe' in lines[0], \
        proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr and not marker.exists()
