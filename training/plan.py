"""The training plan: what a run resolves from its options, built by the same functions the training loop uses.

train.py's loop takes its model arguments, loss, mixup, transforms, optimizer groups and its `TrainingSchedule` (the
LR scheduler and the model's scheduled values, stepped in the loop's order) from here; ``train.py --plan OUT.json``
replays that schedule without data on a model built on the meta device and writes every update's LR and temperature,
the parameter groups and the rest (`build_plan` lists the keys), a picture and a summary.
"""
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from timm.data import create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from . import cli
from .cli import UsageError
from .hooks import ModelHooks
from .options import check_resolution, global_batch_size, parse_args, resolve_lr

__all__ = ['TrainingSchedule', 'model_create_kwargs', 'mixup_kwargs', 'train_loss_fn', 'train_transform_kwargs',
           'eval_transform_kwargs', 'bn_agreement', 'loader_batches', 'keep_last_batch', 'updates_per_epoch',
           'make_plan', 'build_plan', 'write_plan', 'plan_summary']

_logger = logging.getLogger(__name__)

# Optimizer `defaults` that select an implementation or a torch feature, not the update rule.
_RUNTIME_OPTIMIZER_KEYS = ('foreach', 'fused', 'capturable', 'differentiable', 'maximize')


class TrainingSchedule:
    """The run's LR scheduler and the model's scheduled values (ODConv's temperature), stepped in the loop's order.

    The training loop calls `start_update` before the forward pass(es) of every update, `end_update` after its
    optimizer step and `end_epoch` after each epoch (timm legacy_train's order); the plan makes the same calls.
    ``--warmup-updates`` scales the scheduler's LR of the first updates (mmcv's linear warm-up,
    mmcv/runner/hooks/lr_updater.py `get_warmup_lr`): the scheduler's own values are kept to scale them afresh.

    Args:
        args: Resolved train.py options (``args.lr`` set).
        optimizer: The optimizer whose groups the scheduler sets.
        num_batches: Training loader batches per epoch (per process).
        hooks: The model's training hooks.
        decreasing_metric: The eval metric improves downwards (plateau scheduling).
    """

    def __init__(self, args, optimizer, num_batches: int, hooks: ModelHooks, decreasing_metric: bool = False):
        self.num_batches = num_batches
        self.accum_steps = args.grad_accum_steps
        self.updates_per_epoch = updates_per_epoch(num_batches, args.grad_accum_steps, args.accum_drop_last)
        self.batch_clock = args.sched_clock == 'batches'
        self.lr_scheduler, self.num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing_metric),
            updates_per_epoch=num_batches if self.batch_clock else self.updates_per_epoch)
        self.hooks = hooks
        self.optimizer = optimizer
        self.warmup_updates, self.warmup_ratio = args.warmup_updates, args.warmup_ratio
        self._keep_scheduled_lr()

    def _keep_scheduled_lr(self):
        """Called whenever the scheduler has written the groups' LR: the values a warm-up scales."""
        self._scheduled_lr = [g['lr'] for g in self.optimizer.param_groups]

    def set_update_lr(self, epoch: int, update_idx: int):
        """The LR of update `update_idx` of `epoch`: the scheduler's, scaled during a --warmup-updates warm-up."""
        if not self.warmup_updates:
            return
        t = epoch * self.updates_per_epoch + update_idx
        ratio = 1.0 if t >= self.warmup_updates else (
            self.warmup_ratio + (1 - self.warmup_ratio) * t / self.warmup_updates)
        for group, lr in zip(self.optimizer.param_groups, self._scheduled_lr):
            group['lr'] = lr * ratio

    def progress(self, epoch: int, update_idx: int) -> float:
        """Fractional epochs done once update `update_idx` of `epoch` completes: what the model's hooks are given
        before its forward pass(es) (ODConv's release counts the update being run: main.py L279-282 passes
        `batch_idx + 1` to utils/misc.py `get_temperature`)."""
        return epoch + (update_idx + 1) / self.updates_per_epoch

    def _clock_after(self, epoch: int, update_idx: int) -> int:
        """The per-update scheduler's time once update `update_idx` of `epoch` is done."""
        if self.batch_clock:  # the index of the update's last loader batch
            return epoch * self.num_batches + min((update_idx + 1) * self.accum_steps, self.num_batches) - 1
        return epoch * self.updates_per_epoch + update_idx + 1

    def start_update(self, epoch: int, update_idx: int):
        self.set_update_lr(epoch, update_idx)
        self.hooks.set_progress(self.progress(epoch, update_idx))

    def end_update(self, epoch: int, update_idx: int, metric: Optional[float] = None):
        if self.lr_scheduler is not None and not self.lr_scheduler.t_in_epochs:  # else timm's step_update is a no-op
            self.lr_scheduler.step_update(num_updates=self._clock_after(epoch, update_idx), metric=metric)
            self._keep_scheduled_lr()

    def end_epoch(self, epoch: int, metric: Optional[float] = None):
        if self.lr_scheduler is not None and self.lr_scheduler.t_in_epochs:  # else timm's step is a no-op
            self.lr_scheduler.step(epoch + 1, metric)
            self._keep_scheduled_lr()

    def resume_at(self, epoch: int, updates_done: int):
        """Positions the scheduler as the loop leaves it after `updates_done` updates of `epoch`."""
        if self.lr_scheduler is None or (epoch == 0 and updates_done == 0):
            return
        if self.lr_scheduler.t_in_epochs:
            self.lr_scheduler.step(epoch)
            self._keep_scheduled_lr()
        elif updates_done:
            self.end_update(epoch, updates_done - 1)
        else:
            self.end_update(epoch - 1, self.updates_per_epoch - 1)


def _in_chans(args) -> int:
    return args.in_chans or (args.input_size[0] if args.input_size else 3)


def model_create_kwargs(args) -> Dict[str, Any]:
    """timm.create_model's keyword arguments for the run (the model kwargs merged over by the command line)."""
    return dict(
        in_chans=_in_chans(args),
        num_classes=args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        **args.model_kwargs,
    )


def mixup_kwargs(args) -> Optional[Dict[str, Any]]:
    """timm Mixup/FastCollateMixup arguments, None when mixup and cutmix are off."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return dict(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
        num_classes=args.num_classes)


def train_loss_fn(args) -> nn.Module:
    if mixup_kwargs(args) is not None:
        return SoftTargetCrossEntropy()  # mixup's targets already carry the label smoothing
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def _describe_loss(args) -> Dict[str, Any]:
    loss_fn = train_loss_fn(args)
    names = {SoftTargetCrossEntropy: 'soft_target_cross_entropy',
             LabelSmoothingCrossEntropy: 'label_smoothing_cross_entropy', nn.CrossEntropyLoss: 'cross_entropy'}
    mixup = mixup_kwargs(args)
    if mixup is not None:
        mixup.pop('num_classes')
        smoothing = 0.0  # in the targets, see mixup
    else:
        smoothing = getattr(loss_fn, 'smoothing', getattr(loss_fn, 'label_smoothing', 0.0))
    return {'type': names[type(loss_fn)], 'label_smoothing': float(smoothing), 'mixup': mixup}


def train_transform_kwargs(args, data_config) -> Dict[str, Any]:
    """The augmentation arguments the run gives timm's create_loader (and the plan create_transform)."""
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = data_config['interpolation']
    return dict(
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=interpolation, mean=data_config['mean'], std=data_config['std'])


def eval_transform_kwargs(data_config) -> Dict[str, Any]:
    return dict(interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
                mean=data_config['mean'], std=data_config['std'])


def bn_agreement(args) -> str:
    """How BatchNorm statistics agree across processes: '' each keeps its own, 'broadcast' rank 0's, 'reduce'
    their mean after each epoch (--dist-bn); DDP broadcasts rank 0's buffers at every forward unless --no-ddp-bb."""
    if args.sync_bn:
        return ''  # SyncBatchNorm: the statistics are computed over every process and agree without help
    if args.dist_bn in ('reduce', 'broadcast'):
        return args.dist_bn
    return '' if args.no_ddp_bb else 'broadcast'


def samples_per_process(train_size: int, world_size: int, aug_repeats: float = 0) -> int:
    """Training samples one process draws per epoch, from the sampler timm's create_loader uses."""
    if world_size == 1:
        return train_size
    dataset = range(train_size)
    if aug_repeats:
        from timm.data.distributed_sampler import RepeatAugSampler
        return len(RepeatAugSampler(dataset, num_replicas=world_size, rank=0, num_repeats=int(aug_repeats)))
    return len(torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world_size, rank=0))


def loader_batches(samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches a DataLoader gives for `samples` samples per process."""
    return samples // batch_size if drop_last else -(-samples // batch_size)


def keep_last_batch(loader):
    """The training loader of timm's create_loader (which drops the last partial batch) with that batch kept: the
    same DataLoader arguments and sampler, drop_last=False (a PrefetchLoader gets the new one inside)."""
    inner = getattr(loader, 'loader', loader)
    kept = torch.utils.data.DataLoader(
        inner.dataset, batch_size=inner.batch_size, sampler=inner.sampler, num_workers=inner.num_workers,
        collate_fn=inner.collate_fn, pin_memory=inner.pin_memory, drop_last=False,
        worker_init_fn=inner.worker_init_fn, persistent_workers=inner.persistent_workers)
    if inner is loader:
        return kept
    loader.loader = kept
    return loader


def updates_per_epoch(num_batches: int, grad_accum_steps: int, accum_drop_last: bool = False) -> int:
    """Optimizer updates in an epoch of `num_batches` loader batches (a short last accumulation updates unless
    `accum_drop_last`)."""
    return num_batches // grad_accum_steps if accum_drop_last else -(-num_batches // grad_accum_steps)


def make_plan(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """The plan of ``train.py ARGV`` (options as train.py takes them; ``--plan`` itself not needed)."""
    args = parse_args(argv)
    with cli.usage_errors('train.py'):
        return build_plan(args)


def build_plan(args) -> Dict[str, Any]:
    """Resolves the run of `args` as train.py would, without data or devices.

    Returns:
        A JSON-ready dict: model, model_kwargs; world_size, batch_size, grad_accum_steps, global_batch; train_size,
        updates_per_epoch, epochs (cool-down included), total_updates; optimizer (torch class name and the
        hyper-parameters it was built with; weight decay is per group); param_groups (weight_decay, lr_scale,
        parameter names); lr and temperature (None without one) of every update; loss (type, label_smoothing,
        mixup); aux_losses; clip_grad (value, mode, per_micro_batch); ema; amp; drop_rate, drop_path_rate;
        sync_bn, dist_bn (`bn_agreement`); train_transform, eval_transform (reprs, non-prefetcher form); and for
        the summary lr_source, warnings, sched, sched_on_updates, warmup_epochs, warmup_updates, cooldown_epochs.
    """
    cli.check_model_name(args.model)
    if args.sched == 'plateau':
        raise UsageError('--sched plateau follows the eval metric, which a plan cannot know')
    world_size = args.plan_world_size
    if world_size < 1 or args.plan_train_size < 1:
        raise UsageError('--plan-world-size and --plan-train-size must be at least 1')
    if args.batch_size < 1 or args.grad_accum_steps < 1:
        raise UsageError('--batch-size and --grad-accum-steps must be at least 1')
    lr_source = resolve_lr(args, world_size)
    warnings = check_resolution(args)

    with torch.device('meta'):
        model = cli.create_model(args.model, **model_create_kwargs(args))
    data_config = resolve_data_config(vars(args), model=model)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)

    num_batches = loader_batches(
        samples_per_process(args.plan_train_size, world_size, args.aug_repeats), args.batch_size, args.drop_last)
    if num_batches == 0:
        raise UsageError(f'batch size {args.batch_size} x {world_size} process(es) is larger than the '
                         f'{args.plan_train_size} training images')
    hooks = ModelHooks(model)
    schedule = TrainingSchedule(args, optimizer, num_batches, hooks)
    per_epoch = schedule.updates_per_epoch
    lrs, temperatures = _replay(schedule, optimizer, hooks)

    names = {id(p): n for n, p in model.named_parameters()}
    # weight decay is per group (timm builds the optimizer with 0 and sets each group's): see param_groups
    defaults = {k: v for k, v in optimizer.defaults.items() if k not in _RUNTIME_OPTIMIZER_KEYS + ('weight_decay',)}
    return {
        'model': args.model,
        'model_kwargs': dict(args.model_kwargs),
        'world_size': world_size,
        'batch_size': args.batch_size,
        'grad_accum_steps': args.grad_accum_steps,
        'global_batch': global_batch_size(args, world_size),
        'train_size': args.plan_train_size,
        'updates_per_epoch': per_epoch,
        'epochs': schedule.num_epochs,
        'total_updates': per_epoch * schedule.num_epochs,
        'lr_source': lr_source,
        'warnings': warnings,
        'sched': args.sched,
        'sched_on_updates': bool(args.sched_on_updates),
        'warmup_epochs': args.warmup_epochs,
        'warmup_updates': args.warmup_updates,
        'cooldown_epochs': args.cooldown_epochs,
        'optimizer': {'type': type(optimizer).__name__, **_plain(defaults)},
        'param_groups': [
            {'weight_decay': g['weight_decay'], 'lr_scale': g.get('lr_scale', 1.0),
             'params': [names[id(p)] for p in g['params']]}
            for g in optimizer.param_groups],
        'lr': lrs,
        'temperature': temperatures,
        'loss': _describe_loss(args),
        'aux_losses': hooks.auxiliary_losses(),
        'clip_grad': None if args.clip_grad is None else {
            'value': args.clip_grad, 'mode': args.clip_mode,
            'per_micro_batch': bool(args.clip_per_micro_batch and args.grad_accum_steps > 1)},
        'ema': {'decay': args.model_ema_decay} if args.model_ema else None,
        'amp': ('float16' if args.apex_amp else args.amp_dtype) if (args.amp or args.apex_amp) else None,
        'drop_rate': args.drop,
        'drop_path_rate': args.drop_path,
        'sync_bn': bool(args.sync_bn),
        'dist_bn': bn_agreement(args),
        'train_transform': _transform_reprs(create_transform(
            data_config['input_size'], is_training=True, use_prefetcher=False,
            **train_transform_kwargs(args, data_config))),
        'eval_transform': _transform_reprs(create_transform(
            data_config['input_size'], is_training=False, use_prefetcher=False, **eval_transform_kwargs(data_config))),
    }


def _plain(value):
    """JSON-ready copies of optimizer hyper-parameters (tuples as lists, tensors as numbers)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _transform_reprs(transform) -> List[str]:
    return [repr(t) for t in getattr(transform, 'transforms', [transform])]


def _replay(schedule: TrainingSchedule, optimizer, hooks: ModelHooks):
    """The LR (of a group with lr_scale 1) each update steps with, and the temperature in force in its forward
    pass(es), from the loop's calls of `schedule` in the loop's order."""
    group = optimizer.param_groups[0]
    scale = group.get('lr_scale', 1.0)
    scheduled = hooks.scheduled if hooks.model is not None else None
    lrs, temperatures = [], []
    for epoch in range(schedule.num_epochs):
        for update_idx in range(schedule.updates_per_epoch):
            schedule.set_update_lr(epoch, update_idx)
            if scheduled is not None:
                temperatures.append(scheduled(schedule.progress(epoch, update_idx)).get('temperature'))
            lrs.append(group['lr'] / scale)
            schedule.end_update(epoch, update_idx)
        schedule.end_epoch(epoch)
    return lrs, (temperatures if any(t is not None for t in temperatures) else None)


def write_plan(plan: Dict[str, Any], path: str) -> str:
    """Writes the plan as JSON at `path` and its picture beside it (same name, .png); returns the picture's path."""
    png_path = os.path.splitext(path)[0] + '.png'
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(json.dumps(plan))  # dumps takes the C encoder, json.dump the pure-Python one
    os.replace(tmp, path)
    _plot_plan(plan, png_path)
    return png_path


def _plot_plan(plan: Dict[str, Any], png_path: str):
    """LR (and temperature) against the update index; epoch boundaries, warm-up and cool-down marked."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    total, per_epoch, epochs = plan['total_updates'], plan['updates_per_epoch'], plan['epochs']
    step = max(1, total // 20000)  # at most ~20k points: the plot looks the same
    xs = range(0, total, step)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(xs, plan['lr'][::step], color='tab:blue', lw=1.2, label='lr')
    ax.set_xlabel(f'optimizer update ({per_epoch} per epoch, {epochs} epochs)')
    ax.set_ylabel('learning rate', color='tab:blue')
    ax.set_xlim(0, total)
    every = max(1, math.ceil(epochs / 100))
    for e in range(every, epochs, every):
        ax.axvline(e * per_epoch, color='0.85', lw=0.5, zorder=0)
    warmup = plan['warmup_epochs'] if plan['sched'] != 'none' else 0
    if warmup:
        ax.axvspan(0, min(warmup, epochs) * per_epoch, color='tab:orange', alpha=0.15, label=f'warm-up ({warmup} ep)')
    cooldown = plan['cooldown_epochs'] if plan['sched'] in ('cosine', 'tanh', 'poly') else 0
    if cooldown:
        ax.axvspan((epochs - cooldown) * per_epoch, total, color='tab:green', alpha=0.15,
                   label=f'cool-down ({cooldown} ep)')
    if plan['warmup_updates']:
        ax.axvspan(0, min(plan['warmup_updates'], total), color='tab:orange', alpha=0.15,
                   label=f"warm-up ({plan['warmup_updates']} updates)")
    handles, labels = ax.get_legend_handles_labels()
    if plan['temperature'] is not None:
        ax_t = ax.twinx()
        ax_t.plot(xs, plan['temperature'][::step], color='tab:red', lw=1.2, label='temperature')
        ax_t.set_ylabel('attention temperature', color='tab:red')
        h, l = ax_t.get_legend_handles_labels()
        handles, labels = handles + h, labels + l
    ax.legend(handles, labels, loc='upper right')
    ax.set_title(f"{plan['model']}: {plan['optimizer']['type']}, {plan['sched']} "
                 f"(per {'update' if plan['sched_on_updates'] else 'epoch'}), global batch {plan['global_batch']} "
                 f"= {plan['batch_size']} x {plan['world_size']} x {plan['grad_accum_steps']}")
    fig.tight_layout()
    tmp = png_path + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)


def _first_line(text: str) -> str:
    """A transform's repr on one line (RandAugment lists its ops on the next lines)."""
    first, _, rest = text.partition('\n')
    return first + ' ...)' if rest else first


def plan_summary(plan: Dict[str, Any]) -> str:
    """A few lines for a person: the batch arithmetic, the schedule's landmarks, optimizer groups, loss, BN."""
    lrs, per_epoch = plan['lr'], plan['updates_per_epoch']
    opt = plan['optimizer']
    hyper = ', '.join(f'{k} {v}' for k, v in opt.items() if k not in ('type', 'lr', 'weight_decay'))
    groups = ', '.join(f"wd {g['weight_decay']:g} on {len(g['params'])}" +
                       (f" (lr x{g['lr_scale']:g})" if g['lr_scale'] != 1 else '') for g in plan['param_groups'])
    landmarks = [f'update 0: {lrs[0]:.4g}', f'max {max(lrs):.4g}']
    if plan['warmup_epochs'] and plan['sched'] != 'none' or plan['warmup_updates']:
        at = min(plan['warmup_updates'] or plan['warmup_epochs'] * per_epoch, len(lrs) - 1)
        landmarks.append(f'after warm-up (update {at}): {lrs[at]:.4g}')
    landmarks.append(f'last: {lrs[-1]:.4g}')
    steps = [e for e in range(1, plan['epochs']) if lrs[e * per_epoch] != lrs[e * per_epoch - 1]]
    if not plan['sched_on_updates'] and 0 < len(steps) <= 8:
        landmarks.append('changes at the start of epoch ' + ', '.join(
            f'{e} (to {lrs[e * per_epoch]:.4g})' for e in steps))
    lines = [
        f"model       {plan['model']} {plan['model_kwargs'] or ''}  drop {plan['drop_rate']}, "
        f"drop_path {plan['drop_path_rate']}",
        f"batch       {plan['batch_size']} per process x {plan['world_size']} processes x "
        f"{plan['grad_accum_steps']} accumulation = {plan['global_batch']} per update; {per_epoch} updates per "
        f"epoch of {plan['train_size']} images",
        f"schedule    {plan['epochs']} epochs = {plan['total_updates']} updates; {plan['sched']} stepped per "
        f"{'update' if plan['sched_on_updates'] else 'epoch'}; lr {opt['lr']:.6g} ({plan['lr_source']})",
        f"lr          {', '.join(landmarks)}",
    ]
    temps = plan['temperature']
    if temps is not None:
        settled = next((i for i, t in enumerate(temps) if t == temps[-1]), 0)
        lines.append(f"temperature update 0: {temps[0]:.6g}, {temps[-1]:.6g} from update {settled} "
                     f"(epoch {settled / per_epoch:.2f})")
    lines += [
        f"optimizer   {opt['type']} ({hyper}); {groups} parameter tensors",
        f"loss        {plan['loss']['type']} (smoothing {plan['loss']['label_smoothing']}); mixup "
        f"{plan['loss']['mixup'] or 'off'}; aux {plan['aux_losses'] or 'none'}",
        f"other       clip {plan['clip_grad'] or 'none'}; EMA {plan['ema'] or 'none'}; AMP {plan['amp'] or 'off'}; "
        f"BN across processes: {plan['dist_bn'] or 'own'} (sync_bn {plan['sync_bn']})",
        f"train       {' | '.join(_first_line(t) for t in plan['train_transform'])}",
        f"eval        {' | '.join(_first_line(t) for t in plan['eval_transform'])}",
    ]
    return '\n'.join(lines)
