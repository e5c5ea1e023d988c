""" Mutation check of the emulated CUDA tests: plants one typical kernel bug at a time in a copy of ops/csrc, builds it
with the emulation and runs tests/test_cuda_emulated.py against it; every mutant must make a test fail.

    python -m tests.cuda_emu.mutants [--only NAME ...] [--jobs N]

Prints a markdown table (mutant -> caught, first failing test) and exits 1 if a mutant survives or the unmodified
sources fail. Each mutant is a full build (~15 s on 2 cores) plus the tests up to the first failure.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[2]
TEST_FILE = 'tests/test_cuda_emulated.py'
KERNELS = 'cuda/ddf_kernel.cuh'
LAUNCHERS = 'cuda/ddf.cu'


class Mutant(NamedTuple):
    name: str
    bug: str
    file: str  # relative to ops/csrc
    old: str  # must occur exactly once in the file
    new: str


MUTANTS = [
    Mutant('no_syncthreads', 'removed __syncthreads (grad_cf block reduction)', KERNELS,
           '  __syncthreads();\n', ''),
    Mutant('shuffle_offset', 'wrong warp-shuffle offset (starts at 8: half the warp never summed)', KERNELS,
           'for (int offset = 16; offset > 0; offset /= 2)', 'for (int offset = 8; offset > 0; offset /= 2)'),
    Mutant('off_by_one_bound', 'off-by-one bound (forward reads one column past the row)', KERNELS,
           'if (xx < 0 || xx >= p.width) {', 'if (xx < 0 || xx > p.width) {'),
    Mutant('no_stride_check', 'missing stride check (grad_x gathers outputs between strides)', KERNELS,
           'if (ty < 0 || ty % s != 0 || ty / s >= oh) {', 'if (ty < 0 || ty / s >= oh) {'),
    Mutant('block_not_warp_multiple', 'block size not a multiple of 32 (240 threads)', KERNELS,
           'constexpr int kThreads = 256;', 'constexpr int kThreads = 240;'),
    Mutant('half_accumulation', 'half-precision accumulation (forward sums in scalar_t)', KERNELS,
           'using acc_t = at::opmath_type<scalar_t>;\n  const int64_t k = p.kernel_size, kk = k * k, oh = '
           'p.out_height, ow = p.out_width, hw_out = oh * ow;\n  for (int64_t idx',
           'using acc_t = scalar_t;\n  const int64_t k = p.kernel_size, kk = k * k, oh = '
           'p.out_height, ow = p.out_width, hw_out = oh * ow;\n  for (int64_t idx'),
    Mutant('every_lane_writes', 'missing lane-0 guard after a warp sum (per-tap grad_cf)', KERNELS,
           '    if (lane == 0) {\n      gcf[item]', '    if (true) {\n      gcf[item]'),
    Mutant('tap_transposed', 'tap (u, v) transposed (per-tap grad_sf)', KERNELS,
           'const int64_t y = i * p.stride - p.pad + t / k * p.dilation;',
           'const int64_t y = i * p.stride - p.pad + t % k * p.dilation;'),
    Mutant('dilation_ignored', 'dilation ignored (per-tap grad_cf)', KERNELS,
           'const int64_t y = i * p.stride - p.pad + u * p.dilation, xx = j * p.stride - p.pad + v * p.dilation;',
           'const int64_t y = i * p.stride - p.pad + u, xx = j * p.stride - p.pad + v;'),
    Mutant('head_index', 'wrong head of a channel (forward: c % head)', KERNELS,
           'const int64_t c = plane % p.channels, b = plane / p.channels, g = c / p.group_channels;\n'
           '    const scalar_t* xp = x + plane * p.height * p.width;\n    const int64_t sf_base',
           'const int64_t c = plane % p.channels, b = plane / p.channels, g = c % p.head;\n'
           '    const scalar_t* xp = x + plane * p.height * p.width;\n    const int64_t sf_base'),
    Mutant('lane_stride', 'lanes stride by 64 over the pixels (per-tap grad_cf skips half)', KERNELS,
           'for (int64_t pix = lane; pix < hw_out; pix += 32)', 'for (int64_t pix = lane; pix < hw_out; pix += 64)'),
    Mutant('wrong_specialisation', 'launcher picks the k = 5 kernel for k = 7', LAUNCHERS,
           'case 7: specialised(std::integral_constant<int, 7>()); break;',
           'case 7: specialised(std::integral_constant<int, 5>()); break;'),
    Mutant('channel_tap_reversed', 'channel filter read at the mirrored tap (per-tap grad_sf)', KERNELS,
           'static_cast<acc_t>(cf[plane * kk + t])', 'static_cast<acc_t>(cf[plane * kk + kk - 1 - t])'),
]


def apply(mutant: Mutant, csrc: Path):
    path = csrc / mutant.file
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f'mutant {mutant.name}: its text occurs {count} times in ops/csrc/{mutant.file}, expected 1 '
                         '(update MUTANTS after a kernel change)')
    path.write_text(text.replace(mutant.old, mutant.new))


def run_tests(mutant: Optional[Mutant], timeout: int) -> tuple:
    """Builds ops/csrc (with the mutant applied) in a scratch folder and runs the tests; (passed, first failure)."""
    with tempfile.TemporaryDirectory(prefix='cuda_emu_mutant_') as tmp:
        csrc = Path(tmp) / 'csrc'
        shutil.copytree(ROOT / 'ops' / 'csrc', csrc)
        if mutant is not None:
            apply(mutant, csrc)
        # COLUMNS: room for the failure's message in pytest's summary line
        env = dict(os.environ, CUDA_EMU_CSRC=str(csrc), CUDA_EMU_BUILD_DIR=str(Path(tmp) / 'build'), COLUMNS='400')
        cmd = [sys.executable, '-m', 'pytest', TEST_FILE, '-x', '-q', '-p', 'no:cacheprovider']
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f'timed out after {timeout} s'
    if res.returncode == 0:
        return True, ''
    failed = re.search(r'^(?:FAILED|ERROR) \S+::(\S+)(?: - (.*))?$', res.stdout, re.M)
    if failed:
        reason = (failed.group(2) or '').replace('|', '/')
        return False, f'{failed.group(1)}: {reason[:110]}{"..." if len(reason) > 110 else ""}'
    tail = (res.stdout + res.stderr).strip().splitlines()
    return False, f'exit {res.returncode}: {tail[-1] if tail else ""}'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', nargs='+', metavar='NAME', choices=[m.name for m in MUTANTS],
                        help='run these mutants only')
    parser.add_argument('--jobs', type=int, default=1, help='mutants built and tested at the same time')
    parser.add_argument('--timeout', type=int, default=600, help='seconds per mutant')
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]

    start = time.time()
    passed, failure = run_tests(None, args.timeout)
    if not passed:
        print(f'the unmodified sources fail the tests ({failure}): fix that first', file=sys.stderr)
        return 1
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda m: run_tests(m, args.timeout), mutants))
    print('| mutant | bug planted | caught | first failing test: message |')
    print('| --- | --- | --- | --- |')
    for m, (survived, failure) in zip(mutants, results):
        print(f'| {m.name} | {m.bug} | {"no" if survived else "yes"} | {failure} |')
    caught = sum(not survived for survived, _ in results)
    print(f'\n{caught} of {len(mutants)} mutants caught ({time.time() - start:.0f} s)')
    return 0 if caught == len(mutants) else 1


if __name__ == '__main__':
    sys.exit(main())
