#!/usr/bin/env python3
"""ODConv formulation study: the released per-sample grouped convolution vs the exact rewrites, on CPU or GPU.

Two tables, each measured side by side in one process (rounds alternate between the candidates; each round's time is
divided by the baseline's time of the same round; the median of these ratios is reported, which cancels most of the
drift of a shared, noisy machine):

* `layers`: one ODConv2d of each OD-ResNet-50 shape, forward (inference) or forward+backward (training), every
  formulation vs a static nn.Conv2d of the same shape.
* `models`: od_resnet50 (and any `--models`) with the released formulation and with ODConv2d's own, vs timm's
  resnet50, inference (batch 8, 224x224) and a training step (batch 8, 160x160, SGD).

Formulations (all exact; tests/test_odconv.py checks each of ODConv2d's paths against the released one):
    released  `ODConv2d(impl='released')`, the original forward: per-sample kernels from the broadcast product of
              the attentions with all kernel_num kernels, then one conv with groups = batch; point-wise kernel_num 1
              is a plain conv.
    ours      ODConv2d's default, `impl='auto'`: the path ops/odconv.py's table picks for each call.
    traced    what torch.compile and torch.export trace, run eagerly (`impl=` the path `ops.odconv.choose_path`
              gives each call as if compiling): per-sample
              kernels (kernel_num aggregated by a matmul), channel and filter attentions on activations, the
              per-sample convolution op (groups = batch, or one conv per sample for large dense convs on CPU);
              CPU inference of dense convs with several kernels: the per-sample path as an op.
    unfold    ours, but every dense k x k conv as im2col + GEMM (`impl='unfold'`); the columns carry the spatial and
              channel attentions, so kernel_num 1 multiplies the *static* weight (one GEMM for the whole batch).
    bmm       ours, but every dense point-wise conv with several kernels as the blockwise bmm of per-sample weights
              (`impl='pointwise_bmm'`).
Options: --channels-last, --bf16 (autocast).

Example:
    python scripts/benchmark_odconv.py --table models --threads 2 --rounds 7
"""
import argparse
import contextlib
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the od_* models)
from models.layers.odconv import ODConv2d
from ops.odconv import choose_path


def _traced_impl(m: ODConv2d, args) -> None:
    """Forward pre-hook: this call runs the path 'auto' takes under torch.compile / torch.export."""
    m.impl = choose_path(args[0], m.weight, m.stride, m.padding, m.dilation, m.groups, traced=True)


def _is_dense_pointwise(m: ODConv2d) -> bool:
    return m.kernel_size == 1 and m.groups == 1 and m.padding == 0


# formulation -> the `impl` of each ODConv2d (None: set per call by `_traced_impl`).
FORMULATIONS = {
    'released': lambda m: 'released',
    'ours': lambda m: 'auto',
    'traced': None,
    'unfold': lambda m: 'unfold' if m.kernel_size > 1 and m.groups == 1 else 'auto',
    'bmm': lambda m: 'pointwise_bmm' if _is_dense_pointwise(m) and m.kernel_num > 1 else 'auto',
}


def use_formulation(model: torch.nn.Module, name: str) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, ODConv2d):
            if FORMULATIONS[name] is None:
                m.register_forward_pre_hook(_traced_impl)
            else:
                m.impl = FORMULATIONS[name](m)
    return model


def _step_fn(model, x, train: bool, bf16: bool):
    autocast = torch.autocast(x.device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    if not train:
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(x)
        return step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def step():
        with autocast:
            loss = F.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def side_by_side(steps: dict, baseline: str, rounds: int, iters: int, device) -> dict:
    """Median seconds per step and median ratio (step time / baseline step time in the same round)."""
    for step in steps.values():  # warm-up
        step()
    times = {n: [] for n in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                steps[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / iters)
    return {n: (statistics.median(t), statistics.median(a / b for a, b in zip(t, times[baseline])))
            for n, t in times.items()}


def _prep(module, x, args):
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return module.to(args.device), x.to(args.device)


def layer_table(args):
    # OD-ResNet-50 block convs at 224 (in, out, k, stride, input size), one per stage.
    shapes = [(64, 64, 1, 1, 56), (64, 64, 3, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14),
              (512, 512, 3, 1, 7), (1024, 256, 1, 1, 14), (512, 2048, 1, 1, 7)]
    print('| shape (in, out, k, size) | kernel_num | pass | static conv ms | '
          + ' | '.join(f'{f} ms (x static)' for f in args.formulations) + ' |')
    print('|' + ' --- |' * (4 + len(args.formulations)))
    for in_chs, out_chs, k, stride, size in [s for s in shapes if s[2] in args.kernel_sizes]:
        for kernel_num in args.kernel_nums:
            for train in args.passes:
                torch.manual_seed(0)
                size_ = size if not train else size * 160 // 224
                x = torch.randn(args.batch_size, in_chs, size_, size_)
                steps = {}
                static, xs = _prep(torch.nn.Conv2d(in_chs, out_chs, k, stride, k // 2, bias=False), x, args)
                steps['static'] = _layer_step(static, xs, train, args.bf16)
                for f in args.formulations:
                    od = ODConv2d(in_chs, out_chs, k, stride, k // 2, bias=False, kernel_num=kernel_num)
                    od, xo = _prep(od, x, args)
                    steps[f] = _layer_step(use_formulation(od, f), xo, train, args.bf16)
                res = side_by_side(steps, 'static', args.rounds, args.iters, torch.device(args.device))
                cells = ' | '.join(f'{res[f][0] * 1e3:.2f} ({res[f][1]:.2f})' for f in args.formulations)
                print(f'| {in_chs}, {out_chs}, {k}, {size_} | {kernel_num} | {"train" if train else "infer"} | '
                      f'{res["static"][0] * 1e3:.2f} | {cells} |', flush=True)


def _layer_step(module, x, train, bf16):
    autocast = torch.autocast(x.device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    module.train(train)
    if not train:
        def step():
            with torch.inference_mode(), autocast:
                module(x)
        return step
    x = x.clone().requires_grad_()

    def step():
        with autocast:
            out = module(x)
        out.float().sum().backward()
    return step


def model_table(args):
    print(f'| pass | batch x res | model | kernel_num | formulation | ms/step | img/s | x {args.baseline} img/s |')
    print('|' + ' --- |' * 8)
    for train in args.passes:
        res = 160 if train else 224
        x = torch.randn(args.batch_size, 3, res, res)
        steps = {}
        torch.manual_seed(0)
        base, xb = _prep(timm.create_model(args.baseline), x, args)
        steps[(args.baseline, '-', 'static')] = _step_fn(base, xb, train, args.bf16)
        for name in args.models:
            for kernel_num in args.kernel_nums:
                for f in args.formulations:
                    torch.manual_seed(0)
                    model, xm = _prep(timm.create_model(name, kernel_num=kernel_num), x, args)
                    steps[(name, kernel_num, f)] = _step_fn(use_formulation(model, f), xm, train, args.bf16)
        out = side_by_side(steps, (args.baseline, '-', 'static'), args.rounds, args.iters, torch.device(args.device))
        for (name, kernel_num, f), (sec, ratio) in out.items():
            print(f'| {"train" if train else "infer"} | {args.batch_size} x {res} | {name} | {kernel_num} | {f} | '
                  f'{sec * 1e3:.0f} | {args.batch_size / sec:.1f} | {1 / ratio:.2f} |', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--table', choices=('layers', 'models'), default='models')
    parser.add_argument('--kernel-sizes', type=int, nargs='+', default=[1, 3], help='layers table: conv sizes')
    parser.add_argument('--models', nargs='+', default=['od_resnet50'])
    parser.add_argument('--baseline', default='resnet50', help='static timm model of the models table')
    parser.add_argument('--kernel-nums', type=int, nargs='+', default=[1, 4])
    parser.add_argument('--formulations', nargs='+', choices=sorted(FORMULATIONS), default=['released', 'ours'])
    parser.add_argument('--passes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=7, help='alternating rounds (median over rounds)')
    parser.add_argument('--iters', type=int, default=1, help='steps per round and candidate')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--bf16', action='store_true', help='autocast to bfloat16')
    args = parser.parse_args()
    args.passes = [p == 'train' for p in args.passes]
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device here; use --device cpu')
    unknown = [m for m in args.models + [args.baseline] if not timm.is_model(m)]
    if unknown:
        parser.error(f'unknown model(s) {unknown}: see timm.list_models("od_*")')
    torch.set_num_threads(args.threads)
    print(f'# torch {torch.__version__}, {args.device}, {args.threads} threads, batch {args.batch_size}, '
          f'channels_last={args.channels_last}, bf16={args.bf16}, rounds={args.rounds}x{args.iters}')
    layer_table(args) if args.table == 'layers' else model_table(args)


if __name__ == '__main__':
    main()
