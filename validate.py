#!/usr/bin/env python3
"""ImageNet validation: top-1, top-5 and loss of one or more models over an ImageFolder val set.

Loads the checkpoints of the original releases (timm-era ddfnet, ODConv main.py, DWNet's Swin-style main.py,
torchvision-style scripts) as well as this project's own, always without running pickled code (models/_helpers.py);
the plain weights of a file unless --use-ema. A checkpoint of a train.py run (or its run folder) names its model:
the model, its kwargs, the number of classes and the eval transforms come from the args it saved (or the run's
args.yaml); flags on the command line still win, and a conflict is reported in one line. Otherwise evaluation uses
each model's protocol from its pretrained cfg (input size, crop_pct, interpolation, mean/std), every piece of it
overridable. Built on timm's library, after timm's validate.py; the library half is training/validation.py.

Examples:
    python validate.py /data/imagenet --checkpoint output/train/od_r50_4x/          # a train.py run
    python validate.py /data/imagenet --model ddf_mul_resnet50 --checkpoint ddf_mul_r50.pth.tar --amp
    python validate.py /data/imagenet --model od_resnet18,od_resnet50 --checkpoint od_r18.pth,od_r50.pth \\
        --model-kwargs kernel_num=4 --results-file results.csv
    python validate.py /data/imagenet --model-list table.txt --results-file table.json
"""

import logging
import sys
from collections import OrderedDict

from timm.utils import setup_default_logging

from models._helpers import CheckpointError
from training import cli
from training.cli import UsageError
from training.validation import expand_runs, parse_args, results_table, validate_one, write_results

__all__ = ['main', 'parse_args', 'validate_one', 'write_results']

_logger = logging.getLogger('validate')


def main(argv: list[str] = None) -> int:
    setup_default_logging()
    with cli.usage_errors('validate.py'):
        args = parse_args(argv)
        runs = expand_runs(args)
        for run in runs:
            if run.model:
                cli.check_model_name(run.model)
        results, failed = [], 0
        for run in runs:
            try:
                results.append(validate_one(run))
            except (UsageError, CheckpointError) as e:
                if len(runs) == 1:
                    raise
                _logger.error(f'{run.model or run.checkpoint}: {e}')
                results.append(OrderedDict(model=run.model, checkpoint=run.checkpoint, error=str(e)))
                failed += 1
        if args.results_file:
            write_results(args.results_file, results)
            _logger.info(f'Results written to {args.results_file}')
        print(results_table(results))
        if failed:
            raise UsageError(f'{failed} of {len(runs)} models failed (see the table)')
    return 0


if __name__ == '__main__':
    sys.exit(cli.exit_status(main))
