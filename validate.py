#!/usr/bin/env python3
"""ImageNet validation: top-1, top-5 and loss of one or more models over an ImageFolder val set.

Loads the checkpoints of the original releases (timm-era ddfnet, ODConv main.py, DWNet's Swin-style main.py,
torchvision-style scripts) as well as this project's own, always without running pickled code (models/_helpers.py).
Evaluation uses each model's protocol from its pretrained cfg (input size, crop_pct, interpolation, mean/std); every
piece of it can be overridden. Built on timm's library, after timm's validate.py.

Examples:
    python validate.py /data/imagenet --model ddf_mul_resnet50 --checkpoint ddf_mul_r50.pth.tar --amp
    python validate.py /data/imagenet --model od_resnet18,od_resnet50 --checkpoint od_r18.pth,od_r50.pth \\
        --model-kwargs kernel_num=4 --results-file results.csv
    python validate.py /data/imagenet --model-list table.txt --results-file table.json
"""
import argparse
import copy
import csv
import difflib
import json
import logging
import os
import shlex
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List

import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.utils import AverageMeter, ParseKwargs, accuracy, setup_default_logging

import models  # noqa: F401  (registers the project's models)
from models._helpers import CheckpointError, load_checkpoint

_logger = logging.getLogger('validate')

_RESULT_FORMATS = ('.json', '.csv')


class ValidateError(ValueError):
    """Bad input for a validation run; the message is one line naming the problem and the fix."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Validate ImageNet checkpoints (top-1, top-5, loss)',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('data', nargs='?', metavar='DIR', help='dataset root (holding val/) or the val folder itself')
    parser.add_argument('--data-dir', metavar='DIR', help='dataset root (alternative to the positional DIR)')
    parser.add_argument('--dataset', default='', help='timm dataset type; empty = ImageFolder')
    parser.add_argument('--split', default='validation', help='split folder searched under the root (val, validation)')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', '-m', default=None, help='model name, or a comma list of names')
    group.add_argument('--model-list', metavar='FILE', default=None,
                       help='file of `model checkpoint [key=value ...]` lines (checkpoint `-` for none; # comments)')
    group.add_argument('--checkpoint', default='', help='checkpoint file, or a comma list (one per --model name)')
    group.add_argument('--use-ema', action='store_true', help="load the EMA weights ('state_dict_ema')")
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

    group = parser.add_argument_group('Runtime')
    group.add_argument('-b', '--batch-size', type=int, default=256, help='batch size')
    group.add_argument('-j', '--workers', type=int, default=4, help='data loading processes')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    group.add_argument('--amp', action='store_true', help='mixed precision (torch.autocast)')
    group.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'], help='autocast dtype')
    group.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    group.add_argument('--no-prefetcher', action='store_false', dest='prefetcher', help='disable the prefetcher')
    group.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the loader')
    group.add_argument('--log-freq', type=int, default=50, help='batches between progress lines')
    group.add_argument('--results-file', default='', metavar='FILE', help='write results here (.json or .csv)')
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace):
    if not (args.data or args.data_dir):
        parser.error('no dataset given: pass the ImageNet root (or its val folder) as DIR or --data-dir')
    if bool(args.model) == bool(args.model_list):
        parser.error('pass exactly one of --model (name or comma list) and --model-list FILE')
    if args.model_list and not os.path.isfile(args.model_list):
        parser.error(f'--model-list {args.model_list} does not exist: pass a file of `model checkpoint` lines')
    if args.results_file:
        if os.path.splitext(args.results_file)[1].lower() not in _RESULT_FORMATS:
            parser.error(f'--results-file {args.results_file}: use a .json or .csv file name')
        folder = os.path.dirname(os.path.abspath(args.results_file))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f'--results-file {args.results_file}: folder {folder} does not exist or is not writable')
    for flag in ('batch_size', 'log_freq'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be at least 1')
    if args.workers < 0:
        parser.error('--workers must be 0 or more')


def parse_args(argv: List[str] = None) -> argparse.Namespace:
    """Parse and check validate.py's command line (also used by scripts/reproduce.py to build runs)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _read_model_list(path: str) -> List[Dict[str, Any]]:
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
                raise ValidateError(
                    f'{path}:{line_no}: expected `model checkpoint [key=value ...]`, got {line.strip()!r}')
            kwargs = argparse.Namespace()
            ParseKwargs(option_strings=[], dest='kw')(None, kwargs, fields[2:])
            runs.append(dict(model=fields[0], checkpoint='' if fields[1] == '-' else fields[1], model_kwargs=kwargs.kw))
    if not runs:
        raise ValidateError(f'{path} lists no models: write one `model checkpoint` line per model')
    return runs


def expand_runs(args: argparse.Namespace) -> List[argparse.Namespace]:
    """One Namespace per model to validate, from --model/--checkpoint comma lists or --model-list."""
    if args.model_list:
        runs = _read_model_list(args.model_list)
    else:
        names = [m.strip() for m in args.model.split(',') if m.strip()]
        checkpoints = [c.strip() for c in args.checkpoint.split(',')] if args.checkpoint else [''] * len(names)
        if len(checkpoints) != len(names):
            raise ValidateError(
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


def check_model_name(name: str):
    """Raise a one-line error suggesting close names if `name` is not a registered model."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f'did you mean {", ".join(close)}?' if close else 'list them with timm.list_models()'
    raise ValidateError(f'unknown model {name!r}: {hint}')


def _resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValidateError(f'--device {name}: {e}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValidateError(f'--device {name}: CUDA is not available on this machine; use --device cpu')
    return device


def _amp_context(args: argparse.Namespace, device: torch.device):
    if not args.amp:
        return nullcontext
    dtype = getattr(torch, args.amp_dtype)
    if device.type == 'cpu' and dtype == torch.float16:
        _logger.warning('float16 autocast is not supported well on CPU: using bfloat16 instead.')
        dtype = torch.bfloat16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def _create_model(args: argparse.Namespace) -> torch.nn.Module:
    check_model_name(args.model)
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if args.in_chans is not None:
        kwargs['in_chans'] = args.in_chans
    try:
        return timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except TypeError as e:
        raise ValidateError(f'model {args.model} rejected its arguments {kwargs}: {e}') from None


def _create_dataset(args: argparse.Namespace, num_classes: int):
    root = args.data or args.data_dir
    if not args.dataset and not os.path.isdir(root):
        raise ValidateError(f'dataset folder {root} does not exist: pass the ImageNet root or its val folder')
    try:
        dataset = create_dataset(name=args.dataset, root=root, split=args.split)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise ValidateError(f'cannot read dataset {root}: {str(e).splitlines()[0]}') from None
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or {}
    if '' in class_to_idx:
        raise ValidateError(f'images lie directly in {root}: an ImageFolder needs one subfolder per class')
    folder = getattr(reader, 'root', None)
    if class_to_idx and folder and os.path.isdir(folder):
        # A class folder without images would silently shift the indices of every class sorted after it.
        empty = sorted(
            d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and d not in class_to_idx)
        if empty:
            raise ValidateError(f'class folders without images in {folder}: {", ".join(empty[:5])}; '
                                'add their images or remove them (class indices would shift)')
    if len(class_to_idx) > num_classes:
        raise ValidateError(
            f'the val set has {len(class_to_idx)} classes but the model predicts {num_classes}: '
            f'pass --num-classes {len(class_to_idx)} (and a checkpoint trained with it)')
    return dataset


def validate_one(args: argparse.Namespace) -> Dict[str, Any]:
    """Validate one model (args.model, args.checkpoint) on the val set.

    Args:
        args: A Namespace from `parse_args` (one run of `expand_runs` when several models were given).

    Returns:
        Ordered results: model, checkpoint, top1, top1_err, top5, top5_err, loss, param_count (M), img_size, crop_pct,
        interpolation, samples.

    Raises:
        ValidateError, CheckpointError: bad input (unknown model, unusable dataset or checkpoint), one-line message.
    """
    device = _resolve_device(args.device)
    model = _create_model(args)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
    param_count = sum(p.numel() for p in model.parameters())
    data_config = resolve_data_config(vars(args), model=model, use_test_size=True)
    dataset = _create_dataset(args, model.num_classes)
    _logger.info(
        f'Model {args.model} ({param_count / 1e6:.2f}M params), checkpoint {args.checkpoint or "none"}, '
        f'{len(dataset)} images, eval {data_config}')

    model = model.to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = torch.nn.CrossEntropyLoss().to(device)
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
    amp_autocast = _amp_context(args, device)
    top5_k = min(5, model.num_classes)
    batch_time, losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter(), AverageMeter()
    start = end = time.time()
    with torch.inference_mode():
        for batch_idx, (images, target) in enumerate(loader):
            if not args.prefetcher:
                images, target = images.to(device), target.to(device)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(images)
            loss = criterion(output.float(), target)
            acc1, acc5 = accuracy(output.detach(), target, topk=(1, top5_k))
            losses.update(loss.item(), images.size(0))
            top1.update(acc1.item(), images.size(0))
            top5.update(acc5.item(), images.size(0))
            batch_time.update(time.time() - end)
            end = time.time()
            if batch_idx % args.log_freq == 0 or batch_idx == len(loader) - 1:
                _logger.info(
                    f'Test: [{batch_idx:>4d}/{len(loader)}]  Time: {batch_time.val:.3f}s '
                    f'({images.size(0) / batch_time.avg:>7.2f}/s)  Loss: {losses.val:>7.4f} ({losses.avg:>6.4f})  '
                    f'Acc@1: {top1.val:>7.3f} ({top1.avg:>7.3f})  Acc@5: {top5.val:>7.3f} ({top5.avg:>7.3f})')
    results = OrderedDict(
        model=args.model,
        checkpoint=args.checkpoint,
        top1=round(top1.avg, 4), top1_err=round(100 - top1.avg, 4),
        top5=round(top5.avg, 4), top5_err=round(100 - top5.avg, 4),
        loss=round(losses.avg, 5),
        param_count=round(param_count / 1e6, 3),
        img_size=data_config['input_size'][-1],
        crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'],
        samples=top1.count,
        time_s=round(time.time() - start, 2),
    )
    _logger.info(f' * Acc@1 {results["top1"]:.3f} ({results["top1_err"]:.3f}) '
                 f'Acc@5 {results["top5"]:.3f} ({results["top5_err"]:.3f})')
    return results


def write_results(path: str, results: List[Dict[str, Any]]):
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


def results_table(results: List[Dict[str, Any]]) -> str:
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


def main(argv: List[str] = None) -> int:
    setup_default_logging()
    args = parse_args(argv)
    try:
        runs = expand_runs(args)
        for run in runs:
            check_model_name(run.model)
    except ValidateError as e:
        raise SystemExit(f'validate.py: error: {e}') from None

    results, failed = [], 0
    for run in runs:
        try:
            results.append(validate_one(run))
        except (ValidateError, CheckpointError) as e:
            if len(runs) == 1:
                raise SystemExit(f'validate.py: error: {e}') from None
            _logger.error(f'{run.model}: {e}')
            results.append(OrderedDict(model=run.model, checkpoint=run.checkpoint, error=str(e)))
            failed += 1
    if args.results_file:
        write_results(args.results_file, results)
        _logger.info(f'Results written to {args.results_file}')
    print(results_table(results))
    if failed:
        raise SystemExit(f'validate.py: error: {failed} of {len(runs)} models failed (see the table)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
