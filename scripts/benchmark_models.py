#!/usr/bin/env python3
"""Inference and training speed and peak memory of each dynamic family beside its static baseline, in one run.

Pairs (dynamic model, static baseline of the same depth): DDF-ResNet50 and OD-ResNet50 vs ResNet-50,
OD-MobileNetV2 vs MobileNetV2, G-ResNeXt50 vs ResNeXt-50 32x4d, dynamic DWNet-T vs the static DWNet-T. Every model
runs in the same process under the same settings, so the ratios are comparable even on a busy machine.

Inference: eval mode, `torch.inference_mode`, img/s over timed batches after warm-up. Training: one SGD step
(forward, cross-entropy, backward, optimizer step) per batch. Peak memory: on CUDA `torch.cuda.max_memory_allocated`
per phase; on CPU the peak process RSS sampled during the phase minus the RSS before the model was built (so it
includes the weights and the optimizer state).

Usage:
    python scripts/benchmark_models.py --output benchmarks/models.md
    python scripts/benchmark_models.py --device cuda --amp --channels-last -b 64 --families odconv,ddf
"""
import argparse
import ctypes
import datetime
import gc
import logging
import os
import platform
import shlex
import sys
import threading
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List, Optional

import timm
import torch
from timm.utils import ParseKwargs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402,F401  (registers the project's models)

__all__ = ['PAIRS', 'benchmark_model', 'run_benchmarks', 'to_markdown']

_logger = logging.getLogger(__name__)

# family -> (static baseline, [(dynamic model, kwargs), ...])
PAIRS = {
    'ddf': ('resnet50', [('ddf_mul_resnet50', {})]),
    'odconv': ('resnet50', [('od_resnet50', {'kernel_num': 1}), ('od_resnet50', {'kernel_num': 4})]),
    'odconv_mbv2': ('mobilenetv2_100', [('od_mobilenetv2_100', {'kernel_num': 1}),
                                        ('od_mobilenetv2_100', {'kernel_num': 4})]),
    'dgconv': ('resnext50_32x4d', [('g_resnext50', {})]),
    'dwnet': ('dwnet_tiny_patch4_window7_224', [('dynamic_dwnet_tiny_patch4_window7_224', {}),
                                                ('i_dynamic_dwnet_tiny_patch4_window7_224', {})]),
}


class _RssPeak:
    """Peak resident memory of this process while the context is open (sampled every millisecond; Linux)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf('SC_PAGE_SIZE')

    def rss(self) -> int:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _release_memory():
    """Return freed heap memory to the OS so that RSS baselines do not hide the next model's allocations."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS baselines are just less tight
        pass


def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed(step, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of `step` (mean over `iters` after `warmup` calls)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _phase(step, device: torch.device, warmup: int, iters: int, rss_base: int):
    """(seconds per step, peak memory in bytes) of one phase."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        seconds = _timed(step, device, warmup, iters)
        return seconds, torch.cuda.max_memory_allocated(device)
    _release_memory()
    with _RssPeak() as rss:
        seconds = _timed(step, device, warmup, iters)
    return seconds, rss.peak - rss_base


def benchmark_model(
        name: str,
        kwargs: Dict[str, Any],
        device: torch.device,
        batch_size: int,
        img_size: int,
        warmup: int,
        iters: int,
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        train: bool = True,
) -> Dict[str, Any]:
    """Inference and training img/s and peak memory of one model at batch_size x 3 x img_size x img_size."""
    _release_memory()
    rss_base = _RssPeak().rss() if device.type == 'cpu' else 0
    model = timm.create_model(name, **kwargs).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, model.num_classes, (batch_size,), device=device)
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else nullcontext

    model.eval()

    def infer():
        with torch.inference_mode(), autocast():
            model(x)

    result = dict(model=name, kwargs=kwargs, params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    seconds, peak = _phase(infer, device, warmup, iters, rss_base)
    result.update(infer_img_s=batch_size / seconds, infer_peak_mb=peak / 2 ** 20)
    if train:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        criterion = torch.nn.CrossEntropyLoss()

        def train_step():
            with autocast():
                loss = criterion(model(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds, peak = _phase(train_step, device, warmup, iters, rss_base)
        result.update(train_img_s=batch_size / seconds, train_peak_mb=peak / 2 ** 20)
    del model
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return result


def run_benchmarks(args: argparse.Namespace) -> List[Dict[str, Any]]:
    device = torch.device(args.device)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    rows = []
    for family in args.families.split(','):
        baseline, dynamic = PAIRS[family]
        for kind, (name, kwargs) in [('baseline', (baseline, {}))] + [('dynamic', d) for d in dynamic]:
            if not timm.is_model(name):
                _logger.warning(f'{name} is not registered; skipped')
                continue
            _logger.info(f'{family}: {name} {kwargs}')
            row = benchmark_model(
                name, {**kwargs, **args.model_kwargs}, device, args.batch_size, args.img_size, args.warmup,
                args.iters, amp_dtype=amp_dtype, channels_last=args.channels_last, train=not args.no_train)
            row.update(family=family, kind=kind, baseline=baseline)
            rows.append(row)
            _logger.info(
                f'  infer {row["infer_img_s"]:.1f} img/s' +
                (f', train {row["train_img_s"]:.1f} img/s' if 'train_img_s' in row else ''))
    for row in rows:
        base = next(r for r in rows if r['family'] == row['family'] and r['kind'] == 'baseline')
        for key in ('infer_img_s', 'train_img_s'):
            if key in row:
                row[key + '_ratio'] = row[key] / base[key]
    return rows


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    text = f'{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads'
    if device.type == 'cuda':
        text += f'; GPU {torch.cuda.get_device_name(device)}'
    return f'{text}; torch {torch.__version__}, timm {timm.__version__}'


def to_markdown(rows: List[Dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    device = torch.device(args.device)
    precision = f'autocast {args.amp_dtype}' if args.amp else 'float32'
    memory = 'max allocated' if device.type == 'cuda' else 'peak RSS above the pre-model baseline'
    lines = [
        f'### {args.device.upper()}, batch {args.batch_size}, {args.img_size}x{args.img_size}, {precision}'
        f'{", channels_last" if args.channels_last else ""}',
        '',
        f'- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC',
        f'- Machine: {machine_description(device)}',
        f'- Command: `{command}`',
        f'- {args.warmup} warm-up + {args.iters} timed batches per phase; memory = {memory}.',
        '',
        '| family | model | kwargs | params (M) | infer img/s | vs baseline | train img/s | vs baseline '
        '| infer peak MB | train peak MB |',
        '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for r in rows:
        kwargs = ' '.join(f'{k}={v}' for k, v in r['kwargs'].items())
        name = f'`{r["model"]}`' + (' (baseline)' if r['kind'] == 'baseline' else '')
        train = (f'{r["train_img_s"]:.1f} | {r["train_img_s_ratio"]:.2f}x' if 'train_img_s' in r else '- | -')
        train_mb = f'{r["train_peak_mb"]:.0f}' if 'train_peak_mb' in r else '-'
        lines.append(
            f'| {r["family"]} | {name} | {kwargs} | {r["params_m"]:.2f} | {r["infer_img_s"]:.1f} | '
            f'{r["infer_img_s_ratio"]:.2f}x | {train} | {r["infer_peak_mb"]:.0f} | {train_mb} |')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description='Dynamic models vs their static baselines: img/s and peak memory')
    parser.add_argument('--families', default=','.join(PAIRS), help=f'comma list of {", ".join(PAIRS)}')
    parser.add_argument('--device', default='cuda' if cuda else 'cpu', help='torch device')
    parser.add_argument('-b', '--batch-size', type=int, default=64 if cuda else 8, help='batch size')
    parser.add_argument('--img-size', type=int, default=224, help='square input size')
    parser.add_argument('--warmup', type=int, default=10 if cuda else 2, help='untimed batches per phase')
    parser.add_argument('--iters', type=int, default=50 if cuda else 5, help='timed batches per phase')
    parser.add_argument('--amp', action='store_true', help='torch.autocast')
    parser.add_argument('--amp-dtype', default='bfloat16', choices=['float16', 'bfloat16'], help='autocast dtype')
    parser.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    parser.add_argument('--no-train', action='store_true', help='inference only')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='key=value arguments added to every model (e.g. num_classes=10)')
    parser.add_argument('--output', default='', help='append the markdown section to this file')
    args = parser.parse_args(argv)
    unknown = [f for f in args.families.split(',') if f not in PAIRS]
    if unknown:
        parser.error(f'unknown families {unknown}: choose from {", ".join(PAIRS)}')
    if args.device.startswith('cuda') and not cuda:
        parser.error('--device cuda: CUDA is not available on this machine; use --device cpu')
    if args.amp and args.amp_dtype == 'float16' and not args.device.startswith('cuda'):
        parser.error('--amp-dtype float16 is for CUDA; use bfloat16 on CPU')
    for flag in ('batch_size', 'img_size', 'iters'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be at least 1')
    words = ['scripts/benchmark_models.py', *(sys.argv[1:] if argv is None else argv)]
    command = 'python ' + ' '.join(shlex.quote(w) for w in words)
    table = to_markdown(run_benchmarks(args), args, command)
    print(table)
    if args.output:
        with open(args.output, 'a') as f:
            f.write('\n' + table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
