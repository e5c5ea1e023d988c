""" The CUDA kernels and launchers of ops/csrc/cuda, run on the CPU by the emulation in tests/cuda_emu (no GPU needed),
against ops.ddf_reference in float64: every kernel size 1..13, dilation up to 8, stride, heads, both combinations,
absent filters, every output_mask, planes larger than a block, the four dtypes (tolerance: half an ulp of the output
plus the worst-case error of the sum in the accumulation type), and a random order of blocks and threads. Then the
emulation itself: warp collectives against their CUDA definitions, and misuse that must raise.

With a GPU the same kernel checks also run on the real CUDA kernels (backend 'cuda'). The first run builds the
emulated kernels into build/cuda_emu (about 20 s on 2 cores); later runs reuse the build.
"""
import itertools
from typing import Callable, NamedTuple

import pytest
import torch

from ops import HAS_EXT, ddf_reference
from tests.cuda_emu import EmulationError, build, transform

ALL_MASKS = list(itertools.product([False, True], repeat=3))
FILTERS = {'both': (True, True), 'channel': (True, False), 'spatial': (False, True), 'none': (False, False)}
# (precision in bits, smallest normal exponent) of each dtype
FORMATS = {torch.float64: (53, -1022), torch.float32: (24, -126), torch.float16: (11, -14), torch.bfloat16: (8, -126)}
SEED = '20240917'


class Kernels(NamedTuple):
    forward: Callable
    backward: Callable
    device: str


@pytest.fixture(scope='module')
def emulated() -> Kernels:
    ops = build()
    return Kernels(ops.ddf_forward, ops.ddf_backward, 'cpu')


@pytest.fixture(params=[
    'emulated',
    'emulated_shuffled',
    pytest.param('cuda', marks=pytest.mark.skipif(
        not (HAS_EXT and torch.cuda.is_available()), reason='needs a CUDA device and ops._C')),
])
def kernels(request, monkeypatch) -> Kernels:
    """The CUDA launchers: emulated on the CPU (blocks and threads in order, or shuffled with a fixed seed), and the
    real ones when a GPU is present."""
    if request.param == 'cuda':
        return Kernels(torch.ops.dynconv.ddf_forward.default, torch.ops.dynconv.ddf_backward.default, 'cuda')
    if request.param == 'emulated_shuffled':
        monkeypatch.setenv('CUDA_EMU_SEED', SEED)
    return request.getfixturevalue('emulated')


def make_inputs(shape, k, stride, head, has_cf, has_sf, dtype, seed=0):
    """x, channel filter, spatial filter, grad_output in dtype (random normal, rounded)."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dtype)

    x = rand(b, c, h, w)
    cf = rand(b, c, k, k) if has_cf else None
    sf = rand(b, head * k * k, h // stride, w // stride) if has_sf else None
    return x, cf, sf, rand(b, c, h // stride, w // stride)


def reference(x, cf, sf, go, args):
    """ddf_reference in float64 on the same values: output and the three gradients (None for an absent filter)."""
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, cf, sf)]
    out = ddf_reference(*leaves, *args)
    given = [t for t in leaves if t is not None]
    if out.requires_grad:
        grads = iter(torch.autograd.grad(out, given, go.double(), allow_unused=True))
    else:  # 'add' without filters: the output is constant zero
        grads = iter([None] * len(given))
    full = [next(grads) if t is not None else None for t in leaves]
    full = [torch.zeros_like(t) if g is None and t is not None else g for g, t in zip(full, leaves)]
    return out.detach(), full


def assert_rounded(actual, ref, abs_sum, terms, dtype, what):
    """|actual - ref| <= half an ulp of the output in dtype + (terms + 2) * u * abs_sum: the rounding of the output,
    and the worst-case errors of a sum of `terms` products in the kernel's accumulation type (fp64 for fp64, fp32
    otherwise) and in the float64 reference; u is the sum of their unit roundoffs, abs_sum the sum of the terms'
    magnitudes. NaN fails."""
    bits, emin = FORMATS[dtype]
    u = (2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24) + 2.0 ** -53
    a = actual.detach().cpu().double()
    assert a.shape == ref.shape, f'{what}: shape {tuple(a.shape)} != {tuple(ref.shape)}'
    mag = torch.maximum(a.abs(), ref.abs())
    exponent = torch.frexp(mag).exponent.where(mag > 0, emin + 1)  # mag = m * 2**exponent, 0.5 <= m < 1
    ulp = torch.ldexp(torch.ones_like(mag), (exponent - 1).clamp(min=emin) - (bits - 1))
    tol = 0.5 * ulp + (terms + 2) * u * abs_sum
    err = (a - ref).abs()
    bad = ~(err <= tol)
    if bad.any():
        worst = torch.argmax(torch.where(bad, (err / tol).nan_to_num(float('inf')), 0).flatten()).item()
        raise AssertionError(
            f'{what} ({dtype}): {int(bad.sum())} of {a.numel()} elements off; worst at flat index {worst}: '
            f'{a.flatten()[worst].item()!r} vs {ref.flatten()[worst].item()!r} (tolerance {tol.flatten()[worst]:.3g})')


def check(kernels, shape, k, dilation, stride, head, combine, dtype=torch.float64, filters='both', masks=None):
    """Emulated (or real) CUDA forward and backward against the float64 reference, for each output_mask."""
    args = (k, dilation, stride, head, combine)
    has_cf, has_sf = FILTERS[filters]
    inputs = make_inputs(shape, k, stride, head, has_cf, has_sf, dtype)
    out_ref, grads_ref = reference(*inputs, args)
    out_abs, grads_abs = reference(*[t.abs() if t is not None else None for t in inputs], args)
    b, c, h, w = shape
    terms = [k * k, k * k, (h // stride) * (w // stride), c // head]  # longest sum behind each output
    x, cf, sf, go = [t.to(kernels.device) if t is not None else None for t in inputs]
    label = f'k={k} d={dilation} s={stride} head={head} {combine} filters={filters}'
    assert_rounded(kernels.forward(x, cf, sf, *args), out_ref, out_abs, terms[0], dtype, f'output, {label}')
    for mask in masks or [(True, True, True)]:
        grads = kernels.backward(go, x, cf, sf, *args, list(mask))
        for name, want, given, g, r, r_abs, m in zip(
                ('grad_x', 'grad_cf', 'grad_sf'), mask, (x, cf, sf), grads, grads_ref, grads_abs, terms[1:]):
            if want and given is not None:
                assert g.dtype == dtype
                assert_rounded(g, r, r_abs, m, dtype, f'{name}, {label}, mask={mask}')
            else:
                assert g.numel() == 0, f'{name} not asked for, {label}, mask={mask}'


@pytest.mark.parametrize('combine', ['mul', 'add'])
@pytest.mark.parametrize('dilation,stride,head', [(1, 1, 1), (2, 2, 2), (8, 1, 4), (3, 3, 1)])
@pytest.mark.parametrize('k', [1, 3, 5, 7, 9, 11, 13])  # 1, 3, 5, 7: specialised filter-gradient kernels
def test_kernel_sizes(kernels, k, dilation, stride, head, combine):
    check(kernels, (2, 3 * head, 13, 11), k, dilation, stride, head, combine)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('combine', ['mul', 'add'])
@pytest.mark.parametrize('k', [3, 9])
def test_dtypes(kernels, dtype, combine, k):
    check(kernels, (2, 6, 12, 9), k, 2, 1, 2, combine, dtype)


@pytest.mark.parametrize('filters', list(FILTERS))
@pytest.mark.parametrize('combine', ['mul', 'add'])
@pytest.mark.parametrize('k', [3, 11])
def test_absent_filters_and_output_masks(kernels, filters, combine, k):
    check(kernels, (1, 4, 9, 7), k, 1, 2, 2, combine, filters=filters, masks=ALL_MASKS)


# more output pixels than a block has threads (256): the block-wide loops run more than once
@pytest.mark.parametrize('k,dilation,stride', [(3, 1, 1), (7, 2, 1), (9, 1, 1), (5, 3, 2)])
def test_planes_larger_than_a_block(kernels, k, dilation, stride):
    check(kernels, (1, 2, 23, 19), k, dilation, stride, 1, 'mul', torch.float32)


# involution (RedNet): spatial filters only, one head per 16 channels, k 7 in the bottlenecks at stride 1 and 2, k 3
# in the stem; the gradients autograd asks for (x and the spatial filter)
@pytest.mark.parametrize('k,stride,dtype', [
    (7, 1, torch.float64), (7, 2, torch.float64), (3, 1, torch.float64), (7, 2, torch.float32), (7, 2, torch.float16),
], ids=str)
def test_involution_shapes(kernels, k, stride, dtype):
    check(kernels, (2, 32, 14, 10), k, 1, stride, 2, 'mul', dtype, filters='spatial', masks=[(True, False, True)])


def test_any_odd_kernel_size(kernels):
    for k in (15, 21):
        check(kernels, (1, 2, 6, 5), k, 1, 1, 1, 'mul')


@pytest.mark.parametrize('k', [3, 9])
def test_random_order_of_blocks_and_threads(emulated, monkeypatch, k):
    """The kernels do not depend on the order blocks and threads run in: same bits as in the default order."""
    args = (k, 2, 1, 2, 'mul')
    x, cf, sf, go = make_inputs((2, 4, 17, 16), k, 1, 2, True, True, torch.float32)
    expected = (emulated.forward(x, cf, sf, *args), *emulated.backward(go, x, cf, sf, *args, [True, True, True]))
    monkeypatch.setenv('CUDA_EMU_SEED', SEED)
    shuffled = (emulated.forward(x, cf, sf, *args), *emulated.backward(go, x, cf, sf, *args, [True, True, True]))
    for a, e in zip(shuffled, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def _error(fn, *args):
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    return str(info.value).splitlines()[0]


@pytest.mark.skipif(not HAS_EXT, reason='ops._C is not built')
def test_invalid_arguments_give_the_cpu_messages(emulated):
    x, cf, sf, go = make_inputs((2, 4, 7, 9), 3, 2, 2, True, True, torch.float32)
    cpu = torch.ops.dynconv
    cases = [
        (x, cf, sf, 2, 1, 1, 1, 'mul'), (x, None, None, 0, 1, 1, 1, 'mul'), (x, None, None, 3, 0, 1, 1, 'mul'),
        (x, None, None, 3, 1, 0, 1, 'mul'), (x, None, None, 3, 1, 1, 0, 'mul'), (x, None, None, 3, 1, 1, 3, 'mul'),
        (x, cf, sf, 3, 1, 2, 2, 'sum'), (x, torch.zeros(2, 4, 5, 5), sf, 3, 1, 2, 2, 'mul'),
        (x, cf, torch.zeros(2, 18, 7, 9), 3, 1, 2, 2, 'mul'), (x, cf, sf.double(), 3, 1, 2, 2, 'mul'),
        (x[0], cf, sf, 3, 1, 2, 2, 'mul'), (x.long(), None, None, 3, 1, 1, 1, 'mul'),
    ]
    for args in cases:
        assert _error(emulated.forward, *args) == _error(cpu.ddf_forward, *args)
        assert _error(emulated.backward, go, *args, [True] * 3) == _error(cpu.ddf_backward, go, *args, [True] * 3)
    bad_go = (go[:, :, :2], x, cf, sf, 3, 1, 2, 2, 'mul', [True] * 3)
    assert 'grad_output must have shape' in _error(emulated.backward, *bad_go)
    assert _error(emulated.backward, *bad_go) == _error(cpu.ddf_backward, *bad_go)


# The emulation itself

def _lane_op(values, width, op):
    """Reference of one shuffle for a warp of 32 values: CUDA's definitions (out-of-segment sources read their own)."""
    out = []
    for lane, v in enumerate(values):
        base = lane - lane % width
        src = {'shfl': base + 3 % width, 'up': lane - 1 if lane - 1 >= base else lane,
               'down': lane + 1 if lane + 1 < base + width else lane,
               'xor': lane ^ 1 if (lane ^ 1) < base + width else lane}[op]
        out.append(values[src])
    return out


@pytest.mark.parametrize('width', [32, 8])
def test_warp_collectives_follow_cuda(emulated, width):
    values = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(width), dtype=torch.int32)
    out = torch.ops.cuda_emu_selftest.warp_ops(values, width)
    for warp in range(2):
        v = values[warp * 32:(warp + 1) * 32].tolist()
        o = out[warp * 32:(warp + 1) * 32]
        for column, op in enumerate(['shfl', 'up', 'down', 'xor']):
            assert o[:, column].tolist() == _lane_op(v, width, op), op
        ballot = sum(1 << lane for lane in range(32) if v[lane] % 3 == 0)
        assert o[:, 4].tolist() == [ballot - (1 << 32) if ballot >= 1 << 31 else ballot] * 32
        assert o[:, 5].tolist() == [int(5 in v)] * 32
        assert o[:, 6].tolist() == [int(all(e < 40 for e in v))] * 32


@pytest.mark.parametrize('threads', [32, 96, 1024])
def test_block_reduction(emulated, monkeypatch, threads):
    x = torch.randn(2500, dtype=torch.float64, generator=torch.Generator().manual_seed(threads))
    expected = torch.nn.functional.pad(x, (0, -x.numel() % threads)).view(-1, threads).sum(1)
    torch.testing.assert_close(torch.ops.cuda_emu_selftest.block_sum(x, threads), expected)
    monkeypatch.setenv('CUDA_EMU_SEED', SEED)
    torch.testing.assert_close(torch.ops.cuda_emu_selftest.block_sum(x, threads), expected)


def order(blocks, threads):
    """Rank of each thread of the grid in the order they ran (atomicAdd), and the first one (atomicCAS)."""
    out = torch.ops.cuda_emu_selftest.order(blocks, threads).tolist()
    return out[:-1], out[-1]


def test_execution_order(emulated, monkeypatch):
    """Default: blocks in order, threads in order; CUDA_EMU_SEED: another order, the same for the same seed."""
    assert order(3, 64) == (list(range(192)), 0)
    monkeypatch.setenv('CUDA_EMU_SEED', SEED)
    ranks, first = order(3, 64)
    assert sorted(ranks) == list(range(192)) and ranks != list(range(192))
    assert ranks[first] == 0
    assert [min(ranks[b * 64:(b + 1) * 64]) for b in range(3)] != [0, 64, 128]  # the blocks' order too
    assert order(3, 64) == (ranks, first)
    monkeypatch.setenv('CUDA_EMU_SEED', str(int(SEED) + 1))
    assert order(3, 64)[0] != ranks


def test_shared_memory_starts_as_nan(emulated):
    assert torch.ops.cuda_emu_selftest.unwritten_shared().isnan().all()


@pytest.mark.parametrize('misuse,message', [
    ('barrier_in_branch', r'__syncthreads at tests/cuda_emu/selftest.cu:\d+ is never reached by thread \(16, 0, 0\)'),
    ('barrier_after_exit', r'never reached by thread \(7, 0, 0\), which has exited'),
    ('different_barriers', r'threads wait at different __syncthreads'),
    ('divergent_shuffle', r'__shfl_down_sync at tests/cuda_emu/selftest.cu:\d+ with mask 0xffffffff names lane 0'),
    ('shuffle_then_barrier', r'divergent warp: lane 3 reaches __syncthreads .* wait for it at __shfl_down_sync'),
    ('partial_warp_shuffle', r'names lanes that do not exist: warp 1 of this block of 48 threads has 16 lanes'),
    ('mask_without_caller', r'mask 0x2 does not name the calling lane 0'),
    ('read_outside_mask', r'lane 15 reads lane 16, which is not in the mask 0xffff'),
    ('too_much_shared', r'static shared memory to 49160 bytes, over the 48 KiB limit'),
    ('block_too_large', r'CUDA error: invalid configuration argument \(launch checked at tests/cuda_emu/selftest.cu'),
    ('empty_grid', r'CUDA error: invalid configuration argument'),
    ('dynamic_shared', r'dynamic shared memory is not emulated'),
])
def test_misuse_raises(emulated, misuse, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.cuda_emu_selftest.misuse(misuse)
    # the emulation is still usable afterwards
    assert order(1, 32) == (list(range(32)), 0)


@pytest.mark.parametrize('source,what', [
    ('extern __shared__ float tile[];', 'dynamic shared memory'),
    ('asm volatile("membar.gl;");', 'inline PTX'),
    ('#include <cub/cub.cuh>', 'cub'),
    ('__half h = __float2half(1.f);', '__half intrinsics'),
    ('__constant__ float table[4];', '__constant__'),
    ('__shared__ float a[4], b[4];', '__shared__ declaration of a form'),
])
def test_unsupported_constructs_fail_the_build(source, what):
    with pytest.raises(EmulationError, match=f'k.cu:2: {what}'):
        transform(f'// line 1\n{source}\n', 'k.cu')


def test_transform_keeps_lines():
    source = (
        '__global__ void k(float* out) {\n  __shared__ float tile[2][32];\n  out[0] = tile[0][0];\n}\n'
        'void run(float* p) {\n  k<<<dim3(2, 1), 64, 0, stream>>>(p);  // launch <<<\n}\n')
    out = transform(source, 'ops/csrc/cuda/k.cu')
    assert out.splitlines()[0] == '#line 1 "ops/csrc/cuda/k.cu"'
    lines = out.splitlines()[1:]
    assert len(lines) == len(source.splitlines())
    assert lines[1] == '  auto& tile = ::cuda_emu::shared<float[2][32]>(__COUNTER__);'
    assert lines[5] == '  ::cuda_emu::launch(k, dim3(2, 1), 64, 0, stream)(p);  // launch <<<'
