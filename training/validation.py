"""The library half of validate.py: its command line, its runs, one validation, and the results files.

validate.py is the command line over it. scripts/reproduce.py builds its runs with the same parser (`parse_args`)
and takes the same runtime options (`runtime_parser`); both validate through `validate_one`, on the evaluation loop
that train.py uses too (training/evaluate.py).
"""
import argparse
import copy
import csv
import json
import logging
import os
import shlex
import time
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import yaml
from timm.data import create_loader, resolve_data_config
from timm.utils import ParseKwargs

import models  # noqa: F401  (registers the project's models)
from models._helpers import load_checkpoint_file, load_weights, pretrained_file
from training import cli
from training.cli import UsageError
from training.evaluate import evaluate

__all__ = ['expand_runs', 'parse_args', 'results_table', 'runtime_parser', 'validate_one', 'write_results']

_logger = logging.getLogger('validate')

_RESULT_FORMATS = ('.json', '.csv')
# What a train.py run's saved args give a validation of its checkpoint; flags on the command line win.
_RUN_ARGS = ('model', 'model_kwargs', 'num_classes', 'in_chans', 'img_size', 'input_size', 'crop_pct', 'interpolation',
             'mean', 'std')
# The checkpoint of a run folder passed as --checkpoint, in order of preference.
_RUN_CHECKPOINTS = ('model_best.pth.tar', 'last.pth.tar')


def runtime_parser() -> argparse.ArgumentParser:
    """How a validation runs (batch, loader, device, precision, compile): a parent parser for validate.py's command
    line and scripts/reproduce.py's."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group('Runtime')
    group.add_argument('-b', '--batch-size', type=int, default=256, help='batch size')
    group.add_argument('-j', '--workers', type=int, default=4, help='data loading processes')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    group.add_argument('--amp', action='store_true', help='mixed precision (torch.autocast)')
    group.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'], help='autocast dtype')
    group.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='compile the model with this torch.compile backend (default when given: inductor)')
    group.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode')
    group.add_argument('--no-prefetcher', action='store_false', dest='prefetcher', help='disable the prefetcher')
    group.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the loader')
    group.add_argument('--log-freq', type=int, default=50, help='batches between progress lines')
    return parser


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Validate ImageNet checkpoints (top-1, top-5, loss)',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, parents=[runtime_parser()])
    parser.add_argument('data', nargs='?', metavar='DIR', help='dataset root (holding val/) or the val folder itself')
    parser.add_argument('--data-dir', metavar='DIR', help='dataset root (alternative to the positional DIR)')
    parser.add_argument('--dataset', default='', help='timm dataset type; empty = ImageFolder')
    parser.add_argument('--split', default='validation', help='split folder searched under the root (val, validation)')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', '-m', default=None,
                       help='model name, or a comma list of names (default: the one a train.py checkpoint names)')
    group.add_argument('--model-list', metavar='FILE', default=None,
                       help='file of `model checkpoint [key=value ...]` lines (checkpoint `-` for none; # comments)')
    group.add_argument('--checkpoint', default='',
                       help='checkpoint file or train.py run folder, or a comma list (one per --model name)')
    group.add_argument('--use-ema', action='store_true',
                       help="load the EMA weights ('state_dict_ema') instead of the plain ones")
    group.add_argument('--pretrained', action='store_true', help="use the model's pretrained weights (timm cfg)")
    group.add_argument('--num-classes', type=int, default=None, help='classifier size (default: the model cfg)')
    group.add_argument('--in-chans', type=int, default=None, help='input channels')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='key=value arguments for the model entrypoint, e.g. kernel_num=4')

    group = parser.add_argument_group('Eval transforms (default: the model cfg)')
    group.add_argument('--img-size', type=int, default=None, help='input image size')
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N', help='C H W input size')
    group.add_argument('--crop-pct', type=float, default=None, help='center crop fraction')
    group.add_argument('--crop-mode', default=None, choices=['center', 'squash', 'border'], help='crop mode')
    group.add_argument('--interpolation', default='', help='resize interpolation (bilinear, bicubic, ...)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalization mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='normalization std')

    parser.add_argument('--results-file', default='', metavar='FILE', help='write results here (.json or .csv)')
    return parser


def _check_args(args: argparse.Namespace):
    if not (args.data or args.data_dir):
        raise UsageError('no dataset given: pass the ImageNet root (or its val folder) as DIR or --data-dir')
    if args.model and args.model_list:
        raise UsageError('pass one of --model (name or comma list) and --model-list FILE, not both')
    if not (args.model or args.model_list or args.checkpoint):
        raise UsageError('no model given: pass --model (name or comma list), --model-list FILE, or the --checkpoint '
                         'of a train.py run (it names its model)')
    if args.model_list and not os.path.isfile(args.model_list):
        raise UsageError(f'--model-list {args.model_list} does not exist: pass a file of `model checkpoint` lines')
    if args.results_file:
        if os.path.splitext(args.results_file)[1].lower() not in _RESULT_FORMATS:
            raise UsageError(f'--results-file {args.results_file}: use a .json or .csv file name')
        folder = os.path.dirname(os.path.abspath(args.results_file))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UsageError(f'--results-file {args.results_file}: folder {folder} does not exist or is not writable')
    for flag in ('batch_size', 'log_freq'):
        if getattr(args, flag) < 1:
            raise UsageError(f'--{flag.replace("_", "-")} must be at least 1')
    if args.workers < 0:
        raise UsageError('--workers must be 0 or more')


def parse_args(argv: list[str] = None, runtime: argparse.Namespace | None = None) -> argparse.Namespace:
    """Parse and check validate.py's command line.

    Args:
        argv: The command line (default: sys.argv[1:]).
        runtime: A command line parsed with `runtime_parser()` among its parents (scripts/reproduce.py's): its runtime
            options are the defaults here.

    Raises:
        UsageError: A bad combination of flags (one-line message).
    """
    parser = _build_parser()
    if runtime is not None:
        dests = [action.dest for action in runtime_parser()._actions if action.dest != 'help']
        parser.set_defaults(**{dest: getattr(runtime, dest) for dest in dests})
    args = parser.parse_args(argv)
    _check_args(args)
    return args


def _read_model_list(path: str) -> list[dict[str, Any]]:
    """Runs from a `model checkpoint [key=value ...]` file."""
    runs = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                fields = shlex.split(line, comments=True)
            except ValueError:  # unbalanced quotes
                fields = [line]
            if not fields:
                continue
            if len(fields) < 2 or any('=' not in kv for kv in fields[2:]):
                raise UsageError(
                    f'{path}:{line_no}: expected `model checkpoint [key=value ...]`, got {line.strip()!r}')
            kwargs = argparse.Namespace()
            ParseKwargs(option_strings=[], dest='kw')(None, kwargs, fields[2:])
            runs.append(dict(model=fields[0], checkpoint='' if fields[1] == '-' else fields[1], model_kwargs=kwargs.kw))
    if not runs:
        raise UsageError(f'{path} lists no models: write one `model checkpoint` line per model')
    return runs


def expand_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One Namespace per model to validate, from --model/--checkpoint comma lists or --model-list."""
    if args.model_list:
        runs = _read_model_list(args.model_list)
    else:
        names = [m.strip() for m in args.model.split(',') if m.strip()] if args.model else []
        checkpoints = [c.strip() for c in args.checkpoint.split(',')] if args.checkpoint else []
        if not names:
            names = [None] * len(checkpoints)  # each checkpoint names its model
        elif not checkpoints:
            checkpoints = [''] * len(names)
        if len(checkpoints) != len(names):
            raise UsageError(
                f'{len(names)} models but {len(checkpoints)} checkpoints: give one --checkpoint per --model name')
        runs = [dict(model=n, checkpoint=c, model_kwargs={}) for n, c in zip(names, checkpoints)]
    expanded = []
    for run in runs:
        one = copy.copy(args)
        one.model, one.checkpoint = run['model'], run['checkpoint']
        one.model_kwargs = {**args.model_kwargs, **run['model_kwargs']}
        one.model_list = None
        expanded.append(one)
    return expanded


def _checkpoint_file(path: str) -> str:
    """The file of --checkpoint: itself, or the best (else last) checkpoint of a train.py run folder."""
    if not os.path.isdir(path):
        return path
    found = [os.path.join(path, name) for name in _RUN_CHECKPOINTS if os.path.isfile(os.path.join(path, name))]
    if not found:
        raise UsageError(f'run folder {path} holds no {" or ".join(_RUN_CHECKPOINTS)}: pass a checkpoint file')
    return found[0]


def _saved_run_args(checkpoint: Any, path: str) -> tuple[dict[str, Any], str]:
    """The train.py args a checkpoint saved ('args'), else those of the args.yaml beside it; and where from."""
    saved = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if isinstance(saved, argparse.Namespace):
        return vars(saved), f'the args saved in {path}'
    args_yaml = os.path.join(os.path.dirname(os.path.abspath(path)), 'args.yaml')
    if not os.path.isfile(args_yaml):
        return {}, ''
    try:
        with open(args_yaml) as f:
            saved = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UsageError(f'{args_yaml} beside the checkpoint is not valid YAML ({str(e).splitlines()[0]}): fix or '
                         'remove it, or pass --model') from None
    return (saved, args_yaml) if isinstance(saved, dict) else ({}, '')


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, (str, dict, list, tuple)) and not value)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _apply_run_args(args: argparse.Namespace, saved: dict[str, Any], source: str):
    """Fills the flags not given on the command line from a run's saved args; conflicts are logged in one line."""
    given_size = not (_unset(args.img_size) and _unset(args.input_size))
    conflicts = []
    for key in _RUN_ARGS:
        value = saved.get(key)
        if _unset(value) or (given_size and key in ('img_size', 'input_size') and _unset(getattr(args, key))):
            continue
        given = getattr(args, key)
        if key == 'model_kwargs':
            conflicts += [f'{k}={given[k]} (run: {value[k]})' for k in given if k in value and given[k] != value[k]]
            args.model_kwargs = {**value, **given}
        elif _unset(given):
            setattr(args, key, _plain(value))
        elif _plain(given) != _plain(value):
            conflicts.append(f'--{key.replace("_", "-")} {given} (run: {value})')
    if conflicts:
        _logger.warning(f'The command line overrides {source}: {"; ".join(conflicts)}.')


def _amp_context(args: argparse.Namespace, device: torch.device):
    if not args.amp:
        return nullcontext
    dtype = cli.resolve_amp_dtype(args.amp_dtype, device, doing='validating')
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def _create_model(args: argparse.Namespace) -> torch.nn.Module:
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if args.in_chans is not None:
        kwargs['in_chans'] = args.in_chans
    return cli.create_model(args.model, **kwargs)


def _create_dataset(args: argparse.Namespace, num_classes: int):
    root = args.data or args.data_dir
    dataset = cli.create_image_split(args.dataset, root, args.split)
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None) or {}
    if len(class_to_idx) > num_classes:
        raise UsageError(
            f'the val set has {len(class_to_idx)} classes but the model predicts {num_classes}: '
            f'pass --num-classes {len(class_to_idx)} (and a checkpoint trained with it)')
    return dataset


def validate_one(args: argparse.Namespace) -> dict[str, Any]:
    """Validate one model (args.model, args.checkpoint) on the val set.

    Args:
        args: A Namespace from `parse_args` (one run of `expand_runs` when several models were given); not changed.

    Returns:
        Ordered results: model, checkpoint, top1, top1_err, top5, top5_err, loss, param_count (M), img_size, crop_pct,
        interpolation, samples.

    Raises:
        UsageError, CheckpointError: bad input (unknown model, unusable dataset or checkpoint), one-line message.
    """
    args = copy.copy(args)
    device = cli.resolve_device(args.device)
    checkpoint = None
    if args.checkpoint:
        args.checkpoint = _checkpoint_file(args.checkpoint)
        checkpoint = load_checkpoint_file(args.checkpoint)
        _apply_run_args(args, *_saved_run_args(checkpoint, args.checkpoint))
    if not args.model:
        raise UsageError(f'{args.checkpoint} does not name its model (no train.py args in it, no args.yaml beside '
                         'it): pass --model')
    model = _create_model(args)
    if args.pretrained:
        load_weights(model, pretrained_file(model), use_ema=args.use_ema)
    if checkpoint is not None:
        load_weights(model, checkpoint, use_ema=args.use_ema, source=args.checkpoint)
    param_count = sum(p.numel() for p in model.parameters())
    data_config = resolve_data_config(vars(args), model=model, use_test_size=True)
    dataset = _create_dataset(args, model.num_classes)
    _logger.info(
        f'Model {args.model} ({param_count / 1e6:.2f}M params), checkpoint {args.checkpoint or "none"}, '
        f'{len(dataset)} images, eval {data_config}')

    model = model.to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    loader = create_loader(
        dataset,
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        use_prefetcher=args.prefetcher,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=args.workers,
        crop_pct=data_config['crop_pct'],
        crop_mode=data_config['crop_mode'],
        pin_memory=args.pin_mem,
        device=device,
    )
    start = time.time()
    metrics = evaluate(model, loader, device, _amp_context(args, device), channels_last=args.channels_last,
                       prefetcher=args.prefetcher, log_interval=args.log_freq)
    results = OrderedDict(
        model=args.model,
        checkpoint=args.checkpoint,
        top1=round(metrics['top1'], 4), top1_err=round(100 - metrics['top1'], 4),
        top5=round(metrics['top5'], 4), top5_err=round(100 - metrics['top5'], 4),
        loss=round(metrics['loss'], 5),
        param_count=round(param_count / 1e6, 3),
        img_size=data_config['input_size'][-1],
        crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'],
        samples=metrics['samples'],
        time_s=round(time.time() - start, 2),
    )
    _logger.info(f' * Acc@1 {results["top1"]:.3f} ({results["top1_err"]:.3f}) '
                 f'Acc@5 {results["top5"]:.3f} ({results["top5_err"]:.3f})')
    return results


def write_results(path: str, results: list[dict[str, Any]]):
    """Write result rows as a JSON list or a CSV table (by file extension), via a temp file and a rename."""
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        if path.lower().endswith('.csv'):
            fields = list(OrderedDict.fromkeys(k for row in results for k in row))
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(results)
        else:
            json.dump(results, f, indent=2)
            f.write('\n')
    os.replace(tmp, path)


def results_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of result rows (failed runs show their error)."""
    lines = ['| model | checkpoint | top-1 | top-5 | loss | params (M) | img size | crop_pct | interpolation |',
             '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |']
    for r in results:
        if 'error' in r:
            lines.append(f'| {r["model"]} | {r["checkpoint"] or "-"} | error: {r["error"]} |')
        else:
            lines.append(
                f'| {r["model"]} | {r["checkpoint"] or "-"} | {r["top1"]:.3f} | {r["top5"]:.3f} | {r["loss"]:.4f} | '
                f'{r["param_count"]:.2f} | {r["img_size"]} | {r["crop_pct"]} | {r["interpolation"]} |')
    return '\n'.join(lines)
