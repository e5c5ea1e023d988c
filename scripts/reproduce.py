#!/usr/bin/env python3
"""Reproduce the papers' ImageNet tables from the released checkpoints.

Looks in CHECKPOINT_DIR for the released checkpoint of every model of the zoo table (scripts/model_zoo.py: the
project's models, their published variants and the static baselines), validates each one found with validate.py's
`validate_one` (training/validation.py; the same runtime options) under its paper's evaluation protocol (paper_tables.yaml `eval`: resize/crop, interpolation, mean/std)
and prints published vs measured top-1/top-5 with the differences as markdown. Every release format loads: timm-era
ddfnet files, ODConv main.py, DWNet's Swin-style main.py, torchvision-style files, plain state_dicts.

A row's checkpoint is found under its key (the model name; ODConv rows add `_<kernel_num>x`, e.g. `od_resnet50_4x`)
as `<key>.pth.tar`, `<key>.pth`, `<key>.pt`, `<key>.safetensors` or `<key>/model_best.pth.tar`, or under the name a
`--names` YAML file maps the key to (`od_resnet50_4x: downloads/od50_4x.pth`). `--list` prints the keys.

Usage:
    python scripts/reproduce.py /data/imagenet /data/released_checkpoints --amp --output reproduce.md
    python scripts/reproduce.py /data/imagenet ckpts --names names.yaml --models 'od_*' --results-file r.csv
"""
import argparse
import fnmatch
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from timm.utils import ParseKwargs, setup_default_logging

from models._helpers import CheckpointError
from tools.zoo import DEFAULT_REFERENCE, table_rows
from training.cli import UsageError
from training.validation import parse_args, runtime_parser, validate_one, write_results

__all__ = ['eval_protocols', 'find_checkpoint', 'reproduce', 'row_key', 'to_markdown']

_logger = logging.getLogger('reproduce')

_EXTENSIONS = ('.pth.tar', '.pth', '.pt', '.safetensors')


def row_key(row: dict[str, Any]) -> str:
    """File-name key of a zoo row: the model name, plus `_<k>x` for ODConv models (as the release tables name them)."""
    if row['family'] == 'odconv' and row['kind'] == 'dynamic':
        return f'{row["model"]}_{row["kwargs"].get("kernel_num", 1)}x'
    return row['model']


def find_checkpoint(checkpoint_dir: Path, key: str, names: dict[str, str]) -> Path | None:
    """The checkpoint file of a row key in checkpoint_dir (a `names` entry wins), or None."""
    if key in names:
        candidates = [checkpoint_dir / names[key]]
    else:
        candidates = [checkpoint_dir / f'{key}{ext}' for ext in _EXTENSIONS]
        candidates.append(checkpoint_dir / key / 'model_best.pth.tar')
    return next((path for path in candidates if path.is_file()), None)


def _value(entry: Any) -> Any:
    return entry['value'] if isinstance(entry, dict) else entry


def eval_protocols(reference: Path) -> dict[str, dict[str, Any]]:
    """Per paper family, validate.py's eval arguments (img_size, crop_pct, interpolation, mean, std)."""
    protocols = {}
    for family, section in yaml.safe_load(reference.read_text()).items():
        spec = section.get('eval') or {}
        protocol = dict(img_size=_value(spec.get('crop')), crop_pct=_value(spec.get('crop_pct')),
                        interpolation=_value(spec.get('interpolation')), mean=spec.get('mean'), std=spec.get('std'))
        protocols[family] = {k: v for k, v in protocol.items() if v is not None}
    return protocols


def _validate_args(args: argparse.Namespace, row: dict[str, Any], checkpoint: Path,
                   protocol: dict[str, Any]) -> argparse.Namespace:
    """validate.py's Namespace for one row, built through its own parser, with this command line's runtime options."""
    protocol = dict(protocol)
    if args.img_size:
        protocol['img_size'] = args.img_size
    argv = [args.imagenet_dir, '--model', row['model'], '--checkpoint', str(checkpoint)]
    for key in ('img_size', 'crop_pct', 'interpolation'):
        if key in protocol:
            argv += [f'--{key.replace("_", "-")}', str(protocol[key])]
    for key in ('mean', 'std'):
        if key in protocol:
            argv += [f'--{key}', *map(str, protocol[key])]
    if args.use_ema:
        argv.append('--use-ema')
    if args.num_classes:
        argv += ['--num-classes', str(args.num_classes)]
    kwargs = {**args.model_kwargs, **row['kwargs']}
    if kwargs:
        argv += ['--model-kwargs', *(f'{k}={v}' for k, v in kwargs.items())]
    return parse_args(argv, runtime=args)


def reproduce(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Validate every zoo row whose checkpoint is present; returns one result dict per such row."""
    names = yaml.safe_load(args.names.read_text()) if args.names else {}
    if not isinstance(names, dict):
        raise UsageError(f'--names {args.names}: expected a YAML mapping of row keys to file names')
    protocols = eval_protocols(args.reference)
    results, measured = [], {}
    for row in table_rows(args.reference):
        key = row_key(row)
        if args.models and not any(fnmatch.fnmatch(key, p) for p in args.models.split(',')):
            continue
        checkpoint = find_checkpoint(args.checkpoint_dir, key, names)
        if checkpoint is None:
            continue
        run = (row['model'], json.dumps(row['kwargs'], sort_keys=True), str(checkpoint), row['family'])
        if run not in measured:
            _logger.info(f'Validating {key} from {checkpoint}')
            try:
                measured[run] = validate_one(
                    _validate_args(args, row, checkpoint, protocols.get(row['family'], {})))
            except (UsageError, CheckpointError) as e:
                _logger.error(f'{key}: {e}')
                measured[run] = dict(error=str(e))
        result = dict(family=row['family'], kind=row['kind'], key=key, model=row['model'], kwargs=row['kwargs'],
                      checkpoint=str(checkpoint), pub_top1=row.get('pub_top1'), pub_top5=row.get('pub_top5'))
        outcome = measured[run]
        if 'error' in outcome:
            result['error'] = outcome['error']
        else:
            result.update(top1=outcome['top1'], top5=outcome['top5'], loss=outcome['loss'],
                          img_size=outcome['img_size'], crop_pct=outcome['crop_pct'],
                          interpolation=outcome['interpolation'], samples=outcome['samples'])
            for k in ('top1', 'top5'):
                pub = result[f'pub_{k}']
                result[f'{k}_diff'] = None if pub is None else round(result[k] - pub, 3)
        results.append(result)
    return results


def _num(value: Any, spec: str) -> str:
    return '' if value is None else format(value, spec)


def to_markdown(results: list[dict[str, Any]]) -> str:
    lines = ['| family | model | kwargs | checkpoint | eval | published top-1 | measured top-1 | Δ top-1 '
             '| published top-5 | measured top-5 | Δ top-5 |',
             '| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in results:
        kwargs = ' '.join(f'{k}={v}' for k, v in r['kwargs'].items())
        head = f'| {r["family"]} | `{r["model"]}` | {kwargs} | {os.path.basename(r["checkpoint"])} |'
        if 'error' in r:
            lines.append(
                f'{head} error: {r["error"]} | {_num(r["pub_top1"], "")} | | | {_num(r["pub_top5"], "")} | | |')
            continue
        lines.append(
            f'{head} {r["img_size"]}px {r["crop_pct"]} {r["interpolation"]} | {_num(r["pub_top1"], "")} | '
            f'{r["top1"]:.2f} | {_num(r["top1_diff"], "+.2f")} | {_num(r["pub_top5"], "")} | {r["top5"]:.2f} | '
            f'{_num(r["top5_diff"], "+.2f")} |')
    return '\n'.join(lines) + '\n'


def main(argv: list[str] = None) -> int:
    setup_default_logging()
    parser = argparse.ArgumentParser(description='Validate every released checkpoint found; published vs measured',
                                     parents=[runtime_parser()])
    parser.add_argument('imagenet_dir', metavar='IMAGENET_DIR', help='ImageNet root (holding val/) or its val folder')
    parser.add_argument('checkpoint_dir', metavar='CHECKPOINT_DIR', type=Path, help='folder of released checkpoints')
    parser.add_argument('--names', type=Path, default=None, help='YAML mapping of row keys to checkpoint file names')
    parser.add_argument('--models', default='', help='comma list of row-key patterns to restrict to (e.g. "od_*")')
    parser.add_argument('--reference', type=Path, default=DEFAULT_REFERENCE, help='paper_tables.yaml')
    parser.add_argument('--list', action='store_true', help='print the row keys and the file looked for; no validation')
    parser.add_argument('--use-ema', action='store_true', help='validate the EMA weights of training checkpoints')
    parser.add_argument('--img-size', type=int, default=None, help="override the papers' eval crop size")
    parser.add_argument('--num-classes', type=int, default=None, help='classifier size (demo data; default: cfg)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='key=value arguments for every model (a row\'s own, e.g. kernel_num, win)')
    parser.add_argument('--output', type=Path, default=None, help='also write the markdown table here')
    parser.add_argument('--results-file', default='', help='also write the rows here (.json or .csv)')
    args = parser.parse_args(argv)
    if not args.reference.is_file():
        parser.error(f'--reference {args.reference} does not exist: pass the paper_tables.yaml of the reference facts')
    if args.names and not args.names.is_file():
        parser.error(f'--names {args.names} does not exist: pass a YAML file mapping row keys to file names')
    if args.results_file and os.path.splitext(args.results_file)[1].lower() not in ('.json', '.csv'):
        parser.error(f'--results-file {args.results_file}: use a .json or .csv file name')
    if args.list:
        names = yaml.safe_load(args.names.read_text()) if args.names else {}
        for row in table_rows(args.reference):
            key = row_key(row)
            print(f'{key}: {names.get(key, key + ".pth.tar")}')
        return 0
    if not args.checkpoint_dir.is_dir():
        parser.error(f'checkpoint folder {args.checkpoint_dir} does not exist')
    if not os.path.isdir(args.imagenet_dir):
        parser.error(f'dataset folder {args.imagenet_dir} does not exist: pass the ImageNet root or its val folder')
    try:
        results = reproduce(args)
    except UsageError as e:
        parser.error(str(e))
    if not results:
        parser.error(f'no released checkpoint found in {args.checkpoint_dir}: name files <key>.pth.tar '
                     '(keys: --list) or map keys to files with --names')
    table = to_markdown(results)
    print(table, end='')
    if args.output:
        args.output.write_text(table)
    if args.results_file:
        write_results(args.results_file, [
            {**r, 'kwargs': ' '.join(f'{k}={v}' for k, v in r['kwargs'].items())} for r in results])
    failed = sum('error' in r for r in results)
    if failed:
        raise SystemExit(f'reproduce.py: error: {failed} of {len(results)} checkpoints failed (see the table)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
