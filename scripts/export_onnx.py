#!/usr/bin/env python3
"""Export a registered model to ONNX with a dynamic batch, then check the file with onnxruntime (CPU) against the
eager model at batch sizes the export did not trace: the largest output difference and the time per image of both.

Usage:
    python scripts/export_onnx.py ddf_mul_resnet50 --checkpoint ddf_mul_resnet50.pth --output ddf_mul_resnet50.onnx
    python scripts/export_onnx.py od_resnet18 --model-kwargs kernel_num=4 --img-size 160 --batch-sizes 1 8
    python scripts/export_onnx.py rednet26 --reparameterize    # the fused deployment form
"""
import argparse
import logging
import os
import sys

import torch
from timm.utils import ParseKwargs, reparameterize_model

from models import load_weights
from tools.info import default_input_size
from tools.onnx_export import check_onnx, export_onnx
from training import cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export a model to ONNX (dynamic batch) and check it with onnxruntime')
    parser.add_argument('model', help='registered model name, e.g. ddf_mul_resnet50')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='key=value entrypoint args')
    parser.add_argument('--checkpoint', default='', help='weights to load (any format validate.py reads)')
    parser.add_argument('--use-ema', action='store_true', help="load the checkpoint's EMA weights")
    parser.add_argument('--reparameterize', action='store_true',
                        help='export the deployment form (timm.utils.reparameterize_model: BatchNorms folded)')
    parser.add_argument('--output', default='', help='the .onnx file to write (default: MODEL.onnx)')
    parser.add_argument('--img-size', type=int, default=None, help="square input size (default: the model cfg's)")
    parser.add_argument('--export-batch-size', type=int, default=2, help='batch size the export traces')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 3],
                        help='batch sizes onnxruntime is checked at (default: 1 3)')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per batch size')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads of both runtimes (default: torch)')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest accepted max |ort - eager| / max |eager| (exit status 1 above it)')
    args = parser.parse_args(argv)
    for flag in ('img_size', 'export_batch_size', 'repeats', 'threads'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise cli.UsageError(f'--{flag.replace("_", "-")} must be at least 1, got {value}')
    if min(args.batch_sizes) < 1:
        raise cli.UsageError(f'--batch-sizes must be at least 1, got {args.batch_sizes}')
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    logging.getLogger('models').setLevel(logging.INFO)  # the checkpoint loader's line; not the exporter's chatter
    with cli.usage_errors('export_onnx.py'):
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        output = args.output or f'{args.model}.onnx'
        if not os.path.isdir(os.path.dirname(output) or '.'):
            raise cli.UsageError(f'--output {output}: folder {os.path.dirname(output)} does not exist')
        model = cli.create_model(args.model, **args.model_kwargs)
        if args.checkpoint:
            load_weights(model, args.checkpoint, use_ema=args.use_ema)
        input_size = default_input_size(model, args.img_size)
        try:  # a size the model refuses (DDF-ResNets: multiples of 32) in its own words, not inside the exporter's
            with torch.no_grad():
                model.eval()(torch.zeros(1, *input_size))
        except ValueError as e:
            raise cli.UsageError(f'{args.model} does not take a {input_size[1]}x{input_size[2]} input: {e}') from None
    if args.reparameterize:
        model = reparameterize_model(model)
    export_onnx(model, output, input_size, args.export_batch_size)
    rows = check_onnx(model, output, input_size, args.batch_sizes, args.repeats)
    fused = ' (reparameterized)' if args.reparameterize else ''
    print(f'{output}: {args.model}{fused} at {"x".join(map(str, input_size))}, exported at batch '
          f'{args.export_batch_size}, {torch.get_num_threads()} CPU threads')
    print(f'{"batch":>5}  {"max abs diff":>12}  {"max rel diff":>12}  {"eager ms/img":>12}  {"ORT ms/img":>10}')
    for r in rows:
        print(f'{r["batch_size"]:>5}  {r["max_abs"]:>12.3e}  {r["max_rel"]:>12.3e}  {r["eager_ms"]:>12.2f}  '
              f'{r["ort_ms"]:>10.2f}')
    worst = max(r['max_rel'] for r in rows)
    if worst > args.tolerance:
        print(f'export_onnx.py: onnxruntime differs from eager by {worst:.3e} (relative), above --tolerance '
              f'{args.tolerance:g}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(cli.exit_status(main))
