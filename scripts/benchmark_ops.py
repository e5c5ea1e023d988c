#!/usr/bin/env python3
""" Side-by-side timing of the DDF op against convolutions (the comparison of ddfnet's test_time.py, in one run).

Columns: Conv2d 3x3, depth-wise Conv2d 3x3, DDFPack (models.layers.ddf, when present), the compiled ddf op and the
pure-PyTorch reference; forward and forward+backward; shapes (2, 256, 200, 300) and (32, 256, S, S) for S in
112, 56, 28, 14, 7 (batches divided by --batch-divisor, default 8 on CPU), and the target shape (8, 256, 56, 56) with
the ratio of ddf to the depth-wise conv measured alternately (median of per-pair ratios). On GPU: also fp16/bf16 and
the achieved memory bandwidth of the ddf forward next to the device's copy bandwidth.

Example: python scripts/benchmark_ops.py --device cpu --threads 2
"""
import argparse
import datetime
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from ops import HAS_EXT, ddf, ddf_reference

try:
    from models.layers.ddf import DDFPack
    DDFPACK_NOTE = ''
except ImportError as e:
    DDFPack = None
    DDFPACK_NOTE = f'DDFPack skipped: models.layers.ddf not importable ({e})'

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
COLUMNS = ['Conv2d 3x3', 'DW Conv2d 3x3', 'DDFPack', 'ddf op', 'reference']


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--dtypes', default=None, help='comma list of fp32,fp16,bf16 (default: fp32 CPU, all GPU)')
    parser.add_argument('--batch-divisor', type=int, default=None, help='divide batch sizes (default 8 CPU, 1 GPU)')
    parser.add_argument('--repeats', type=int, default=None, help='timed runs per cell (default 5 on CPU, 50 on GPU)')
    parser.add_argument('--pairs', type=int, default=None, help='A/B pairs (default 15 CPU, 100 GPU)')
    parser.add_argument('--reference-max-gb', type=float, default=4.0, help='skip the reference when its unfold buffer '
                        'is larger (GiB)')
    parser.add_argument('--target-only', action='store_true', help='only the (8, 256, 56, 56) ratio rows')
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is visible; use --device cpu')
    if not HAS_EXT:
        parser.error('ops._C is not built: run `pip install --no-build-isolation -e .`')
    default_dtypes = 'fp32' if args.device == 'cpu' else 'fp32,fp16,bf16'
    try:
        args.dtypes = [DTYPES[d] for d in (args.dtypes or default_dtypes).split(',')]
    except KeyError as e:
        parser.error(f'--dtypes: unknown dtype {e}; choose from {", ".join(DTYPES)}')
    cpu = args.device == 'cpu'
    args.batch_divisor = args.batch_divisor or (8 if cpu else 1)
    args.repeats = args.repeats or (5 if cpu else 50)
    args.pairs = args.pairs or (15 if cpu else 100)
    return args


def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def time_once(fn: Callable, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable, device: str, repeats: int) -> float:
    for _ in range(2 if device == 'cpu' else 10):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(repeats))


def make_cases(shape, dtype, device, args):
    """name -> (forward fn, forward+backward fn) or a string saying why the column is empty."""
    b, c, h, w = shape
    kw = dict(device=device, dtype=dtype)
    x = torch.randn(shape, **kw, requires_grad=True)
    cf = torch.randn(b, c, 3, 3, **kw).div_(3).requires_grad_()
    sf = torch.randn(b, 9, h, w, **kw).div_(3).requires_grad_()
    grad = torch.randn(shape, **kw)

    def module_case(module):
        module = module.to(**kw)
        return (lambda: module(x), lambda: module(x).backward(grad))

    def op_case(op):
        return (lambda: op(x, cf, sf, 3, 1, 1, 1, 'mul'), lambda: op(x, cf, sf, 3, 1, 1, 1, 'mul').backward(grad))

    cases = {
        'Conv2d 3x3': module_case(nn.Conv2d(c, c, 3, padding=1, bias=False)),
        'DW Conv2d 3x3': module_case(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)),
        'ddf op': op_case(ddf),
    }
    if DDFPack is None:
        cases['DDFPack'] = 'n/a'
    else:
        cases['DDFPack'] = module_case(DDFPack(c, kernel_size=3, stride=1, kernel_combine='mul'))
    unfold_gb = x.numel() * 9 * x.element_size() / 2 ** 30
    if unfold_gb > args.reference_max_gb:
        cases['reference'] = 'skip'
    else:
        cases['reference'] = op_case(ddf_reference)
    return cases


def ab_ratio(fn_a: Callable, fn_b: Callable, device: str, pairs: int) -> tuple:
    """Median over alternated runs of time(a) / time(b), and the median times."""
    for _ in range(2):
        fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(pairs):
        ta.append(time_once(fn_a, device))
        tb.append(time_once(fn_b, device))
    return statistics.median(a / b for a, b in zip(ta, tb)), statistics.median(ta), statistics.median(tb)


def copy_bandwidth(device: str) -> Optional[float]:
    if device != 'cuda':
        return None
    src = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, 50)
    return 2 * src.numel() / t / 1e9


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        return f'{names[0]} ({len(names)} logical CPUs visible)'
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def fmt_ms(t) -> str:
    return t if isinstance(t, str) else f'{t * 1e3:.2f}'


def main():
    args = parse_args()
    device = args.device
    if device == 'cpu':
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    div = args.batch_divisor
    shapes = [] if args.target_only else [(max(1, 2 // div), 256, 200, 300)] + [
        (max(1, 32 // div), 256, s, s) for s in (112, 56, 28, 14, 7)]
    if device == 'cpu':
        machine = f'{cpu_name()}, {torch.get_num_threads()} threads'
    else:
        machine = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f'# ddf benchmark: {machine}, torch {torch.__version__}, {now:%Y-%m-%d %H:%M} UTC')
    print(f'# command: {" ".join(sys.argv)}')
    print(f'# times in ms (median of {args.repeats}); k=3, mul, both filters, head 1; batches divided by {div}')
    if DDFPACK_NOTE:
        print(f'# {DDFPACK_NOTE}')
    bw = copy_bandwidth(device)
    if bw:
        print(f'# device copy bandwidth: {bw:.0f} GB/s')
    header = ['shape', 'dtype', 'pass'] + COLUMNS + ['ddf / DW']
    if bw:
        header += ['ddf GB/s (% copy)']
    if shapes:
        print('| ' + ' | '.join(header) + ' |')
        print('|' + '---|' * len(header))
    for dtype in args.dtypes:
        dname = next(k for k, v in DTYPES.items() if v == dtype)
        for shape in shapes:
            cases = make_cases(shape, dtype, device, args)
            for pass_idx, pass_name in enumerate(('fwd', 'fwd+bwd')):
                times = {}
                for name in COLUMNS:
                    case = cases[name]
                    if isinstance(case, str):
                        times[name] = case
                        continue
                    if pass_idx == 0:
                        with torch.no_grad():
                            times[name] = median_time(case[0], device, args.repeats)
                    else:
                        times[name] = median_time(case[1], device, args.repeats)
                row = [str(tuple(shape)), dname, pass_name] + [fmt_ms(times[n]) for n in COLUMNS]
                row.append(f"{times['ddf op'] / times['DW Conv2d 3x3']:.2f}x")
                if bw:
                    if pass_idx == 0:
                        b, c, h, w = shape
                        moved = (2 * b * c * h * w + b * 9 * h * w + b * c * 9) * torch.finfo(dtype).bits // 8
                        gbs = moved / times['ddf op'] / 1e9
                        row.append(f'{gbs:.0f} ({100 * gbs / bw:.0f}%)')
                    else:
                        row.append('')
                print('| ' + ' | '.join(row) + ' |', flush=True)
            del cases
    # the target: ddf vs depth-wise conv at (8, 256, 56, 56), alternated A/B, median of per-pair ratios
    target = (8, 256, 56, 56)
    for dtype in args.dtypes if device == 'cuda' else [torch.float32]:
        cases = make_cases(target, dtype, device, args)
        dname = next(k for k, v in DTYPES.items() if v == dtype)
        with torch.no_grad():
            r_fwd, t_ddf, t_dw = ab_ratio(cases['ddf op'][0], cases['DW Conv2d 3x3'][0], device, args.pairs)
        print(f'# target {target} {dname} fwd: ddf {t_ddf * 1e3:.2f} ms, DW conv {t_dw * 1e3:.2f} ms, '
              f'median per-pair ratio {r_fwd:.2f}x ({args.pairs} pairs)')
        r_bwd, t_ddf, t_dw = ab_ratio(cases['ddf op'][1], cases['DW Conv2d 3x3'][1], device, args.pairs)
        print(f'# target {target} {dname} fwd+bwd: ddf {t_ddf * 1e3:.2f} ms, DW conv {t_dw * 1e3:.2f} ms, '
              f'median per-pair ratio {r_bwd:.2f}x ({args.pairs} pairs)')


if __name__ == '__main__':
    main()
