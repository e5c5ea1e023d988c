#!/usr/bin/env python3
"""ImageNet training of the project's dynamic-convolution models on timm's library.

The loop follows timm's ``legacy_train.py`` (explicit epoch loop) and calls timm's pieces for everything it can:
``create_model``, ``create_dataset``/``create_loader``, ``Mixup``/``FastCollateMixup``, ``create_optimizer_v2``,
``create_scheduler_v2``, ``ModelEmaV3``, ``CheckpointSaver``, ``distribute_bn``, ``NativeScaler``. Flags keep timm's
names; ``--config file.yaml`` sets defaults by dest name (CLI > YAML > code defaults) and unknown keys are errors.

Additions over timm's script, each in its own module of ``training/``:
    * exact resume (``--resume PATH`` or ``--auto-resume``; ``training/resume.py``): checkpoints also hold the LR
      scheduler, the RNG states of every rank, the model's training-hook state and, for recovery checkpoints, the
      step inside the epoch, so a resumed run repeats the uninterrupted one;
    * the training-hook protocol (``training/hooks.py``): a model that implements ``set_training_progress``,
      ``auxiliary_loss``, ``training_hook_state``/``load_training_hook_state`` and ``training_hook_log`` takes part
      in the loop (ODConv's temperature annealing, DGConv's group regularizer);
    * every weight file (``--initial-checkpoint``, ``--pretrained-path``, ``--pretrained``, ``--resume``) is read by
      the project's weights-only loader (``models/_helpers.py``), which takes the original releases' formats; the
      plain weights of a file unless ``--use-ema``. ``--pretrained``/``--pretrained-path`` adapt a differing
      classifier; everything else must fit;
    * up-front checks of user input that end with one line and exit status 2 (``training/cli.py``), a NaN/inf loss
      stop that names the step and lr, an ETA in the step lines, TensorBoard scalars (``--log-tb``) and a PNG of the
      loss/top-1 curves.

AMP: ``--amp`` uses ``torch.autocast``; float16 gets timm's ``NativeScaler``. float16 is not offered on CPU: a CPU run
asking for it falls back to bfloat16 autocast with a warning. ``--torchcompile [BACKEND]`` compiles the model (and its
EMA copy) after the DDP wrap; checkpoints keep the plain state_dict keys.

Example:
    python train.py --config configs/demo.yaml --data-dir data/demo --output output/train --experiment demo
    ./distributed_train.sh 8 --config configs/odconv/od_resnet50_4x.yaml --data-dir /data/imagenet --auto-resume \\
        --experiment od_r50_4x
"""
import csv
import datetime
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from functools import partial

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as NativeDDP

from timm import utils
from timm.data import FastCollateMixup, ImageDataset, Mixup, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.models import model_parameters, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs

import models  # noqa: F401  (registers the project's models with timm)
from models._helpers import CheckpointError, load_weights, pretrained_file
from training import cli
from training.cli import UsageError
from training.distributed import all_gather, bn_running_mean_sum, close_process_group, state_fingerprint
from training.evaluate import evaluate
from training.hooks import ModelHooks
from training.options import args_for_yaml, check_resolution, global_batch_size, parse_args, resolve_lr
from training.plan import (
    TrainingSchedule, build_plan, eval_transform_kwargs, keep_last_batch, mixup_kwargs, model_create_kwargs,
    plan_summary, train_loss_fn, train_transform_kwargs, write_plan)
from training.resume import CHECKPOINT_EXT, ExactResume, TrainCheckpointSaver, find_auto_resume
from training.skips import SkipRecordingDataset

_logger = logging.getLogger('train')

def _writable_folder(path):
    """True if `path` is, or can be created as, a folder this process can write to."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _check_args(args):
    """Cheap checks of user input, done before any process group, model or file is created."""
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        raise UsageError('no dataset given; pass --data-dir DIR (an ImageFolder root with train/ and val/ class '
                         'folders)')
    cli.check_dataset_root(args.dataset, args.data_dir)
    cli.check_model_name(args.model)
    if args.amp and args.apex_amp:
        raise UsageError('--amp and --apex-amp are exclusive; pick one (--amp uses native torch.amp)')
    if args.apex_amp:
        try:
            import apex  # noqa: F401
        except ImportError:
            raise UsageError('--apex-amp needs NVIDIA apex, which is not installed; use --amp (native torch.amp) '
                             'instead') from None
    args.device = str(cli.resolve_device(args.device))
    if args.sync_bn and not args.device.startswith('cuda'):
        raise UsageError('--sync-bn needs CUDA devices; use --dist-bn reduce on CPU')
    if args.batch_size < 1 or args.grad_accum_steps < 1:
        raise UsageError('--batch-size and --grad-accum-steps must be at least 1')
    for flag in ('resume', 'initial_checkpoint', 'pretrained_path'):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise UsageError(f"--{flag.replace('_', '-')} checkpoint '{path}' not found")
    output = args.output or './output/train'
    if not _writable_folder(output):
        raise UsageError(f"output folder '{output}' is not writable; pass --output with a folder you can write to")


def _create_datasets(args, input_img_mode):
    """The train and eval splits (timm's create_dataset; ImageFolder layouts checked) with the same classes."""
    common = dict(class_map=args.class_map, batch_size=args.batch_size, seed=args.seed, input_img_mode=input_img_mode)
    dataset_train = cli.create_image_split(
        args.dataset, args.data_dir, args.train_split, split_required=True, is_training=True, **common)
    dataset_eval = None
    if args.val_split:
        dataset_eval = cli.create_image_split(
            args.dataset, args.data_dir, args.val_split, split_required=True,
            missing_split_hint=" or pass --val-split '' to skip evaluation", **common)
        train_map = getattr(getattr(dataset_train, 'reader', None), 'class_to_idx', None)
        eval_map = getattr(getattr(dataset_eval, 'reader', None), 'class_to_idx', None)
        if train_map is not None and eval_map is not None and train_map != eval_map:
            missing = sorted(set(train_map) ^ set(eval_map))
            raise UsageError(f"train and {args.val_split} splits have different classes (e.g. '{missing[0]}'); "
                             f"both need the same class folders")
    # timm's ImageDataset skips an unreadable image and loads the next: the wrapper records which it skipped
    return tuple(SkipRecordingDataset(d) if isinstance(d, ImageDataset) else d for d in (dataset_train, dataset_eval))


def _count_skipped(args, dataset) -> int:
    """How many distinct images of `dataset` the ranks skipped as unreadable since the last call (collective)."""
    taken = dataset.take() if isinstance(dataset, SkipRecordingDataset) else []
    return len(set().union(*all_gather(args, taken)))


def _format_eta(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def _plot_curves(summary_path, png_path):
    """Writes loss and top-1 curves from summary.csv to a PNG (atomic replace, matplotlib Agg)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    with open(summary_path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(float(r['epoch'])) for r in rows]
    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (('train_loss', 'train'), ('eval_loss', 'eval')):
        if key in rows[0]:
            ax_loss.plot(epochs, [float(r[key]) for r in rows], marker='o', label=label)
    ax_loss.set_xlabel('epoch')
    ax_loss.set_ylabel('loss')
    ax_loss.legend()
    if 'eval_top1' in rows[0]:
        ax_top1.plot(epochs, [float(r['eval_top1']) for r in rows], marker='o', label='eval top-1')
        ax_top1.legend()
    ax_top1.set_xlabel('epoch')
    ax_top1.set_ylabel('top-1 (%)')
    fig.tight_layout()
    tmp_path = png_path + '.tmp.png'
    fig.savefig(tmp_path)
    plt.close(fig)
    os.replace(tmp_path, png_path)


class NonFiniteLoss(Exception):
    """Raised on every rank when some rank's loss is NaN or inf."""


def _run_plan(args):
    """--plan: the resolved run, written as JSON and PNG and summarised; nothing else is read or written."""
    with cli.usage_errors('train.py'):
        plan = build_plan(args)
        if not _writable_folder(os.path.dirname(os.path.abspath(args.plan))):
            raise UsageError(f"--plan '{args.plan}': its folder is not writable")
    for warning in plan['warnings']:
        _logger.warning(warning)
    png_path = write_plan(plan, args.plan)
    print(f"Plan of {args.config or 'the command line'} for {plan['world_size']} process(es) and "
          f"{plan['train_size']} training images:\n{plan_summary(plan)}\nWrote {args.plan} and {png_path}.")


def main(argv=None):
    utils.setup_default_logging()
    args = parse_args(argv)
    if args.plan:
        return _run_plan(args)
    with cli.usage_errors('train.py'):
        _check_args(args)

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    args.prefetcher = not args.no_prefetcher
    device = utils.init_distributed_device(args)
    with cli.usage_errors('train.py'):
        lr_source = resolve_lr(args, args.world_size)
        for warning in check_resolution(args):
            if utils.is_primary(args):
                _logger.warning(warning)
    if args.distributed:
        _logger.info(
            f'Training in distributed mode with multiple processes, 1 device per process. '
            f'Process {args.rank}, total {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Training with a single process on 1 device ({args.device}).')

    failure = None
    try:
        with cli.usage_errors('train.py'):
            _train(args, device, lr_source)
    except NonFiniteLoss as e:
        failure = f'train.py: error: {e}'
    if args.distributed:  # here, where _train's objects (and the exception's traceback) no longer hold the group
        close_process_group()
    if failure:
        raise SystemExit(failure)


def _create_model(args):
    """timm's create_model; then --pretrained or --pretrained-path, then --initial-checkpoint, through our loader."""
    model = cli.create_model(args.model, **model_create_kwargs(args))
    flag = '--pretrained-path' if args.pretrained_path else '--pretrained'
    try:
        if args.pretrained or args.pretrained_path:
            load_weights(model, args.pretrained_path or pretrained_file(model), use_ema=args.use_ema, adapt=True)
        if args.initial_checkpoint:
            flag = '--initial-checkpoint'
            load_weights(model, args.initial_checkpoint, use_ema=args.use_ema)
    except CheckpointError as e:
        raise UsageError(f'{flag}: {e}') from None
    return model


def _setup_amp(args, device, model, optimizer):
    """(model, optimizer, amp_autocast, loss_scaler) for --amp / --apex-amp / float32."""
    amp_autocast = suppress
    loss_scaler = None
    if args.apex_amp:
        from apex import amp as apex_amp
        model, optimizer = apex_amp.initialize(model, optimizer, opt_level='O1')
        loss_scaler = utils.ApexScaler()
        message = 'Using NVIDIA APEX AMP (O1). Training in mixed precision.'
    elif args.amp:
        amp_dtype = cli.resolve_amp_dtype(args.amp_dtype, device)
        args.amp_dtype = str(amp_dtype).removeprefix('torch.')
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if amp_dtype == torch.float16:
            loss_scaler = utils.NativeScaler(device=device.type)
        message = f'Using native torch AMP ({args.amp_dtype}). Training in mixed precision.'
    else:
        message = 'AMP not enabled. Training in float32.'
    if utils.is_primary(args):
        _logger.info(message)
    return model, optimizer, amp_autocast, loss_scaler


def _resume_path(args, output_dir):
    """--resume, or with --auto-resume the newest checkpoint of the run folder; a fresh run never overwrites one."""
    path = args.resume
    if args.auto_resume and not path:
        primary = utils.is_primary(args)
        path = all_gather(args, find_auto_resume(output_dir) if primary else '')[0]
        if primary:
            _logger.info(f"Auto-resume from '{path}'." if path else
                         f"Auto-resume: no checkpoint in '{output_dir}' yet, starting fresh.")
    if not path and os.path.isfile(os.path.join(output_dir, 'last' + CHECKPOINT_EXT)):
        raise UsageError(f"run folder '{output_dir}' already holds checkpoints; pass --auto-resume to continue it or "
                         f"choose another --experiment")
    return path


def _create_loaders(args, data_config, dataset_train, dataset_eval, device):
    """timm's loaders (and Mixup/CutMix): (loader_train, loader_eval or None, mixup_fn or None)."""
    mixup_fn = None
    collate_fn = None
    mixup_args = mixup_kwargs(args)
    if mixup_args is not None:
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)

    common_loader_kwargs = dict(
        pin_memory=args.pin_mem,
        device=device,
        distributed=args.distributed,
        use_prefetcher=args.prefetcher,
        # fresh workers each epoch draw their seeds from the (checkpointed) main RNG, so a resumed run sees the same
        # augmentations; persistent workers would carry RNG state that no checkpoint holds
        persistent_workers=False,
    )
    loader_train = create_loader(
        dataset_train,
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        is_training=True,  # timm then sets drop_last (--no-drop-last undoes it below)
        num_aug_repeats=args.aug_repeats,
        num_workers=args.workers,
        worker_seeding=args.worker_seeding,
        collate_fn=collate_fn,
        **train_transform_kwargs(args, data_config),
        **common_loader_kwargs,
    )
    if not args.drop_last:
        loader_train = keep_last_batch(loader_train)
    if len(loader_train) == 0:
        raise UsageError(f'batch size {args.batch_size} x {args.world_size} process(es) is larger than the '
                         f'{len(dataset_train)} training images; lower -b/--batch-size')

    loader_eval = None
    if dataset_eval is not None:
        loader_eval = create_loader(
            dataset_eval,
            input_size=data_config['input_size'],
            batch_size=args.validation_batch_size or args.batch_size,
            is_training=False,
            num_workers=args.workers,
            **eval_transform_kwargs(data_config),
            **common_loader_kwargs,
        )
    return loader_train, loader_eval, mixup_fn


def _create_run_outputs(args, output_dir, model, optimizer, model_ema, loss_scaler, resume, decreasing, start_epoch):
    """Rank 0's run folder: the saver (its history restored on resume), args.yaml, the trimmed summary, TensorBoard.

    Called only after every weight has loaded, so a bad file never leaves anything in the run folder.
    """
    os.makedirs(output_dir, exist_ok=True)
    saver = TrainCheckpointSaver(
        extra_state_fn=resume.checkpoint_state,
        model=model,
        optimizer=optimizer,
        args=args,
        model_ema=model_ema,
        amp_scaler=loss_scaler,
        checkpoint_dir=output_dir,
        recovery_dir=output_dir,
        decreasing=decreasing,
        max_history=args.checkpoint_hist,
    )
    resume.restore_saver(saver)
    utils.trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        yaml.safe_dump(args_for_yaml(args), f, default_flow_style=False)
    tb_writer = None
    if args.log_tb:
        from torch.utils.tensorboard import SummaryWriter
        tb_writer = SummaryWriter(log_dir=output_dir)
    _logger.info(f'Run folder: {output_dir}')
    return saver, tb_writer


def _write_epoch(epoch, train_metrics, eval_metrics, latest_metric, optimizer, saver, tb_writer):
    """The epoch's summary row, then its checkpoint (a kill between them leaves a row that a resume from the previous
    checkpoint trims and rewrites, never a checkpoint whose epoch has no row), the curves and TensorBoard scalars."""
    lrs = [g['lr'] for g in optimizer.param_groups]
    summary_path = os.path.join(saver.checkpoint_dir, 'summary.csv')
    utils.update_summary(epoch, train_metrics, eval_metrics, filename=summary_path, lr=sum(lrs) / len(lrs))
    best = saver.save_checkpoint(epoch, metric=latest_metric)
    _plot_curves(summary_path, os.path.join(saver.checkpoint_dir, 'curves.png'))
    if tb_writer is not None:
        for k, v in train_metrics.items():
            tb_writer.add_scalar(f'epoch/train_{k}', v, epoch)
        for k, v in (eval_metrics or {}).items():
            tb_writer.add_scalar(f'epoch/eval_{k}', v, epoch)
        tb_writer.add_scalar('epoch/lr', sum(lrs) / len(lrs), epoch)
        tb_writer.flush()
    return best


def _distribute_bn(args, model, log=False):
    """--dist-bn across the processes; logs the BatchNorm statistics before and after when asked."""
    if not (args.distributed and args.dist_bn in ('broadcast', 'reduce')):
        return
    sums = all_gather(args, bn_running_mean_sum(model)) if log else None
    utils.distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
    if log and utils.is_primary(args):
        _logger.info(f'Distributed BatchNorm stats ({args.dist_bn}): running_mean sums per rank before '
                     f'{[repr(s) for s in sums]}, after {bn_running_mean_sum(model)!r}')


def _train(args, device, lr_source):
    primary = utils.is_primary(args)
    utils.random_seed(args.seed, args.rank)

    in_chans = model_create_kwargs(args)['in_chans']
    dataset_train, dataset_eval = _create_datasets(args, 'RGB' if in_chans == 3 else 'L')
    train_classes = getattr(getattr(dataset_train, 'reader', None), 'class_to_idx', None)
    if args.num_classes is None and train_classes is not None:
        args.num_classes = len(train_classes)
    elif train_classes is not None and args.num_classes < len(train_classes):
        raise UsageError(f'--num-classes {args.num_classes} is less than the {len(train_classes)} class folders of '
                         f'the train split; raise it or leave it unset')

    model = _create_model(args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if primary:
        _logger.info(f'Model {safe_model_name(args.model)} created with kwargs {args.model_kwargs}, param count: '
                     f'{sum(m.numel() for m in model.parameters())}')
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)

    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''  # SyncBatchNorm keeps the statistics identical already
        model = convert_sync_batchnorm(model)
        if primary:
            _logger.info('Converted model to use Synchronized BatchNorm.')

    if primary:
        _logger.info(f'Global batch size {global_batch_size(args, args.world_size)} ({args.batch_size} per process '
                     f'x {args.world_size} processes x {args.grad_accum_steps} accumulation steps); lr {args.lr:.6g} '
                     f'({lr_source}).')
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    model, optimizer, amp_autocast, loss_scaler = _setup_amp(args, device, model, optimizer)

    # The run folder is known on every rank (auto-resume reads it); only rank 0 creates and writes it.
    exp_name = args.experiment
    if not exp_name:
        exp_name = '-'.join([safe_model_name(args.model), str(data_config['input_size'][-1])])
        if not args.auto_resume:
            exp_name = '-'.join([datetime.datetime.now().strftime('%Y%m%d-%H%M%S'), exp_name])
    output_dir = os.path.join(args.output or './output/train', exp_name)

    resume = ExactResume.load(args, _resume_path(args, output_dir))
    model_ema = None
    if args.model_ema:  # before the DDP wrap (timm's order); restore() fills it
        model_ema = utils.ModelEmaV3(
            model,
            decay=args.model_ema_decay,
            use_warmup=args.model_ema_warmup,
            device='cpu' if args.model_ema_force_cpu else None,
        )
    hooks = ModelHooks(model, model_ema)
    resume.restore(model, optimizer, loss_scaler, model_ema, hooks)

    if args.distributed:
        if primary:
            _logger.info('Using native Torch DistributedDataParallel.')
        model = NativeDDP(
            model, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=not args.no_ddp_bb)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
        if model_ema is not None:
            model_ema = torch.compile(model_ema, backend=args.torchcompile, mode=args.torchcompile_mode)

    loader_train, loader_eval, mixup_fn = _create_loaders(args, data_config, dataset_train, dataset_eval, device)
    loss_fn = train_loss_fn(args).to(device=device)

    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    decreasing_metric = eval_metric == 'loss'
    schedule = TrainingSchedule(args, optimizer, len(loader_train), hooks, decreasing_metric)
    num_epochs = schedule.num_epochs
    start_epoch = resume.start(schedule)

    saver, tb_writer = None, None
    if primary:
        saver, tb_writer = _create_run_outputs(
            args, output_dir, model, optimizer, model_ema, loss_scaler, resume, decreasing_metric, start_epoch)
        _logger.info(f'Scheduled epochs: {num_epochs} ({schedule.updates_per_epoch} updates per epoch). '
                     f'LR stepped per {"update" if args.sched_on_updates else "epoch"}.')
    resume.restore_rng()

    best_metric = None
    best_epoch = None
    results = []
    for epoch in range(start_epoch, num_epochs):
        if args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)  # DistributedSampler orders by (seed, epoch)

        train_metrics = train_one_epoch(
            epoch, model, loader_train, optimizer, loss_fn, args,
            device=device, schedule=schedule, saver=saver, amp_autocast=amp_autocast,
            loss_scaler=loss_scaler, model_ema=model_ema, mixup_fn=mixup_fn, num_epochs=num_epochs,
            resume=resume, hooks=hooks, tb_writer=tb_writer,
        )
        train_metrics['skipped_images'] = skipped = _count_skipped(args, dataset_train)
        if skipped and primary:
            _logger.warning(f'Epoch {epoch}: skipped {skipped} unreadable training image(s) (see the warnings '
                            f'above); training went on with the next images.')
        train_metrics.update(hooks.log())
        _distribute_bn(args, model, log=True)

        eval_metrics = None
        if loader_eval is not None:
            eval_metrics = _evaluate(model, loader_eval, args, device, amp_autocast)
            if model_ema is not None and not args.model_ema_force_cpu:
                _distribute_bn(args, model_ema)
                eval_metrics = _evaluate(model_ema, loader_eval, args, device, amp_autocast, log_name='Test (EMA)')
            skipped_eval = _count_skipped(args, dataset_eval)
            if skipped_eval and primary:
                _logger.warning(f'Epoch {epoch}: skipped {skipped_eval} unreadable validation image(s).')
        latest_metric = eval_metrics[eval_metric] if eval_metrics is not None else train_metrics[eval_metric]

        resume.end_epoch()  # every rank hands in its RNG state; rank 0 writes them all
        if saver is not None:
            best_metric, best_epoch = _write_epoch(
                epoch, train_metrics, eval_metrics, latest_metric, optimizer, saver, tb_writer)
        schedule.end_epoch(epoch, latest_metric)
        results.append({'epoch': epoch, 'train': train_metrics, 'validation': eval_metrics})

    fingerprints = all_gather(args, state_fingerprint(utils.unwrap_model(model).state_dict()))
    if primary and args.distributed:
        same = len(set(fingerprints)) == 1
        (_logger.info if same else _logger.warning)(
            f'Final model state on {args.world_size} ranks: {"identical" if same else "DIFFERENT"} '
            f'(sha1 {fingerprints})')
    if tb_writer is not None:
        tb_writer.close()
    if primary:
        if best_metric is not None:
            _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
        _logger.info(f'Checkpoints, args.yaml, summary.csv and curves.png are in {output_dir}')
        print(f'--result\n{json.dumps(results[-10:], indent=4)}')


def train_one_epoch(
        epoch,
        model,
        loader,
        optimizer,
        loss_fn,
        args,
        device,
        resume,
        hooks,
        schedule,
        saver=None,
        amp_autocast=suppress,
        loss_scaler=None,
        model_ema=None,
        mixup_fn=None,
        num_epochs=1,
        tb_writer=None,
):
    """One training epoch (timm legacy_train's loop) with the model's training hooks, a NaN check and an ETA.

    Args:
        resume: The run's ExactResume: updates a recovery checkpoint already holds are skipped (their batches are
            drawn from the loader, so the order stays that of the original run, but not trained on), and recovery
            checkpoints get the state for an exact resume.
        hooks: ModelHooks of the model and its EMA copy.
        schedule: The run's TrainingSchedule (LR scheduler and the model's scheduled values), stepped here per update.
    """
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and loader.mixup_enabled:
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

    second_order = getattr(optimizer, 'is_second_order', False)
    has_no_sync = hasattr(model, 'no_sync')
    update_time_m = utils.AverageMeter()
    losses_m = utils.AverageMeter()

    model.train()

    accum_steps = args.grad_accum_steps
    # a short last accumulation updates on its own micro-batches, unless --accum-drop-last discards them
    last_accum_steps = accum_steps if args.accum_drop_last else len(loader) % accum_steps
    epoch_updates = schedule.updates_per_epoch
    last_batch_idx = len(loader) - 1
    last_batch_idx_to_accum = len(loader) - last_accum_steps
    skip_updates = resume.begin_epoch(epoch)
    num_updates = epoch * epoch_updates + skip_updates
    skip_batches = skip_updates * accum_steps

    update_start_time = time.time()
    optimizer.zero_grad()
    update_sample_count = 0
    for batch_idx, (input, target) in enumerate(loader):
        if batch_idx < skip_batches:
            if batch_idx == skip_batches - 1:
                resume.replayed()
                update_start_time = time.time()
            continue
        last_batch = batch_idx == last_batch_idx
        need_update = (batch_idx + 1) % accum_steps == 0 or (last_batch and not args.accum_drop_last)
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps

        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        schedule.start_update(epoch, update_idx)

        def _forward():
            with amp_autocast():
                output = model(input)
                _loss = loss_fn(output, target)
            _loss = hooks.add_auxiliary_loss(_loss)
            _check_finite(_loss, args, epoch, update_idx, epoch_updates, optimizer, saver)
            if accum_steps > 1:
                _loss = _loss / accum_steps
            return _loss

        def _backward(_loss):
            if loss_scaler is not None:
                loss_scaler(
                    _loss,
                    optimizer,
                    clip_grad=args.clip_grad,
                    clip_mode=args.clip_mode,
                    parameters=model_parameters(model, exclude_head='agc' in args.clip_mode),
                    create_graph=second_order,
                    need_update=need_update,
                )
            else:
                _loss.backward(create_graph=second_order)
                if args.clip_grad is not None and (need_update or args.clip_per_micro_batch):
                    utils.dispatch_clip_grad(
                        model_parameters(model, exclude_head='agc' in args.clip_mode),
                        value=args.clip_grad,
                        mode=args.clip_mode,
                    )
                if need_update:
                    optimizer.step()

        batch_size = input.shape[0]
        global_batch_size = batch_size * args.world_size
        if has_no_sync and not need_update and not args.clip_per_micro_batch:  # clipping needs the summed gradient
            with model.no_sync():
                loss = _forward()
                _backward(loss)
        else:
            loss = _forward()
            _backward(loss)

        losses_m.update(loss.item() * accum_steps, batch_size)
        update_sample_count += global_batch_size

        if not need_update:
            continue

        num_updates += 1
        optimizer.zero_grad()
        if model_ema is not None:
            model_ema.update(model, step=num_updates)

        if device.type == 'cuda':
            torch.cuda.synchronize()
        time_now = time.time()
        update_time_m.update(time_now - update_start_time)
        update_start_time = time_now

        if update_idx % args.log_interval == 0 or last_batch:
            lrl = [g['lr'] for g in optimizer.param_groups]
            lr = sum(lrl) / len(lrl)
            loss_avg, loss_now = losses_m.avg, losses_m.val
            if args.distributed:
                loss_avg = utils.reduce_tensor(loss.new([loss_avg]), args.world_size).item()
                loss_now = utils.reduce_tensor(loss.new([loss_now]), args.world_size).item()
            if utils.is_primary(args):
                updates_left = epoch_updates - update_idx - 1
                eta_epoch = update_time_m.avg * updates_left
                eta_total = update_time_m.avg * (updates_left + epoch_updates * (num_epochs - epoch - 1))
                _logger.info(
                    f'Train: {epoch} [{update_idx:>4d}/{epoch_updates} '
                    f'({100. * (update_idx + 1) / epoch_updates:>3.0f}%)]  '
                    f'Loss: {loss_now:#.3g} ({loss_avg:#.3g})  '
                    f'Time: {update_time_m.val:.3f}s, {update_sample_count / update_time_m.val:>7.2f} img/s  '
                    f'LR: {lr:.3e}  '
                    f'ETA: {_format_eta(eta_epoch)} epoch, {_format_eta(eta_total)} total'
                )
                if tb_writer is not None:
                    tb_writer.add_scalar('step/train_loss', loss_now, num_updates)
                    tb_writer.add_scalar('step/lr', lr, num_updates)

        if args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0 and not last_batch:
            resume.recovery_point(update_idx + 1)
            if saver is not None:
                saver.save_recovery(epoch, batch_idx=update_idx)

        schedule.end_update(epoch, update_idx, metric=losses_m.avg)

        update_sample_count = 0

    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()

    loss_avg = losses_m.avg
    if args.distributed:
        loss_avg = utils.reduce_tensor(torch.tensor([loss_avg], device=device), args.world_size).item()
    return OrderedDict([('loss', loss_avg)])


def _check_finite(loss, args, epoch, update_idx, updates_per_epoch, optimizer, saver):
    """Stops every rank (NonFiniteLoss) if any rank's loss is NaN or inf, before it reaches the weights."""
    bad = torch.tensor([0. if torch.isfinite(loss).item() else 1.], device=loss.device)
    if args.distributed:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item() == 0:
        return
    lrl = [g['lr'] for g in optimizer.param_groups]
    last_good = ''
    if saver is not None:
        last_path = os.path.join(saver.checkpoint_dir, 'last' + CHECKPOINT_EXT)
        last_good = f" Last good checkpoint: '{last_path}'." if os.path.isfile(last_path) else ' No checkpoint yet.'
    raise NonFiniteLoss(
        f'loss is {loss.item()} at epoch {epoch} step {update_idx}/{updates_per_epoch} (lr {sum(lrl) / len(lrl):.3e});'
        f' stopped without saving.{last_good} Lower --lr or set --clip-grad, then resume with --auto-resume.')


def _evaluate(model, loader, args, device, amp_autocast, log_name='Test'):
    """The shared evaluation loop (training/evaluate.py) on this run's settings: loss, top1, top5."""
    metrics = evaluate(
        model, loader, device, amp_autocast, channels_last=args.channels_last, prefetcher=args.prefetcher,
        world_size=args.world_size if args.distributed else 1, log_interval=args.log_interval, log_name=log_name,
        log=utils.is_primary(args))
    metrics.pop('samples')
    return metrics


if __name__ == '__main__':
    sys.exit(cli.exit_status(main))
