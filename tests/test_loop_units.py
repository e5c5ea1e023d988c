"""The training loop's resolution and scheduling pieces, without data: LR scaling, the LR schedule's position after a
resume (TrainingSchedule.resume_at through ExactResume.start), the batch arithmetic, model and option arguments and
the plan's replay of the schedule. Each test takes at most a second or two, so the mutation check
(scripts/mutation_check.py) runs them for every mutant of these functions."""
import math
import os

import pytest
import torch
import yaml

from models.layers.odconv import ODConv2d, ODConvTrainingHooks, odconv_temperature
from training.hooks import ModelHooks
from training.options import args_for_yaml, parse_args, resolve_lr
from training.plan import (
    TrainingSchedule, loader_batches, make_plan, model_create_kwargs, samples_per_process, updates_per_epoch)
from training.resume import ExactResume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# timm's rule (train.py): sqrt scaling for the adaptive optimizers, whose names hold 'ada' or 'lamb'
LINEAR_OPTS = ['sgd', 'momentum', 'nesterov', 'rmsprop', 'lars', 'lion']
SQRT_OPTS = ['adam', 'AdamW', 'nadam', 'radam', 'adagrad', 'adafactor', 'adabelief', 'lamb', 'lambc']


@pytest.mark.parametrize('base_size', [256, 512])
@pytest.mark.parametrize('opt, rule', [(o, 'linear') for o in LINEAR_OPTS] + [(o, 'sqrt') for o in SQRT_OPTS])
def test_lr_base_scaled_by_the_optimizers_rule(opt, rule, base_size):
    # 64 per process x 8 processes x 2 accumulation steps = 1024 images per update
    args = parse_args(['--opt', opt, '--lr-base', '0.1', '--lr-base-size', str(base_size), '-b', '64',
                       '--grad-accum-steps', '2'])
    source = resolve_lr(args, world_size=8)
    ratio = 1024 / base_size
    assert args.lr == pytest.approx(0.1 * (ratio if rule == 'linear' else ratio ** 0.5), rel=1e-12)
    assert args.lr_base_scale == rule
    assert source == f'lr_base 0.1 x 1024/{base_size} with {rule} scaling'


@pytest.mark.parametrize('opt', ['sgd', 'adamw'])
@pytest.mark.parametrize('scale', ['linear', 'sqrt'])
def test_lr_base_scale_flag_overrides_the_optimizers_rule(opt, scale):
    args = parse_args(['--opt', opt, '--lr-base', '0.3', '--lr-base-size', '512', '--lr-base-scale', scale,
                       '-b', '32'])
    resolve_lr(args, world_size=4)  # 128 images per update: a quarter of the reference batch
    assert args.lr == pytest.approx(0.3 * (0.25 if scale == 'linear' else 0.5), rel=1e-12)
    assert args.lr_base_scale == scale


def test_lr_flag_is_taken_as_given():
    args = parse_args(['--opt', 'adamw', '--lr', '0.003', '--lr-base', '0.1', '-b', '1024'])
    assert resolve_lr(args, world_size=8) == 'set by --lr'
    assert args.lr == 0.003 and args.lr_base_scale == ''


def test_recipe_with_reference_batch_512_plans_its_scaled_lr():
    """DWNet's recipes scale by 512 (main.py L349); the plan (train.py --plan) optimizes with that LR."""
    config = os.path.join(ROOT, 'configs', 'dwnet', 'dwnet_tiny_patch4_window7_224.yaml')
    with open(config) as f:
        cfg = yaml.safe_load(f)
    plan = make_plan(['--config', config, '--plan-world-size', '2', '--plan-train-size', '4096'])
    batch = cfg['batch_size'] * 2 * cfg.get('grad_accum_steps', 1)
    assert plan['optimizer']['lr'] == pytest.approx(cfg['lr_base'] * batch / 512, rel=1e-12)
    assert plan['lr_source'].endswith(f'x {batch}/512 with linear scaling')


# --- where a resumed run's LR schedule starts ---

SCHEDULES = {
    'per_update': ['--sched', 'cosine', '--sched-on-updates', '--warmup-epochs', '1', '--warmup-lr', '0.001'],
    'per_update_accum': ['--sched', 'cosine', '--sched-on-updates', '--warmup-epochs', '1', '--warmup-lr', '0.001',
                         '--grad-accum-steps', '3'],
    'batch_clock': ['--sched', 'cosine', '--sched-on-updates', '--sched-clock', 'batches', '--warmup-epochs', '1',
                    '--warmup-lr', '0.001', '--grad-accum-steps', '3', '--accum-drop-last'],
    'per_epoch': ['--sched', 'step', '--decay-epochs', '1', '--decay-rate', '0.5', '--warmup-epochs', '0'],
}
NUM_BATCHES = 10  # loader batches per epoch


def _schedule(argv):
    args = parse_args(['--lr', '0.1', '--epochs', '3', *argv])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    return args, optimizer, TrainingSchedule(args, optimizer, NUM_BATCHES, ModelHooks(torch.nn.Linear(1, 1)))


def _straight_run(argv):
    """The LR of every update of an uninterrupted run, and the checkpoints it writes: a recovery checkpoint after
    every update inside an epoch, an epoch checkpoint after each epoch (both before the scheduler steps, as train.py
    saves them)."""
    _, optimizer, schedule = _schedule(argv)
    lrs, checkpoints = {}, []
    for epoch in range(schedule.num_epochs):
        for update_idx in range(schedule.updates_per_epoch):
            lrs[epoch, update_idx] = optimizer.param_groups[0]['lr']
            schedule.start_update(epoch, update_idx)
            if update_idx + 1 < schedule.updates_per_epoch:
                checkpoints.append({'epoch': epoch, 'step': update_idx + 1, 'version': 2,
                                    'scheduler': schedule.lr_scheduler.state_dict()})
            schedule.end_update(epoch, update_idx)
        checkpoints.append({'epoch': epoch, 'step': None, 'version': 2,
                            'scheduler': schedule.lr_scheduler.state_dict()})
        schedule.end_epoch(epoch)
    return lrs, checkpoints


@pytest.mark.parametrize('name', list(SCHEDULES))
def test_resume_sets_the_lr_of_the_next_update(name):
    """From every checkpoint of a run, the resumed schedule gives the next update, and every one after it, the
    straight run's LR."""
    lrs, checkpoints = _straight_run(SCHEDULES[name])
    # a wrong position shows: most updates (per-update schedules) or every epoch (per-epoch) have their own LR
    per_update = '--sched-on-updates' in SCHEDULES[name]
    assert len(set(lrs.values())) > (len(lrs) // 2 if per_update else 2)
    for checkpoint in checkpoints[:-1]:
        args, optimizer, schedule = _schedule(SCHEDULES[name])
        resume = ExactResume(args, checkpoint, 'ckpt.pth.tar')
        epoch = resume.start(schedule)
        update_idx = checkpoint['step'] or 0
        assert (epoch, resume.start_update) == (
            (checkpoint['epoch'], update_idx) if checkpoint['step'] else (checkpoint['epoch'] + 1, 0))
        for e in range(epoch, schedule.num_epochs):
            for u in range(update_idx if e == epoch else 0, schedule.updates_per_epoch):
                assert optimizer.param_groups[0]['lr'] == lrs[e, u], (checkpoint['epoch'], checkpoint['step'], e, u)
                schedule.end_update(e, u)
            schedule.end_epoch(e)


def test_resume_of_a_fresh_checkpoint_free_run_and_start_epoch_flag():
    args, optimizer, schedule = _schedule(SCHEDULES['per_epoch'])
    assert ExactResume(args).start(schedule) == 0 and optimizer.param_groups[0]['lr'] == 0.1
    args, optimizer, schedule = _schedule(SCHEDULES['per_epoch'] + ['--start-epoch', '2'])
    assert ExactResume(args).start(schedule) == 2
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.025)  # halved after each of epochs 0 and 1
    # a timm checkpoint of version 1 holds the epoch to start
    args, optimizer, schedule = _schedule(SCHEDULES['per_epoch'])
    assert ExactResume(args, {'epoch': 1, 'version': 1}, 'old.pth.tar').start(schedule) == 1
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.05)


def test_args_for_yaml_is_a_config_again(tmp_path):
    """args.yaml of a run (every option by dest, --config itself left out) gives the same options back."""
    args = parse_args(['--opt', 'adamw', '--lr-base-size', '512', '--model-kwargs', 'kernel_num=4', '--epochs', '7'])
    values = args_for_yaml(args)
    assert 'config' not in values and values['lr_base_size'] == 512 and values['model_kwargs'] == {'kernel_num': 4}
    path = tmp_path / 'args.yaml'
    path.write_text(yaml.safe_dump(values))
    again = parse_args(['--config', str(path)])
    assert args_for_yaml(again) == values


# --- batch arithmetic and model arguments the loop and the plan share ---

def test_batches_and_updates_per_epoch():
    assert [loader_batches(80, 12, drop_last) for drop_last in (True, False)] == [6, 7]
    assert [loader_batches(84, 12, drop_last) for drop_last in (True, False)] == [7, 7]
    assert [updates_per_epoch(7, 3, drop) for drop in (True, False)] == [2, 3]
    # DistributedSampler pads to equal shares; timm's RepeatAugSampler draws whole 256-sample blocks per process
    assert [samples_per_process(1001, w) for w in (1, 4)] == [1001, 251]
    assert samples_per_process(1000, 4, aug_repeats=3) == 192


def test_schedule_progress_counts_the_running_update():
    _, _, schedule = _schedule(['--grad-accum-steps', '3'])  # 10 batches: 4 updates, the last of one batch
    assert schedule.updates_per_epoch == 4
    assert [schedule.progress(1, u) for u in range(4)] == [1.25, 1.5, 1.75, 2.0]


def test_model_create_kwargs_from_the_options():
    args = parse_args(['--num-classes', '7', '--drop', '0.1', '--drop-path', '0.2', '--drop-block', '0.3', '--gp',
                       'max', '--bn-momentum', '0.05', '--bn-eps', '1e-4', '--in-chans', '1', '--model-kwargs',
                       'kernel_num=4'])
    assert model_create_kwargs(args) == {
        'in_chans': 1, 'num_classes': 7, 'drop_rate': 0.1, 'drop_path_rate': 0.2, 'drop_block_rate': 0.3,
        'global_pool': 'max', 'bn_momentum': 0.05, 'bn_eps': 1e-4, 'kernel_num': 4}
    assert model_create_kwargs(parse_args(['--input-size', '2', '32', '32']))['in_chans'] == 2
    assert model_create_kwargs(parse_args([]))['in_chans'] == 3


@pytest.mark.parametrize('name', ['per_update', 'per_update_accum', 'per_epoch'])
def test_plan_replays_the_loops_schedule(name):
    """--plan lists the LR of every update as the loop steps it (80 images in batches of 8: the 10 batches above)."""
    lrs, _ = _straight_run(SCHEDULES[name])
    plan = make_plan(['--model', 'resnet10t', '-b', '8', '--plan-train-size', '80', '--lr', '0.1', '--epochs', '3',
                      *SCHEDULES[name]])
    assert plan['lr'] == [lrs[k] for k in sorted(lrs)]
    assert plan['temperature'] is None  # no scheduled values in a plain ResNet


def test_plan_lists_odconv_temperature_of_every_update():
    plan = make_plan(['--model', 'od_resnet18', '--model-kwargs', 'layers=[1,1,1,1]', 'temp_epochs=1.5', '-b', '8',
                      '--plan-train-size', '80', '--lr', '0.1', '--epochs', '2', '--warmup-epochs', '0'])
    # each update's forward runs at the temperature of the epochs done once it completes (ODConv main.py L279-282)
    expected = [odconv_temperature(e + (u + 1) / 10, temp_epochs=1.5) for e in range(2) for u in range(10)]
    assert plan['temperature'] == pytest.approx(expected, rel=1e-12)


def test_model_hooks_of_a_model_without_them():
    hooks = ModelHooks(torch.nn.Linear(1, 1))
    assert hooks.scheduled(1.0) == {} and hooks.auxiliary_losses() == [] and hooks.state() is None


@pytest.mark.parametrize('argv, expected', [
    (['--model-kwargs', 'act=gelu', 'kernel_num=4', 'sizes=[1,2]'], {'act': 'gelu', 'kernel_num': 4, 'sizes': [1, 2]}),
    (['--model-kwargs', 'expr=a=b'], {'expr': 'a=b'}),  # the first '=' splits
])
def test_model_kwargs_values(argv, expected):
    assert parse_args(argv).model_kwargs == expected


@pytest.mark.parametrize('item', ['no_value', '=4'])
def test_model_kwargs_without_a_key_or_value_is_a_usage_error(item, capsys):
    with pytest.raises(SystemExit):
        parse_args(['--model-kwargs', item])
    assert f"--model-kwargs takes key=value pairs, got '{item}'" in capsys.readouterr().err


def _config_error(tmp_path, text):
    path = tmp_path / 'cfg.yaml'
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_args(['--config', str(path)])
    return e.value.code.replace(str(path), 'CFG')


def test_config_errors_are_exact_one_liners(tmp_path):
    """Where the YAML breaks (1-based line and column), the first line of errors without a position, the closest
    option for a misspelt key, and a hint otherwise; 'config' is no key of a config."""
    assert _config_error(tmp_path, 'lr: [0.1\nepochs: 2\n') == (
        "train.py: error: config file 'CFG' is not valid YAML: expected ',' or ']', but got ':' at line 2, column 7")
    assert _config_error(tmp_path, 'lr: 0.1\nepochs: \x07\n') == (
        "train.py: error: config file 'CFG' is not valid YAML: unacceptable character #x0007: special characters "
        "are not allowed")
    assert _config_error(tmp_path, 'lr_bse: 0.1\n') == (
        "train.py: error: unknown key 'lr_bse' in config file 'CFG'; did you mean 'lr_base'?")
    hint = "keys are option dest names such as 'lr_base'"
    assert _config_error(tmp_path, 'zzzz: 1\n') == f"train.py: error: unknown key 'zzzz' in config file 'CFG'; {hint}"
    assert _config_error(tmp_path, 'config: x.yaml\n').startswith("train.py: error: unknown key 'config'")


def test_config_path_is_kept_in_the_options(tmp_path):
    path = tmp_path / 'cfg.yaml'
    path.write_text('epochs: 3\n')
    args = parse_args(['--config', str(path)])
    assert args.config == str(path) and args.epochs == 3


# --- ODConv's scheduled temperature and its hook state ---

class _OneODConv(ODConvTrainingHooks, torch.nn.Module):
    def __init__(self, layers: int = 1):
        super().__init__()
        self.convs = torch.nn.ModuleList(ODConv2d(8, 8, 3, padding=1, kernel_num=2) for _ in range(layers))


def test_odconv_temperature_over_one_epoch_and_none():
    assert odconv_temperature(0.5, temp_init=30., temp_epochs=1.) == 15.5
    assert odconv_temperature(1.5, temp_init=30., temp_epochs=1.) == 1.
    assert odconv_temperature(0.5, temp_init=30., temp_epochs=0.) == 1.


def test_odconv_hook_state_and_log():
    assert _OneODConv(layers=0).training_hook_log() == {'temperature': 1.}  # no attention: the eval temperature
    model = _OneODConv()
    model.set_temperature(7.)
    assert model.training_hook_log() == model.training_hook_state() == {'temperature': 7.}
    model.load_training_hook_state({})  # a state without a temperature (older checkpoints): 1
    assert model.training_hook_log() == {'temperature': 1.}


def _warmup_cosine(t, warmup, total, base=0.1, warmup_lr=0.001):
    """timm's CosineLRScheduler at time t (warm-up from warmup_lr, then cosine to 0 over `total`, no prefix)."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * t / total))


@pytest.mark.parametrize('name, times', [
    # timm's clock: update u of epoch e runs at the value of time 10e + u
    ('per_update', [10 * e + u for e in range(3) for u in range(10)]),
    # 4 updates per epoch (the last of one batch): 4e + u
    ('per_update_accum', [4 * e + u for e in range(3) for u in range(4)]),
    # Swin's clock: 3 updates of 3 batches per epoch (the 10th dropped); each update runs at the value the previous
    # one left, its last batch index: 2, 5, 8 in epoch 0, then 12, 15, 18, ...
    ('batch_clock', [0, 2, 5, 8, 12, 15, 18, 22, 25]),
], ids=['per_update', 'per_update_accum', 'batch_clock'])
def test_lr_of_every_update_is_the_schedules_at_its_clock(name, times):
    lrs, _ = _straight_run(SCHEDULES[name])
    warmup, total = (4, 12) if name == 'per_update_accum' else (10, 30)
    assert [lrs[k] for k in sorted(lrs)] == pytest.approx([_warmup_cosine(t, warmup, total) for t in times],
                                                          rel=1e-12)


def test_plan_lists_the_unscaled_lr_with_layer_decay():
    """With --layer-decay every group has its lr_scale; the plan lists the schedule's LR, as for one group."""
    argv = ['--model', 'resnet10t', '-b', '8', '--plan-train-size', '80', '--lr', '0.1', '--epochs', '3',
            *SCHEDULES['per_update']]
    plan = make_plan(argv + ['--layer-decay', '0.5'])
    assert plan['param_groups'][0]['lr_scale'] < 1
    assert plan['lr'] == pytest.approx(make_plan(argv)['lr'], rel=1e-12)


@pytest.mark.parametrize('decreasing, metrics, halved', [(True, [1., 2.], True), (True, [2., 1.], False),
                                                        (False, [1., 2.], False), (False, [2., 1.], True)])
def test_plateau_follows_the_eval_metric_and_its_direction(decreasing, metrics, halved):
    args = parse_args(['--lr', '0.1', '--epochs', '3', '--sched', 'plateau', '--patience-epochs', '0',
                       '--decay-rate', '0.5', '--warmup-epochs', '0'])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    schedule = TrainingSchedule(args, optimizer, NUM_BATCHES, ModelHooks(torch.nn.Linear(1, 1)), decreasing)
    for epoch, metric in enumerate(metrics):
        schedule.end_epoch(epoch, metric)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.05 if halved else 0.1)


def test_fresh_start_leaves_every_clock_at_time_zero():
    for name, argv in SCHEDULES.items():
        lrs, _ = _straight_run(argv)
        args, optimizer, schedule = _schedule(argv)
        assert ExactResume(args).start(schedule) == 0
        assert optimizer.param_groups[0]['lr'] == lrs[0, 0], name


def test_resume_takes_the_checkpoints_scheduler_state_and_timms_epoch_rule():
    # the scheduler state of a run with lr 0.2 wins over this run's 0.1 (halved once after epoch 0)
    state = _schedule(SCHEDULES['per_epoch'] + ['--lr', '0.2'])[2].lr_scheduler.state_dict()
    args, optimizer, schedule = _schedule(SCHEDULES['per_epoch'])
    assert ExactResume(args, {'epoch': 0, 'version': 2, 'scheduler': state}, 'c.pth.tar').start(schedule) == 1
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.1)
    # no 'version': timm's first format, whose epoch is the one to start
    args, optimizer, schedule = _schedule(SCHEDULES['per_epoch'])
    assert ExactResume(args, {'epoch': 1}, 'old.pth.tar').start(schedule) == 1


def test_start_update_sets_the_models_temperature():
    model = _OneODConv()
    args = parse_args(['--lr', '0.1', '--epochs', '3', '--warmup-epochs', '0'])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    schedule = TrainingSchedule(args, optimizer, NUM_BATCHES, ModelHooks(model))
    schedule.start_update(1, 4)
    assert model.training_hook_log()['temperature'] == pytest.approx(odconv_temperature(1.5), rel=1e-6)


def test_defaults_of_the_batch_arithmetic():
    assert updates_per_epoch(7, 3) == 3  # a short last accumulation updates by default
    assert samples_per_process(1001, 2) == 501


class _AuxModel(torch.nn.Module):
    """Implements the whole hook protocol with one auxiliary loss term."""

    def set_training_progress(self, epochs):
        pass

    def scheduled_values(self, epochs):
        return {}

    def auxiliary_loss_terms(self):
        return [{'name': 'reg', 'weight': 0.5}]

    def auxiliary_loss(self):
        return None

    def training_hook_state(self):
        return {}

    def load_training_hook_state(self, state):
        pass

    def training_hook_log(self):
        return {}


def test_model_hooks_list_the_models_auxiliary_losses():
    assert ModelHooks(_AuxModel()).auxiliary_losses() == [{'name': 'reg', 'weight': 0.5}]


def test_no_schedule_keeps_the_lr():
    args, optimizer, schedule = _schedule(['--sched', 'none', '--warmup-epochs', '0'])
    assert schedule.lr_scheduler is None
    assert ExactResume(args, {'epoch': 0, 'step': 3, 'version': 2}, 'c.pth.tar').start(schedule) == 0
    schedule.end_update(0, 3)
    schedule.end_epoch(0)
    assert optimizer.param_groups[0]['lr'] == 0.1
