#!/usr/bin/env python3
"""Inference and training speed and peak memory of each dynamic family beside its static baseline, in one run.

Pairs (dynamic model, static baseline of the same depth): DDF-ResNet50 and OD-ResNet50 vs ResNet-50,
OD-MobileNetV2 vs MobileNetV2, G-ResNeXt50 vs ResNeXt-50 32x4d, dynamic DWNet-T vs the static DWNet-T. Every model
runs in the same process under the same settings, so the ratios are comparable even on a busy machine.

Inference: eval mode, `torch.inference_mode`, img/s over timed batches after warm-up. Training: one SGD step
(forward, cross-entropy, backward, optimizer step) per batch. Peak memory: on CUDA `torch.cuda.max_memory_allocated`
per phase; on CPU the peak process RSS sampled during the phase minus the RSS before the model was built (so it
includes the weights and the optimizer state).

`--torchcompile [BACKEND]` (timm's option, with `--torchcompile-mode`) runs every model a second time under
`torch.compile` in the same process: a compiled row follows each eager one, its ratios are against the compiled
baseline and against the same model in eager mode, and its first call of each phase (the compilation) is timed
apart from the warm-up and the timed batches.

`--reparameterize` also runs every dynamic model in its deployment form (`timm.utils.reparameterize_model`, in the
same process, inference only: a fused model is eval-only): a fused row follows each unfused one. Its "vs unfused" is
measured apart, robust to a busy machine: both forms resident, timed in `--rounds` interleaved rounds (alternating
which goes first) of `--iters` batches each, the median over the rounds of the unfused/fused time ratio (the same
mode, eager or compiled).

Usage:
    python scripts/benchmark_models.py --output benchmarks/models.md
    python scripts/benchmark_models.py --device cuda --amp --channels-last -b 64 --families odconv,ddf
    python scripts/benchmark_models.py --torchcompile --families odconv,dwnet
    python scripts/benchmark_models.py --reparameterize --no-train -b 1 --families odconv,dgconv
"""
import argparse
import ctypes
import datetime
import gc
import logging
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List, Optional

import timm
import torch
from timm.utils import ParseKwargs, reparameterize_model

import models  # noqa: F401  (registers the project's models)

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
    'rednet': ('resnet50', [('rednet50', {})]),
    'rednet26': ('resnet26', [('rednet26', {})]),
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


def _side_by_side(steps, device: torch.device, warmup: int, iters: int, rounds: int) -> float:
    """Median over `rounds` of the time ratio steps[0] / steps[1], each round timing both (alternating which goes
    first) over `iters` calls."""
    for step in steps:
        for _ in range(warmup):
            step()
    ratios = []
    for r in range(rounds):
        first, second = (0, 1) if r % 2 == 0 else (1, 0)
        times = {first: _timed(steps[first], device, 0, iters)}
        times[second] = _timed(steps[second], device, 0, iters)
        ratios.append(times[0] / times[1])
    return statistics.median(ratios)


def _phase(step, device: torch.device, warmup: int, iters: int, rss_base: int, compiled: bool):
    """(seconds per step, peak memory in bytes, seconds of the first call if `compiled` else None) of one phase."""
    compile_seconds = None
    if compiled:  # the first call compiles: timed apart, not a warm-up step
        compile_seconds = _timed(step, device, 0, 1)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        seconds = _timed(step, device, warmup, iters)
        return seconds, torch.cuda.max_memory_allocated(device), compile_seconds
    _release_memory()
    with _RssPeak() as rss:
        seconds = _timed(step, device, warmup, iters)
    return seconds, rss.peak - rss_base, compile_seconds


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
        compile_args: Optional[Dict[str, Any]] = None,
        reparameterize: bool = False,
        rounds: int = 5,
) -> Dict[str, Any]:
    """Inference and training img/s and peak memory of one model at batch_size x 3 x img_size x img_size, eager or
    under `torch.compile(**compile_args)`; `reparameterize`: its deployment form, inference only, and its speed-up
    over the unfused model side by side (`_side_by_side` over `rounds`)."""
    _release_memory()
    torch._dynamo.reset()  # models of one class share `forward`'s compile cache (and its recompile limit)
    rss_base = _RssPeak().rss() if device.type == 'cpu' else 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=memory_format)
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else nullcontext

    def build():
        torch.manual_seed(0)  # the same weights in every row (a fresh G-ResNeXt's groups follow its random gates)
        return timm.create_model(name, **kwargs).to(device, memory_format=memory_format)

    def inference(module):
        model = module.eval() if compile_args is None else torch.compile(module.eval(), **compile_args)

        def infer():
            with torch.inference_mode(), autocast():
                model(x)
        return model, infer

    module = build()
    if reparameterize:
        module = reparameterize_model(module.eval(), inplace=True)
        train = False
    model, infer = inference(module)
    target = torch.randint(0, model.num_classes, (batch_size,), device=device)
    compiled = compile_args is not None
    result = dict(model=name, kwargs=kwargs, params_m=sum(p.numel() for p in module.parameters()) / 1e6,
                  compiled=compiled, fused=reparameterize)
    seconds, peak, compile_seconds = _phase(infer, device, warmup, iters, rss_base, compiled)
    result.update(infer_img_s=batch_size / seconds, infer_peak_mb=peak / 2 ** 20, infer_compile_s=compile_seconds)
    if reparameterize:  # the unfused model rebuilt (same seed, same weights) and timed beside the fused one
        result['infer_img_s_vs_unfused'] = _side_by_side(
            [inference(build())[1], infer], device, warmup, iters, rounds)
    if train:
        module.train()
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
        criterion = torch.nn.CrossEntropyLoss()

        def train_step():
            with autocast():
                loss = criterion(model(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds, peak, compile_seconds = _phase(train_step, device, warmup, iters, rss_base, compiled)
        result.update(train_img_s=batch_size / seconds, train_peak_mb=peak / 2 ** 20, train_compile_s=compile_seconds)
    del model, module
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return result


def run_benchmarks(args: argparse.Namespace) -> List[Dict[str, Any]]:
    device = torch.device(args.device)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    modes = [None]
    if args.torchcompile:
        modes.append(dict(backend=args.torchcompile, mode=args.torchcompile_mode))
    rows = []
    for family in args.families.split(','):
        baseline, dynamic = PAIRS[family]
        for kind, (name, kwargs) in [('baseline', (baseline, {}))] + [('dynamic', d) for d in dynamic]:
            if not timm.is_model(name):
                _logger.warning(f'{name} is not registered; skipped')
                continue
            for compile_args in modes:
                for fused in (False, True) if args.reparameterize and kind == 'dynamic' else (False,):
                    _logger.info(f'{family}: {name} {kwargs}' + (' fused' if fused else '') +
                                 (' compiled' if compile_args else ''))
                    row = benchmark_model(
                        name, {**kwargs, **args.model_kwargs}, device, args.batch_size, args.img_size, args.warmup,
                        args.iters, amp_dtype=amp_dtype, channels_last=args.channels_last, train=not args.no_train,
                        compile_args=compile_args, reparameterize=fused, rounds=args.rounds)
                    row.update(family=family, kind=kind, baseline=baseline)
                    rows.append(row)
                    _logger.info(
                        f'  infer {row["infer_img_s"]:.1f} img/s' +
                        (f', train {row["train_img_s"]:.1f} img/s' if 'train_img_s' in row else ''))

    for row in rows:
        base = next(r for r in rows if r['family'] == row['family'] and r['kind'] == 'baseline'
                    and r['compiled'] == row['compiled'])
        eager = next(r for r in rows if r['family'] == row['family'] and r['model'] == row['model']
                     and r['kwargs'] == row['kwargs'] and r['fused'] == row['fused'] and not r['compiled'])
        for key in ('infer_img_s', 'train_img_s'):
            if key in row:
                row[key + '_ratio'] = row[key] / base[key]
                row[key + '_vs_eager'] = row[key] / eager[key]
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
    compiled = bool(args.torchcompile)
    fused = args.reparameterize
    lines = [
        f'### {args.device.upper()}, batch {args.batch_size}, {args.img_size}x{args.img_size}, {precision}'
        f'{", channels_last" if args.channels_last else ""}'
        f'{f", eager and torch.compile ({args.torchcompile})" if compiled else ""}'
        f'{", unfused and reparameterized" if fused else ""}',
        '',
        f'- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC',
        f'- Machine: {machine_description(device)}',
        f'- Command: `{command}`',
        f'- {args.warmup} warm-up + {args.iters} timed batches per phase; memory = {memory}.',
    ]
    if compiled:
        lines.append('- Compiled rows: "vs baseline" against the compiled baseline, "vs eager" against the same model '
                     'in eager mode; "compile s" is the first call of each phase (inference / training).')
    if fused:
        lines.append(f'- Fused rows: `timm.utils.reparameterize_model` (eval mode, inference only); "vs unfused": the '
                     f'median over {args.rounds} interleaved rounds of {args.iters} batches of the unfused/fused time '
                     f'ratio, both in the same mode.')
    header = ['family', 'model', 'kwargs']
    if compiled:
        header.append('mode')
    header += ['params (M)', 'infer img/s', 'vs baseline']
    if compiled:
        header.append('vs eager')
    if fused:
        header.append('vs unfused')
    header += ['train img/s', 'vs baseline']
    if compiled:
        header += ['vs eager', 'compile s']
    header += ['infer peak MB', 'train peak MB']
    lines += ['', '| ' + ' | '.join(header) + ' |',
              '| --- | --- | --- |' + ' --- |' * compiled + ' ---: |' * (len(header) - 3 - compiled)]
    for r in rows:
        cells = [r['family'], f'`{r["model"]}`' + (' (baseline)' if r['kind'] == 'baseline' else '')
                 + (' fused' if r['fused'] else ''),
                 ' '.join(f'{k}={v}' for k, v in r['kwargs'].items())]
        if compiled:
            cells.append('compiled' if r['compiled'] else 'eager')
        cells += [f'{r["params_m"]:.2f}', f'{r["infer_img_s"]:.1f}', f'{r["infer_img_s_ratio"]:.2f}x']
        if compiled:
            cells.append(f'{r["infer_img_s_vs_eager"]:.2f}x' if r['compiled'] else '-')
        if fused:
            cells.append(f'{r["infer_img_s_vs_unfused"]:.2f}x' if r['fused'] else '-')
        trained = 'train_img_s' in r
        cells += [f'{r["train_img_s"]:.1f}' if trained else '-', f'{r["train_img_s_ratio"]:.2f}x' if trained else '-']
        if compiled:
            cells.append(f'{r["train_img_s_vs_eager"]:.2f}x' if trained and r['compiled'] else '-')
            seconds = [r[k] for k in ('infer_compile_s', 'train_compile_s') if r.get(k) is not None]
            cells.append(' / '.join(f'{t:.0f}' for t in seconds) if seconds else '-')
        cells += [f'{r["infer_peak_mb"]:.0f}', f'{r["train_peak_mb"]:.0f}' if trained else '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
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
    parser.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                        help='also run every model under torch.compile with this backend (default inductor)')
    parser.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode')
    parser.add_argument('--reparameterize', action='store_true',
                        help='also run every dynamic model reparameterized (timm.utils.reparameterize_model), '
                             'inference only')
    parser.add_argument('--rounds', type=int, default=5,
                        help='--reparameterize: interleaved rounds timing the unfused and the fused model')
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
    for flag in ('batch_size', 'img_size', 'iters', 'rounds'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be at least 1')
    if args.torchcompile and args.torchcompile not in torch.compiler.list_backends(exclude_tags=()):
        parser.error(f'--torchcompile {args.torchcompile}: unknown backend; choose from '
                     f'{", ".join(torch.compiler.list_backends())}')
    if args.torchcompile_mode and not args.torchcompile:
        parser.error('--torchcompile-mode needs --torchcompile')
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
