#!/usr/bin/env python3
"""Parameters and multiply-adds (GMACs) of a model at its default input size (counted by tools/info.py), and, for a
published model, its overhead over the static baseline beside the published one.

Usage:
    python scripts/model_info.py ddf_mul_resnet50
    python scripts/model_info.py od_resnet50 --model-kwargs kernel_num=4 --img-size 256 --depth 2
    python scripts/model_info.py od_resnet50 --reparameterize    # the fused deployment form
"""
import argparse
import logging
import sys

from timm.utils import ParseKwargs

from tools.info import model_info
from tools.zoo import published_overhead
from training import cli


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    parser = argparse.ArgumentParser(description='Parameters and GMACs of a registered model')
    parser.add_argument('model', help='registered model name, e.g. ddf_mul_resnet50')
    parser.add_argument('--img-size', type=int, default=None, help="square input size (default: the model cfg's)")
    parser.add_argument('--num-classes', type=int, default=None, help='classifier size (default: the model cfg)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='key=value entrypoint args')
    parser.add_argument('--depth', type=int, default=None, help='also print GMACs per module down to this depth')
    parser.add_argument('--reparameterize', action='store_true',
                        help='count the deployment form (timm.utils.reparameterize_model; DGConv groups from the '
                             "fresh model's random gates)")
    args = parser.parse_args(argv)
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    try:
        cli.check_model_name(args.model)
        if args.img_size is not None and args.img_size < 1:
            raise cli.UsageError('--img-size must be positive')
        info = model_info(args.model, img_size=args.img_size, depth=args.depth, reparameterize=args.reparameterize,
                          **kwargs)
    except cli.UsageError as e:
        parser.error(str(e))
    c, h, w = info['input_size']
    fused = ' (reparameterized)' if args.reparameterize else ''
    print(f'{info["model"]}{fused}: {info["params_m"]:.2f}M params, {info["gmacs"]:.3f} GMACs at {c}x{h}x{w}')
    if args.img_size is None and not args.reparameterize:
        row = published_overhead(args.model, kwargs)
        if row is not None:
            print(f'over {row["baseline"]}: {row["overhead_gmacs"]:+.3f} GMACs here, {row["pub_overhead_gmacs"]:+.4f} '
                  f'published ({row["overhead_diff_pct"]:+.1f}%; the paper counts both with its own tool)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
