"""train.py --plan: the resolved run, and the run itself using exactly what the plan reports."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
import yaml

from models.layers.odconv import ODAttention
from training.plan import make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN_KEYS = {
    'model', 'model_kwargs', 'world_size', 'batch_size', 'grad_accum_steps', 'global_batch', 'train_size',
    'updates_per_epoch', 'epochs', 'total_updates', 'optimizer', 'param_groups', 'lr', 'temperature', 'loss',
    'aux_losses', 'clip_grad', 'ema', 'amp', 'drop_rate', 'drop_path_rate', 'sync_bn', 'dist_bn', 'train_transform',
    'eval_transform'}
TINY_OD = ['--model', 'od_resnet18', '--model-kwargs', 'layers=[1,1,1,1]', 'channels=[8,16,32,64]', 'kernel_num=2',
           'temp_epochs=1.5', '--img-size', '32', '-b', '8', '-j', '0', '--device', 'cpu', '--seed', '0',
           '--log-interval', '100', '--val-split', '']


def _run_plan_cli(argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


class _Recorder:
    """Records, through torch's global hooks, the LR of every optimizer step, the ODConv temperature of every
    training forward (with the number of steps before it) and the optimizer's parameter groups by name."""

    def __init__(self):
        self.lrs, self.temperatures, self.groups, self.model = [], [], None, None

    def __enter__(self):
        self._handles = [
            register_optimizer_step_pre_hook(self._on_step),
            torch.nn.modules.module.register_module_forward_pre_hook(self._on_forward),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _on_forward(self, module, inputs):
        if self.model is None and any(isinstance(m, ODAttention) for m in module.modules()):
            self.model = module  # the outermost module holding an attention is called first: the model
        if isinstance(module, ODAttention) and module.training:
            self.temperatures.append((len(self.lrs), float(module.temperature)))

    def _on_step(self, optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        self.lrs.append(group['lr'] / group.get('lr_scale', 1.0))
        if self.groups is None:
            names = {id(p): n for n, p in self.model.named_parameters()}
            self.groups = [{'weight_decay': g['weight_decay'], 'lr_scale': g.get('lr_scale', 1.0),
                            'params': [names[id(p)] for p in g['params']]} for g in optimizer.param_groups]


@pytest.mark.slow
@pytest.mark.parametrize('schedule', [
    # per-update cosine with warm-up and cool-down; 80 images in 7 batches of 12 (the last of 8, kept) in updates of
    # 3 micro-batches (the last one of 1)
    ['--sched', 'cosine', '--sched-on-updates', '--warmup-epochs', '1', '--warmup-lr', '0.01', '--cooldown-epochs',
     '1', '--min-lr', '0.002', '--epochs', '2', '-b', '12', '--no-drop-last', '--grad-accum-steps', '3', '--opt',
     'adamw', '--lr', '0.05'],
    # per-epoch multistep with warm-up, every parameter decayed
    ['--sched', 'multistep', '--decay-milestones', '1', '2', '--warmup-epochs', '1', '--warmup-lr', '0.01',
     '--epochs', '3', '--opt', 'momentum', '--lr-base', '0.2', '--lr-base-size', '16', '--opt-kwargs',
     'filter_bias_and_bn=False'],
    # Swin's clock: a per-update cosine over loader batches, set to each update's last batch index; 10 batches in
    # updates of 3, the 10th batch's gradient discarded
    ['--sched', 'cosine', '--sched-on-updates', '--sched-clock', 'batches', '--warmup-epochs', '1', '--warmup-lr',
     '0.01', '--epochs', '3', '--grad-accum-steps', '3', '--accum-drop-last', '--clip-grad', '1',
     '--clip-per-micro-batch', '--opt', 'adamw', '--lr', '0.05'],
], ids=['cosine-updates-accum', 'multistep-epochs', 'cosine-batch-clock'])
def test_run_uses_the_plan(in_process, tiny_imagefolder, tmp_path, schedule):
    """A short CPU run steps with the plan's LR at every update, runs every forward at the plan's temperature and
    builds the plan's parameter groups."""
    argv = ['--data-dir', tiny_imagefolder, *TINY_OD, *schedule, '--output', str(tmp_path), '--experiment', 'run']
    train_size = len(glob.glob(os.path.join(tiny_imagefolder, 'train', '*', '*.jpg')))
    plan = make_plan(argv + ['--plan-train-size', str(train_size)])
    with _Recorder() as rec:
        in_process(argv)
    assert len(rec.lrs) == plan['total_updates'] == len(plan['lr'])
    assert rec.lrs == pytest.approx(plan['lr'], rel=1e-12)
    per_update = {}
    for update, t in rec.temperatures:
        per_update.setdefault(update, set()).add(t)
    per_update.pop(plan['total_updates'], None)  # --accum-drop-last: the run's last, discarded micro-batch
    assert sorted(per_update) == list(range(plan['total_updates']))
    for update, temps in per_update.items():  # every attention of every micro-batch forward of the update
        assert all(t == pytest.approx(plan['temperature'][update], rel=1e-6) for t in temps), update  # float32
    assert rec.groups == plan['param_groups']


def test_plan_cli_writes_json_and_png_only(tmp_path):
    """--plan needs no data and writes the two files; the JSON has every key of the contract."""
    out = tmp_path / 'plan' / 'od.json'
    out.parent.mkdir()
    r = _run_plan_cli(['--config', os.path.join(ROOT, 'configs/odconv/od_resnet18_4x.yaml'), '--plan', str(out),
                       '--plan-world-size', '8', '--plan-train-size', '25600'], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out.parent)) == ['od.json', 'od.png']
    assert sorted(os.listdir(tmp_path)) == ['plan']  # nothing else written (no output/ run folder)
    plan = json.loads(out.read_text())
    assert PLAN_KEYS <= set(plan)
    assert plan['updates_per_epoch'] == 100 and plan['total_updates'] == 100 * plan['epochs']
    assert 'temperature update 0: 29.971,' in r.stdout and 'Wrote' in r.stdout  # 30 - 29 / (10 x 100)


def test_command_line_model_kwargs_merge_over_the_config(tmp_path):
    plan = make_plan(['--config', os.path.join(ROOT, 'configs/odconv/od_resnet18_4x.yaml'),
                      '--model-kwargs', 'layers=[1,1,1,1]', '--plan-train-size', '2560'])
    assert plan['model_kwargs'] == {'kernel_num': 4, 'reduction': 0.0625, 'temp_init': 30.0, 'temp_epochs': 10,
                                    'layers': [1, 1, 1, 1]}


def test_help_shows_the_config_values():
    r = _run_plan_cli(['--config', os.path.join(ROOT, 'configs/odconv/od_resnet18_4x.yaml'), '--help'], cwd=ROOT)
    assert r.returncode == 0
    text = ' '.join(r.stdout.split())
    assert 'number of epochs to train (default: 100)' in text
    assert "(default: {'kernel_num': 4," in text


def _error_line(argv, tmp_path):
    r = _run_plan_cli(argv + ['--plan', str(tmp_path / 'p.json'), '--plan-train-size', '2560'], cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('train.py: error: '), r.stderr
    assert not (tmp_path / 'p.json').exists()
    return lines[0]


@pytest.mark.parametrize('argv, needle', [
    (['--lr', '-0.1'], 'must not be negative'),
    (['--lr-base', '-1'], 'must not be negative'),
    (['--epochs', '0'], '--epochs must be at least 1'),
    (['--sched', 'cosine', '--decay-milestones', '10', '20'],
     '--decay-milestones [10, 20] has no effect with --sched cosine'),
    (['--sched', 'step', '--min-lr', '1e-5'], '--min-lr 1e-05 has no effect with --sched step'),
    (['--warmup-epochs', '0', '--warmup-lr', '0.001'], '--warmup-lr 0.001 has no effect'),
    (['--sched', 'onecycle'], "unknown --sched 'onecycle'"),
], ids=['lr', 'lr-base', 'epochs', 'milestones', 'min-lr', 'warmup-lr', 'sched'])
def test_bad_resolution_is_one_line(tmp_path, argv, needle):
    assert needle in _error_line(['--model', 'resnet18', '--epochs', '3'] + argv, tmp_path)  # later flags win


def test_zero_lr_is_kept_and_warned(tmp_path, caplog):
    plan = make_plan(['--model', 'resnet18', '--lr', '0', '--epochs', '2', '--warmup-epochs', '0',
                      '--plan-train-size', '1280'])
    assert set(plan['lr']) == {0.0}  # not replaced by the scaled lr_base
    r = _run_plan_cli(['--model', 'resnet18', '--lr', '0', '--epochs', '2', '--warmup-epochs', '0', '--plan',
                       str(tmp_path / 'p.json'), '--plan-train-size', '1280'], cwd=tmp_path)
    assert r.returncode == 0 and 'The learning rate is 0' in r.stderr


def test_warmup_covering_the_run_is_warned(tmp_path):
    cfg = os.path.join(ROOT, 'configs/ddf/ddf_mul_resnet50.yaml')
    r = _run_plan_cli(['--config', cfg, '--epochs', '1', '--cooldown-epochs', '0', '--lr', '0.01', '--plan',
                       str(tmp_path / 'p.json'), '--plan-train-size', '12800'], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'covers the whole run of 1 epochs' in r.stderr


@pytest.mark.parametrize('config', sorted(glob.glob(os.path.join(ROOT, 'configs', '*', '*.yaml'))),
                         ids=lambda p: os.path.relpath(p, os.path.join(ROOT, 'configs')))
def test_every_config_plans_at_its_release_world_size(config):
    """Every recipe resolves; its global batch is the one its comment states for the release's processes."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    plan = make_plan(['--config', config])
    assert plan['world_size'] == cfg['plan_world_size']
    assert len(plan['lr']) == plan['total_updates'] == plan['updates_per_epoch'] * plan['epochs']
