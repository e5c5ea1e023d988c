#!/usr/bin/env python3
"""Write the embedded demo dataset (tools/demo_data.py): a small, deterministic ImageFolder of synthetic shapes.

Usage:
    python scripts/make_demo_data.py --output data/demo --train-per-class 200 --val-per-class 50 --image-size 64
"""
import argparse
import logging
import sys

from tools.demo_data import SHAPES, make_demo_dataset


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', '-o', default='data/demo', help='output folder (default: data/demo)')
    parser.add_argument('--num-classes', type=int, default=10, help=f'number of classes, 2..{len(SHAPES)}')
    parser.add_argument('--train-per-class', type=int, default=200, help='training images per class')
    parser.add_argument('--val-per-class', type=int, default=50, help='validation images per class')
    parser.add_argument('--image-size', type=int, default=64, help='image width and height in pixels')
    parser.add_argument('--seed', type=int, default=0, help='base random seed')
    parser.add_argument('--force', action='store_true', help='rewrite even if the same dataset exists')
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = _parse_args(argv)
    try:
        make_demo_dataset(
            args.output,
            num_classes=args.num_classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            image_size=args.image_size,
            seed=args.seed,
            force=args.force,
        )
    except (ValueError, OSError) as e:
        sys.exit(f'make_demo_data.py: error: {e}')


if __name__ == '__main__':
    main()
