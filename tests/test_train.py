"""train.py on the tiny demo ImageFolder: run folder, YAML handling, hooks, exact resume, atomic checkpoints, bad input.

Training runs use timm's resnet10t at 32x32 with one thread per process, so each takes seconds. Runs that must be
killed or that check the command-line behaviour go through a subprocess; the others call `train.main` in-process.
"""
import argparse
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial

import pytest
import torch
import torch.nn as nn
import yaml
from timm.models import register_model

import train
from training import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'train.py')
VALIDATE = os.path.join(ROOT, 'validate.py')
TINY = [
    '--model', 'resnet10t', '--img-size', '32', '-b', '8', '-j', '0', '--warmup-epochs', '0', '--lr', '0.05',
    '--smoothing', '0', '--log-interval', '4', '--device', 'cpu', '--seed', '0',
]


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


def _run(argv, cwd, timeout=600):
    return subprocess.run(
        [sys.executable, TRAIN, *argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _summary(run_dir):
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        return list(csv.DictReader(f))


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _fails(main, argv, *needles):
    """main(argv) must end with one 'train.py: error:' line naming all needles (no other exception)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith('train.py: error: ') and '\n' not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# --- config handling ---

def test_yaml_precedence_cli_over_yaml_over_defaults(tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump({'lr': 0.5, 'epochs': 7, 'batch_size': 16, 'model_kwargs': {'reg_weight': 0.01}}))
    args = options.parse_args(['--config', str(cfg), '--lr', '0.2', '--data-dir', 'x'])
    assert args.lr == 0.2  # CLI beats YAML
    assert args.epochs == 7 and args.batch_size == 16 and args.model_kwargs == {'reg_weight': 0.01}  # YAML
    assert args.momentum == 0.9 and args.sched == 'cosine'  # code defaults
    # a fresh parse does not keep the previous config's values
    assert options.parse_args(['--data-dir', 'x']).epochs == 300


def test_yaml_unknown_key_names_closest(tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('lr_bse: 0.1\nepochs: 2\n')
    with pytest.raises(SystemExit) as e:
        options.parse_args(['--config', str(cfg)])
    assert "unknown key 'lr_bse'" in str(e.value.code) and "'lr_base'" in str(e.value.code)


def test_yaml_that_is_not_text_is_one_line(tmp_path):
    binary = tmp_path / 'binary.yaml'
    binary.write_bytes(b'lr: 0.1\n\xff\xfe\x00')
    with pytest.raises(SystemExit) as e:
        options.parse_args(['--config', str(binary)])
    assert 'not valid YAML' in str(e.value.code) and "can't decode" in str(e.value.code)


def test_yaml_malformed_and_not_a_mapping(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('lr: [0.1\nepochs: 2\n')
    with pytest.raises(SystemExit) as e:
        options.parse_args(['--config', str(bad)])
    assert 'not valid YAML' in str(e.value.code) and 'line' in str(e.value.code)
    listed = tmp_path / 'list.yaml'
    listed.write_text('- lr\n- 0.1\n')
    with pytest.raises(SystemExit) as e:
        options.parse_args(['--config', str(listed)])
    assert 'must be a mapping' in str(e.value.code)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    """Through the real entry point: exit status, a single stderr line, no traceback."""
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('model_ema_decy: 0.99\n')
    proc = _run(['--config', str(cfg)], cwd=tmp_path)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'model_ema_decy'" in lines[0] and "'model_ema_decay'" in lines[0], proc.stderr


# --- a full run, then validate.py on its checkpoint ---

def test_run_folder_and_validate_agree(tiny_imagefolder, tmp_path):
    out = tmp_path / 'out'
    proc = _run(['--data-dir', tiny_imagefolder, *TINY, '--epochs', '2', '--output', str(out), '--experiment', 'run',
                 '--log-tb', '--checkpoint-hist', '1', '--crop-pct', '0.875'], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert 'Global batch size 8 (8 per process x 1 processes x 1 accumulation steps); lr 0.05' in log
    step_lines = [ln for ln in log.splitlines() if ln.startswith('Train: ')]
    assert step_lines and all('Loss:' in ln and 'img/s' in ln and 'LR:' in ln and 'ETA:' in ln for ln in step_lines)

    run = out / 'run'
    names = set(os.listdir(run))
    assert {'args.yaml', 'last.pth.tar', 'model_best.pth.tar', 'summary.csv', 'curves.png'} <= names
    assert len([n for n in names if n.startswith('checkpoint-')]) == 1  # --checkpoint-hist 1
    assert len([n for n in names if n.startswith('events.out.tfevents')]) == 1
    assert not [n for n in names if 'tmp' in n]
    rows = _summary(run)
    assert [r['epoch'] for r in rows] == ['0', '1']
    assert {'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'train_skipped_images'} <= set(rows[0])

    ckpt = _load(run / 'last.pth.tar')
    assert {'state_dict', 'optimizer', 'scheduler', 'epoch', 'args', 'rng', 'saver', 'metric'} <= set(ckpt)
    assert ckpt['epoch'] == 1 and ckpt['step'] is None and len(ckpt['rng']) == 1
    # the resolved arguments are a valid --config again
    again = options.parse_args(['--config', str(run / 'args.yaml')])
    assert again.lr == 0.05 and again.epochs == 2 and again.num_classes == 10

    # one crop for both: resnet10t's cfg has a separate test-time crop that validate.py would otherwise apply
    results = tmp_path / 'val.json'
    proc = subprocess.run(
        [sys.executable, VALIDATE, '--data-dir', tiny_imagefolder, '--model', 'resnet10t', '--num-classes', '10',
         '--img-size', '32', '--crop-pct', '0.875', '--checkpoint', str(run / 'last.pth.tar'), '-b', '8', '-j', '0',
         '--device', 'cpu', '--results-file', str(results)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(results) as f:
        val_top1 = json.load(f)[0]['top1']
    assert val_top1 == pytest.approx(float(rows[-1]['eval_top1']), abs=1e-3)


# --- generic model hooks ---

class _HookNet(nn.Module):
    """A tiny classifier with every training hook; instances are recorded so the test can inspect them."""
    instances = []

    def __init__(self, num_classes=10, in_chans=3, aux_value=0., **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(nn.Conv2d(in_chans, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)
        self.aux_value = aux_value
        self.progress = []
        self.aux_calls = 0
        self.loaded_state = None
        _HookNet.instances.append(self)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))

    def set_training_progress(self, epochs):
        self.progress.append(epochs)

    def scheduled_values(self, epochs):
        return {}

    def auxiliary_loss_terms(self):
        return [{'name': 'constant', 'weight': 1.0}]

    def auxiliary_loss(self):
        self.aux_calls += 1
        return self.fc.weight.sum() * 0. + self.aux_value

    def training_hook_state(self):
        return {'progress': self.progress[-1], 'calls': len(self.progress)}

    def load_training_hook_state(self, state):
        self.loaded_state = state

    def training_hook_log(self):
        return {'hook_progress': self.progress[-1]}


@register_model
def train_test_hook_net(pretrained=False, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k in ('num_classes', 'in_chans', 'aux_value')}
    return _HookNet(**kwargs)


def test_model_hooks_called_saved_and_restored(tiny_imagefolder, tmp_path, in_process):
    argv = ['--data-dir', tiny_imagefolder, *TINY, '--model', 'train_test_hook_net',
            '--model-kwargs', 'aux_value=1000.', '--output', str(tmp_path), '--experiment', 'hooks', '--model-ema']
    _HookNet.instances.clear()
    in_process(argv + ['--epochs', '1'])
    model = _HookNet.instances[0]
    steps = 10  # 80 images, batch 8, drop_last
    assert model.progress == pytest.approx([(i + 1) / steps for i in range(steps)])  # the running update counted
    assert model.aux_calls == steps
    rows = _summary(tmp_path / 'hooks')
    assert float(rows[0]['train_loss']) > 1000.  # the auxiliary loss is part of the loss
    assert float(rows[0]['train_hook_progress']) == pytest.approx(1.0)
    ckpt = _load(tmp_path / 'hooks' / 'last.pth.tar')
    assert ckpt['training_hooks'] == {'progress': pytest.approx(1.0), 'calls': steps}

    _HookNet.instances.clear()
    in_process(argv + ['--epochs', '2', '--auto-resume'])
    resumed = _HookNet.instances[0]
    assert resumed.loaded_state == ckpt['training_hooks']
    assert resumed.progress[0] == pytest.approx(1.1)


def test_odconv_model_trains_channels_last_and_checkpoints_its_temperature(tiny_imagefolder, tmp_path, in_process):
    """A real ODConv model through train.py with --channels-last (its 5-D kernel banks stay contiguous); the
    annealed temperature is in the checkpoint: 1 + 29 * (1 - 1.0 / 2) for the 10th of the 20 annealing updates."""
    argv = ['--data-dir', tiny_imagefolder, *TINY, '--model', 'od_resnet18', '--channels-last', '--epochs', '1',
            '--model-kwargs', 'kernel_num=2', 'layers=(1,1,1,1)', 'temp_epochs=2', '--output', str(tmp_path),
            '--experiment', 'od']
    in_process(argv)
    ckpt = _load(tmp_path / 'od' / 'last.pth.tar')
    assert ckpt['training_hooks']['temperature'] == pytest.approx(1 + 29 * (1 - 1.0 / 2))  # update 10 counted
    assert ckpt['state_dict']['layer1.0.conv1.weight'].shape == (2, 64, 64, 3, 3)


# --- resume exactness and atomic checkpoints ---

def _kill_when(argv, cwd, marker):
    """Starts train.py, SIGKILLs it as soon as marker() is true and checks that it was still running then."""
    proc = subprocess.Popen([sys.executable, TRAIN, *argv], cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not marker() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    still_running = proc.poll() is None
    proc.kill()
    proc.wait()
    assert still_running, 'the run ended before it could be killed in its second epoch'


def test_resume_after_hard_kill_is_exact(tiny_imagefolder, tmp_path, in_process, caplog):
    """2 epochs straight == 1 epoch, SIGKILL, --auto-resume; also from a mid-epoch recovery checkpoint."""
    # augmentation in a loader worker, drop-path and EMA all draw from the RNG streams
    argv = ['--data-dir', tiny_imagefolder, *TINY, '-j', '1', '--epochs', '2', '--drop-path', '0.1',
            '--model-ema', '--model-ema-decay', '0.9', '--output', str(tmp_path)]
    in_process(argv + ['--experiment', 'straight'])
    expected = _load(tmp_path / 'straight' / 'last.pth.tar')

    caplog.set_level(logging.INFO)
    cases = (
        ('epoch_end', [], lambda run: (run / 'checkpoint-0.pth.tar').exists(), 'last.pth.tar'),
        ('mid_epoch', ['--recovery-interval', '4'], lambda run: (run / 'recovery-1-3.pth.tar').exists(),
         'recovery-1-3.pth.tar'),
    )
    for name, extra, marker, resumed_from in cases:
        run = tmp_path / name
        _kill_when(argv + extra + ['--experiment', name], tmp_path, partial(marker, run))
        caplog.clear()
        in_process(argv + extra + ['--experiment', name, '--auto-resume'])
        assert f"Auto-resume from '{run / resumed_from}'" in caplog.text
        got = _load(run / 'last.pth.tar')
        _assert_same_tensors(expected['state_dict'], got['state_dict'])
        _assert_same_tensors(expected['state_dict_ema'], got['state_dict_ema'])
        assert [r['epoch'] for r in _summary(run)] == ['0', '1']


def test_mid_epoch_resume_with_per_update_schedule_is_exact(tiny_imagefolder, tmp_path, in_process, caplog):
    """--sched-on-updates (every DWNet recipe), killed after a recovery point inside epoch 1: the resumed run sets
    the LR of the saved update, not of the epoch start, so its weights equal a straight run's bit for bit."""
    # 10 updates per epoch; a cosine stepped per update gives every update its own LR
    argv = ['--data-dir', tiny_imagefolder, *TINY, '-j', '1', '--epochs', '2', '--sched', 'cosine',
            '--sched-on-updates', '--recovery-interval', '4', '--val-split', '', '--output', str(tmp_path)]
    in_process(argv + ['--experiment', 'straight'])
    expected = _load(tmp_path / 'straight' / 'last.pth.tar')

    run = tmp_path / 'killed'
    _kill_when(argv + ['--experiment', 'killed'], tmp_path, lambda: (run / 'recovery-1-3.pth.tar').exists())
    assert _load(run / 'recovery-1-3.pth.tar')['step'] == 4
    caplog.set_level(logging.INFO)
    in_process(argv + ['--experiment', 'killed', '--auto-resume'])
    assert f"Auto-resume from '{run / 'recovery-1-3.pth.tar'}'" in caplog.text
    got = _load(run / 'last.pth.tar')
    _assert_same_tensors(expected['state_dict'], got['state_dict'])
    _assert_same_tensors(expected['optimizer']['state'][0], got['optimizer']['state'][0])
    # 'metric' is the loss average the loop hands step_update (only plateau reads it): a resumed epoch averages fewer
    assert {k: v for k, v in got['scheduler'].items() if k != 'metric'} == {
        k: v for k, v in expected['scheduler'].items() if k != 'metric'}


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    """SIGKILL in the middle of writing checkpoint 1: last.pth.tar still holds checkpoint 0 and auto-resume picks it."""
    script = textwrap.dedent(f'''
        import os, signal, torch
        import train
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        saver = train.TrainCheckpointSaver(
            extra_state_fn=lambda: {{'step': None}}, model=model, optimizer=opt,
            checkpoint_dir={str(tmp_path)!r}, recovery_dir={str(tmp_path)!r}, max_history=2)
        saver.save_checkpoint(0, metric=1.0)
        torch.save(model.state_dict(), os.path.join({str(tmp_path)!r}, 'weights0.pt'))
        real_save = torch.save

        def dying_save(obj, path):
            real_save(obj, path)
            with open(path, 'r+b') as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = dying_save
        with torch.no_grad():
            model.weight.add_(1.)
        saver.save_checkpoint(1, metric=2.0)
    ''')
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert os.path.exists(tmp_path / 'tmp.pth.tar')  # the torn write
    with pytest.raises(Exception):
        _load(tmp_path / 'tmp.pth.tar')
    last = _load(tmp_path / 'last.pth.tar')
    assert last['epoch'] == 0
    _assert_same_tensors(last['state_dict'], torch.load(tmp_path / 'weights0.pt', weights_only=True))
    assert train.find_auto_resume(str(tmp_path)) == str(tmp_path / 'last.pth.tar')


# --- bad input: one line, non-zero exit, nothing lost ---

def _copy_data(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_bad_data_folders(tiny_imagefolder, tmp_path, in_process):
    out = tmp_path / 'out'
    common = [*TINY, '--epochs', '1', '--output', str(out), '--experiment', 'x']
    _fails(in_process, ['--data-dir', str(tmp_path / 'missing'), *common], 'does not exist', '--data-dir')

    flat = tmp_path / 'flat'
    (flat / 'train').mkdir(parents=True)
    shutil.copytree(os.path.join(tiny_imagefolder, 'val'), flat / 'val')
    for f in os.listdir(os.path.join(tiny_imagefolder, 'train', 'circle'))[:3]:
        shutil.copy(os.path.join(tiny_imagefolder, 'train', 'circle', f), flat / 'train' / f)
    _fails(in_process, ['--data-dir', str(flat), *common], 'no class subfolders')

    empty_train = tmp_path / 'empty_train'
    (empty_train / 'train').mkdir(parents=True)
    _fails(in_process, ['--data-dir', str(empty_train), *common], 'train')

    empty_class = _copy_data(tiny_imagefolder, tmp_path / 'empty_class')
    os.makedirs(os.path.join(empty_class, 'train', 'zebra'))
    _fails(in_process, ['--data-dir', empty_class, *common], 'zebra', 'has no images')

    no_val = _copy_data(tiny_imagefolder, tmp_path / 'no_val')
    shutil.rmtree(os.path.join(no_val, 'val'))
    _fails(in_process, ['--data-dir', no_val, *common], "no 'validation' folder", "--val-split ''")
    assert not out.exists()


def test_bad_options(tiny_imagefolder, tmp_path, in_process):
    out = tmp_path / 'out'
    common = ['--data-dir', tiny_imagefolder, *TINY, '--epochs', '1', '--output', str(out), '--experiment', 'x']
    _fails(in_process, [*common, '--model', 'resnet10x'], "unknown model 'resnet10x'", 'resnet10t')
    _fails(in_process, [*common, '-b', '100'], 'batch size 100', '80 training images')
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    _fails(in_process, [*common, '--output', str(blocker / 'sub')], 'not writable')
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / 'locked'
        locked.mkdir(mode=0o555)
        _fails(in_process, [*common, '--output', str(locked)], 'not writable')
    try:
        import apex  # noqa: F401
    except ImportError:
        _fails(in_process, [*common, '--apex-amp'], '--apex-amp needs NVIDIA apex')
    not_ckpt = tmp_path / 'not_a_checkpoint.pth.tar'
    not_ckpt.write_bytes(b'this is not a checkpoint')
    _fails(in_process, [*common, '--resume', str(not_ckpt)], 'cannot resume')
    _fails(in_process, [*common, '--resume', str(tmp_path / 'nope.pth.tar')], 'not found')
    assert not out.exists()

    # an existing run is never overwritten by a fresh start
    run = out / 'x'
    run.mkdir(parents=True)
    (run / 'last.pth.tar').write_bytes(b'precious')
    _fails(in_process, common, 'already holds checkpoints', '--auto-resume')
    assert (run / 'last.pth.tar').read_bytes() == b'precious' and os.listdir(run) == ['last.pth.tar']


def test_corrupt_images_skipped_and_fp16_on_cpu_falls_back(tiny_imagefolder, tmp_path, in_process, caplog):
    data = _copy_data(tiny_imagefolder, tmp_path / 'data')
    folder = os.path.join(data, 'train', 'circle')
    files = sorted(os.listdir(folder))
    with open(os.path.join(folder, files[0]), 'wb') as f:
        f.write(b'not a jpeg at all')
    path = os.path.join(folder, files[1])
    with open(path, 'rb') as f:
        head = f.read()[:200]
    with open(path, 'wb') as f:
        f.write(head)  # truncated JPEG
    caplog.set_level(logging.INFO)
    in_process(['--data-dir', data, *TINY, '--epochs', '1', '--amp', '--amp-dtype', 'float16',
                '--output', str(tmp_path), '--experiment', 'x'])
    log = caplog.text
    assert 'float16 AMP is not offered on CPU; training with bfloat16' in log
    assert 'skipped 2 unreadable training image(s)' in log
    rows = _summary(tmp_path / 'x')
    assert rows[0]['train_skipped_images'] == '2'
    assert _load(tmp_path / 'x' / 'last.pth.tar')['args'].amp_dtype == 'bfloat16'


def test_corrupt_images_counted_when_loader_workers_decode(tiny_imagefolder, tmp_path, in_process):
    """With loader workers (timm's default -j 4) the images are decoded in other processes; the count still reaches
    summary.csv, per epoch."""
    data = _copy_data(tiny_imagefolder, tmp_path / 'data')
    for cls, name in (('circle', 0), ('square', 3), ('square', 5)):
        folder = os.path.join(data, 'train', cls)
        with open(os.path.join(folder, sorted(os.listdir(folder))[name]), 'wb') as f:
            f.write(b'not a jpeg at all')
    in_process(['--data-dir', data, *TINY, '-j', '2', '--epochs', '2', '--val-split', '', '--output', str(tmp_path),
                '--experiment', 'x'])
    assert [r['train_skipped_images'] for r in _summary(tmp_path / 'x')] == ['3', '3']


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_imagefolder, tmp_path, in_process):
    # epoch 0 trains normally; the step schedule then multiplies the lr by 1e30 and the loss blows up in epoch 1
    argv = ['--data-dir', tiny_imagefolder, *TINY, '--epochs', '3', '--sched', 'step', '--decay-epochs', '1',
            '--decay-rate', '1e30', '--output', str(tmp_path), '--experiment', 'nan']
    msg = _fails(in_process, argv, 'at epoch 1 step', 'lr 5.000e+28', 'Last good checkpoint')
    assert msg.startswith('train.py: error: loss is ')
    run = tmp_path / 'nan'
    assert _load(run / 'last.pth.tar')['epoch'] == 0
    assert [r['epoch'] for r in _summary(run)] == ['0']
