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
import argparse
import csv
import datetime
import difflib
import json
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from functools import partial

import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel as NativeDDP

from timm import utils
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import model_parameters, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

import models  # noqa: F401  (registers the project's models with timm)
from models._helpers import CheckpointError, load_weights, pretrained_file
from training import cli
from training.cli import UsageError
from training.distributed import all_gather, bn_running_mean_sum, state_fingerprint
from training.hooks import ModelHooks
from training.resume import CHECKPOINT_EXT, ExactResume, TrainCheckpointSaver, find_auto_resume

_logger = logging.getLogger('train')

# The first parser only knows --config; the YAML it names becomes the defaults of the main parser (timm's scheme).
config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument(
    '-c', '--config', default='', type=str, metavar='FILE',
    help='YAML file of train.py dest names to values; they replace the defaults, command-line flags still win')


def _create_parser():
    """The main parser; a fresh one per parse, as YAML values become its defaults."""
    parser = argparse.ArgumentParser(description='Dynamic-convolution ImageNet training on timm')
    parser.add_argument(
        '-c', '--config', default='', type=str, metavar='FILE',
        help='YAML file of train.py dest names to values; they replace the defaults, command-line flags still win')

    # Dataset parameters
    group = parser.add_argument_group('Dataset parameters')
    parser.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (same as --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', help='dataset root (ImageFolder: <root>/train/<class>/<image>)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='timm dataset type + name ("<type>/<name>"); empty means ImageFolder or ImageTar')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='dataset validation split, also found as val/ (default: validation); empty to skip eval')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='path to class to idx mapping file (default: "")')

    # Model parameters
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                       help='Name of model to train (default: "resnet50")')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='Start with pretrained version of specified network (if avail)')
    group.add_argument('--pretrained-path', default=None, type=str,
                       help='Load this checkpoint as if it were the pretrained weights (head adapted to --num-classes)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='Load this checkpoint into model after initialization (default: none)')
    group.add_argument('--use-ema', action='store_true', default=False,
                       help='take the EMA weights of --initial-checkpoint/--pretrained-path/--pretrained files (an '
                            'error if they have none); default: their plain weights')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='Resume model, optimizer, scheduler, EMA, RNG and hook state from checkpoint')
    group.add_argument('--auto-resume', action='store_true', default=False,
                       help='Resume from the newest checkpoint (last or recovery) in the run folder, if any')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='prevent resume of optimizer state when resuming model')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of label classes (default: the number of class folders in the train split)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL',
                       help='Global pool type, one of (fast, avg, max, avgmax, avgmaxc). Model default if None.')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='Image size (default: None => model default)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='Image input channels (default: None => 3)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='Input image dimensions (d h w, e.g. --input-size 3 224 224), model default if empty')
    group.add_argument('--crop-pct', default=None, type=float,
                       metavar='N', help='Input image center crop percent (for validation only)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='Override mean pixel value of dataset')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help='Override std deviation of dataset')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='Image resize interpolation type (overrides model)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='Input batch size per process for training (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='Validation batch size override (default: None)')
    group.add_argument('--channels-last', action='store_true', default=False,
                       help='Use channels_last memory layout')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='The number of steps to accumulate gradients (default: 1)')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='Enable gradient checkpointing through model blocks/stages')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       help='extra model constructor kwargs as key=value (YAML: a mapping)')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='Enable compilation w/ specified backend (default: inductor).')
    group.add_argument('--torchcompile-mode', type=str, default=None,
                       help="torch.compile mode (default: None, torch's default)")

    # Device & distributed
    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default=None, type=str,
                       help='Device to use (default: cuda when available, else cpu)')
    group.add_argument('--amp', action='store_true', default=False,
                       help='use native torch.amp mixed precision')
    group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'),
                       help='lower precision AMP dtype (default: float16; bfloat16 on CPU)')
    group.add_argument('--apex-amp', action='store_true', default=False,
                       help='use NVIDIA apex AMP (O1) instead of native AMP; needs apex installed')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='Force broadcast buffers for native DDP to off.')
    group.add_argument('--local_rank', default=0, type=int, help=argparse.SUPPRESS)

    # Optimizer parameters
    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER',
                       help='Optimizer (default: "sgd")')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                       help='Optimizer Epsilon (default: None, use opt default)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                       help='Optimizer Betas (default: None, use opt default)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M',
                       help='Optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5,
                       help='weight decay (default: 2e-5)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='Clip gradient norm (default: None, no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm',
                       help='Gradient clipping mode. One of ("norm", "value", "agc")')
    group.add_argument('--layer-decay', type=float, default=None,
                       help='layer-wise learning rate decay (default: None)')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       help='extra optimizer kwargs as key=value')

    # Learning rate schedule parameters
    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler (default: "cosine"')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='Apply LR scheduler step on update instead of epoch end.')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate, overrides lr-base if set (default: None)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV',
                       help='base learning rate batch size (divisor, default: 256).')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT',
                       help='learning rate noise limit percent (default: 0.67)')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV',
                       help='learning rate noise std-dev (default: 1.0)')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT',
                       help='learning rate cycle len multiplier (default: 1.0)')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT',
                       help='amount to decay each learning rate cycle (default: 0.5)')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N',
                       help='learning rate cycle limit, cycles enabled if > 1')
    group.add_argument('--lr-k-decay', type=float, default=1.0,
                       help='learning rate k-decay for cosine/poly (default: 1.0)')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR',
                       help='warmup learning rate (default: 1e-5)')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR',
                       help='lower lr bound for cyclic schedulers that hit 0 (default: 0)')
    group.add_argument('--epochs', type=int, default=300, metavar='N',
                       help='number of epochs to train (default: 300)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='manual epoch number (useful on restarts)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='list of decay epoch indices for multistep lr. must be increasing')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N',
                       help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N',
                       help='epochs to warmup LR, if scheduler supports')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='Exclude warmup period from decay schedule.')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='patience epochs for Plateau LR scheduler (default: 10)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='LR decay rate (default: 0.1)')

    # Augmentation & regularization parameters
    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False,
                       help='Disable all training augmentation, override other train aug args')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='Random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='Random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5,
                       help='Horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0.,
                       help='Vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                       help='Color jitter factor (default: 0.4)')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='AutoAugment / RandAugment policy, e.g. "v0" or "rand-m9-mstd0.5" (default: None)')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='Number of augmentation repetitions (distributed training only) (default: 0)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT',
                       help='Random erase prob (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel',
                       help='Random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1,
                       help='Random erase count (default: 1)')
    group.add_argument('--mixup', type=float, default=0.0,
                       help='mixup alpha, mixup enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix', type=float, default=0.0,
                       help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='Probability of performing mixup or cutmix when either/both is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='Probability of switching to cutmix when both mixup and cutmix enabled')
    group.add_argument('--mixup-mode', type=str, default='batch',
                       help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='Turn off mixup after this epoch, disabled if 0 (default: 0)')
    group.add_argument('--smoothing', type=float, default=0.1,
                       help='Label smoothing (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='Training interpolation (random, bilinear, bicubic default: "random")')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT',
                       help='Dropout rate (default: 0.)')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT',
                       help='Drop path rate (default: None)')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT',
                       help='Drop block rate (default: None)')

    # Batch norm parameters
    group = parser.add_argument_group('Batch norm parameters')
    group.add_argument('--bn-momentum', type=float, default=None,
                       help='BatchNorm momentum override (if not None)')
    group.add_argument('--bn-eps', type=float, default=None,
                       help='BatchNorm epsilon override (if not None)')
    group.add_argument('--sync-bn', action='store_true',
                       help='Enable synchronized BatchNorm (CUDA only).')
    group.add_argument('--dist-bn', type=str, default='reduce', choices=('reduce', 'broadcast', ''),
                       help='Distribute BatchNorm stats between processes after each epoch (reduce, broadcast or "")')

    # Model Exponential Moving Average
    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='Enable tracking moving average of model weights.')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='Force ema to be tracked on CPU, rank=0 node only. Disables EMA validation.')
    group.add_argument('--model-ema-decay', type=float, default=0.9998,
                       help='Decay factor for model weights moving average (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true',
                       help='Enable warmup for model EMA decay.')

    # Misc
    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S',
                       help='random seed (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all',
                       help='worker seed mode (default: all)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='how many batches to wait before logging training status')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='how many updates to wait before writing a recovery checkpoint (0: never)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of checkpoints to keep (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='how many training processes to use (default: 4)')
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    group.add_argument('--no-prefetcher', action='store_true', default=False,
                       help='disable fast prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='path to output folder (default: ./output/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of the run folder inside --output (default: date-model-size; model-size with '
                            '--auto-resume)')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help='Best metric (default: "top1"')
    group.add_argument('--log-tb', action='store_true', default=False,
                       help='log scalars to TensorBoard in the run folder')
    return parser


def _option_dests(parser):
    return sorted(a.dest for a in parser._actions if a.dest != 'help')


def _load_config(path, dests):
    """Reads a YAML config whose keys must be in `dests`; every problem is reported as one line."""
    if not os.path.isfile(path):
        raise UsageError(f"config file '{path}' not found")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise UsageError(f"config file '{path}' is not valid YAML: {problem}{where}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UsageError(f"config file '{path}' must be a mapping of option names to values, not a "
                         f"{type(cfg).__name__}")
    for key in cfg:
        if key not in dests:
            close = difflib.get_close_matches(str(key), dests, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "keys are option dest names such as 'lr_base'"
            raise UsageError(f"unknown key '{key}' in config file '{path}'; {hint}")
    return cfg


def _parse_args(argv=None):
    """Parses argv with timm's two-stage scheme: CLI flags > YAML config values > code defaults."""
    args_config, remaining = config_parser.parse_known_args(argv)
    parser = _create_parser()
    dests = [d for d in _option_dests(parser) if d != 'config']
    if args_config.config:
        with cli.usage_errors('train.py'):
            parser.set_defaults(**_load_config(args_config.config, dests))
    args = parser.parse_args(remaining)
    args.config = args_config.config
    return args


def _args_for_yaml(args):
    """The resolved values of every option, keyed by dest, so args.yaml works again as --config."""
    return {d: getattr(args, d) for d in _option_dests(_create_parser()) if d != 'config'}


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
    return dataset_train, dataset_eval


class SkippedImageCounter(logging.Filter):
    """Counts the unreadable images timm's ImageDataset skips.

    ``ImageDataset.__getitem__`` already catches decode errors, logs 'Skipped sample (index N)' and loads the next
    index, so training goes on; this filter on its logger only marks each index N once in a shared-memory bitmap, so
    forked loader workers (Linux' default start method) mark the parent's copy too.
    """
    _pattern = re.compile(r'Skipped sample \(index (\d+)\)')

    def __init__(self):
        super().__init__()
        self.seen = None

    def reset(self, size):
        """Starts counting over indices 0..size-1; call before the loader workers start."""
        self.seen = torch.zeros(size, dtype=torch.bool).share_memory_()

    def filter(self, record):
        match = self._pattern.match(record.getMessage())
        if match is not None and self.seen is not None and int(match.group(1)) < len(self.seen):
            self.seen[int(match.group(1))] = True
        return True

    def take(self):
        """The indices marked since the last call; clears them."""
        if self.seen is None:
            return []
        indices = self.seen.nonzero().flatten().tolist()
        self.seen.zero_()
        return indices

    def count_all_ranks(self, args):
        """How many distinct images every rank skipped since the last call (collective)."""
        return len(set().union(*all_gather(args, self.take())))


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


def main(argv=None):
    utils.setup_default_logging()
    args = _parse_args(argv)
    with cli.usage_errors('train.py'):
        _check_args(args)

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    args.prefetcher = not args.no_prefetcher
    device = utils.init_distributed_device(args)
    if args.distributed:
        _logger.info(
            f'Training in distributed mode with multiple processes, 1 device per process. '
            f'Process {args.rank}, total {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Training with a single process on 1 device ({args.device}).')

    skipped_counter = SkippedImageCounter()
    dataset_logger = logging.getLogger('timm.data.dataset')
    dataset_logger.addFilter(skipped_counter)
    try:
        with cli.usage_errors('train.py'):
            _train(args, device, skipped_counter)
    except NonFiniteLoss as e:
        if args.distributed:
            torch.distributed.destroy_process_group()
        raise SystemExit(f'train.py: error: {e}')
    finally:
        dataset_logger.removeFilter(skipped_counter)


def _create_model(args, in_chans):
    """timm's create_model; then --pretrained or --pretrained-path, then --initial-checkpoint, through our loader."""
    model = cli.create_model(
        args.model,
        in_chans=in_chans,
        num_classes=args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        **args.model_kwargs,
    )
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


def _scale_lr(args):
    """--lr, or lr_base scaled by the global batch size (timm's rule); logged with where it came from."""
    global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
    if not args.lr:
        batch_ratio = global_batch_size / args.lr_base_size
        if not args.lr_base_scale:
            on = args.opt.lower()
            args.lr_base_scale = 'sqrt' if any(o in on for o in ('ada', 'lamb')) else 'linear'
        if args.lr_base_scale == 'sqrt':
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio
        lr_source = (f'lr_base {args.lr_base} x {global_batch_size}/{args.lr_base_size} with {args.lr_base_scale} '
                     f'scaling')
    else:
        lr_source = 'set by --lr'
    if utils.is_primary(args):
        _logger.info(f'Global batch size {global_batch_size} ({args.batch_size} per process x {args.world_size} '
                     f'processes x {args.grad_accum_steps} accumulation steps); lr {args.lr:.6g} ({lr_source}).')


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
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    mixup_fn = None
    collate_fn = None
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)

    common_loader_kwargs = dict(
        mean=data_config['mean'],
        std=data_config['std'],
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
        is_training=True,  # timm then sets drop_last: a batch of 1 breaks BatchNorm (ODConv's attention BN too)
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats,
        interpolation=train_interpolation,
        num_workers=args.workers,
        worker_seeding=args.worker_seeding,
        collate_fn=collate_fn,
        **common_loader_kwargs,
    )
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
            interpolation=data_config['interpolation'],
            num_workers=args.workers,
            crop_pct=data_config['crop_pct'],
            **common_loader_kwargs,
        )
    return loader_train, loader_eval, mixup_fn


def _train_loss_fn(args):
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        return SoftTargetCrossEntropy()  # mixup's targets already carry the label smoothing
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


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
        yaml.safe_dump(_args_for_yaml(args), f, default_flow_style=False)
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


def _train(args, device, skipped_counter):
    primary = utils.is_primary(args)
    utils.random_seed(args.seed, args.rank)

    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    dataset_train, dataset_eval = _create_datasets(args, 'RGB' if in_chans == 3 else 'L')
    skipped_counter.reset(max(len(dataset_train), len(dataset_eval) if dataset_eval is not None else 0))
    train_classes = getattr(getattr(dataset_train, 'reader', None), 'class_to_idx', None)
    if args.num_classes is None and train_classes is not None:
        args.num_classes = len(train_classes)
    elif train_classes is not None and args.num_classes < len(train_classes):
        raise UsageError(f'--num-classes {args.num_classes} is less than the {len(train_classes)} class folders of '
                         f'the train split; raise it or leave it unset')

    model = _create_model(args, in_chans)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if primary:
        _logger.info(f'Model {safe_model_name(args.model)} created, param count: '
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

    _scale_lr(args)
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
    train_loss_fn = _train_loss_fn(args).to(device=device)
    validate_loss_fn = nn.CrossEntropyLoss().to(device=device)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    decreasing_metric = eval_metric == 'loss'
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        **scheduler_kwargs(args, decreasing_metric=decreasing_metric),
        updates_per_epoch=updates_per_epoch,
    )
    start_epoch = resume.start(lr_scheduler, updates_per_epoch)

    saver, tb_writer = None, None
    if primary:
        saver, tb_writer = _create_run_outputs(
            args, output_dir, model, optimizer, model_ema, loss_scaler, resume, decreasing_metric, start_epoch)
        _logger.info(f'Scheduled epochs: {num_epochs} ({updates_per_epoch} updates per epoch). '
                     f'LR stepped per {"epoch" if lr_scheduler.t_in_epochs else "update"}.')
    resume.restore_rng()

    best_metric = None
    best_epoch = None
    results = []
    for epoch in range(start_epoch, num_epochs):
        if args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)  # DistributedSampler orders by (seed, epoch)

        train_metrics = train_one_epoch(
            epoch, model, loader_train, optimizer, train_loss_fn, args,
            device=device, lr_scheduler=lr_scheduler, saver=saver, amp_autocast=amp_autocast,
            loss_scaler=loss_scaler, model_ema=model_ema, mixup_fn=mixup_fn, num_epochs=num_epochs,
            resume=resume, hooks=hooks, tb_writer=tb_writer,
        )
        train_metrics['skipped_images'] = skipped = skipped_counter.count_all_ranks(args)
        if skipped and primary:
            _logger.warning(f'Epoch {epoch}: skipped {skipped} unreadable training image(s) (see the warnings '
                            f'above); training went on with the next images.')
        train_metrics.update(hooks.log())
        _distribute_bn(args, model, log=True)

        eval_metrics = None
        if loader_eval is not None:
            eval_metrics = validate(model, loader_eval, validate_loss_fn, args, device=device,
                                    amp_autocast=amp_autocast)
            if model_ema is not None and not args.model_ema_force_cpu:
                _distribute_bn(args, model_ema)
                eval_metrics = validate(model_ema, loader_eval, validate_loss_fn, args, device=device,
                                        amp_autocast=amp_autocast, log_suffix=' (EMA)')
            skipped_eval = skipped_counter.count_all_ranks(args)
            if skipped_eval and primary:
                _logger.warning(f'Epoch {epoch}: skipped {skipped_eval} unreadable validation image(s).')
        latest_metric = eval_metrics[eval_metric] if eval_metrics is not None else train_metrics[eval_metric]

        resume.end_epoch()  # every rank hands in its RNG state; rank 0 writes them all
        if saver is not None:
            best_metric, best_epoch = _write_epoch(
                epoch, train_metrics, eval_metrics, latest_metric, optimizer, saver, tb_writer)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, latest_metric)
        results.append({'epoch': epoch, 'train': train_metrics, 'validation': eval_metrics})

    fingerprints = all_gather(args, state_fingerprint(utils.unwrap_model(model).state_dict()))
    if primary and args.distributed:
        same = len(set(fingerprints)) == 1
        (_logger.info if same else _logger.warning)(
            f'Final model state on {args.world_size} ranks: {"identical" if same else "DIFFERENT"} '
            f'(sha1 {fingerprints})')
    if args.distributed:
        torch.distributed.destroy_process_group()
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
        lr_scheduler=None,
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
    last_accum_steps = len(loader) % accum_steps
    updates_per_epoch = (len(loader) + accum_steps - 1) // accum_steps
    last_batch_idx = len(loader) - 1
    last_batch_idx_to_accum = len(loader) - last_accum_steps
    skip_updates = resume.begin_epoch(epoch)
    num_updates = epoch * updates_per_epoch + skip_updates
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
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps

        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        hooks.set_progress(epoch + update_idx / updates_per_epoch)

        def _forward():
            with amp_autocast():
                output = model(input)
                _loss = loss_fn(output, target)
            _loss = hooks.add_auxiliary_loss(_loss)
            _check_finite(_loss, args, epoch, update_idx, updates_per_epoch, optimizer, saver)
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
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(
                            model_parameters(model, exclude_head='agc' in args.clip_mode),
                            value=args.clip_grad,
                            mode=args.clip_mode,
                        )
                    optimizer.step()

        batch_size = input.shape[0]
        global_batch_size = batch_size * args.world_size
        if has_no_sync and not need_update:
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
                updates_left = updates_per_epoch - update_idx - 1
                eta_epoch = update_time_m.avg * updates_left
                eta_total = update_time_m.avg * (updates_left + updates_per_epoch * (num_epochs - epoch - 1))
                _logger.info(
                    f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                    f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
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

        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)

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


def validate(model, loader, loss_fn, args, device, amp_autocast=suppress, log_suffix=''):
    """Loss, top-1 and top-5 over the eval loader (timm legacy_train's validate)."""
    batch_time_m = utils.AverageMeter()
    losses_m = utils.AverageMeter()
    top1_m = utils.AverageMeter()
    top5_m = utils.AverageMeter()

    model.eval()
    end = time.time()
    last_idx = len(loader) - 1
    with torch.inference_mode():
        for batch_idx, (input, target) in enumerate(loader):
            last_batch = batch_idx == last_idx
            if not args.prefetcher:
                input, target = input.to(device), target.to(device)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)

            with amp_autocast():
                output = model(input)
                if isinstance(output, (tuple, list)):
                    output = output[0]
                loss = loss_fn(output, target)
            acc1, acc5 = utils.accuracy(output, target, topk=(1, min(5, output.shape[-1])))

            if args.distributed:
                reduced_loss = utils.reduce_tensor(loss.data, args.world_size)
                acc1 = utils.reduce_tensor(acc1, args.world_size)
                acc5 = utils.reduce_tensor(acc5, args.world_size)
            else:
                reduced_loss = loss.data
            if device.type == 'cuda':
                torch.cuda.synchronize()

            batch_size = output.shape[0]
            losses_m.update(reduced_loss.item(), batch_size)
            top1_m.update(acc1.item(), batch_size)
            top5_m.update(acc5.item(), batch_size)
            batch_time_m.update(time.time() - end)
            end = time.time()
            if utils.is_primary(args) and (last_batch or batch_idx % args.log_interval == 0):
                _logger.info(
                    f'Test{log_suffix}: [{batch_idx:>4d}/{last_idx}]  '
                    f'Time: {batch_time_m.val:.3f} ({batch_time_m.avg:.3f})  '
                    f'Loss: {losses_m.val:>7.3f} ({losses_m.avg:>6.3f})  '
                    f'Acc@1: {top1_m.val:>7.3f} ({top1_m.avg:>7.3f})  '
                    f'Acc@5: {top5_m.val:>7.3f} ({top5_m.avg:>7.3f})'
                )

    return OrderedDict([('loss', losses_m.avg), ('top1', top1_m.avg), ('top5', top5_m.avg)])


if __name__ == '__main__':
    status = cli.exit_status(main)
    if status or not torch.distributed.is_torchelastic_launched():
        sys.exit(status)
    # The run is complete and every file is closed. Skip the interpreter's C++ teardown: after a restarted
    # rendezvous, torch 2.14's store threads can abort it ("terminate called without an active exception"), and
    # torchrun would then report a finished job as failed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
