"""train.py's options: the parser, YAML configs as its defaults, and the resolution of the batch and learning rate.

timm's two-stage scheme: a first parser knows only ``--config``; the YAML file it names (keys are option dests)
becomes the main parser's defaults, so command-line flags win over the config, which wins over the code defaults,
and ``--help`` shows the config's values. ``--model-kwargs``/``--opt-kwargs`` on the command line merge over the
config's mapping key by key.
"""
import argparse
import ast
import difflib
import os
from typing import List

import yaml

from .cli import UsageError, usage_errors

__all__ = ['MergeKwargs', 'create_parser', 'load_config', 'parse_args', 'args_for_yaml', 'resolve_lr',
           'global_batch_size', 'check_resolution']

class MergeKwargs(argparse.Action):
    """``key=value`` pairs (values as Python literals, else strings) merged over the current mapping (the config's)."""

    def __call__(self, parser, namespace, values, option_string=None):
        merged = dict(getattr(namespace, self.dest) or {})
        for item in values:
            key, sep, value = item.partition('=')
            if not sep or not key:
                parser.error(f"{option_string} takes key=value pairs, got '{item}'")
            try:
                merged[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                merged[key] = value
        setattr(namespace, self.dest, merged)


# The first parser only knows --config; the YAML it names becomes the defaults of the main parser (timm's scheme).
config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument(
    '-c', '--config', default='', type=str, metavar='FILE',
    help='YAML file of train.py dest names to values; they replace the defaults, command-line flags still win')


def create_parser():
    """The main parser; a fresh one per parse, as YAML values become its defaults."""
    parser = argparse.ArgumentParser(
        description='Dynamic-convolution ImageNet training on timm',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        '-c', '--config', default='', type=str, metavar='FILE',
        help='YAML file of train.py dest names to values; they replace the defaults, command-line flags still win')

    # Dataset parameters
    group = parser.add_argument_group('Dataset parameters')
    parser.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (same as --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', help='dataset root (ImageFolder: <root>/train/<class>/<image>)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='timm dataset type + name ("<type>/<name>"); empty means ImageFolder or ImageTar')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='dataset validation split, also found as val/; empty to skip eval')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='path to class to idx mapping file')

    # Model parameters
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                       help='Name of model to train')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='Start with pretrained version of specified network (if avail)')
    group.add_argument('--pretrained-path', default=None, type=str,
                       help='Load this checkpoint as if it were the pretrained weights (head adapted to --num-classes)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='Load this checkpoint into model after initialization')
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
                       help='number of label classes (None: the number of class folders in the train split)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL',
                       help='Global pool type, one of (fast, avg, max, avgmax, avgmaxc). Model default if None.')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help="Image size (None: the model's)")
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='Image input channels (None: 3)')
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
                       help='Input batch size per process for training')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='Validation batch size override')
    group.add_argument('--channels-last', action='store_true', default=False,
                       help='Use channels_last memory layout')
    group.add_argument('--no-drop-last', dest='drop_last', action='store_false', default=True,
                       help="keep each epoch's last partial training batch (timm drops it), as releases whose "
                            "DataLoader kept it")
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='The number of steps to accumulate gradients')
    group.add_argument('--accum-drop-last', action='store_true', default=False,
                       help="with --grad-accum-steps, drop an epoch's last micro-batches that do not fill an update "
                            "(their forward and backward still run) instead of updating on them")
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='Enable gradient checkpointing through model blocks/stages')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=MergeKwargs,
                       help='extra model constructor kwargs as key=value (YAML: a mapping)')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='Enable compilation w/ specified backend (inductor when given without a value).')
    group.add_argument('--torchcompile-mode', type=str, default=None,
                       help="torch.compile mode (None: torch's default)")

    # Device & distributed
    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default=None, type=str,
                       help='Device to use (None: cuda when available, else cpu)')
    group.add_argument('--amp', action='store_true', default=False,
                       help='use native torch.amp mixed precision')
    group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'),
                       help='lower precision AMP dtype (float16 falls back to bfloat16 on CPU)')
    group.add_argument('--apex-amp', action='store_true', default=False,
                       help='use NVIDIA apex AMP (O1) instead of native AMP; needs apex installed')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='Force broadcast buffers for native DDP to off.')
    group.add_argument('--local_rank', default=0, type=int, help=argparse.SUPPRESS)

    # Optimizer parameters
    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER',
                       help='Optimizer')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                       help="Optimizer Epsilon (None: the optimizer's)")
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                       help="Optimizer Betas (None: the optimizer's)")
    group.add_argument('--momentum', type=float, default=0.9, metavar='M',
                       help='Optimizer momentum')
    group.add_argument('--weight-decay', type=float, default=2e-5,
                       help='weight decay')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='Clip gradient norm (None: no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm',
                       help='Gradient clipping mode. One of ("norm", "value", "agc")')
    group.add_argument('--clip-per-micro-batch', action='store_true', default=False,
                       help='with --grad-accum-steps, clip the gradient summed so far after every micro-batch (and '
                            'all-reduce it each time), as Swin-based releases do, instead of once per update')
    group.add_argument('--layer-decay', type=float, default=None,
                       help='layer-wise learning rate decay')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=MergeKwargs,
                       help='extra optimizer kwargs as key=value')

    # Learning rate schedule parameters
    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='Apply LR scheduler step on update instead of epoch end.')
    group.add_argument('--sched-clock', default='updates', choices=('updates', 'batches'),
                       help="what a per-update schedule counts: 'updates' (timm: update i runs at the schedule's "
                            "value at i), or 'batches' (Swin-based releases: the schedule spans the loader's batches "
                            "and is set after each update to its last batch index, so an update runs at the value "
                            "left by the previous one)")
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate, overrides lr-base if set')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV',
                       help='base learning rate batch size (divisor)')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT',
                       help='learning rate noise limit percent')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV',
                       help='learning rate noise std-dev')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT',
                       help='learning rate cycle len multiplier')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT',
                       help='amount to decay each learning rate cycle')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N',
                       help='learning rate cycle limit, cycles enabled if > 1')
    group.add_argument('--lr-k-decay', type=float, default=1.0,
                       help='learning rate k-decay for cosine/poly')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR',
                       help='warmup learning rate')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR',
                       help='lower lr bound for cyclic schedulers that hit 0')
    group.add_argument('--epochs', type=int, default=300, metavar='N',
                       help='number of epochs to train')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='manual epoch number (useful on restarts)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='list of decay epoch indices for multistep lr. must be increasing')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N',
                       help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N',
                       help='epochs to warmup LR, if scheduler supports')
    group.add_argument('--warmup-updates', type=int, default=0, metavar='N',
                       help="mmcv's linear warm-up: the first N updates run at the schedule's LR times a ratio "
                            "rising from --warmup-ratio at update 0 towards 1 at update N (with --warmup-epochs 0)")
    group.add_argument('--warmup-ratio', type=float, default=0.1, metavar='R',
                       help='the LR ratio of update 0 under --warmup-updates')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='Exclude warmup period from decay schedule.')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='patience epochs for Plateau LR scheduler')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='LR decay rate')

    # Augmentation & regularization parameters
    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False,
                       help='Disable all training augmentation, override other train aug args')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='Random resize scale')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='Random resize aspect ratio')
    group.add_argument('--hflip', type=float, default=0.5,
                       help='Horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0.,
                       help='Vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                       help='Color jitter factor')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='AutoAugment / RandAugment policy, e.g. "v0" or "rand-m9-mstd0.5"')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='Number of augmentation repetitions (distributed training only)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT',
                       help='Random erase prob')
    group.add_argument('--remode', type=str, default='pixel',
                       help='Random erase mode')
    group.add_argument('--recount', type=int, default=1,
                       help='Random erase count')
    group.add_argument('--mixup', type=float, default=0.0,
                       help='mixup alpha, mixup enabled if > 0.')
    group.add_argument('--cutmix', type=float, default=0.0,
                       help='cutmix alpha, cutmix enabled if > 0.')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='Probability of performing mixup or cutmix when either/both is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='Probability of switching to cutmix when both mixup and cutmix enabled')
    group.add_argument('--mixup-mode', type=str, default='batch',
                       help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='Turn off mixup after this epoch, disabled if 0')
    group.add_argument('--smoothing', type=float, default=0.1,
                       help='Label smoothing')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='Training interpolation (random, bilinear, bicubic)')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT',
                       help='Dropout rate')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT',
                       help='Drop path rate')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT',
                       help='Drop block rate')

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
                       help='Decay factor for model weights moving average')
    group.add_argument('--model-ema-warmup', action='store_true',
                       help='Enable warmup for model EMA decay.')

    # Training plan
    group = parser.add_argument_group('Training plan (see the resolved run without running it)')
    group.add_argument('--plan', default='', type=str, metavar='OUT.json',
                       help='resolve everything the run would use (LR and temperature of every update, optimizer '
                            'groups, loss, mixup, transforms, batch arithmetic), write OUT.json and OUT.png, print a '
                            'summary and exit; reads no data, builds the model on the meta device')
    group.add_argument('--plan-world-size', type=int, default=1, metavar='W',
                       help='processes the plan stands for (a config states its release\'s)')
    group.add_argument('--plan-train-size', type=int, default=1281167, metavar='N',
                       help='training images the plan stands for (ImageNet-1k)')

    # Misc
    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S',
                       help='random seed')
    group.add_argument('--worker-seeding', type=str, default='all',
                       help='worker seed mode')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='how many batches to wait before logging training status')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='how many updates to wait before writing a recovery checkpoint (0: never)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of checkpoints to keep')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='how many training processes to use')
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    group.add_argument('--no-prefetcher', action='store_true', default=False,
                       help='disable fast prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help="path to output folder ('': ./output/train)")
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help="name of the run folder inside --output ('': date-model-size; model-size with "
                            "--auto-resume)")
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help='Best metric')
    group.add_argument('--log-tb', action='store_true', default=False,
                       help='log scalars to TensorBoard in the run folder')
    return parser


def _option_dests(parser):
    return sorted(a.dest for a in parser._actions if a.dest != 'help')


def load_config(path, dests):
    """Reads a YAML config whose keys must be in `dests`; every problem is reported as one line."""
    if not os.path.isfile(path):
        raise UsageError(f"config file '{path}' not found")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # a binary file is not YAML either
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


def parse_args(argv=None):
    """Parses argv with timm's two-stage scheme: CLI flags > YAML config values > code defaults."""
    args_config, remaining = config_parser.parse_known_args(argv)
    parser = create_parser()
    dests = [d for d in _option_dests(parser) if d != 'config']
    if args_config.config:
        with usage_errors('train.py'):
            parser.set_defaults(**load_config(args_config.config, dests))
    args = parser.parse_args(remaining)
    args.config = args_config.config
    return args


def args_for_yaml(args):
    """The resolved values of every option, keyed by dest, so args.yaml works again as --config."""
    return {d: getattr(args, d) for d in _option_dests(create_parser()) if d != 'config'}



def global_batch_size(args, world_size: int) -> int:
    """Images per optimizer update: per-process batch x processes x accumulation steps."""
    return args.batch_size * world_size * args.grad_accum_steps


def resolve_lr(args, world_size: int) -> str:
    """Sets ``args.lr``: ``--lr`` as given, else ``lr_base`` scaled by the global batch (timm's rule: linear, or sqrt
    for adaptive optimizers when ``--lr-base-scale`` is empty); returns where the value came from."""
    if args.lr is not None:
        return 'set by --lr'
    batch = global_batch_size(args, world_size)
    if not args.lr_base_scale:
        name = args.opt.lower()
        args.lr_base_scale = 'sqrt' if any(o in name for o in ('ada', 'lamb')) else 'linear'
    ratio = batch / args.lr_base_size
    if args.lr_base_scale == 'sqrt':
        ratio = ratio ** 0.5
    args.lr = args.lr_base * ratio
    return f'lr_base {args.lr_base} x {batch}/{args.lr_base_size} with {args.lr_base_scale} scaling'


# Scheduler options and the schedulers of timm's create_scheduler_v2 that read them (timm/scheduler/
# scheduler_factory.py); the warm-up options are read by all but 'none', and only while warmup_epochs > 0.
_CYCLIC = ('cosine', 'tanh', 'poly')
_SCHED_OPTIONS = {
    'min_lr': _CYCLIC + ('plateau', 'wsd', 'rsqrt'),
    'cooldown_epochs': _CYCLIC,
    'lr_cycle_mul': _CYCLIC,
    'lr_cycle_decay': _CYCLIC,
    'lr_cycle_limit': _CYCLIC,
    'lr_k_decay': ('cosine', 'poly'),
    'decay_epochs': ('step', 'wsd', 'rsqrt'),
    'decay_milestones': ('multistep',),
    'decay_rate': ('step', 'multistep', 'plateau', 'poly'),
    'patience_epochs': ('plateau',),
}
_SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'constant', 'none')


def check_resolution(args) -> List[str]:
    """Raises a one-line UsageError for a resolved value that cannot mean anything; returns warnings for those where
    a run still makes sense. Call after `resolve_lr`."""
    warnings = []
    if args.sched not in _SCHEDULERS:
        raise UsageError(f"unknown --sched '{args.sched}'; one of {', '.join(_SCHEDULERS)}")
    if args.lr_base_scale not in ('', 'linear', 'sqrt'):
        raise UsageError(f"--lr-base-scale '{args.lr_base_scale}' is not 'linear' or 'sqrt'")
    if args.lr_base_size < 1:
        raise UsageError(f'--lr-base-size must be at least 1, got {args.lr_base_size}')
    if args.lr < 0:
        raise UsageError(f'the learning rate must not be negative, got {args.lr:g}; pass a positive --lr or --lr-base')
    if args.lr == 0:
        warnings.append('The learning rate is 0: the optimizer will not change the weights (BatchNorm statistics '
                        'still update).')
    if args.epochs < 1:
        raise UsageError(f'--epochs must be at least 1, got {args.epochs}')
    for flag in ('warmup_epochs', 'cooldown_epochs'):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    if args.warmup_updates < 0 or not 0 < args.warmup_ratio <= 1:
        raise UsageError(f'--warmup-updates must not be negative and --warmup-ratio must be in (0, 1], got '
                         f'{args.warmup_updates} and {args.warmup_ratio:g}')
    if args.warmup_updates and args.warmup_epochs:
        raise UsageError('--warmup-updates (a ratio of the schedule) and --warmup-epochs (a ramp to it) are two '
                         'warm-ups; set --warmup-epochs 0 or drop --warmup-updates')
    if args.sched_clock != 'updates' and not args.sched_on_updates:
        raise UsageError(f'--sched-clock {args.sched_clock} applies to per-update schedules; add --sched-on-updates')
    if args.accum_drop_last and args.grad_accum_steps == 1:
        raise UsageError('--accum-drop-last has no effect without --grad-accum-steps > 1')
    if args.clip_per_micro_batch and args.clip_grad is None:
        raise UsageError('--clip-per-micro-batch needs --clip-grad')
    if args.clip_per_micro_batch and (args.apex_amp or (args.amp and args.amp_dtype == 'float16')):
        raise UsageError("--clip-per-micro-batch cannot run under float16 AMP (its loss scaler unscales once per "
                         "update); use --amp-dtype bfloat16 or float32")
    if args.sched == 'plateau' and args.sched_on_updates:
        raise UsageError('--sched plateau steps once per epoch (on the eval metric); drop --sched-on-updates')
    defaults = create_parser()
    ineffective = [dest for dest, scheds in _SCHED_OPTIONS.items()
                   if args.sched not in scheds and getattr(args, dest) != defaults.get_default(dest)]
    if args.sched == 'none' or args.warmup_epochs == 0:
        ineffective += [d for d in ('warmup_lr', 'warmup_prefix') if getattr(args, d) != defaults.get_default(d)]
    if not args.warmup_updates and args.warmup_ratio != defaults.get_default('warmup_ratio'):
        ineffective.append('warmup_ratio')
    if ineffective:
        flag = ineffective[0].replace('_', '-')
        raise UsageError(f"--{flag} {getattr(args, ineffective[0])} has no effect with --sched {args.sched}"
                         f"{' and no warm-up' if ineffective[0].startswith('warmup') else ''}; remove it (from the "
                         f"config too) or choose a schedule that uses it")
    if args.sched != 'none' and args.warmup_epochs >= args.epochs and not args.warmup_prefix:
        warnings.append(f'The warm-up ({args.warmup_epochs} epochs) covers the whole run of {args.epochs} epochs: '
                        f'every update uses a warm-up LR between {args.warmup_lr:g} and {args.lr:g}. Lower '
                        f'--warmup-epochs (e.g. 0 for a short fine-tune) if that is not meant.')
    return warnings
